"""The CLI: every config parses, unknown keys fail clearly, fit/validate write the output contract."""

import json
import math
from pathlib import Path

import pytest
import torch

from kelight.cli.main import main, run

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_configs_exist_for_every_method():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    for model in ("smollm2", "gemma3"):
        for method in (
            "rome",
            "rome_sadr",
            "memit",
            "memit_sadr",
            "pmet",
            "pmet_sadr",
            "ft",
            "pathedit",
            "pathedit_sadr",
            "alphaedit",
        ):
            assert f"{model}/{method}.yaml" in names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: kelight." in printed


def test_unknown_config_key_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/smollm2/rome.yaml"), "--model.init_args.layr", "3"])
    assert exit_info.value.code != 0
    assert "layr" in capsys.readouterr().err


def _case_file(tmp_path: Path) -> Path:
    records = [
        {
            "requested_rewrite": {
                "prompt": "The Eiffel Tower is in",
                "subject": "Eiffel Tower",
                "target_new": "Rome",
                "target_true": "Paris",
            },
            "rewrite": {"prompts": ["The Eiffel Tower is in"], "targets": ["Rome"]},
            "p-paraphrase": {"prompts": ["Where is the Eiffel Tower? In"], "targets": ["Rome"]},
            "l-neighbor": {"prompts": ["The Louvre is in"], "targets": ["Paris"]},
            "generation": {"prompts": ["The Eiffel Tower is"]},
            "o-commonsense": {"prompts": "To boil water", "right": "heat it", "wrong": "freeze it"},
        },
        {
            "requested_rewrite": {
                "prompt": "Mount Fuji is in",
                "subject": "Mount Fuji",
                "target_new": "Peru",
                "target_true": "Japan",
            },
            "rewrite": {"prompts": ["Mount Fuji is in"], "targets": ["Peru"]},
            "l-relation": {"prompts": ["Mount Fuji is a"], "targets": ["volcano"]},
            "o-commonsense": {"prompts": "To dry clothes", "right": "hang them", "wrong": "wet them"},
        },
    ]
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(records))
    return path


COMMON = [
    "--model.model_name",
    "tiny:llama",
    "--model.editor.context_templates",
    "[[3, 1]]",
    "--model.editor.steps",
    "3",
    "--model.editor.mom2_n_tokens",
    "300",
    "--model.fluency",
    "false",
]


@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("rome.yaml", ["--model.editor.layer", "1"]),
        ("rome_sadr.yaml", ["--model.editor.layer", "1"]),
        ("memit.yaml", ["--model.editor.layers", "[0, 1]", "--model.regime", "batch", "--data.batch_size", "2"]),
        ("pmet_sadr.yaml", ["--model.editor.layers", "[0, 1]", "--model.regime", "sequential"]),
    ],
)
def test_fit_writes_contract_and_restores(tmp_path, config, extra):
    out = tmp_path / "run"
    cli = run(
        [
            "fit",
            "--config",
            str(ROOT / "configs/smollm2" / config),
            *COMMON,
            *extra,
            "--data.path",
            str(_case_file(tmp_path)),
            "--trainer.default_root_dir",
            str(out),
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_cases"] == 2 and metrics["seconds_per_edit"] > 0
    for key in ("ES", "ES_ci", "EM", "PS", "NS", "RS", "OS", "DOS", "Avg.S"):
        assert key in metrics
    # one case per half: the per-half values are that case's own
    assert metrics["counterfact/NS"] in (0.0, 100.0) and "counterfact/RS" not in metrics
    assert metrics["wikidata/RS"] in (0.0, 100.0) and "wikidata/PS" not in metrics
    rows = [json.loads(line) for line in (out / "cases.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1] and all("edit_seconds" in r for r in rows)
    from kelight.models.tiny import tiny_model

    fresh, _ = tiny_model("llama")  # same seed: the run must end with the unedited weights
    for (name, a), b in zip(cli.model.lm.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_validate_writes_unedited_contract(tmp_path):
    out = tmp_path / "none"
    main(
        [
            "validate",
            "--config",
            str(ROOT / "configs/smollm2/rome.yaml"),
            *COMMON,
            "--model.editor.layer",
            "1",
            "--data.path",
            str(_case_file(tmp_path)),
            "--trainer.default_root_dir",
            str(out),
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_cases"] == 2 and "seconds_per_edit" not in metrics
    from kelight.runs.report import report

    assert report([out]).splitlines()[2].startswith("| none |")


def test_console_script_exits_zero(tmp_path):
    """``sys.exit(main())`` must not turn the returned CLI object into exit status 1."""
    out = tmp_path / "none"
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(
            main(
                [
                    "validate",
                    "--config",
                    str(ROOT / "configs/smollm2/rome.yaml"),
                    *COMMON,
                    "--model.editor.layer",
                    "1",
                    "--data.path",
                    str(_case_file(tmp_path)),
                    "--trainer.default_root_dir",
                    str(out),
                ]
            )
        )
    assert exit_info.value.code is None


def test_default_run_dir_is_unique_per_wandb_agent_run(monkeypatch):
    from kelight.cli.main import default_run_dir

    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", "run7")
    assert default_run_dir() == Path("runs") / "abc123" / "run7"
    monkeypatch.delenv("WANDB_RUN_ID")
    assert default_run_dir().parent == Path("runs") and default_run_dir().name[:2] == "20"


def test_report_help_and_missing_run_are_messages_not_tracebacks(tmp_path, capsys):
    run(["report", "--help"])
    assert capsys.readouterr().out.startswith("usage: kelight report RUN_DIR")
    with pytest.raises(SystemExit, match="usage: kelight report"):
        run(["report"])
    with pytest.raises(SystemExit, match=r"kelight report: .*nope/metrics.json does not exist; run `kelight fit"):
        run(["report", str(tmp_path / "nope")])


def test_top_level_help_lists_every_subcommand(capsys):
    """LightningCLI's own help names only fit/validate/test/predict; `kelight --help` lists the tools too."""
    import re

    import kelight
    from kelight.cli.main import _FILE_TOOLS, _TOOLS

    run(["--help"])
    text = capsys.readouterr().out
    listed = re.findall(r"^  (\w+) ", text, flags=re.M)
    assert listed == ["fit", "validate", *_FILE_TOOLS, *_TOOLS]
    methods = re.search(r"methods: (.*?)\)", text, flags=re.S).group(1).replace("\n", " ")
    for name in methods.split(", "):  # the names `--model.help NAME` takes
        assert isinstance(getattr(kelight, name.strip()), type)
    with pytest.raises(SystemExit) as exit_info:
        run([])
    assert exit_info.value.code == 2 and capsys.readouterr().out.startswith("usage: kelight SUBCOMMAND")


def _fit(tmp_path: Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    run(
        [
            "fit",
            "--config",
            str(ROOT / "configs/smollm2/rome.yaml"),
            *COMMON,
            "--model.editor.layer",
            "1",
            "--model.fluency",
            "true",
            "--data.path",
            str(_case_file(tmp_path)),
            "--trainer.default_root_dir",
            str(out),
            *extra,
        ]
    )
    return out


def test_merge_of_split_runs_equals_the_whole_run(tmp_path, capsys):
    """``--data.skip`` continues a run; ``kelight merge`` of the parts reports what one run of all cases does."""
    whole = _fit(tmp_path, "whole")
    first, second = _fit(tmp_path, "first", "--data.limit", "1"), _fit(tmp_path, "second", "--data.skip", "1")
    run(["merge", str(tmp_path / "merged"), str(first), str(second)])
    assert capsys.readouterr().out.splitlines()[-1].startswith("| merged | ")
    expected = json.loads((whole / "metrics.json").read_text())
    merged = json.loads((tmp_path / "merged" / "metrics.json").read_text())
    assert set(merged) == set(expected) and "FL" in merged and "wikidata/RS" in merged
    for key, value in expected.items():
        if value is None:  # e.g. a per-source FL_ci of one case: no spread to measure, null in both
            assert merged[key] is None, key
        elif key != "seconds_per_edit":  # wall time differs run to run; float32 edits by a few ulp
            assert merged[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key

    def rows(d):
        return [
            {k: v for k, v in json.loads(line).items() if k != "edit_seconds"}
            for line in (d / "cases.jsonl").read_text().splitlines()
        ]

    from kelight.runs.merge import metrics_from_rows

    raw = [json.loads(line) for line in (whole / "cases.jsonl").read_text().splitlines()]
    recomputed = metrics_from_rows(raw)  # exact for the run's own rows: same pooling as EditMetrics
    for key, value in expected.items():  # nan (an FL_ci of one case) is null in metrics.json
        if key != "seconds_per_edit":
            got = recomputed[key]
            assert math.isnan(got) if value is None else got == pytest.approx(value, rel=1e-12), key
    assert [r.keys() for r in rows(tmp_path / "merged")] == [r.keys() for r in rows(whole)]
    assert [r["id"] for r in rows(tmp_path / "merged")] == [0, 1] and rows(whole)[0]["z_steps"] >= 1
    other = _fit(tmp_path, "other", "--data.skip", "1", "--model.editor.steps", "2")
    differ = r"kelight merge: the runs differ in model.init_args.editor.steps; only runs of one"
    with pytest.raises(SystemExit, match=differ):
        run(["merge", str(tmp_path / "bad"), str(first), str(other)])
    with pytest.raises(SystemExit, match=r"kelight merge: case ids \[0\] occur in more than one run"):
        run(["merge", str(tmp_path / "bad"), str(first), str(whole)])
    seq = [
        _fit(tmp_path, f"seq{i}", "--data.skip", str(i), "--data.limit", "1", "--model.regime", "sequential")
        for i in (0, 1)
    ]
    with pytest.raises(SystemExit, match=r"kelight merge: sequential runs of kelight.ROME edit their cases together"):
        run(["merge", str(tmp_path / "bad"), *map(str, seq)])
    with pytest.raises(SystemExit, match=r"kelight merge: the output directory .*first is one of the runs"):
        run(["merge", str(first), str(first), str(second)])
    with pytest.raises(SystemExit, match=r"usage: kelight merge OUT_DIR RUN_DIR RUN_DIR"):
        run(["merge", str(tmp_path / "bad"), str(first)])

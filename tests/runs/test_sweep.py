"""Sweep specs parse and expand into CLI calls LightningCLI accepts; the offline sweep loop."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from kelight.cli.main import main
from kelight.runs.sweep import _as_sweep_run, expand_command, load_spec, read_metric, run_sweep

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "sweeps").glob("*.yaml"))
TINY = (
    "--model.model_name",
    "tiny:llama",
    "--model.editor.context_templates",
    "[[3, 1]]",
    "--model.editor.steps",
    "3",
    "--model.editor.mom2_adjustment",
    "false",
    "--model.fluency",
    "false",
    "--data.limit",
    "1",
)


def _first_params(spec: dict) -> dict:
    import random

    from sweeps import next_run

    random.seed(0)
    np.random.seed(0)
    proposal = next_run(spec, [], validate=True)
    return {
        k: (v["value"].item() if isinstance(v["value"], np.generic) else v["value"]) for k, v in proposal.config.items()
    }


def test_the_specs_the_issue_asks_for_exist():
    methods = {p.stem: load_spec(p)["method"] for p in SPECS}
    assert methods.get("rome_sadr_gamma_grid") == "grid"
    gamma = load_spec(ROOT / "sweeps/rome_sadr_gamma_grid.yaml")["parameters"]["model.editor.sadr_gamma"]["values"]
    assert len(gamma) >= 5 and 0 in gamma
    bayes = load_spec(ROOT / "sweeps/rome_sadr_bayes.yaml")
    assert set(bayes["parameters"]) == {
        "model.editor.sadr_gamma",
        "model.editor.steps",
        "model.editor.lr",
        "model.editor.kl_factor",
    }
    assert set(load_spec(ROOT / "sweeps/pathedit_lambda_path.yaml")["parameters"]) == {
        "model.editor.contrastive_lambda",
        "model.editor.path_size",
    }


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.name)
def test_spec_expands_into_a_cli_call_lightning_accepts(spec_path, capsys):
    spec = load_spec(spec_path)
    config = spec["command"][spec["command"].index("--config") + 1]
    if not (ROOT / config).exists():
        pytest.skip(f"{config} does not exist yet (its method is being added by another change)")
    params = _first_params(spec)
    command = expand_command(spec, params)
    assert command[:3] == ["/usr/bin/env", "kelight", "fit"]
    assert all(f"--{k}={v}" in command for k, v in params.items())  # ${args}: --model.editor.sadr_gamma=0.01
    args = [str(ROOT / a) if a == config else a for a in command[2:]]  # `fit --config ... --model.x=v`
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    for key, value in params.items():  # model.editor.sadr_gamma: printed model.init_args.editor.sadr_gamma
        node = printed["model"]["init_args"]
        for part in key.removeprefix("model.").split("."):
            node = node[part]
        assert node == value, key


def test_expansion_follows_the_agent(monkeypatch):
    monkeypatch.setenv("KELIGHT_TEST_DATA", "cases.json")
    spec = {
        "program": "train.py",
        "command": [
            "${env}",
            "${interpreter}",
            "${program}",
            "--data.path",
            "${envvar:KELIGHT_TEST_DATA}",
            "${args}",
            "--tail",
        ],
    }
    command = expand_command(
        spec, {"model.editor.sadr_gamma": 0.01, "model.fluency": False}, ("--model.editor.steps", "20")
    )
    assert command == [
        "/usr/bin/env",
        "python",
        "train.py",
        "--data.path",
        "cases.json",
        "--model.editor.steps",
        "20",
        "--model.editor.sadr_gamma=0.01",
        "--model.fluency=False",
        "--tail",
    ]
    assert spec["command"][4] == "${envvar:KELIGHT_TEST_DATA}"  # the spec itself is not rewritten
    assert expand_command({"command": ["kelight", "fit"]}, {"model.editor.lr": 0.1}, ("-x",)) == [
        "kelight",
        "fit",
        "-x",
    ]


def test_metric_is_read_with_or_without_the_stage_prefix():
    assert read_metric({"Avg.S": 41.5}, "fit/Avg.S") == 41.5
    assert read_metric({"fit/Avg.S": 3.0, "Avg.S": 1.0}, "fit/Avg.S") == 3.0
    assert read_metric({"Avg.S": None}, "Avg.S") is None
    assert read_metric({"Avg.S": float("nan")}, "Avg.S") is None


def test_invalid_spec_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grid\nparameters: {model.editor.lr: {values: [0.1]}}\ncommand: '${env} kelight'\n")
    with pytest.raises(ValueError, match="block list"):
        load_spec(bad)
    bad.write_text(
        "method: nope\nmetric: {name: Avg.S}\nparameters: {model.editor.lr: {values: [0.1]}}\ncommand: [a]\n"
    )
    with pytest.raises(ValueError, match="invalid sweep spec"):
        load_spec(bad)


def test_bayes_accepts_finished_and_crashed_trials():
    from kelight.runs.sweep import Trial
    from sweeps import next_run

    spec = load_spec(ROOT / "sweeps/rome_sadr_bayes.yaml")
    trials = [Trial(i, f"r{i}", _first_params(spec), [], "", state="finished", metric=40.0 + i) for i in range(2)]
    trials.append(Trial(2, "r2", _first_params(spec), [], "", state="crashed", returncode=1))
    proposal = next_run(spec, [_as_sweep_run(t, "fit/Avg.S") for t in trials], validate=True)
    assert set(proposal.config) == set(spec["parameters"])


def test_offline_sweep_records_a_crash_and_goes_on(tmp_path, monkeypatch):
    """Two grid trials on the tiny model; layer 7 does not exist, so the second one crashes."""
    monkeypatch.chdir(ROOT)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "method": "grid",
                "metric": {"name": "fit/Avg.S", "goal": "maximize"},
                "parameters": {"model.editor.layer": {"values": [1, 7]}},
                "command": ["${env}", "kelight", "fit", "--config", "configs/smollm2/rome.yaml", "${args}"],
            }
        )
    )
    out = tmp_path / "sweep"
    summary = run_sweep(spec, count=5, out=out, extra_args=TINY)  # the grid stops after 2
    ok, crashed = summary["trials"]
    assert ok["state"] == "finished" and ok["returncode"] == 0 and ok["params"] == {"model.editor.layer": 1}
    assert ok["metric"] == ok["metrics"]["Avg.S"] and ok["metrics"]["n_cases"] == 1
    assert Path(ok["directory"], "metrics.json").exists()
    assert list(Path(ok["directory"], "wandb").glob(f"offline-run-*-{ok['run_id']}"))  # WANDB_RUN_ID honoured
    assert yaml.safe_load(Path(ok["directory"], "sweep-params.yaml").read_text())["model.editor.layer"]["value"] == 1
    assert crashed["state"] == "crashed" and crashed["returncode"] != 0
    assert "layer 7 is out of range" in crashed["stderr_tail"]
    assert json.loads((out / "summary.json").read_text())["best"]["run_id"] == ok["run_id"]
    table = (out / "summary.md").read_text()
    assert ok["run_id"] in table and f"crashed (exit {crashed['returncode']})" in table
    assert (out / "tradeoff.png").stat().st_size > 0


def test_sigterm_stops_the_running_trial_too(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    pid_file = tmp_path / "trial.pid"
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text(f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    spec = tmp_path / "sleepy.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "method": "grid",
                "metric": {"name": "Avg.S", "goal": "maximize"},
                "parameters": {"x": {"values": [1]}},
                "command": [sys.executable, str(sleeper), "${args}"],
            }
        )
    )
    sweep = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kelight.cli",
            "sweep",
            str(spec),
            "--count",
            "1",
            "--out",
            str(tmp_path / "out"),
            "--wandb-mode",
            "disabled",
        ]
    )
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and sweep.poll() is None, "the trial never started"
        time.sleep(0.2)
    trial_pid = int(pid_file.read_text())
    sweep.send_signal(signal.SIGTERM)
    assert sweep.wait(timeout=30) != 0
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the trial is gone with the sweep
        os.kill(trial_pid, 0)


def test_malformed_spec_yaml_is_named(tmp_path, monkeypatch):
    from kelight.runs import sweep

    bad = tmp_path / "bad.yaml"
    bad.write_text("method: grid\nparameters: {model.editor.lr: {values: [0.1]}\ncommand: [a]\n")  # an unclosed brace
    with pytest.raises(ValueError, match=r"bad\.yaml is not valid YAML at line \d+, column \d+ .*fix the spec"):
        load_spec(bad)
    monkeypatch.setattr(sweep, "_exit_on_sigterm", lambda: None)  # keep pytest's SIGTERM handler
    with pytest.raises(SystemExit, match=r"^kelight sweep: .*bad\.yaml is not valid YAML"):
        sweep.main([str(bad), "--count", "1", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_truncated_metrics_file_crashes_its_trial_not_the_sweep(tmp_path):
    import sys

    from kelight.runs.sweep import Trial, run_trial

    directory = tmp_path / "trial"
    writer = tmp_path / "writer.py"  # exits 0 after writing a metrics.json cut off mid-way
    writer.write_text(f"open({str(directory / 'metrics.json')!r}, 'w').write('{{\"Avg.S\": 3')\n")
    spec = {"metric": {"name": "Avg.S", "goal": "maximize"}}
    trial = run_trial(
        spec, Trial(0, "r0", {"x": 1}, [sys.executable, str(writer)], str(directory)), "sweep0", wandb_mode="disabled"
    )
    assert trial.returncode == 0 and trial.state == "crashed" and trial.metric is None and trial.metrics == {}
    assert "metrics.json is not valid JSON at line 1" in trial.stderr_tail


@pytest.mark.parametrize("code", ["raise SystemExit(143)", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"])
def test_a_trial_stopped_by_sigterm_is_recorded_as_failed(tmp_path, code):
    import sys

    from kelight.runs.sweep import Trial, _as_sweep_run, markdown_table, run_trial

    spec = {"metric": {"name": "Avg.S", "goal": "maximize"}}
    trial = run_trial(
        spec,
        Trial(0, "r0", {"x": 1}, [sys.executable, "-c", code], str(tmp_path / "trial")),
        "sweep0",
        wandb_mode="disabled",
    )
    assert trial.returncode in (143, -15) and trial.state == "failed" and trial.metric is None
    assert _as_sweep_run(trial, "Avg.S").state == "failed"
    table = markdown_table({"metric": spec["metric"], "trials": [{**trial.__dict__}]})
    assert f"failed (exit {trial.returncode})" in table

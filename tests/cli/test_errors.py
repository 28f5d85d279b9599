"""A user's mistake on the command line ends in one short message that names the problem and the fix, and exit
status 2, without a traceback (``--debug`` shows it)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kelight.cli.main import main
from tests.cli.test_main import COMMON, ROOT, _case_file

CONFIG = ["--config", str(ROOT / "configs/smollm2/rome.yaml")]


def _record_file(tmp_path: Path, **changes: object) -> Path:
    records = json.loads(_case_file(tmp_path).read_text())
    records[1]["requested_rewrite"].update(changes)
    path = tmp_path / f"bad-{'-'.join(changes)}.json"
    path.write_text(json.dumps(records))
    return path


def _bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "broken.yaml").write_text("model: [unclosed\n")
    return [
        (
            ["--model.editor.sadr_gamma", "-1"],
            r"expected sadr_gamma to be a finite number ≥ 0, got -1.0; use 0 to turn SADR",
        ),
        (
            ["--model.nosuch", "1"],
            r"--model: Option 'nosuch' is not accepted \(the options of kelight.ROME: kelight "
            r"fit --model.help kelight.ROME\)",
        ),
        (
            ["--model.steps", "3"],  # a method option at its key before 2026-12-07
            r"--model: Option 'steps' is not accepted .*; method options are under --model.editor since 2026-12-07: "
            r"use --model.editor.steps$",
        ),
        (["--model.regime", "sometimes"], r"--model.regime: Expected a typing.Literal\['single'.*Got value: sometimes"),
        (["--model.editor.steps", "many"], r"--model.editor.steps: .*many"),
        (["--model.eval_every", "2"], r"eval_every evaluates the edits kept so far, but the single regime"),
        (["--model.eval_protocol", "generated"], r"--model.eval_protocol: .*Got value: generated"),
        (["--data.path", str(tmp_path / "missing.json")], r"edit dataset '.*missing.json' not found"),
        (["--data.path", str(_record_file(tmp_path, subject="Nobody"))], r"record 1: key 'requested_rewrite.subject'"),
        (
            ["--data.path", str(_record_file(tmp_path, target_new=""))],
            r"record 1: key 'requested_rewrite.target_new': expected a non-empty string, got ''",
        ),
        (["--data.limit", "0"], r"expected limit > 0"),
        (["--data.format", "wiki"], r"--data.format: .*wiki"),
        (["--model.editor.layer", "9"], r"layer 9 is out of range"),
        (["--model.model_name", str(tmp_path / "no-model-here")], r"could not load the model '.*no-model-here'"),
        (["--model.regime", "sequential", "--model.resume", "true"], r"a stopped run cannot be continued"),
        (["--config", str(tmp_path / "broken.yaml")], r"broken.yaml"),
    ]


def test_a_dozen_bad_inputs_each_end_in_one_line_and_status_2(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unknown model fails at once instead of retrying the hub
    for extra, message in _bad_inputs(tmp_path):
        with pytest.raises(SystemExit) as stop:
            main(
                [
                    "fit",
                    *CONFIG,
                    *COMMON,
                    "--model.editor.layer",
                    "1",
                    *extra,
                    "--trainer.default_root_dir",
                    str(tmp_path / "run"),
                ]
            )
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("kelight: error:")]
        assert stop.value.code == 2, (extra, err[-2000:])
        assert len(lines) == 1 and "Traceback" not in err, (extra, err[-2000:])
        assert re.search(message, lines[0]), (extra, lines[0])


def test_debug_shows_the_traceback(tmp_path: Path, monkeypatch) -> None:
    from kelight.types import EditInputError

    with pytest.raises(EditInputError, match=r"expected limit > 0"):
        main(["fit", *CONFIG, "--data.limit", "0", "--debug", "--trainer.default_root_dir", str(tmp_path)])
    monkeypatch.setenv("KELIGHT_DEBUG", "1")
    with pytest.raises(EditInputError, match=r"expected limit > 0"):
        main(["fit", *CONFIG, "--data.limit", "0", "--trainer.default_root_dir", str(tmp_path)])

"""A stopped run keeps what it finished, says so with a non-zero status, and ``--model.resume`` ends it with the
uninterrupted run's metrics.json; long keeping-regime streams score a seeded sample (``eval_cases``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kelight.cli.main import run
from kelight.runs.outputs import read_partial_rows
from tests.cli.test_main import COMMON, ROOT
from tests.methods.test_distributed import _assert_same, _five_distinct_cases, _results

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def _base(tmp_path: Path) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs/smollm2/rome.yaml"),
        *COMMON,
        "--model.editor.layer",
        "1",
        "--data.path",
        str(_five_distinct_cases(tmp_path)),
        "--trainer.accelerator",
        "cpu",
    ]


def _stopped_copy(full: Path, out: Path, keep: list[int], rank_of: dict[int, int] | None = None) -> None:
    """``out`` as a run stopped after the cases ``keep`` of ``full`` (their rows in the partial logs)."""
    out.mkdir(parents=True)
    for row in _results(full)[1]:
        if row["id"] in keep:
            rank = (rank_of or {}).get(row["id"], 0)
            name = "cases.partial.jsonl" if rank == 0 else f"cases.partial.rank{rank}.jsonl"
            with (out / name).open("a") as f:
                f.write(json.dumps(row) + "\n")


def _assert_resumed(resumed: Path, full: Path, kept: list[int]) -> None:
    (metrics, rows), (reference, reference_rows) = _results(resumed), _results(full)
    _assert_same(metrics, reference)
    assert [r["id"] for r in rows] == [r["id"] for r in reference_rows]
    for a, b in zip(rows, reference_rows, strict=True):
        _assert_same(a, b)
        if a["id"] in kept and "edit_seconds" in b:
            assert a["edit_seconds"] == b["edit_seconds"]  # kept as written: not edited again
    assert not list(resumed.glob("cases.partial*"))


@pytest.mark.parametrize("regime", [[], ["--model.regime", "batch", "--data.batch_size", "2"]])
def test_resume_ends_with_the_uninterrupted_metrics(tmp_path: Path, regime: list[str]) -> None:
    base = [*_base(tmp_path), *regime]
    run(["fit", *base, "--trainer.default_root_dir", str(tmp_path / "full")])
    kept = [0, 2]  # batch regime: batch {2, 3} was stopped half-scored, so it is edited again, scoring 3 only
    _stopped_copy(tmp_path / "full", tmp_path / "stopped", kept)
    run(["fit", *base, "--model.resume", "true", "--trainer.default_root_dir", str(tmp_path / "stopped")])
    _assert_resumed(tmp_path / "stopped", tmp_path / "full", kept)


def test_resume_of_validate_and_of_other_ranks_logs(tmp_path: Path) -> None:
    """The kept rows may come from any process's log (a run stopped under DDP, resumed on one process)."""
    base = _base(tmp_path)
    run(["validate", *base, "--trainer.default_root_dir", str(tmp_path / "full")])
    _stopped_copy(tmp_path / "full", tmp_path / "stopped", [0, 1, 3], rank_of={1: 1, 3: 1})
    run(["validate", *base, "--model.resume", "true", "--trainer.default_root_dir", str(tmp_path / "stopped")])
    _assert_resumed(tmp_path / "stopped", tmp_path / "full", [0, 1, 3])


def test_sigterm_stops_with_status_143_and_a_last_line_then_resume(tmp_path: Path) -> None:
    base = _base(tmp_path)
    run(["fit", *base, "--trainer.default_root_dir", str(tmp_path / "full")])
    out = tmp_path / "stopped"
    slow = [
        "--model.editor.steps",
        "40",
        "--model.editor.early_stop_loss",
        "0",
    ]  # a few seconds per edit: time to stop it
    proc = subprocess.Popen(
        [sys.executable, "-m", "kelight.cli", "fit", *base, *slow, "--trainer.default_root_dir", str(out)],
        env=ENV,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    while not (out / "cases.partial.jsonl").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert "stopped by SIGTERM with" in last and "--model.resume true" in last, last
    kept = sorted(read_partial_rows(out))
    assert 1 <= len(kept) < 5 and not (out / "metrics.json").exists()
    run(["fit", *base, *slow, "--model.resume", "true", "--trainer.default_root_dir", str(out)])
    metrics, rows = _results(out)
    assert metrics["n_cases"] == 5 and [r["id"] for r in rows] == [0, 1, 2, 3, 4]


def test_resume_is_refused_where_edits_are_kept(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"the sequential regime keeps every edit in memory until the end, so a "
        r"stopped run cannot be continued: run it again without --model.resume",
    ):
        run(
            [
                "fit",
                *_base(tmp_path),
                "--model.regime",
                "sequential",
                "--model.resume",
                "true",
                "--trainer.default_root_dir",
                str(tmp_path / "x"),
            ]
        )


def test_a_torn_last_line_is_dropped_and_a_damaged_one_named(tmp_path: Path, caplog) -> None:
    (tmp_path / "cases.partial.jsonl").write_text('{"id": 0, "ES": 100.0}\n{"id": 1, "ES"')
    with caplog.at_level(logging.WARNING, logger="kelight.runs.outputs"):
        assert list(read_partial_rows(tmp_path)) == [0]
    assert "line 2 was cut short by the stop" in caplog.text
    (tmp_path / "cases.partial.rank1.jsonl").write_text('{"id": 5\n{"id": 6}\n')
    with pytest.raises(ValueError, match=r"cases.partial.rank1.jsonl is not valid JSON at line 1"):
        read_partial_rows(tmp_path)


def test_eval_cases_scores_a_seeded_sample_of_the_kept_edits(tmp_path: Path) -> None:
    seq = [*_base(tmp_path), "--model.regime", "sequential", "--model.eval_every", "2", "--model.eval_cases", "2"]
    run(["fit", *seq, "--trainer.default_root_dir", str(tmp_path / "a")])
    metrics, rows = _results(tmp_path / "a")
    assert metrics["n_cases"] == 2 and metrics["n_edits"] == 5 and len(rows) == 2
    curve = [json.loads(line) for line in (tmp_path / "a" / "sequential.jsonl").read_text().splitlines()]
    assert [point["edits"] for point in curve] == [2, 4]
    shutil.rmtree(tmp_path / "a")
    run(["fit", *seq, "--trainer.default_root_dir", str(tmp_path / "a")])
    assert [r["id"] for r in _results(tmp_path / "a")[1]] == [r["id"] for r in rows]  # the same sample
    with pytest.raises(ValueError, match=r"eval_cases samples the edits kept so far, but the single regime"):
        run(["fit", *_base(tmp_path), "--model.eval_cases", "2", "--trainer.default_root_dir", str(tmp_path / "b")])

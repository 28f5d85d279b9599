"""``kelight curve``: the sequential regime's sequential.jsonl as a table and a plot."""

from __future__ import annotations

import json

import pytest

from kelight.cli.main import main
from kelight.runs.curves import curve_metrics, curve_table, read_curve


def _run(tmp_path, name: str, points: list[dict]):
    run = tmp_path / name
    run.mkdir()
    (run / "sequential.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    return run


def test_curve_reads_points_in_edit_order_and_tabulates_the_scores_present(tmp_path):
    run = _run(tmp_path, "memit", [{"edits": 200, "Efficacy": 40.0, "Locality": 30.5, "ES_ci": 1.0},
                                   {"edits": 100, "Efficacy": 80.25, "Locality": None}])
    points = read_curve(run)
    assert [p["edits"] for p in points] == [100, 200]
    curves = {"memit": points}
    assert curve_metrics(curves) == ["Efficacy", "Locality"]  # CI columns and absent scores are not drawn
    assert curve_table(curves).splitlines() == ["| run | edits | Efficacy | Locality |", "|---|---|---|---|",
                                                "| memit | 100 | 80.2 | – |", "| memit | 200 | 40.0 | 30.5 |"]


def test_kelight_curve_writes_the_plot_and_prints_the_table(tmp_path, capsys):
    a = _run(tmp_path, "memit", [{"edits": 2, "ES": 100.0, "NS": 50.0}, {"edits": 4, "ES": 75.0, "NS": 40.0}])
    b = _run(tmp_path, "alphaedit", [{"edits": 2, "ES": 100.0, "NS": 60.0}])
    out = tmp_path / "plots" / "curve.png"
    main(["curve", str(out), str(a), str(b)])
    printed = capsys.readouterr().out
    assert "| alphaedit | 2 | 100.0 | 60.0 |" in printed and f"wrote {out}" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("content", "match"), [
    (None, r"sequential.jsonl does not exist; run `kelight fit` with --model.regime sequential .*eval_every"),
    ('{"edits": 2, "ES": 1.0}\n{"edits": 4, "ES"\n', r"sequential.jsonl.* line 2"),
    ('{"ES": 1.0}\n', r"line 1: expected an object with an integer 'edits'"),
    ('{"edits": 2, "CI": 1.0}\n', r"no score in the runs' sequential.jsonl"),
])
def test_kelight_curve_errors_name_the_file_and_fix(tmp_path, content, match):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "sequential.jsonl").write_text(content)
    with pytest.raises(SystemExit, match=match):
        main(["curve", str(tmp_path / "c.png"), str(run)])
    assert not (tmp_path / "c.png").exists()


def test_kelight_curve_keeps_runs_whose_directories_share_a_name(tmp_path, capsys):
    """runs/memit/seq and runs/alphaedit/seq: both are tabulated (and drawn), neither replaces the other."""
    (tmp_path / "memit").mkdir()
    (tmp_path / "alphaedit").mkdir()
    a = _run(tmp_path / "memit", "seq", [{"edits": 2, "ES": 50.0}])
    b = _run(tmp_path / "alphaedit", "seq", [{"edits": 2, "ES": 90.0}])
    main(["curve", str(tmp_path / "c.png"), str(a), str(b)])
    printed = capsys.readouterr().out
    assert "| memit/seq | 2 | 50.0 |" in printed and "| alphaedit/seq | 2 | 90.0 |" in printed


def test_kelight_curve_refuses_a_directory_as_the_plot_file(tmp_path):
    """`kelight curve RUN_DIR RUN_DIR` (the plot file forgotten): one line naming the fix, rather than a plot of
    the second run alone written beside the first as memit.png."""
    a = _run(tmp_path, "memit", [{"edits": 2, "ES": 50.0}])
    b = _run(tmp_path, "alphaedit", [{"edits": 2, "ES": 90.0}])
    with pytest.raises(SystemExit, match=r"memit is a directory; expected the plot file first: kelight curve "
                                         r"OUT.png RUN_DIR"):
        main(["curve", str(a), str(b)])


def test_kelight_curve_draws_each_process_sequence_of_a_ddp_run(tmp_path, capsys):
    """Under DDP each process keeps only its own edits (N sequences, one sequential.rankR.jsonl each): every
    sequence gets its own row, none is left out."""
    run = _run(tmp_path, "seq", [{"edits": 2, "ES": 50.0}])
    (run / "sequential.rank1.jsonl").write_text(json.dumps({"edits": 2, "ES": 70.0}) + "\n")
    main(["curve", str(tmp_path / "c.png"), str(run)])
    printed = capsys.readouterr().out
    assert "| seq (process 0) | 2 | 50.0 |" in printed and "| seq (process 1) | 2 | 70.0 |" in printed

"""``kelight gap``: a run's teacher-forced scores against its generated-answer scores, case by case."""

from __future__ import annotations

import numpy as np
import pytest

from kelight.cli.main import main
from kelight.evaluation.stats import paired_difference_interval
from kelight.runs.compare import read_cases
from kelight.runs.gap import PAIRS, gap_pairs, missed_answers
from tests.runs.test_compare import _run


def _answer(group: str, match: bool, answer: str = "Rome", target: str = "Rome") -> dict:
    return {"group": group, "prompt": f"{group} prompt", "target": target, "answer": answer, "match": match}


ROWS = [
    {"id": 0, "ES": 100.0, "n_ES": 1, "wild_ES": 0.0, "n_wild_ES": 1, "PS": 100.0, "n_PS": 2,
     "wild_PS": 50.0, "n_wild_PS": 2, "RS": 0.0, "n_RS": 3, "wild_RS": 100.0, "n_wild_RS": 3,
     "wild": [_answer("rewrite", False, "Paris is"), _answer("paraphrase", True),
              _answer("paraphrase", False, "a city")]},
    {"id": 1, "ES": 0.0, "n_ES": 1, "wild_ES": 0.0, "n_wild_ES": 1, "PS": 50.0, "n_PS": 2,
     "wild_PS": 0.0, "n_wild_PS": 2, "RS": 100.0, "n_RS": 1, "wild_RS": 100.0, "n_wild_RS": 1,
     "wild": [_answer("rewrite", False, "nothing"), _answer("paraphrase", False, "no")]},
    {"id": 2, "ES": 100.0, "n_ES": 1, "wild_ES": 100.0, "n_wild_ES": 1, "wild": [_answer("rewrite", True)]},
]


def test_the_gap_is_teacher_forced_minus_wild_pooled_over_prompts_with_a_paired_interval(tmp_path):
    rows = read_cases(_run(tmp_path, "run", ROWS))
    out = gap_pairs(rows, n_resamples=300, seed=1)
    assert set(out) == {"ES", "PS", "RS"}  # the scores the run has both ways, by their teacher-forced names
    assert out["ES"][:3] == pytest.approx((200 / 3, 100 / 3, 100 / 3)) and out["ES"][5] == 3
    assert out["PS"][:3] == pytest.approx((75.0, 25.0, 50.0))  # (100·2 + 50·2) / 4 against (50·2 + 0) / 4
    assert out["RS"][:3] == pytest.approx((25.0, 100.0, -75.0))  # 0 of 3 + 1 of 1 prompts, against all 4
    tf, wild = np.array([100.0, 0.0, 100.0]), np.array([0.0, 0.0, 100.0])
    assert out["ES"][2:5] == paired_difference_interval(np.stack([wild, tf]), np.ones(3), 300, 1)


def test_gap_errors_name_the_problem(tmp_path):
    teacher_forced_only = read_cases(_run(tmp_path, "tf", [{"id": 0, "ES": 100.0, "n_ES": 1}]))
    with pytest.raises(ValueError, match=r"no wild score; run it with --model.eval_protocol both"):
        gap_pairs(teacher_forced_only)
    uneven = read_cases(_run(tmp_path, "uneven", [{"id": 4, "PS": 100.0, "n_PS": 2, "wild_PS": 0.0, "n_wild_PS": 1}]))
    with pytest.raises(ValueError, match=r"case 4 scores PS on 2 prompts and wild_PS on 1; the two protocols"):
        gap_pairs(uneven)
    with pytest.raises(SystemExit, match=r"kelight gap: .*tf: the run has no wild score"):
        main(["gap", str(tmp_path / "tf")])
    for argv, match in ((["--examples", "two", "x"], "--examples expects a whole number .*got 'two'"),
                        (["--examples", "3"], "at least one RUN_DIR besides --examples")):
        with pytest.raises(SystemExit, match=match):
            main(["gap", *argv])


def test_missed_answers_come_from_cases_teacher_forcing_scored_full(tmp_path):
    rows = read_cases(_run(tmp_path, "run", ROWS))
    out = missed_answers(rows, examples=5)
    assert [(a["id"], a["answer"]) for a in out["ES"]] == [(0, "Paris is")]  # case 1: ES 0; case 2: matched
    assert [(a["id"], a["answer"]) for a in out["PS"]] == [(0, "a city")]  # case 1's PS is 50, not 100
    assert "RS" not in out  # not an edit score: a good answer avoids o_edit there
    assert missed_answers(rows, examples=0) == {}
    assert {tf for tf, _ in PAIRS.values()} >= {"ES", "PS", "NS", "RS", "DNS", "RES", "Efficacy", "Locality"}


def test_the_cli_prints_the_table_and_the_answers(tmp_path, capsys):
    main(["gap", str(_run(tmp_path, "run", ROWS)), "--examples", "1"])
    out = capsys.readouterr().out
    assert "| run | ES | 66.7 | 33.3 | +33.3 [" in out
    assert "| run | PS | 75.0 | 25.0 | +50.0 [" in out
    assert "- run, ES 100 (case 0): 'rewrite prompt' → 'Paris is' (target 'Rome')" in out

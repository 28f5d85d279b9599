"""``kelight compare``: paired differences of two runs' scores over their common cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kelight.cli.main import main
from kelight.evaluation.stats import paired_difference_interval, pooled
from kelight.runs.compare import compare_pair, read_cases


def _run(tmp_path, name: str, rows: list[dict]):
    run = tmp_path / name
    run.mkdir(parents=True)
    (run / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_paired_difference_is_the_difference_of_the_pooled_values_and_its_interval_holds_it():
    rng = np.random.default_rng(1)
    a = rng.choice([0.0, 50.0, 100.0], size=40)
    b = np.clip(a + rng.choice([0.0, 50.0], size=40), 0, 100)
    counts = rng.integers(1, 5, size=40)
    diff, low, high = paired_difference_interval(np.stack([a, b]), counts, n_resamples=500, seed=3)
    assert diff == pytest.approx(pooled(b, counts) - pooled(a, counts))
    assert 0 < low <= diff <= high  # b never below a: the whole interval is above 0
    assert paired_difference_interval(np.stack([a, b]), counts, n_resamples=500, seed=3) == (diff, low, high)
    assert paired_difference_interval(np.stack([a, a]), counts) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match=r"expected percents \(2, C\) and counts \(C,\)"):
        paired_difference_interval(np.stack([a, b, a]), counts)


def test_compare_pairs_common_cases_and_weights_by_prompts(tmp_path):
    base = _run(tmp_path, "base", [{"id": 0, "ES": 100.0, "n_ES": 1, "NS": 0.0, "n_NS": 3},
                                   {"id": 1, "ES": 0.0, "n_ES": 1, "NS": 100.0, "n_NS": 1},
                                   {"id": 2, "ES": 0.0, "n_ES": 1}])  # not in the other run
    run = _run(tmp_path, "run", [{"id": 1, "ES": 100.0, "n_ES": 1, "NS": 0.0, "n_NS": 1},
                                 {"id": 0, "ES": 100.0, "n_ES": 1, "NS": 100.0, "n_NS": 3},
                                 {"id": 9, "ES": 0.0, "n_ES": 1}])
    out = compare_pair(read_cases(base), read_cases(run), n_resamples=200)
    assert set(out) == {"ES", "NS"}
    assert out["ES"][:3] == (50.0, 100.0, 50.0) and out["ES"][5] == 2  # cases 0 and 1 only
    assert out["NS"][:3] == (25.0, 75.0, 50.0)  # pooled over prompts: (0·3 + 100·1) / 4, (100·3 + 0) / 4


def test_compare_errors_name_the_problem(tmp_path):
    a = read_cases(_run(tmp_path, "a", [{"id": 0, "ES": 1.0, "n_ES": 1}]))
    with pytest.raises(ValueError, match=r"no case id in common; compare runs of the same data selection"):
        compare_pair(a, read_cases(_run(tmp_path, "b", [{"id": 5, "ES": 1.0, "n_ES": 1}])))
    with pytest.raises(ValueError, match=r"case 0 has ES but no n_ES: a run made before per-case counts"):
        compare_pair(a, read_cases(_run(tmp_path, "c", [{"id": 0, "ES": 1.0}])))
    with pytest.raises(ValueError, match=r"different prompt counts for the same case id"):
        compare_pair(a, read_cases(_run(tmp_path, "d", [{"id": 0, "ES": 1.0, "n_ES": 2}])))
    with pytest.raises(ValueError, match=r"line 2: case id 0 occurs twice"):
        read_cases(_run(tmp_path, "e", [{"id": 0}, {"id": 0}]))
    with pytest.raises(SystemExit, match=r"kelight compare: .*nope/cases.jsonl does not exist"):
        main(["compare", str(tmp_path / "a"), str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match=r"usage: kelight compare BASE_DIR RUN_DIR"):
        main(["compare", str(tmp_path / "a")])


def test_kelight_compare_prints_each_run_against_the_base(tmp_path, capsys):
    rows = [{"id": i, "Efficacy": 100.0 * (i % 2), "n_Efficacy": 1} for i in range(20)]
    better = [{**r, "Efficacy": 100.0} for r in rows]
    main(["compare", str(_run(tmp_path, "m/seq", rows)), str(_run(tmp_path, "a/seq", better)),
          str(_run(tmp_path, "same", rows))])
    printed = capsys.readouterr().out
    assert "| Efficacy | 50.0 | a/seq | 100.0 | +50.0 [" in printed and "] * | 20 |" in printed
    assert "| Efficacy | 50.0 | same | 50.0 | +0.0 [+0.0, +0.0] | 20 |" in printed  # no star: 0 is inside


def test_fluency_is_compared_as_a_mean_over_cases(tmp_path):
    base = _run(tmp_path, "base", [{"id": 0, "FL": 600.0}, {"id": 1, "FL": 620.0}])
    run = _run(tmp_path, "run", [{"id": 0, "FL": 610.0}, {"id": 1, "FL": 640.0}])
    out = compare_pair(read_cases(base), read_cases(run), n_resamples=200)
    assert out["FL"][:3] == (610.0, 625.0, 15.0) and out["FL"][3] >= 10.0  # both cases rose: interval above 0

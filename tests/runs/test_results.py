"""Output contract helpers: partial log, final files, Markdown report."""

import json

import pytest

from kelight.evaluation.functional import ngram_entropy as ngram
from kelight.runs.outputs import PARTIAL, append_partial, write_results
from kelight.runs.report import format_table, report
from tests.evaluation.interval_reference import reference_interval, reference_normal


def test_partial_rows_are_replaced_by_the_final_files(tmp_path):
    append_partial(tmp_path, {"id": 0, "ES": 100.0})
    append_partial(tmp_path, {"id": 1, "ES": float("nan")})
    lines = (tmp_path / PARTIAL).read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [0, 1] and json.loads(lines[1])["ES"] is None
    write_results(tmp_path, {"ES": 50.0, "n_cases": 2.0}, [{"id": 0}, {"id": 1}])
    assert not (tmp_path / PARTIAL).exists()
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"ES": 50.0, "n_cases": 2.0}
    assert len((tmp_path / "cases.jsonl").read_text().splitlines()) == 2


def test_table_shows_ci_and_missing_columns():
    table = format_table({"a": {"ES": 94.0, "ES_ci": 6.61, "n_cases": 50.0}, "b": {"NS": 63.1}})
    assert "| a | 94.0 ± 6.6 | – | 50 |" in table and "| b | – | 63.1 | – |" in table
    bounds = {"ES": 100.0, "ES_ci": 5.36, "ES_lo": 89.28, "ES_hi": 100.0, "FL": 600.0, "FL_ci": float("nan")}
    assert "| c | 100.0 [89.3, 100.0] | 600.0 |" in format_table({"c": bounds})  # asymmetric: the bounds


def test_report_names_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.json does not exist"):
        report([tmp_path / "nope"])


def test_report_keeps_runs_whose_directories_share_a_name(tmp_path):
    for method, es in (("memit", 50.0), ("alphaedit", 90.0)):
        write_results(tmp_path / method / "seq", {"ES": es, "n_cases": 2.0}, [])
    table = report([tmp_path / "memit" / "seq", tmp_path / "alphaedit" / "seq"])
    assert "| memit/seq | 50.0 | 2 |" in table and "| alphaedit/seq | 90.0 | 2 |" in table


def test_metrics_from_rows_pools_over_prompts_per_source_and_counts():
    import math

    from kelight.evaluation import functional as F
    from kelight.runs.merge import metrics_from_rows

    rows = [{"id": 0, "source": "a", "ES": 100.0, "EM": 90.0, "n_ES": 1, "RS": 0.0, "RM": 2.0, "n_RS": 3,
             "FL": 600.0, "Efficacy": 50.0, "n_Efficacy": 2, "PPL": math.e, "n_PPL": 10, "edit_seconds": 2.0,
             "z_steps": 80},
            {"id": 1, "source": "b", "ES": 0.0, "EM": 30.0, "n_ES": 1, "RS": 100.0, "RM": 50.0, "n_RS": 1,
             "FL": 500.0, "Efficacy": 100.0, "n_Efficacy": 2, "PPL": math.e ** 3, "n_PPL": 30, "edit_seconds": 4.0,
             "z_steps": 41}]
    m = metrics_from_rows(rows)
    assert m["RS"] == 25.0 and m["RM"] == (3 * 2.0 + 50.0) / 4  # 1 of 4 prompts, not the mean of 0 and 100
    low, high = reference_interval([[0.0, 0.0, 0.0], [1.0]])  # case-clustered: 2 cases, not 4 prompts
    assert (m["RS_lo"], m["RS_hi"], m["RS_ci"]) == pytest.approx((100 * low, 100 * high, 50 * (high - low)))
    assert m["ES"] == 50.0 and m["FL"] == 550.0 and m["PPL"] == pytest.approx(math.exp((10 + 90) / 40))
    assert m["Efficacy"] == 75.0 and m["Score"] == 75.0 and m["Avg.S"] == pytest.approx(F.harmonic_mean([50.0, 25.0]))
    assert m["a/RS"] == 0.0 and m["b/ES"] == 0.0 and m["n_cases"] == 2.0 and m["seconds_per_edit"] == 3.0
    assert m["z_steps_per_edit"] == 60.5 and "z_steps_per_edit" not in metrics_from_rows([{"id": 0}])
    assert "z_steps_per_edit" not in metrics_from_rows([rows[0], {**rows[1], "z_steps": None}])  # not a subset
    with pytest.raises(ValueError, match="rows with RS but no n_RS: .* rerun those cases"):
        metrics_from_rows([{"id": 0, "RS": 0.0}])


def test_token_and_fluency_intervals_recomputed_from_rows_equal_the_metrics():
    """Efficacy/Locality CIs pool per-prompt accuracies (``_sq``: their mean square per case); FL's is over
    cases. Rows without ``_sq`` (runs before commit e8b5678) give no token CI rather than a wrong one."""
    import torch

    from kelight.evaluation.metrics import EditMetrics
    from kelight.evaluation.scoring import CaseResult, case_summary
    from kelight.runs.merge import metrics_from_rows

    t = torch.tensor
    cases = [CaseResult(0, tokens={"efficacy": ([t([1, 2, 3]), t([4])], [t([1, 2, 0]), t([4])])},
                        texts=("a b a b c",)),
             CaseResult(1, tokens={"efficacy": ([t([5, 6])], [t([0, 0])]), "locality": ([t([1])], [t([1])])},
                        texts=("the cat sat on the mat", "a a a"))]
    metrics = EditMetrics()
    for case in cases:
        metrics.update(case)
    expected, rows = metrics.compute(), [case_summary(c) for c in cases]
    got = metrics_from_rows(rows)
    for key in ("Efficacy", "Efficacy_ci", "Efficacy_lo", "Efficacy_hi", "Locality", "Locality_ci", "Locality_lo",
                "Locality_hi", "FL", "FL_ci", "Score"):
        assert got[key] == pytest.approx(expected[key], rel=1e-12), key
    low, high = reference_interval([[2 / 3, 1.0], [0.0]])  # per-prompt accuracies, clustered by case
    assert (expected["Efficacy_lo"], expected["Efficacy_hi"]) == pytest.approx((100 * low, 100 * high))
    low, high = reference_interval([[1.0]])  # one prompt of one case: counted once, never zero width
    assert expected["Locality_hi"] == 100.0 and expected["Locality_lo"] == pytest.approx(100 * low)
    assert expected["Locality_lo"] < 30.0
    assert expected["FL_ci"] == pytest.approx(100 * reference_normal([ngram(t) for t in cases[0].texts] + [
        (ngram(cases[1].texts[0]) + ngram(cases[1].texts[1])) / 2]))
    assert "Efficacy_ci" not in metrics_from_rows([{k: v for k, v in r.items() if not k.endswith("_sq")} for r in rows])


def test_merge_refuses_parts_that_are_not_independent():
    from kelight.runs.merge import _check_parts_are_independent as check

    check({"model.class_path": "kelight.ROME", "model.init_args.regime": "single", "data.skip": 7})
    check({"model.class_path": "kelight.MEMIT", "model.init_args.regime": "batch", "data.batch_size": 8,
           "data.skip": 16})
    with pytest.raises(ValueError, match="batch runs of kelight.PathEdit edit their cases together"):
        check({"model.class_path": "kelight.PathEdit", "model.init_args.regime": "batch"})
    with pytest.raises(ValueError, match="consecutive runs of kelight.PathEdit"):
        check({"model.class_path": "kelight.PathEdit", "model.init_args.regime": "consecutive"})
    with pytest.raises(ValueError, match=r"--data.skip 12 is not a multiple of --data.batch_size 8.*whole batches"):
        check({"model.class_path": "kelight.MEMIT", "model.init_args.regime": "batch", "data.batch_size": 8,
               "data.skip": 12})


def test_report_names_a_corrupt_metrics_file(tmp_path):
    from kelight.cli.main import run

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text('{"ES": 94.0, "PS"')  # cut off mid-write
    with pytest.raises(ValueError, match=r"run/metrics\.json is not valid JSON at line 1, column 18 .*kelight merge"):
        report([tmp_path / "run"])
    with pytest.raises(SystemExit, match=r"kelight report: .*run/metrics\.json is not valid JSON .*rerun `kelight fit"):
        run(["report", str(tmp_path / "run")])


def _run_dir(path, config="model: {class_path: kelight.ROME}\n", cases='{"id": 0}\n'):
    path.mkdir()
    (path / "config.yaml").write_text(config)
    (path / "cases.jsonl").write_text(cases)
    return str(path)


def test_merge_names_a_corrupt_config_or_cases_file(tmp_path):
    from kelight.cli.main import run
    from kelight.runs.merge import merge_runs

    good = _run_dir(tmp_path / "good")
    bad_config = _run_dir(tmp_path / "bad_config", config="model: {class_path: kelight.ROME\ndata: {}\n")
    with pytest.raises(ValueError, match=r"bad_config/config\.yaml is not valid YAML at line 2, column 5 .*rerun"):
        merge_runs(tmp_path / "out", [good, bad_config])
    with pytest.raises(SystemExit, match=r"kelight merge: .*bad_config/config\.yaml is not valid YAML"):
        run(["merge", str(tmp_path / "out"), good, bad_config])
    bad_cases = _run_dir(tmp_path / "bad_cases", cases='{"id": 1}\n{"id": 2, "ES"\n')
    with pytest.raises(ValueError, match=r"bad_cases/cases\.jsonl is not valid JSON at line 2, column \d+"):
        merge_runs(tmp_path / "out", [good, bad_cases])
    assert not (tmp_path / "out").exists()


def test_merge_reproduces_the_metrics_of_cases_with_nan_read_outs(tmp_path):
    """A case whose logits are NaN (a collapsed edit) has no magnitude or perplexity (``null`` in cases.jsonl):
    the recomputed metrics must not silently drop it from EM/PPL while metrics.json has no number."""
    import torch

    from kelight.evaluation.metrics import EditMetrics
    from kelight.evaluation.scoring import CaseResult, case_summary
    from kelight.files import read_json, read_jsonl
    from kelight.runs.merge import metrics_from_rows

    nan = float("nan")
    cases = [CaseResult(0, {"rewrite": (torch.tensor([0.5]), torch.tensor([1.0]))}, perplexity=(20.0, 10)),
             CaseResult(1, {"rewrite": (torch.tensor([nan]), torch.tensor([nan]))}, perplexity=(nan, 10))]
    metrics = EditMetrics(sync_on_compute=False)
    for case in cases:
        metrics.update(case)
    write_results(tmp_path / "run", {**metrics.compute(), "n_cases": 2.0},
                  [{"id": c.case_id, **case_summary(c)} for c in cases])
    rows = read_jsonl(tmp_path / "run" / "cases.jsonl", "")
    write_results(tmp_path / "merged", metrics_from_rows(rows), rows)
    expected = read_json(tmp_path / "run" / "metrics.json", "")
    assert expected["EM"] is None and "PPL" not in expected  # what EditMetrics reports
    assert read_json(tmp_path / "merged" / "metrics.json", "") == expected
    assert metrics_from_rows(rows[1:])["ES"] == 0.0  # every case NaN: no crash


def test_merge_of_two_halves_equals_the_whole_run(tmp_path):
    """``kelight merge`` recomputes every score and its case-clustered interval from cases.jsonl alone: the merged
    halves give the whole run's metrics.json (to 1e-9; through JSON, as on disk)."""
    import numpy as np
    import torch

    from kelight.evaluation.metrics import EditMetrics
    from kelight.evaluation.scoring import CaseResult, case_summary
    from kelight.files import read_json
    from kelight.runs.merge import merge_runs

    rng = np.random.default_rng(7)
    cases = []
    for i in range(13):
        n = int(rng.integers(1, 5))
        right, wrong = (torch.from_numpy(x) for x in rng.gamma(2.0, 1.0, size=(2, n)))
        tokens = [torch.from_numpy(rng.integers(0, 2, size=int(t))) for t in rng.integers(1, 4, size=n)]
        refs = [torch.zeros_like(t) for t in tokens]
        cases.append(CaseResult(i, {"neighbor": (right, wrong), "rewrite": (right[:1], wrong[:1])},
                                {"efficacy": (tokens, refs)}, texts=(f"a b c {'a ' * i}b",)))
    metrics = EditMetrics(sync_on_compute=False)
    for case in cases:
        metrics.update(case)
    config = "model: {class_path: kelight.ROME}\n"
    for name, part in (("first", cases[:6]), ("second", cases[6:]), ("whole", cases)):
        rows = [{"id": c.case_id, **case_summary(c)} for c in part]
        write_results(tmp_path / name, {**metrics.compute(), "n_cases": float(len(cases))}, rows)
        (tmp_path / name / "config.yaml").write_text(config)
    merge_runs(tmp_path / "merged", [tmp_path / "first", tmp_path / "second"])
    whole, merged = (read_json(tmp_path / name / "metrics.json", "") for name in ("whole", "merged"))
    assert set(merged) == set(whole) and {"NS_lo", "NS_hi", "Efficacy_lo", "FL_ci"} <= set(whole)
    for key, value in whole.items():
        assert merged[key] == pytest.approx(value, abs=1e-9), key


def test_doctests():
    import doctest

    import kelight.runs.merge
    import kelight.runs.outputs
    import kelight.runs.report

    for module in (kelight.runs.outputs, kelight.runs.report, kelight.runs.merge):
        assert doctest.testmod(module, raise_on_error=True).failed == 0

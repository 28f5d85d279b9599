"""Output contract helpers: partial log, final files, Markdown report."""

import json

import pytest

from kelight.results import PARTIAL, append_partial, format_table, report, write_results


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


def test_report_names_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.json does not exist"):
        report([tmp_path / "nope"])

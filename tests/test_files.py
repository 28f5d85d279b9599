"""Readers of JSON, JSON-lines and YAML files: a file that does not parse is named with its line and the fix."""

import doctest

import pytest

import kelight.files
from kelight.files import read_json, read_jsonl, read_yaml


def test_valid_files_are_read(tmp_path):
    (tmp_path / "a.json").write_text('{"ES": 94.0}')
    (tmp_path / "a.jsonl").write_text('{"id": 0}\n\n"text"\n')
    (tmp_path / "a.yaml").write_text("model: {lr: 0.5}\n")
    assert read_json(tmp_path / "a.json", "fix") == {"ES": 94.0}
    assert read_jsonl(tmp_path / "a.jsonl", "fix") == [{"id": 0}, "text"]
    assert read_yaml(tmp_path / "a.yaml", "fix") == {"model": {"lr": 0.5}}


def test_errors_name_the_file_line_and_fix(tmp_path):
    (tmp_path / "a.json").write_text('{\n "ES": 94.0,\n "PS"')
    (tmp_path / "a.jsonl").write_text('{"id": 0}\n\n{"id": 1,\n')
    (tmp_path / "a.yaml").write_text("model:\n  lr: [0.5\n")
    with pytest.raises(ValueError, match=r"a\.json is not valid JSON at line 3, column 6 \(Expecting ':' delimiter\); "
                                         r"rerun it$"):
        read_json(tmp_path / "a.json", "rerun it")
    with pytest.raises(ValueError, match=r"a\.jsonl is not valid JSON at line 3, column 10 .*; rerun it$"):
        read_jsonl(tmp_path / "a.jsonl", "rerun it")
    with pytest.raises(ValueError, match=r"a\.yaml is not valid YAML at line 3, column 1 \(expected ',' or ']', "
                                         r"but got '<stream end>'\); rerun it$") as info:
        read_yaml(tmp_path / "a.yaml", "rerun it")
    assert "\n" not in str(info.value)


def test_doctests():
    assert doctest.testmod(kelight.files, raise_on_error=True).failed == 0

"""Where records come from: JSON/JSON-lines/Parquet files, local ``datasets`` folders, hub ids (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from kelight.api import load_cases
from kelight.data import load_records
from kelight.data.datamodule import EditDataModule
from kelight.types import EditInputError
from tests.data.test_datamodule import edit_records


def _ids(path: str | Path, **kwargs: object) -> list[object]:
    return [case.case_id for case in load_cases(path, **kwargs)]


@pytest.fixture
def records() -> datasets.Dataset:
    return datasets.Dataset.from_list(edit_records(4))


def test_parquet_file(tmp_path: Path, records: datasets.Dataset) -> None:
    records.to_parquet(str(tmp_path / "edit.parquet"))
    assert _ids(tmp_path / "edit.parquet") == [100, 101, 102, 103]


def test_saved_dataset_and_dataset_dict(tmp_path: Path, records: datasets.Dataset) -> None:
    records.save_to_disk(str(tmp_path / "one"))
    assert _ids(tmp_path / "one", limit=2) == [100, 101]
    splits = datasets.DatasetDict({"train": records.select([0, 1]), "test": records.select([2, 3])})
    splits.save_to_disk(str(tmp_path / "two"))
    assert _ids(tmp_path / "two", split="test") == [102, 103]
    with pytest.raises(EditInputError, match=r"has the splits \['train', 'test'\]; no split was given: choose one "
                                             r"with --data.split NAME"):
        load_cases(tmp_path / "two")
    with pytest.raises(EditInputError, match=r"has the splits \['train', 'test'\]; got split 'dev'"):
        load_cases(tmp_path / "two", split="dev")


def test_folder_of_data_files_and_hub_id_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id goes through ``datasets.load_dataset(name, config)``, the same call as a folder of data files;
    offline, the tests give it a folder named like a hub id."""
    repo = tmp_path / "someone" / "counterfacts"
    repo.mkdir(parents=True)
    (repo / "test.jsonl").write_text("\n".join(json.dumps(r) for r in edit_records(3)))
    assert _ids(repo) == [100, 101, 102]
    calls = []
    real = datasets.load_dataset

    def load_dataset(name: str, config: str | None = None, **kwargs: object) -> object:
        calls.append((name, config))
        return real(str(repo))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.chdir(tmp_path / "someone")  # "other/name" is no folder here: the hub route
    assert _ids("other/name:default", limit=1) == [100]
    assert calls == [("other/name", "default")]


def test_unreachable_hub_id_says_what_is_accepted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def offline(name: str, config: str | None = None, **kwargs: object) -> object:
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EditInputError, match=r"could not load the edit dataset 'azhx/counterfact' with datasets "
                                             r"\(ConnectionError: .*\); expected a \.json/\.jsonl/\.parquet file.* A "
                                             r"hub id needs internet access"):
        load_records("azhx/counterfact")


def test_missing_paths_and_unknown_suffixes(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"edit dataset '.*missing\.parquet' not found .*expected a "
                                                r"\.json/\.jsonl/\.parquet file"):
        load_records(tmp_path / "missing.parquet")
    with pytest.raises(FileNotFoundError, match=r"not found"):
        load_records(str(tmp_path / "a" / "b" / "c"))  # a path, not a hub id
    (tmp_path / "edit.csv").write_text("prompt,subject\n")
    with pytest.raises(EditInputError, match=r"got a \.csv file; convert it to JSON lines or Parquet"):
        load_records(tmp_path / "edit.csv")
    (tmp_path / "edit.json").write_text(json.dumps(edit_records(2)))
    with pytest.raises(EditInputError, match=r"has no split 'test' \(it is one table\); drop --data.split"):
        EditDataModule(path=str(tmp_path / "edit.json"), split="test").setup()

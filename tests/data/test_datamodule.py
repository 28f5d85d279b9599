"""EditDataModule: selection, loaders, collate, DDP sampler, errors; real data when present."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

from kelight.data import EditDataModule, builtin_cases, default_data_root, load_records, select_indices
from kelight.data.datamodule import BatchShardSampler, collate_cases
from kelight.methods.distributed import interleave
from kelight.types import EditCase, EditInputError


def edit_records(n: int) -> list[dict[str, Any]]:
    return [
        {
            "case_id": 100 + i,
            "prompt": f"Person{i} speaks",
            "subject": f"Person{i}",
            "target_new": "English",
            "ground_truth": "French",
            "rephrase_prompt": f"The language of Person{i} is",
            "locality_prompt": f"Other{i} speaks",
            "locality_ground_truth": "French" if i % 3 else "English",  # every third unscoreable
        }
        for i in range(n)
    ]


@pytest.fixture
def edit_file(tmp_path: Path) -> Path:
    path = tmp_path / "edit.json"
    path.write_text(json.dumps(edit_records(7)))
    return path


def ids(dm: EditDataModule) -> list[str | int]:
    return [case.case_id for case in dm.cases]


def test_builtin_default_and_limit() -> None:
    dm = EditDataModule(limit=5)
    dm.setup()
    assert ids(dm) == [0, 1, 2, 3, 4]
    full = EditDataModule()
    full.setup("fit")
    assert len(full.cases) == len(builtin_cases()) >= 25


def test_shuffle_is_seeded_and_applied_before_limit() -> None:
    def pick(seed: int, shuffle: bool = True) -> list[str | int]:
        dm = EditDataModule(limit=6, seed=seed, shuffle=shuffle)
        dm.setup()
        return ids(dm)

    assert pick(3) == pick(3)
    assert pick(3) != pick(4)
    assert len(set(pick(3))) == 6 and max(pick(3)) > 5  # drawn from the whole set, not the first 6
    assert pick(3, shuffle=False) == pick(4, shuffle=False) == list(range(6))
    assert select_indices(4, seed=1, shuffle=True) == select_indices(4, seed=1, shuffle=True)


def test_skip_continues_where_limit_ended_also_after_shuffling() -> None:
    for shuffle in (False, True):
        whole = EditDataModule(limit=9, shuffle=shuffle, seed=2)
        first = EditDataModule(limit=4, shuffle=shuffle, seed=2)
        rest = EditDataModule(skip=4, limit=5, shuffle=shuffle, seed=2)
        for dm in (whole, first, rest):
            dm.setup()
        assert ids(first) + ids(rest) == ids(whole)
    with pytest.raises(EditInputError, match=r"expected skip >= 0, got -1"):
        EditDataModule(skip=-1)
    with pytest.raises(EditInputError, match=r"skip 99999 leaves none of the \d+ records; lower --data.skip"):
        EditDataModule(skip=99999).setup()


def test_loaders_collate_lists_in_order(edit_file: Path) -> None:
    dm = EditDataModule(path=str(edit_file), batch_size=3)
    dm.setup()
    assert ids(dm) == [100 + i for i in range(7)]
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        batches = list(loader)
        assert [len(b) for b in batches] == [3, 3, 1]
        assert all(isinstance(b, list) and all(isinstance(c, EditCase) for c in b) for b in batches)
        assert [c.case_id for b in batches for c in b] == ids(dm)


def test_skipped_prompts_are_counted(edit_file: Path) -> None:
    dm = EditDataModule(path=str(edit_file), format="counterfact_edit")
    dm.setup()
    assert dm.skipped == {"neighbor": 3}  # records 0, 3, 6
    assert "neighbor" not in dm.cases[0].probes and "neighbor" in dm.cases[1].probes


def test_distributed_eval_loaders_do_not_repeat(edit_file: Path) -> None:
    seen = []
    for rank in (0, 1):
        dm = EditDataModule(path=str(edit_file))
        dm.setup()
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        for loader in (dm.val_dataloader(), dm.test_dataloader()):
            assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
        seen.append([c.case_id for b in dm.test_dataloader() for c in b])
        train = [[c.case_id for c in b] for b in dm.train_dataloader()]
        assert isinstance(dm.train_dataloader().sampler, BatchShardSampler)  # Lightning keeps it
        assert train == [[c] for c in seen[-1]] + [[]] * (4 - len(seen[-1]))  # 4 steps each, padded
    assert sorted(seen[0] + seen[1]) == ids(dm)  # 7 cases: 4 + 3, no duplicate
    dm.trainer = SimpleNamespace(world_size=8, global_rank=0)
    with pytest.raises(EditInputError, match=r"7 cases cannot be shared among 8 processes"):
        dm.val_dataloader()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_train_shards_deal_out_the_one_process_batches(world: int, batch_size: int) -> None:
    one_process = [list(range(i, min(i + batch_size, 7))) for i in range(0, 7, batch_size)]
    shares = []
    for rank in range(world):
        sampler = BatchShardSampler(7, num_replicas=world, rank=rank, batch_size=batch_size)
        loader = torch.utils.data.DataLoader([*range(7), None], batch_size=batch_size, sampler=sampler,
                                             collate_fn=collate_cases)
        shares.append(list(loader))
        assert len(sampler) == len(list(sampler))
    assert len({len(share) for share in shares}) == 1  # the same number of steps on every process
    assert sorted(b for share in shares for b in share if b) == one_process  # the same batches, each once
    assert [b for share in shares for b in share if not b] == [[]] * (len(shares[0]) * world - len(one_process))
    assert interleave([sum(share, []) for share in shares], batch_size) == list(range(7))  # dataset order
    with pytest.raises(ValueError, match=r"expected block >= 1"):
        interleave([[0]], 0)


def test_errors(tmp_path: Path, edit_file: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"--data.path ../shared/data/counterfact_mix/dev.json"):
        EditDataModule(path=str(tmp_path / "missing.json")).setup()
    with pytest.raises(EditInputError, match=r"expected limit > 0"):
        EditDataModule(limit=0)
    with pytest.raises(EditInputError, match=r"expected batch_size > 0"):
        EditDataModule(batch_size=0)
    with pytest.raises(EditInputError, match=r"expected format"):
        EditDataModule(format="mend")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"setup\(\) must run"):
        EditDataModule().test_dataloader()
    with pytest.raises(EditInputError, match=r"key 'requested_rewrite': missing"):
        EditDataModule(path=str(edit_file), format="counterfact_mix").setup()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(edit_records(3)[:2] + [{**edit_records(3)[2], "subject": "Nobody"}]))
    with pytest.raises(EditInputError, match=r"record 2 \(case_id 102\): key 'subject'"):
        EditDataModule(path=str(bad), limit=3).setup()  # eager: fails before any loader exists
    garbage = tmp_path / "garbage.json"
    garbage.write_text("not { json")
    with pytest.raises(EditInputError, match=r"could not read .*garbage.json"):
        load_records(garbage)
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")  # `datasets` alone raises a bare StopIteration
    with pytest.raises(EditInputError, match=r"could not read .*empty\.json' as records \(the file is empty\); "
                                             r"expected a JSON list of objects"):
        EditDataModule(path=str(empty)).setup()


def test_jsonl_is_read(tmp_path: Path) -> None:
    path = tmp_path / "edit.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in edit_records(2)))
    dm = EditDataModule(path=str(path))
    dm.setup()
    assert ids(dm) == [100, 101]


def test_default_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KELIGHT_DATA", str(tmp_path))
    assert default_data_root() == tmp_path.resolve()
    monkeypatch.setenv("KELIGHT_DATA", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"KELIGHT_DATA"):
        default_data_root()
    monkeypatch.delenv("KELIGHT_DATA")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "repo")
    assert default_data_root() == (tmp_path / "shared" / "data").resolve()
    monkeypatch.chdir(tmp_path / "repo" / "sub")
    assert default_data_root() == (tmp_path / "shared" / "data").resolve()
    monkeypatch.chdir(tmp_path)
    assert default_data_root() is None


@pytest.mark.parametrize(
    ("relpath", "source"),
    [("counterfact_mix/dev.json", "counterfact"), ("counterfact_edit/counterfact_edit.json", "counterfact_edit")],
)
def test_real_files_first_50_parse(relpath: str, source: str) -> None:
    root = default_data_root()
    if root is None or not (root / relpath).is_file():
        pytest.skip("shared data not found (set KELIGHT_DATA or run from the repository)")
    dm = EditDataModule(path=str(root / relpath), limit=50)
    dm.setup()
    assert len(dm.cases) == 50 and dm.cases[0].source == source
    assert all("rewrite" in case.probes for case in dm.cases)


def test_drop_conflicting_keeps_the_first_of_each_prompt_and_subject(tmp_path: Path) -> None:
    records = edit_records(4)
    records[2] = {**records[0], "case_id": 102, "target_new": "German"}  # conflicts with case 100
    records[3] = {**records[0], "case_id": 103, "target_new": " English"}  # a duplicate, not a conflict
    path = tmp_path / "conflicts.json"
    path.write_text(json.dumps(records))
    kept = EditDataModule(path=str(path), drop_conflicting=True)
    kept.setup()
    assert [c.case_id for c in kept.cases] == [100, 101, 103]
    everything = EditDataModule(path=str(path))
    everything.setup()
    assert [c.case_id for c in everything.cases] == [100, 101, 102, 103]
    with pytest.raises(EditInputError, match="expected drop_conflicting to be true or false, got 'yes'"):
        EditDataModule(path=str(path), drop_conflicting="yes")  # type: ignore[arg-type]


def test_duplicate_case_ids_are_refused(tmp_path: Path) -> None:
    """Case ids key the unedited Locality references (sequential/consecutive regimes), PathEdit's
    batch caches and ``kelight merge``: two records with one id would silently share them."""
    records = edit_records(3)
    records[2] = {**records[2], "case_id": 100}  # a different fact under case 0's id
    path = tmp_path / "dup.json"
    path.write_text(json.dumps(records))
    with pytest.raises(EditInputError, match=r"case ids \[100\] occur more than once.*give every record"):
        EditDataModule(path=str(path)).setup()
    EditDataModule(path=str(path), limit=2).setup()  # the selected cases alone must be unique

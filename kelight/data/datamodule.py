"""LightningDataModule over edit cases read from a JSON file (or the built-in demo set).

Files are read with ``datasets.load_dataset("json", data_files=path)``, which works offline for
local files: nothing global (such as ``HF_DATASETS_OFFLINE``) is set, and ``datasets`` keeps its
usual Arrow cache under ``~/.cache/huggingface/datasets``. Every selected record is parsed in
:meth:`EditDataModule.setup`, before any editing, so a malformed record fails at once with its
index and the fix.

Data are never copied into the repository; :func:`default_data_root` finds the shared data folder
(``$KELIGHT_DATA``, else ``../shared/data`` or ``../../shared/data`` from the working directory).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import datasets
import lightning.pytorch as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from kelight.data.builtin import builtin_path
from kelight.data.formats import FORMATS, describe_dropped, parse_records
from kelight.types import EditCase, EditInputError, conflicting_pairs

DataFormat = Literal["auto", "counterfact_mix", "counterfact_edit", "zsre"]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")  # "name", "user/name", "user/name:config"
_FILE_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_EXPECTED_SOURCE = ("a .json/.jsonl/.parquet file, a folder written by datasets' save_to_disk or holding such "
                    "files, or a Hugging Face dataset id such as 'user/name' or 'user/name:config'")


def load_records(path: str | os.PathLike[str], split: str | None = None) -> datasets.Dataset:
    """The records of a data file, a local ``datasets`` folder, or a Hugging Face hub dataset.

    Routes: a JSON (list of objects) or JSON-lines file, a Parquet file, a folder written by
    ``Dataset.save_to_disk``/``DatasetDict.save_to_disk``, a folder of such data files (read with
    ``datasets.load_dataset(folder)``), else a hub id ``"user/name"`` or ``"user/name:config"`` (needs the
    internet or a ``datasets`` cache that holds it). A source with several splits needs ``split``.

    Raises:
        FileNotFoundError: a path that does not exist and is no hub id.
        EditInputError: a file that is not records, an empty one, an unknown or missing split, or a hub id
            that cannot be loaded (the message says why and what is accepted).
    """
    source = Path(path).expanduser()
    if source.is_file():
        return _one_split(_read_file(source), split, str(source))
    if source.is_dir():
        saved = any((source / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))
        loaded = datasets.load_from_disk(str(source)) if saved else _load_dataset(str(source), None, str(source))
        return _one_split(loaded, split, str(source))
    text = os.fspath(path)
    if source.suffix in _FILE_LOADERS or not _HUB_ID.match(text):
        raise FileNotFoundError(
            f"edit dataset {text!r} not found (working directory {str(Path.cwd())!r}); expected {_EXPECTED_SOURCE}, "
            f"e.g. --data.path ../shared/data/counterfact_mix/dev.json, or leave the path unset for the built-in "
            f"demo set")
    name, _, config = text.partition(":")
    return _one_split(_load_dataset(name, config or None, text), split, text)


def _read_file(file: Path) -> datasets.Dataset | datasets.DatasetDict:
    loader = _FILE_LOADERS.get(file.suffix)
    if loader is None:
        raise EditInputError(f"could not read {str(file)!r}: expected {_EXPECTED_SOURCE}, got a "
                             f"{file.suffix or 'suffix-less'} file; convert it to JSON lines or Parquet")
    expected = "expected a JSON list of objects or one JSON object per line" if loader == "json" else \
        "expected a Parquet table of records"
    if file.stat().st_size == 0:  # `datasets` would raise a bare StopIteration
        raise EditInputError(f"could not read {str(file)!r} as records (the file is empty); {expected}")
    try:
        return datasets.load_dataset(loader, data_files=str(file), split="train")
    except (datasets.exceptions.DatasetGenerationError, ValueError) as err:
        raise EditInputError(f"could not read {str(file)!r} as records ({err}); {expected}") from err


def _load_dataset(name: str, config: str | None, shown: str) -> datasets.Dataset | datasets.DatasetDict:
    """``datasets.load_dataset(name, config)``; a failure (offline, unknown id or config) names the id."""
    try:
        return datasets.load_dataset(name, config)
    except (OSError, ValueError, datasets.exceptions.DatasetGenerationError) as err:  # incl. ConnectionError
        raise EditInputError(
            f"could not load the edit dataset {shown!r} with datasets ({type(err).__name__}: {err}); expected "
            f"{_EXPECTED_SOURCE}. A hub id needs internet access (or a datasets cache that holds it); on a machine "
            f"without it, download the file elsewhere and pass its path") from err


def _one_split(loaded: datasets.Dataset | datasets.DatasetDict, split: str | None, shown: str) -> datasets.Dataset:
    """The split ``split`` of ``loaded`` (a source with one split needs none)."""
    if isinstance(loaded, datasets.Dataset):
        if split not in (None, str(loaded.split or "train")):
            raise EditInputError(f"{shown} has no split {split!r} (it is one table); drop --data.split")
        return loaded
    names = list(loaded)
    if split is None and len(names) == 1:
        return loaded[names[0]]
    if split not in names:
        given = "no split was given" if split is None else f"got split {split!r}"
        raise EditInputError(f"{shown} has the splits {names}; {given}: choose one with --data.split NAME")
    return loaded[split]


def select_indices(n: int, limit: int | None = None, seed: int = 0, shuffle: bool = False, skip: int = 0) -> list[int]:
    """Record indices to use: all ``n`` in order, or a seeded permutation; less the first ``skip``;
    then the first ``limit``. ``skip`` continues an earlier run: ``limit=100`` then ``skip=100, limit=100``
    gives the same cases as ``limit=200``.

    Example:
        >>> select_indices(5, limit=3)
        [0, 1, 2]
        >>> select_indices(5, limit=3, skip=3)
        [3, 4]
    """
    if limit is not None and limit <= 0:
        raise EditInputError(f"expected limit > 0 (or None for all records), got {limit}")
    if skip < 0:
        raise EditInputError(f"expected skip >= 0, got {skip}")
    if skip >= n:
        raise EditInputError(f"skip {skip} leaves none of the {n} records; lower --data.skip")
    order = list(range(n))
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=generator).tolist()
    order = order[skip:]
    return order if limit is None else order[:limit]


def collate_cases(batch: Sequence[EditCase | None]) -> list[EditCase]:
    """Collate for edit cases: a plain list (cases hold text, never tensors), padding slots dropped."""
    return [case for case in batch if case is not None]


class BatchShardSampler(DistributedSampler):
    """Process r's share of the one-process loader's batches: batches r, r + N, r + 2N, ... of
    ``batch_size`` cases each, then padding slots (index ``n_cases``) up to ``ceil(n_batches / N)`` batches.

    Dealing out whole batches, not cases, keeps every joint edit (MEMIT/PMET's ``batch`` and
    ``consecutive`` regimes, ``z_batch``) the one a single process makes, so the metrics equal a
    one-process run's. Lightning's training loop broadcasts once per step (SIGTERM propagation), so
    every process must run the same number of steps: a shorter share is padded with batches of slots
    that are no case (the loader's dataset holds ``None`` there and :func:`collate_cases` drops them),
    never with duplicates, so each case is still edited exactly once. Only the last batch of all can
    hold fewer than ``batch_size`` cases, and it is the last batch of a longest share.

    Example:
        >>> list(BatchShardSampler(5, num_replicas=2, rank=1))
        [1, 3, 5]
        >>> list(BatchShardSampler(5, num_replicas=2, rank=1, batch_size=2))  # batches [2, 3] and padding
        [2, 3, 5, 5]
    """

    def __init__(self, n_cases: int, num_replicas: int, rank: int, batch_size: int = 1) -> None:
        super().__init__(range(n_cases), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.batch_size = batch_size  # read by EditModule to put the rows back in dataset order
        n_batches = -(-n_cases // batch_size)
        mine = range(rank, n_batches, num_replicas)
        steps = -(-n_batches // num_replicas)  # the longest share's batches
        own = [i for b in mine for i in range(b * batch_size, min((b + 1) * batch_size, n_cases))]
        self.indices = own + [n_cases] * (batch_size * (steps - len(mine)))
        self.num_samples = len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class EditDataModule(L.LightningDataModule):
    """Edit cases for ``kelight fit``/``validate``: one batch = a list of :class:`EditCase`.

    Train, validation and test loaders iterate the same cases in the same order. With several
    processes (``trainer.world_size > 1``) every loader shards the cases so that every case is edited
    and evaluated exactly once (Lightning's default sampler pads shards with duplicates; it leaves a
    distributed sampler it finds in place). The train loader deals out the one-process loader's
    batches, process r getting batches r, r + N, ... (:class:`BatchShardSampler`), so joint edits are
    the same as in one process, and pads a shorter share with empty batches, because Lightning's
    training loop needs the same number of steps on every process. The evaluation loaders (the
    unedited model, case by case) use ``UnrepeatedDistributedSampler``: process r gets cases
    r, r + N, ... (shares may differ by one case).

    Args:
        path: the records (:func:`load_records`: a .json/.jsonl/.parquet file, a local ``datasets`` folder,
            or a Hugging Face dataset id ``user/name[:config]``); ``None`` uses the built-in demo set.
        format: record format (``counterfact_mix``, ``counterfact_edit``, ``zsre``; :mod:`kelight.data.formats`);
            ``"auto"`` detects it per record. Records that hold no edit (zsre's empty ``alt``) are left out,
            counted in ``dropped`` and logged; ``limit`` and ``skip`` count file records, kept or not.
        limit: use only the first ``limit`` records (after shuffling, if ``shuffle``, and ``skip``).
        seed: seed of the shuffling permutation.
        shuffle: take a seeded random permutation of the records before ``limit``.
        skip: leave out the first ``skip`` records (after shuffling), e.g. to extend an earlier run
            of ``limit`` cases with the next ones (``kelight merge`` joins the two runs).
        batch_size: cases per batch (1 for single edits; k for batch editors).
        drop_conflicting: leave out every selected case that rewrites the prompt and subject of an
            earlier selected case to another target (the dev split has 8 such cases, counterfact_edit
            79 of 10,000); joint edits (the batch regime, PathEdit's joint regime) refuse such pairs.
        split: the split of a source that has several (a hub dataset or a ``datasets`` folder).

    Example:
        >>> dm = EditDataModule(limit=2)
        >>> dm.setup()
        >>> [case.request.subject for case in next(iter(dm.test_dataloader()))]
        ['Eiffel Tower']
    """

    def __init__(
        self,
        path: str | None = None,
        format: DataFormat = "auto",
        limit: int | None = None,
        seed: int = 0,
        shuffle: bool = False,
        batch_size: int = 1,
        skip: int = 0,
        drop_conflicting: bool = False,
        split: str | None = None,
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise EditInputError(f"expected format {' or '.join(map(repr, FORMATS))}, got {format!r}")
        if limit is not None and limit <= 0:
            raise EditInputError(f"expected limit > 0 (or None for all records), got {limit}")
        if skip < 0:
            raise EditInputError(f"expected skip >= 0, got {skip}")
        if batch_size <= 0:
            raise EditInputError(f"expected batch_size > 0, got {batch_size}")
        if not isinstance(drop_conflicting, bool):
            raise EditInputError(f"expected drop_conflicting to be true or false, got {drop_conflicting!r}")
        self.save_hyperparameters()
        self.path, self.format, self.limit = path, format, limit
        self.seed, self.shuffle, self.batch_size, self.skip = seed, shuffle, batch_size, skip
        self.drop_conflicting, self.split = drop_conflicting, split
        self.cases: list[EditCase] = []
        self.skipped: dict[str, int] = {}
        self.dropped: dict[str, list[int]] = {}  # reason -> file positions of records left out (no edit)

    def setup(self, stage: str | None = None) -> None:
        """Read and parse every selected record (once; later calls keep the parsed cases)."""
        if self.cases:
            return
        path = builtin_path() if self.path is None else Path(self.path)
        records = load_records(path, self.split)
        order = select_indices(len(records), self.limit, self.seed, self.shuffle, self.skip)
        skipped: Counter[str] = Counter()
        rows = records.select(order).to_list()
        self.cases = parse_records(rows, order, self.format, skipped, self.dropped)
        if self.dropped:
            rank_zero_info(f"{path}: {describe_dropped(self.dropped)}")
        twice = sorted((i for i, n in Counter(case.case_id for case in self.cases).items() if n > 1), key=str)
        if twice:  # ids key the unedited Locality references, PathEdit's joint-regime caches and `kelight merge`
            raise EditInputError(f"{path}: case ids {twice[:5]} occur more than once among the selected records; "
                                 f"give every record a unique case_id")
        if self.drop_conflicting:
            drop = {j for _, j in conflicting_pairs([case.request for case in self.cases])}
            if drop:
                rank_zero_info(f"{path}: left out {len(drop)} cases that conflict with an earlier one (ids "
                               f"{[self.cases[j].case_id for j in sorted(drop)]})")
            self.cases = [case for j, case in enumerate(self.cases) if j not in drop]
        self.skipped = dict(skipped)
        if skipped:
            rank_zero_info(
                f"{path}: skipped {sum(skipped.values())} unscoreable prompts (right == wrong "
                f"target) by group: {self.skipped}"
            )

    def _world(self) -> tuple[int, int]:
        """(number of processes, this process's rank)."""
        if not self.cases:
            raise RuntimeError("EditDataModule.setup() must run before its dataloaders are requested")
        trainer: Any = self.trainer
        world = getattr(trainer, "world_size", 1) if trainer is not None else 1
        if world > len(self.cases):
            raise EditInputError(
                f"{len(self.cases)} cases cannot be shared among {world} processes; raise "
                f"--data.limit or use fewer devices"
            )
        return world, (trainer.global_rank if world > 1 else 0)

    def _loader(self, padded: bool = False) -> DataLoader[list[EditCase]]:
        world, rank = self._world()
        dataset: list[EditCase | None] = list(self.cases)
        sampler: Sampler[int] | None = None
        if world > 1 and padded:
            dataset.append(None)  # the padding slot, index len(cases)
            sampler = BatchShardSampler(len(self.cases), num_replicas=world, rank=rank, batch_size=self.batch_size)
        elif world > 1:
            sampler = UnrepeatedDistributedSampler(self.cases, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, sampler=sampler, collate_fn=collate_cases)

    def train_dataloader(self) -> DataLoader[list[EditCase]]:
        """All cases in order; sharded without duplicates, shards padded to equal length with no-cases."""
        return self._loader(padded=True)

    def val_dataloader(self) -> DataLoader[list[EditCase]]:
        """All cases in order; sharded without duplicates across processes."""
        return self._loader()

    def test_dataloader(self) -> DataLoader[list[EditCase]]:
        """All cases in order; sharded without duplicates across processes."""
        return self._loader()

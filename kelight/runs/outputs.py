"""The output contract of a run directory (docs/design.md, "The output contract"): ``metrics.json`` (flat,
percent), ``cases.jsonl`` (one row per case), and the files a running or stopped run keeps (each process's
``cases.partial*.jsonl``, the sequential curve ``sequential*.jsonl``)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from kelight.files import parse_json

log = logging.getLogger(__name__)


def _clean(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


PARTIAL = "cases.partial.jsonl"


def _rank_file(out_dir: str | Path, stem: str, rank: int) -> Path:
    """``out_dir/<stem>.jsonl`` for rank 0 (or a single process), ``<stem>.rank{rank}.jsonl`` otherwise, so
    that processes never interleave writes."""
    return Path(out_dir) / (f"{stem}.jsonl" if rank == 0 else f"{stem}.rank{rank}.jsonl")


def partial_path(out_dir: str | Path, rank: int = 0) -> Path:
    """The partial log of process ``rank``: ``cases.partial.jsonl`` (rank 0 or a single process),
    ``cases.partial.rank{rank}.jsonl`` otherwise."""
    return _rank_file(out_dir, PARTIAL.removesuffix(".jsonl"), rank)


def sequential_path(out_dir: str | Path, rank: int = 0) -> Path:
    """The sequential regime's curve of process ``rank`` (``eval_every``): ``sequential.jsonl`` (rank 0 or a
    single process), ``sequential.rank{rank}.jsonl`` otherwise (each process edits its own sequence)."""
    return _rank_file(out_dir, "sequential", rank)


def sequential_ranks(out_dir: str | Path) -> list[int]:
    """The processes whose :func:`sequential_path` files a run directory holds besides rank 0's (a
    multi-process run made one sequence per process), rank 0 first."""
    stem = sequential_path(out_dir).stem
    return [0, *sorted(int(p.name.removeprefix(f"{stem}.rank").removesuffix(".jsonl"))
                       for p in Path(out_dir).glob(f"{stem}.rank*.jsonl"))]


def finite_value(row: Mapping, key: str) -> float | None:
    """``row[key]`` as a float when it is a finite number, else ``None`` (absent, or null: nan in the run)."""
    value = row.get(key)
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _append_jsonl(path: Path, row: Mapping) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")


def append_partial(out_dir: str | Path, row: Mapping, rank: int = 0) -> None:
    """Append one case row to this process's partial log (replaced by ``cases.jsonl`` at the end)."""
    _append_jsonl(partial_path(out_dir, rank), row)


def read_partial_rows(out_dir: str | Path) -> dict[object, dict]:
    """``{case id: row}`` of every process's partial log in ``out_dir`` (the cases a stopped run finished).

    A last line cut short by the stop is dropped with a warning; any other line that does not parse names the
    file and line.

    Raises:
        ValueError: a damaged line before the last, or a row without an id.
    """
    rows: dict[object, dict] = {}
    for path in sorted(Path(out_dir).glob(f"{PARTIAL.removesuffix('.jsonl')}*.jsonl")):
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, text in enumerate(lines, start=1):
            if not text.strip():
                continue
            try:
                row = parse_json(text, path, "delete the line (its case is edited again) or the file", number)
            except ValueError:
                if number == len(lines):  # the write the stop interrupted
                    log.warning("%s: line %d was cut short by the stop; its case is edited again", path, number)
                    continue
                raise
            if not isinstance(row, dict) or "id" not in row:
                raise ValueError(f"{path} line {number}: expected a case row with an 'id', got {text[:80]!r}; "
                                 f"delete the line (its case is edited again) or the file")
            rows[row["id"]] = row
    return rows


def append_sequential(out_dir: str | Path, row: Mapping, rank: int = 0) -> None:
    """Append one point of the sequential curve (``{"edits": N, <metric>: ...}``) to this process's file."""
    _append_jsonl(sequential_path(out_dir, rank), row)


def write_results(out_dir: str | Path, metrics: Mapping[str, float], cases: Sequence[Mapping]) -> Path:
    """Write ``metrics.json`` and ``cases.jsonl`` into ``out_dir``; returns the metrics path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.glob("cases.partial*.jsonl"):  # every process's log
        partial.unlink(missing_ok=True)
    path = out / "metrics.json"
    path.write_text(json.dumps({k: _clean(v) for k, v in metrics.items()}, indent=1) + "\n")
    with (out / "cases.jsonl").open("w") as f:
        for case in cases:
            f.write(json.dumps({k: _clean(v) for k, v in case.items()}) + "\n")
    return path



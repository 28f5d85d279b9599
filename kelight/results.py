"""The output contract (DESIGN §5): ``metrics.json`` (flat, percent) and ``cases.jsonl``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path


def _clean(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


PARTIAL = "cases.partial.jsonl"


def partial_path(out_dir: str | Path, rank: int = 0) -> Path:
    """The partial log of process ``rank``: ``cases.partial.jsonl`` (rank 0 or a single process),
    ``cases.partial.rank{rank}.jsonl`` otherwise, so that processes never interleave writes."""
    return Path(out_dir) / (PARTIAL if rank == 0 else f"cases.partial.rank{rank}.jsonl")


def append_partial(out_dir: str | Path, row: Mapping, rank: int = 0) -> None:
    """Append one case row to this process's partial log (replaced by ``cases.jsonl`` at the end)."""
    path = partial_path(out_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")


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


TABLE_COLUMNS = ("ES", "PS", "NS", "RS", "DNS", "EM", "PM", "NM", "RM", "DNM", "RES", "OS", "DOS", "FL",
                 "Efficacy", "Generality", "Locality", "Score", "Avg.S", "n_cases", "seconds_per_edit")


def format_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table: one row per run name, the contract's columns that any run has."""
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows.values())]
    lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = []
        for c in cols:
            v = r.get(c)
            ci = r.get(f"{c}_ci")
            if v is None:
                cells.append("–")
            elif c == "n_cases":
                cells.append(str(int(v)))
            elif ci is not None:
                cells.append(f"{v:.1f} ± {ci:.1f}")
            else:
                cells.append(f"{v:.2f}" if c == "seconds_per_edit" else f"{v:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(run_dirs: Sequence[str | Path]) -> str:
    """The Markdown table of several runs' ``metrics.json`` (row name = the run directory's name)."""
    rows = {}
    for d in run_dirs:
        path = Path(d) / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; run `kelight fit/validate` with this directory first")
        rows[Path(d).name] = json.loads(path.read_text())
    return format_table(rows)

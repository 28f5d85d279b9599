"""``kelight report``: one Markdown row per run, from its ``metrics.json``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from kelight.evaluation.judge import WILD_SCORES
from kelight.files import read_json
from kelight.runs.outputs import finite_value

TABLE_COLUMNS = ("ES", "PS", "NS", "RS", "DNS", "EM", "PM", "NM", "RM", "DNM", "RES", "OS", "DOS", "FL", "PPL",
                 "Efficacy", "Generality", "Locality", "Score", "Avg.S", *WILD_SCORES, "n_cases",
                 "seconds_per_edit", "z_steps_per_edit")


def format_table(rows: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table: one row per run name, the contract's columns that any run has. A score with an interval
    shows it as ``value [low, high]`` (``_lo``/``_hi``: the case-clustered Wilson interval, not symmetric about the
    value), else as ``value ± half-width`` (``_ci``: FL, and runs older than ``_lo``/``_hi``).

    Example:
        >>> print(format_table({"rome": {"ES": 100.0, "ES_ci": 5.4, "ES_lo": 89.3, "ES_hi": 100.0, "FL": 621.2,
        ...                             "FL_ci": 11.4, "n_cases": 32.0}}))
        | run | ES | FL | n_cases |
        |---|---|---|---|
        | rome | 100.0 [89.3, 100.0] | 621.2 ± 11.4 | 32 |
    """
    cols = [c for c in TABLE_COLUMNS if any(c in r for r in rows.values())]
    lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(r, c) for c in cols) + " |")
    return "\n".join(lines)


def _cell(row: Mapping[str, float], column: str) -> str:
    """One table cell: the value with its interval (``[lo, hi]``, else ``± ci``), ``–`` where absent."""
    value = row.get(column)
    low, high, ci = (finite_value(row, f"{column}_{end}") for end in ("lo", "hi", "ci"))
    if value is None:
        return "–"
    if column == "n_cases":
        return str(int(value))
    if low is not None and high is not None:
        return f"{value:.1f} [{low:.1f}, {high:.1f}]"
    if ci is not None:
        return f"{value:.1f} ± {ci:.1f}"
    return f"{value:.2f}" if column == "seconds_per_edit" else f"{value:.1f}"


def run_names(run_dirs: Sequence[str | Path]) -> list[str]:
    """Each run's directory name, or its shortest path suffix no other run ends with (``memit/seq`` and
    ``alphaedit/seq``), so that runs in same-named directories all get their own row and line.

    Example:
        >>> run_names(["runs/memit/seq", "runs/alphaedit/seq", "runs/none"])
        ['memit/seq', 'alphaedit/seq', 'none']
    """
    parts = [Path(os.path.abspath(d)).parts for d in run_dirs]
    names = []
    for mine in parts:
        k = 1
        while k < len(mine) and sum(p[-k:] == mine[-k:] for p in parts) > 1:
            k += 1
        names.append(str(Path(*mine[-k:])))
    return names


def report(run_dirs: Sequence[str | Path]) -> str:
    """The Markdown table of several runs' ``metrics.json`` (row name = the run directory's name, or as
    much of its path as tells it apart: :func:`run_names`)."""
    rows = {}
    for name, d in zip(run_names(run_dirs), run_dirs, strict=True):
        path = Path(d) / "metrics.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; run `kelight fit/validate` with this directory first")
        rows[name] = read_json(path, "rerun `kelight fit/validate` with this directory (for a merged run, "
                                             "run `kelight merge` of its parts again)")
    return format_table(rows)



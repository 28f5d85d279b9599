"""``kelight compare BASE RUN...``: is a run's score different from the base run's, on the same cases?

Each run directory's ``cases.jsonl`` holds every case's per-prompt scores and prompt counts (``n_ES``,
``n_Efficacy``, ...). For every score the runs share, over the cases both runs have (matched by case
id), this reports the pooled value of each (as ``metrics.json`` computes it) and the difference
``RUN − BASE`` in percentage points with a 95% paired case-bootstrap interval (the same resampled
cases in both runs; :func:`~kelight.evaluation.stats.paired_difference_interval`). An interval that
excludes 0 is a difference the cases support; one that contains 0 is not. Compared: the pairwise
scores and magnitudes (ES, EM, ..., DOS, DOM), the token accuracies (Efficacy, Generality, Locality),
the wild scores (``wild_ES``, ``wild_ES_f1``, ..., ``wild_NS_same``, ...) and FL (a mean over cases, as
``metrics.json``'s); not PPL, a perplexity of the models rather than a score per case.

Example:
    kelight compare runs/memit_seq runs/alphaedit_seq
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kelight.evaluation.judge import WILD_METRICS, count_key
from kelight.evaluation.stats import paired_difference_interval, pooled
from kelight.files import read_jsonl
from kelight.runs.outputs import finite_value
from kelight.runs.report import run_names
from kelight.types import PROBE_GROUPS, TOKEN_GROUPS

# score -> the key of its prompt count in a cases.jsonl row; magnitudes are weighted by their score's prompts
SCORES: dict[str, str] = {
    **{score: f"n_{score}" for score, _ in PROBE_GROUPS.values()},
    **{magnitude: f"n_{score}" for score, magnitude in PROBE_GROUPS.values()},
    **{name: f"n_{name}" for name in TOKEN_GROUPS.values()},
    **{name: count_key(name) for name in WILD_METRICS},
    "FL": "",  # every case weighs the same (its generations' mean entropy)
}


def read_cases(run_dir: str | Path) -> dict[object, Mapping]:
    """``{case id: row}`` of ``run_dir/cases.jsonl``.

    Raises:
        FileNotFoundError: without the file.
        ValueError: a row without an id, or an id twice (the file and line are named).
    """
    path = Path(run_dir) / "cases.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `kelight fit/validate` into {run_dir} first")
    rows: dict[object, Mapping] = {}
    for i, row in enumerate(read_jsonl(path, "rerun the fit into this directory"), 1):
        if not isinstance(row, Mapping) or "id" not in row:
            raise ValueError(f"{path}, line {i}: expected an object with an 'id', got {row!r:.200}")
        if row["id"] in rows:
            raise ValueError(f"{path}, line {i}: case id {row['id']!r} occurs twice; was this run merged from "
                             f"overlapping slices? Rerun it or `kelight merge` disjoint ones")
        rows[row["id"]] = row
    return rows


def _finite(row: Mapping, key: str) -> float:
    value = finite_value(row, key)
    return math.nan if value is None else value


def _counts(rows: Sequence[tuple[Mapping, Mapping]], score: str, count: str) -> np.ndarray:
    """Each case's prompts behind ``score`` (``row[count]``), the same in both runs.

    Raises:
        ValueError: a row without the count, or two runs with different counts for one case.
    """
    missing = [a.get("id") for a, b in rows if count not in a or count not in b]
    if missing:
        raise ValueError(f"case {missing[0]!r} has {score} but no {count}: a run made before per-case counts "
                         f"were recorded; rerun it")
    if any(a[count] != b[count] for a, b in rows):
        raise ValueError(f"the runs score {score} on different prompt counts for the same case id; they "
                         f"were run on different data")
    return np.array([a[count] for a, _ in rows], dtype=float)


def compare_pair(base: Mapping[object, Mapping], run: Mapping[object, Mapping], n_resamples: int = 2000,
                 seed: int = 0) -> dict[str, tuple[float, float, float, float, float, int]]:
    """Per score both runs have: ``(base, run, run − base, low, high, cases)`` over their common cases.

    Raises:
        ValueError: if the runs have no case in common, or a row has a score without its prompt count.
    """
    ids = [i for i in base if i in run]
    if not ids:
        raise ValueError("the runs have no case id in common; compare runs of the same data selection "
                         "(--data.path, --data.limit, --data.skip)")
    out = {}
    for score, count in SCORES.items():
        if not any(score in base[i] for i in ids) or not any(score in run[i] for i in ids):
            continue
        rows = [(base[i], run[i]) for i in ids if score in base[i] and score in run[i]]
        percents = np.array([[_finite(a, score) for a, _ in rows], [_finite(b, score) for _, b in rows]])
        counts = _counts(rows, score, count) if count else np.ones(len(rows))  # FL: one weight per case
        difference, low, high = paired_difference_interval(percents, counts, n_resamples, seed)
        has = np.isfinite(percents).all(0) & (counts > 0)  # the cases the difference is over
        values = pooled(percents[:, has], counts[has]) if has.any() else np.array([math.nan, math.nan])
        out[score] = (float(values[0]), float(values[1]), difference, low, high, int(has.sum()))
    return out


#: the footnote of a table of :func:`difference_cell` cells
INTERVAL_NOTE = "* the interval excludes 0 (paired case bootstrap, pooled as metrics.json)"


def difference_cell(difference: float, low: float, high: float) -> str:
    """``+1.2 [+0.3, +2.0] *``: a paired difference and its interval, starred where it excludes 0."""
    mark = " *" if low > 0 or high < 0 else ""
    return f"{difference:+.1f} [{low:+.1f}, {high:+.1f}]{mark}"


def compare_report(run_dirs: Sequence[str | Path], n_resamples: int = 2000, seed: int = 0) -> str:
    """Markdown: one row per (run, score), each run against the first."""
    names = run_names(run_dirs)
    cases = [read_cases(d) for d in run_dirs]
    lines = [f"| score | {names[0]} | run | value | run − {names[0]} [95% CI] | cases |", "|---|---|---|---|---|---|"]
    for name, run in zip(names[1:], cases[1:], strict=True):
        for score, (a, b, diff, low, high, n) in compare_pair(cases[0], run, n_resamples, seed).items():
            lines.append(f"| {score} | {a:.1f} | {name} | {b:.1f} | {difference_cell(diff, low, high)} | {n} |")
    return "\n".join(lines) + "\n\n" + INTERVAL_NOTE

"""The output contract (DESIGN §5): ``metrics.json`` (flat, percent) and ``cases.jsonl``; merging runs."""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kelight.analysis.stats import pooled, score_sums
from kelight.files import parse_json, read_json, read_jsonl, read_yaml
from kelight.metrics import intervals
from kelight.metrics.classes import avg_s
from kelight.metrics.wild import WILD_METRICS, WILD_SCORES, count_key
from kelight.types import KEEPING_REGIMES, PROBE_GROUPS, TOKEN_GROUPS

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


def _pooled(rows: Sequence[Mapping], key: str, count: str) -> tuple[float, int] | None:
    """``(Σ value·n / Σ n, Σ n)`` of ``key`` over the rows that have it, weighted by ``rows[count]``."""
    have = [r for r in rows if r.get(key) is not None]
    if not have:
        return None
    if any(count not in r for r in have):
        raise ValueError(f"rows with {key} but no {count}: they come from a run before per-case counts were "
                         "recorded, so pooled values cannot be recomputed; rerun those cases")
    counts = np.array([int(r[count]) for r in have])
    n = int(counts.sum())
    return (pooled(np.array([float(r[key]) for r in have]), counts), n) if n else None


def _metrics_of(rows: Sequence[Mapping]) -> dict[str, float]:
    out: dict[str, float] = {}
    for score, magnitude in PROBE_GROUPS.values():
        got = _pooled(rows, score, f"n_{score}")
        if got is not None:
            out[score] = got[0]
            out.update(score_interval(rows, score, f"n_{score}"))
            # a row with the score but a null magnitude had NaN read-outs: NaN, as EditMetrics
            nan_rows = any(r.get(magnitude) is None for r in rows if r.get(score) is not None)
            out[magnitude] = math.nan if nan_rows else _pooled(rows, magnitude, f"n_{score}")[0]
    fluency = np.array([float(r["FL"]) for r in rows if r.get("FL") is not None])
    if fluency.size:  # a case scores its texts' mean entropy; cases are averaged (Fluency metric)
        out["FL"] = float(fluency.mean())
        sums = intervals.sum_cases(intervals.case_sums([value]) for value in fluency)  # one value per case
        low, high = intervals.clustered_normal_interval(sums)
        out["FL_ci"] = (high - low) / 2.0  # normal over cases; nan for one case
    ppl = [r for r in rows if r.get("PPL") is not None]
    if ppl and not any(r.get("PPL") is None and r.get("n_PPL") for r in rows):  # null PPL (NaN/inf): as EditMetrics
        nll = _pooled([{**r, "PPL": math.log(r["PPL"])} for r in ppl], "PPL", "n_PPL")  # mean NLL per token
        if nll is not None:
            out["PPL"] = math.exp(nll[0])
    out.update(_tokens_of(rows))
    out.update(avg_s(out))
    for name in WILD_METRICS:
        got = _mean_of_items(rows, name, count_key(name))
        if got is not None:
            out[name] = got[0]
            out.update(got[1])
    return out


def _tokens_of(rows: Sequence[Mapping]) -> dict[str, float]:
    """The token accuracies (with their CIs) and their mean, ``Score``."""
    out, tokens = {}, {}
    for name in TOKEN_GROUPS.values():
        got = _mean_of_items(rows, name, f"n_{name}")
        if got is not None:
            tokens[name] = got[0]
            out.update(got[1])
    if tokens:
        out.update(tokens)
        out["Score"] = sum(tokens.values()) / len(tokens)
    return out


def _mean_of_items(rows: Sequence[Mapping], name: str, count: str) -> tuple[float, dict[str, float]] | None:
    """A mean over per-prompt values pooled across the rows (token accuracies, wild scores) and its 95% interval
    keys (:func:`score_interval`) from the rows' ``<name>_sq`` (none where a row lacks it: older runs)."""
    got = _pooled(rows, name, count)
    if got is None:
        return None
    if not all(r.get(f"{name}_sq") is not None for r in rows if r.get(name) is not None):
        return got[0], {}
    return got[0], score_interval(rows, name, count, f"{name}_sq")


def score_interval(rows: Sequence[Mapping], name: str, count: str, squares: str | None = None) -> dict[str, float]:
    """``<name>_ci``, ``<name>_lo``, ``<name>_hi`` (percent) of a score pooled over the rows: the case-clustered
    Wilson interval that :class:`~kelight.metrics.EditMetrics` reports (:mod:`kelight.metrics.intervals`), from
    each row's score (percent), its prompt count ``row[count]`` and, for fractional per-prompt values, their
    mean square ``row[squares]`` (``None``: 0/1 values). Empty when no row has the score."""
    have = [r for r in rows if r.get(name) is not None and r.get(count)]
    if not have:
        return {}

    def column(key: str) -> np.ndarray:
        return np.array([float(r[key]) for r in have])

    sums = score_sums(column(name), column(count), None if squares is None else column(squares))
    return intervals.percent_interval(name, *intervals.clustered_wilson_interval(sums))


def metrics_from_rows(rows: Sequence[Mapping]) -> dict[str, float]:
    """``metrics.json`` recomputed from ``cases.jsonl`` rows: pooled over prompts, with the case-clustered
    intervals from each row's score and prompt count (:func:`score_interval`), as
    :class:`~kelight.metrics.EditMetrics` does, per source when there are several,
    ``n_cases`` and ``seconds_per_edit``.

    Raises:
        ValueError: if a row has a score but not its prompt count (runs older than ``n_<score>``).
    """
    out = _metrics_of(rows)
    sources = sorted({r["source"] for r in rows if r.get("source") is not None})
    if len(sources) > 1:
        for source in sources:
            part = _metrics_of([r for r in rows if r.get("source") == source])
            out.update({f"{source}/{k}": v for k, v in part.items()})
    out["n_cases"] = float(len(rows))
    seconds = [float(r["edit_seconds"]) for r in rows if r.get("edit_seconds") is not None]
    if seconds:
        out["seconds_per_edit"] = sum(seconds) / len(seconds)
    out.update(z_steps_summary(rows))
    return out


def z_steps_summary(rows: Sequence[Mapping]) -> dict[str, float]:
    """``{"z_steps_per_edit": mean}`` of the rows' ``z_steps`` (value-vector optimisation steps, fewer
    than ``--model.steps`` where the early stop fired); empty unless every edited row has them (a
    merge with runs older than ``z_steps`` would otherwise average a subset)."""
    edited = [r for r in rows if r.get("edit_seconds") is not None]
    if not edited or any(r.get("z_steps") is None for r in edited):
        return {}
    return {"z_steps_per_edit": sum(int(r["z_steps"]) for r in edited) / len(edited)}


#: Config keys that may differ between runs that are merged (which cases, where the output went).
MERGE_FREE_KEYS = ("data.skip", "data.limit", "trainer.default_root_dir", "trainer.logger", "ckpt_path",
                   "model.init_args.resume")


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, Mapping):
        out: dict[str, object] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _free(key: str) -> bool:
    """Whether config ``key`` may differ between merged runs (it is, or is under, a MERGE_FREE_KEYS entry)."""
    return any(key == k or key.startswith(k + ".") for k in MERGE_FREE_KEYS)


def _check_parts_are_independent(config: Mapping[str, object]) -> None:
    """Refuse runs whose cases are not edited and evaluated independently of the cases around them."""
    regime = str(config.get("model.init_args.regime", "single"))
    joint = str(config.get("model.class_path", "")).endswith("PathEdit") and regime == "batch"
    if regime in KEEPING_REGIMES or joint:
        raise ValueError(f"{regime} runs of {config.get('model.class_path')} edit their cases together (the edits "
                         "accumulate or are trained jointly), so parts are not one run of all cases; rerun them in one")
    batch, skip = int(config.get("data.batch_size") or 1), int(config.get("data.skip") or 0)
    if regime == "batch" and skip % batch:
        raise ValueError(f"--data.skip {skip} is not a multiple of --data.batch_size {batch}: the parts' edit batches "
                         "differ from one run's; skip whole batches")


def merge_runs(out_dir: str | Path, run_dirs: Sequence[str | Path]) -> Path:
    """Join runs of the same configuration on disjoint cases (e.g. ``--data.limit 100`` and
    ``--data.skip 100 --data.limit 100``) into one run in ``out_dir``: ``cases.jsonl`` in the given
    order and ``metrics.json`` recomputed from the rows (:func:`metrics_from_rows`); ``merged.json``
    names the parts. Returns the metrics path.

    Raises:
        FileNotFoundError: if a run has no ``cases.jsonl`` or ``config.yaml``.
        ValueError: if the runs' configurations differ beyond :data:`MERGE_FREE_KEYS`, a case id
            occurs twice, the parts are not independent (sequential regimes, PathEdit's batch
            regime, batches cut mid-way), ``out_dir`` is one of the runs, or a row lacks the prompt
            counts needed to pool.
    """
    if len(run_dirs) < 2:
        raise ValueError(f"expected at least two runs to merge, got {len(run_dirs)}")
    if any(Path(out_dir).resolve() == Path(d).resolve() for d in run_dirs):
        raise ValueError(f"the output directory {out_dir} is one of the runs; write the merged run elsewhere")
    configs, rows = [], []
    for d in map(Path, run_dirs):
        for name in ("cases.jsonl", "config.yaml"):
            if not (d / name).exists():
                raise FileNotFoundError(f"{d / name} does not exist; merge finished `kelight fit/validate` runs")
        fix = "`kelight fit/validate` writes it; rerun that run, or restore the file"
        configs.append(_flat(read_yaml(d / "config.yaml", fix)))
        rows += read_jsonl(d / "cases.jsonl", fix)
    differ = sorted({k for c in configs[1:] for k in set(c) | set(configs[0])
                     if not _free(k) and k in c and k in configs[0] and c[k] != configs[0][k]})
    if differ:
        raise ValueError(f"the runs differ in {', '.join(differ)}; only runs of one configuration on different cases "
                         f"(--data.skip/--data.limit) can be merged")
    for c in configs:
        _check_parts_are_independent(c)
    twice = sorted((i for i, n in Counter(r["id"] for r in rows).items() if n > 1), key=str)
    if twice:
        raise ValueError(f"case ids {twice[:5]} occur in more than one run; merge runs on disjoint cases")
    metrics = metrics_from_rows(rows)
    path = write_results(out_dir, metrics, rows)
    unchecked = sorted({k for c in configs for k in c if not _free(k) and not all(k in o for o in configs)})
    (Path(out_dir) / "merged.json").write_text(json.dumps(
        {"parts": [str(d) for d in run_dirs], "n_cases": len(rows), "keys_not_in_every_config": unchecked},
        indent=1) + "\n")
    return path

"""``metrics.json`` recomputed from ``cases.jsonl`` rows (as the run's metrics compute it), and ``kelight merge``:
runs of one configuration on disjoint cases joined into one."""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kelight.evaluation import intervals
from kelight.evaluation.judge import WILD_METRICS, count_key
from kelight.evaluation.metrics import avg_s
from kelight.evaluation.stats import pooled, score_sums
from kelight.files import read_jsonl, read_yaml
from kelight.runs.outputs import write_results
from kelight.types import KEEPING_REGIMES, PROBE_GROUPS, TOKEN_GROUPS


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
    Wilson interval that :class:`~kelight.evaluation.metrics.EditMetrics` reports
    (:mod:`kelight.evaluation.intervals`), from
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
    :class:`~kelight.evaluation.metrics.EditMetrics` does, per source when there are several,
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
    out.update(run_summary(rows, [float(r["edit_seconds"]) for r in rows if r.get("edit_seconds") is not None]))
    return out


def run_summary(rows: Sequence[Mapping], seconds: Sequence[float]) -> dict[str, float]:
    """``n_cases`` (the rows), ``seconds_per_edit`` (the mean of ``seconds``, the edits' times, where there are
    any) and :func:`z_steps_summary` of a run."""
    out = {"n_cases": float(len(rows))}
    if seconds:
        out["seconds_per_edit"] = sum(seconds) / len(seconds)
    out.update(z_steps_summary(rows))
    return out


def z_steps_summary(rows: Sequence[Mapping]) -> dict[str, float]:
    """``{"z_steps_per_edit": mean}`` of the rows' ``z_steps`` (value-vector optimisation steps, fewer
    than ``--model.editor.steps`` where the early stop fired); empty unless every edited row has them (a
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
    old_layout = not any(key.startswith("model.init_args.editor.") for key in config)  # before 2026-12-07
    old_joint = str(config.get("model.class_path", "")).endswith("PathEdit") and regime == "batch" and old_layout
    if regime in (*KEEPING_REGIMES, "joint") or old_joint:  # PathEdit's joint regime was called batch then
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
            occurs twice, the parts are not independent (sequential regimes, PathEdit's joint
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

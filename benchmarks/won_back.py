"""Share of the specificity damage an objective wins back: (with − without) / (none − without).

Reads runs on the same cases (unedited, editor, then one or more editor+objective runs, e.g. SADR or the
relation terms at several weights) and prints for each objective run, per the SADR
paper's Table 3 reading, the share for RS, DNS, NS and their magnitudes (RM, DNM, NM) with a 95%
paired case-bootstrap interval (the same resampled cases in all three runs), plus the change in
ES/PS/EM/PM. Runs with ``--model.eval_protocol both`` (or ``wild``) add the same for the generated answers:
wild_RS/wild_DNS/wild_NS (the answer does not give the new target) and their ``_same`` shares (the answer
unchanged from the unedited model's), and the change in wild_ES/wild_PS. Pooled values are recomputed from
``cases.jsonl`` and checked against ``metrics.json``. Prompt counts per case come from the rows'
``n_<score>`` (runs since commit dcf5823) or, for older runs, from the dataset (``--data``, the same file and
``--limit`` the runs used).

With ``--plot OUT.png`` the runs are drawn as a trade-off: ES and PS against RS, one colour per run (the
unedited model and the editor included), named by the run's folder.

Example:
    python benchmarks/won_back.py runs/none runs/rome runs/rome_sadr \
        --data ../shared/data/counterfact_mix/dev.json
    python benchmarks/won_back.py runs/rel/none50 runs/rel/rome50 runs/rel/kl2_50 runs/rel/leak1_50 --plot tradeoff.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from kelight.data.datamodule import load_records
from kelight.data.formats import parse_record
from kelight.evaluation.stats import pooled, won_back_interval
from kelight.types import PROBE_GROUPS

SCORES = {name: magnitude for name, magnitude in PROBE_GROUPS.values()}  # ES -> EM, ...
KEYS = ("RS", "DNS", "NS", "RM", "DNM", "NM")
WILD_KEYS = ("wild_RS", "wild_DNS", "wild_NS", "wild_RS_same", "wild_DNS_same", "wild_NS_same")  # runs with
# --model.eval_protocol wild|both: the share of the generated answers' damage won back
SCORE_OF = {magnitude: score for score, magnitude in SCORES.items()}


def read_cases(run: Path) -> dict[object, dict]:
    path = run / "cases.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} does not exist; run `kelight fit/validate` into {run} first")
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines()) if row}


def dataset_counts(data: str, ids: list, fmt: str) -> dict[object, dict[str, int]]:
    """``{case id: {score: prompts}}`` from the dataset, for runs whose rows carry no ``n_<score>``."""
    records = load_records(data)
    counts = {}
    for i in ids:
        case = parse_record(records[int(i)], int(i), fmt)
        counts[i] = {PROBE_GROUPS[g][0]: len(p) for g, p in case.probes.items() if p}
    return counts


def won_back_rows(runs: list[dict], metrics: list[dict], dirs: list[Path], n: dict[str, np.ndarray],
                  resamples: int) -> dict[str, object]:
    """The shares won back and the changes of ``runs = [none, without, with]`` (rows by case id, same order; their
    ``metrics.json`` and folders beside them, to check the pooled rows against)."""
    ids = list(runs[0])
    out: dict[str, object] = {"n_cases": len(ids)}
    for key in (*KEYS, *WILD_KEYS, "ES", "PS", "EM", "PM", "wild_ES", "wild_PS"):
        if key not in n:
            continue
        p = np.array([[r[i].get(key, math.nan) for i in ids] for r in runs], dtype=float)  # (3, C)
        for run, row, d in zip(p, metrics, dirs, strict=True):
            keep = np.isfinite(run) & (n[key] > 0)
            if key in row and abs(pooled(run[keep], n[key][keep]) - row[key]) > 1e-3:
                raise SystemExit(f"{d}: pooled {key} from cases.jsonl ({pooled(run[keep], n[key][keep]):.4f}) differs "
                                 f"from metrics.json ({row[key]:.4f}); wrong --data or --limit?")
        if key in KEYS or key in WILD_KEYS:
            share, low, high = won_back_interval(p, n[key], resamples)
            out[key] = {"won_back": round(share, 3), "ci95": [round(low, 3), round(high, 3)],
                        "none/without/with": [round(pooled(r[np.isfinite(r)], n[key][np.isfinite(r)]), 2) for r in p]}
        else:
            keep = np.isfinite(p).all(0) & (n[key] > 0)
            out[f"Δ{key}"] = round(pooled(p[2, keep], n[key][keep]) - pooled(p[1, keep], n[key][keep]), 2)
    return out


def plot_tradeoff(runs: list[dict], dirs: list[Path], n: dict[str, np.ndarray], path: Path) -> None:
    """ES (circle) and PS (square) against RS, one colour per run (named by its folder), joined by a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def score(run: dict, key: str) -> float:
        p = np.array([run[i].get(key, math.nan) for i in run], dtype=float)
        keep = np.isfinite(p) & (n[key] > 0)
        return pooled(p[keep], n[key][keep])

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for run, d in zip(runs, dirs, strict=True):
        x, es, ps = score(run, "RS"), score(run, "ES"), score(run, "PS")
        (line,) = ax.plot([x, x], [ps, es], linewidth=1, label=d.name)
        ax.plot([x], [es], marker="o", color=line.get_color())
        ax.plot([x], [ps], marker="s", color=line.get_color())
    ax.set_xlabel("RS: the subject's other relations kept (%)")
    ax.set_ylabel("ES (circle), PS (square) (%)")
    ax.set_title(f"Edit against the subject's other facts ({len(runs[0])} cases)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("none")
    parser.add_argument("without")
    parser.add_argument("with_", nargs="+", metavar="with")
    parser.add_argument("--data", help="dataset the runs used (only for rows without n_<score>)")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--plot", type=Path, help="write ES and PS against RS of every run to this PNG")
    args = parser.parse_args()
    dirs = [Path(d) for d in (args.none, args.without, *args.with_)]
    runs = [read_cases(d) for d in dirs]
    ids = list(runs[0])
    if any(list(r) != ids for r in runs[1:]):
        raise SystemExit(f"expected the same cases in the same order in all runs; got {[len(r) for r in runs]} "
                         f"cases (run them with the same --data.path/--data.limit)")
    need = any(f"n_{k}" not in row for r in runs for row in r.values() for k in SCORES if k in row)
    if need and not args.data:
        raise SystemExit("these runs' cases.jsonl carry no prompt counts (n_RS, ...); pass --data with the dataset "
                         "they were run on")
    counts = dataset_counts(args.data, ids, args.format) if need else None
    n = {}
    for key in (*KEYS, *WILD_KEYS, "ES", "PS", "EM", "PM", "wild_ES", "wild_PS"):
        score = SCORE_OF.get(key, key)
        scored = [row for row in runs[0].values() if score in row]  # none for wild_* of a teacher-forced run
        if scored and all(key in row for row in scored):
            n[key] = np.array([(runs[0][i].get(f"n_{score}") if counts is None else counts[i].get(score, 0)) or 0
                               for i in ids], dtype=float)
    metrics = [json.loads((d / "metrics.json").read_text()) for d in dirs]
    for with_dir, with_run, with_metrics in zip(dirs[2:], runs[2:], metrics[2:], strict=True):
        if len(dirs) > 3:
            print(f"== {with_dir}")
        out = won_back_rows([runs[0], runs[1], with_run], [*metrics[:2], with_metrics], [*dirs[:2], with_dir], n,
                            args.resamples)
        print("\n".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in out.items()))
    if args.plot:
        if missing := [k for k in ("ES", "PS", "RS") if k not in n]:
            raise SystemExit(f"--plot draws ES and PS against RS; these runs have no {', '.join(missing)} "
                             "(counterfact_mix cases with relation prompts have all three)")
        plot_tradeoff(runs, dirs, n, args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

"""Share of the specificity damage an objective wins back: (with − without) / (none − without).

Reads three runs on the same cases (unedited, editor, editor+SADR) and prints, per the SADR
paper's Table 3 reading, the share for RS, DNS, NS and their magnitudes (RM, DNM, NM) with a 95%
paired case-bootstrap interval (the same resampled cases in all three runs), plus the change in
ES/PS/EM/PM. Runs with ``--model.eval_protocol both`` (or ``wild``) add the same for the generated answers:
wild_RS/wild_DNS/wild_NS (the answer does not give the new target) and their ``_same`` shares (the answer
unchanged from the unedited model's), and the change in wild_ES/wild_PS. Pooled values are recomputed from
``cases.jsonl`` and checked against ``metrics.json``. Prompt counts per case come from the rows'
``n_<score>`` (runs since commit dcf5823) or, for older runs, from the dataset (``--data``, the same file and
``--limit`` the runs used).

Example:
    python benchmarks/won_back.py runs/none runs/rome runs/rome_sadr \
        --data ../shared/data/counterfact_mix/dev.json
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("none")
    parser.add_argument("without")
    parser.add_argument("with_")
    parser.add_argument("--data", help="dataset the runs used (only for rows without n_<score>)")
    parser.add_argument("--format", default="auto")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    dirs = [Path(d) for d in (args.none, args.without, args.with_)]
    runs = [read_cases(d) for d in dirs]
    ids = list(runs[0])
    if any(list(r) != ids for r in runs[1:]):
        raise SystemExit(f"expected the same cases in the same order in all three runs; got {[len(r) for r in runs]} "
                         f"cases (run them with the same --data.path/--data.limit)")
    need = any(f"n_{k}" not in row for r in runs for row in r.values() for k in SCORES if k in row)
    if need and not args.data:
        raise SystemExit("these runs' cases.jsonl carry no prompt counts (n_RS, ...); pass --data with the dataset "
                         "they were run on")
    counts = dataset_counts(args.data, ids, args.format) if need else None
    out: dict[str, object] = {"n_cases": len(ids)}
    for key in (*KEYS, *WILD_KEYS, "ES", "PS", "EM", "PM", "wild_ES", "wild_PS"):
        score = SCORE_OF.get(key, key)
        if not all(key in row for row in runs[0].values() if score in row):
            continue
        n = np.array([(runs[0][i].get(f"n_{score}") if counts is None else counts[i].get(score, 0)) or 0
                      for i in ids], dtype=float)
        p = np.array([[r[i].get(key, math.nan) for i in ids] for r in runs], dtype=float)  # (3, C)
        for run, row, d in zip(p, (json.loads((d / "metrics.json").read_text()) for d in dirs), dirs, strict=True):
            keep = np.isfinite(run) & (n > 0)
            if key in row and abs(pooled(run[keep], n[keep]) - row[key]) > 1e-3:
                raise SystemExit(f"{d}: pooled {key} from cases.jsonl ({pooled(run[keep], n[keep]):.4f}) differs from "
                                 f"metrics.json ({row[key]:.4f}); wrong --data or --limit?")
        if key in KEYS or key in WILD_KEYS:
            share, low, high = won_back_interval(p, n, args.resamples)
            out[key] = {"won_back": round(share, 3), "ci95": [round(low, 3), round(high, 3)],
                        "none/without/with": [round(pooled(r[np.isfinite(r)], n[np.isfinite(r)]), 2) for r in p]}
        else:
            keep = np.isfinite(p).all(0) & (n > 0)
            out[f"Δ{key}"] = round(pooled(p[2, keep], n[keep]) - pooled(p[1, keep], n[keep]), 2)
    print("\n".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in out.items()))


if __name__ == "__main__":
    main()

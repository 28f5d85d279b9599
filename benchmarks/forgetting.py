"""Forgetting in the sequential/consecutive regime: each metric by the age of the edit.

A sequential run edits its cases one after another and evaluates them all after the last edit, so
``cases.jsonl`` (in edit order, one process) holds how well each edit survived the ones after it.
This prints, per run, the case-averaged metric in blocks of ``--block`` consecutive edits, oldest
first, so that the last column is the most recent edits. Case-averaged (each case's own value,
then the mean over the block's cases) — not the prompt-pooled value of ``metrics.json``, whose
overall figure is printed beside it for reference.

Under DDP each process edits its own shard in sequence: the rows are then not in one edit order,
and the script refuses them (``cases.jsonl`` of a multi-process run interleaves the shards).

Example:
    python benchmarks/forgetting.py runs/rome_seq runs/memit_seq --block 100
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

from kelight.evaluation.stats import block_means


def read_run(run: Path) -> tuple[list[dict], dict]:
    cases, metrics = run / "cases.jsonl", run / "metrics.json"
    for path in (cases, metrics):
        if not path.exists():
            raise SystemExit(f"{path} does not exist; run a sequential `kelight fit` into {run} first")
    meta = json.loads(metrics.read_text())
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
    devices = (config.get("trainer") or {}).get("devices", 1)
    if devices not in (1, "1", "auto", None):
        raise SystemExit(f"{run} ran with trainer.devices={devices!r}; a multi-process run's cases are not in one "
                         f"edit order")
    return [json.loads(line) for line in cases.read_text().splitlines() if line], meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of sequential/consecutive fits")
    parser.add_argument("--block", type=int, default=100, help="edits per column")
    parser.add_argument("--metrics", nargs="+", default=["Efficacy", "Generality", "Locality"])
    args = parser.parse_args(argv)
    for metric in args.metrics:
        tables = []
        for run in args.runs:
            rows, meta = read_run(run)
            values = [float(row.get(metric, math.nan)) for row in rows]
            tables.append((run, block_means(values, args.block), meta.get(metric, math.nan), len(rows)))
        width = max(len(t[1]) for t in tables)
        print(f"\n{metric}, case-averaged per block of {args.block} edits (oldest first), and metrics.json's value")
        heads = [f"edits {i * args.block + 1}–{(i + 1) * args.block}" for i in range(width)]
        print("| run | " + " | ".join(heads) + " | all (metrics.json) |")
        print("|---" * (width + 2) + "|")
        for run, means, overall, n in tables:
            cells = [f"{m:.1f}" for m in means] + ["–"] * (width - len(means))
            print(f"| {run} ({n}) | " + " | ".join(cells) + f" | {overall:.1f} |")


if __name__ == "__main__":
    main()

"""Forgetting in the sequential/consecutive regime: each metric by the age of the edit.

A sequential run edits its cases one after another and evaluates them all after the last edit, so
``cases.jsonl`` (in edit order, one process) holds how well each edit survived the ones after it.
This prints, per run, the case-averaged metric in blocks of ``--block`` consecutive edits, oldest
first, so that the last column is the most recent edits. Case-averaged (each case's own value,
then the mean over the block's cases) — not the prompt-pooled value of ``metrics.json``, whose
overall figure is printed beside it for reference.

Under DDP each process edits its own shard in sequence: the rows are then not in one edit order,
and the script refuses them (``cases.jsonl`` of a multi-process run interleaves the shards).

A run scored on a sample of its edits (``--model.eval_cases``) keeps only the sampled cases; ``--order``
then takes each case's edit position from the run's data (its ``data`` block in ``config.yaml``: path,
format, skip, limit, shuffle, seed), so a column still means "edits i–j", holding the sampled cases of
that age.

Example:
    python benchmarks/forgetting.py runs/rome_seq runs/memit_seq --block 100
    python benchmarks/forgetting.py runs/ultra10k --block 1000 --order
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


def edit_positions(run: Path) -> dict:
    """Case id -> 0-based edit position, from the cases the run's ``data`` block selects (as ``kelight fit``
    selects them)."""
    import kelight  # noqa: PLC0415 (only for --order)

    data = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("data") or {}
    keys = ("path", "format", "skip", "limit", "shuffle", "seed", "split")
    cases = kelight.load_cases(**{k: data[k] for k in keys if data.get(k) is not None})
    return {case.case_id: i for i, case in enumerate(cases)}


def age_block_means(rows: list[dict], values: list[float], position: dict, block: int) -> list[float]:
    """Mean of the values whose case was edited in each block of ``block`` edits, oldest first; ``nan`` for a
    block without a scored case."""
    missing = [row["id"] for row in rows if row["id"] not in position]
    if missing:
        raise SystemExit(f"cases {missing[:5]} are not in the run's data; was it moved or changed?")
    blocks: list[list[float]] = [[] for _ in range(max(position.values()) // block + 1)]
    for row, value in zip(rows, values, strict=True):
        blocks[position[row["id"]] // block].append(value)
    return [block_means(b, len(b))[0] if b else math.nan for b in blocks]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories of sequential/consecutive fits")
    parser.add_argument("--block", type=int, default=100, help="edits per column")
    parser.add_argument("--metrics", nargs="+", default=["Efficacy", "Generality", "Locality"])
    parser.add_argument("--order", action="store_true",
                        help="group by each case's edit position in the run's data (runs scored on a sample)")
    args = parser.parse_args(argv)
    for metric in args.metrics:
        tables = []
        for run in args.runs:
            rows, meta = read_run(run)
            values = [float(row.get(metric, math.nan)) for row in rows]
            means = (age_block_means(rows, values, edit_positions(run), args.block) if args.order
                     else block_means(values, args.block))
            tables.append((run, means, meta.get(metric, math.nan), len(rows)))
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

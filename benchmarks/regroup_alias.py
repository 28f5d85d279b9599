"""Runs made before commit e2c9fa9 (2026-11-27) under the paper's grouping: PS = paraphrases, RES = reasoning + aliases.

Until that commit kelight scored counterfact_mix's ``p-subject_alias`` prompts in PS; the SADR paper's
reference scores them with ``p-reasoning`` as portability (RES), and its PS is ``p-paraphrase`` only
(``kelight/data/formats.py``). The two halves of the mix never share a key: a WikiData case has alias
prompts and no paraphrase, a CounterFact case the reverse. So in an old run every WikiData row's
PS/PM are exactly its alias prompts, and moving them (pooled by their prompt counts ``n_PS``) into the
row's RES/REM gives the run under the new grouping, exactly. Rows of new runs are left as they are
(a WikiData row there has no PS), so regrouping is idempotent.

Prints the regrouped table (the columns of ``kelight report``); ``--out DIR`` also writes each run's
regrouped ``cases.jsonl``/``metrics.json`` (and its ``config.yaml``) to ``DIR/<run name>``, for
``kelight merge`` or ``won_back.py``.

Example:
    python benchmarks/regroup_alias.py runs/s11/none200 runs/s11/rome80 runs/s11/rome_sadr80
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from kelight.evaluation.stats import pooled
from kelight.runs.merge import metrics_from_rows
from kelight.runs.outputs import write_results
from kelight.runs.report import format_table


def regroup(row: Mapping) -> dict:
    """``row`` with a WikiData case's PS/PM (its alias prompts) pooled into RES/REM."""
    out = dict(row)
    if row.get("source") != "wikidata" or row.get("PS") is None:
        return out
    if "n_PS" not in row:
        raise SystemExit(f"case {row.get('id')!r} has PS but no n_PS: a run older than per-case counts "
                         "(commit dcf5823, 2026-11-26); rerun it")
    parts = [(row["PS"], row["PM"], int(row["n_PS"]))]
    if row.get("RES") is not None:
        parts.append((row["RES"], row["REM"], int(row["n_RES"])))
    counts = [n for _, _, n in parts]
    out["RES"] = pooled([s for s, _, _ in parts], counts)
    out["REM"] = pooled([m for _, m, _ in parts], counts)
    out["n_RES"] = sum(counts)
    for key in ("PS", "PM", "n_PS"):
        out.pop(key)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (with cases.jsonl)")
    parser.add_argument("--out", type=Path, help="write the regrouped runs to OUT/<run name>")
    args = parser.parse_args()
    table = {}
    for run in args.runs:
        path = run / "cases.jsonl"
        if not path.exists():
            raise SystemExit(f"{path} does not exist; run `kelight fit/validate` into {run} first")
        rows = [regroup(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
        metrics = metrics_from_rows(rows)
        table[run.name] = metrics
        if args.out:
            target = args.out / run.name
            write_results(target, metrics, rows)
            if (run / "config.yaml").exists():
                shutil.copy(run / "config.yaml", target / "config.yaml")
    print(format_table(table))


if __name__ == "__main__":
    main()

"""Where an editor's time per edit goes: optimisation steps taken vs seconds per step, from finished runs.

Reads each run's ``cases.jsonl`` (rows with ``z_steps`` and ``edit_seconds``) and prints, per run,
the mean steps per edit, the share of edits that ran every step (the early stop never fired) and
the seconds per step (all edit seconds over all steps: the per-edit fixed work — keys, the update,
the prefix cache — is spread over the steps, so fewer steps make a step look dearer). With two runs
on the same cases (e.g. an editor and the editor + SADR, run side by side under the same load), it
splits the ratio of their seconds per edit into the steps ratio times the per-step ratio: how much
of an objective's cost is more steps and how much a dearer step. A per-case fit of seconds on steps
is not given: harder cases take more steps and have longer prompts, so the two are confounded.

Example:
    python benchmarks/step_cost.py runs/rome80 runs/rome_sadr80 --steps 80
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def read_rows(run: Path) -> list[dict]:
    path = run / "cases.jsonl"
    if not path.exists():
        path = run / "cases.partial.jsonl"  # a run still going: the cases done so far
    if not path.exists():
        raise SystemExit(f"{run} has no cases.jsonl (nor cases.partial.jsonl); run `kelight fit` into it first")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("z_steps") is not None and r.get("edit_seconds") is not None]
    if len(rows) < 2:
        raise SystemExit(f"{path}: fewer than 2 rows with z_steps and edit_seconds "
                         "(runs since commit 9bcb3d1 have them)")
    return rows


def summary(rows: list[dict], steps: int) -> dict[str, float]:
    z = np.array([r["z_steps"] for r in rows], dtype=float)
    t = np.array([r["edit_seconds"] for r in rows], dtype=float)
    return {"cases": len(rows), "steps_per_edit": z.mean(), "median_steps": float(np.median(z)),
            "ran_all_steps_%": 100.0 * (z >= steps).mean(), "seconds_per_edit": t.mean(),
            "seconds_per_step": t.sum() / z.sum()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, required=True, help="the runs' --model.editor.steps")
    args = parser.parse_args()
    rows = {run: read_rows(run) for run in args.runs}
    if len(rows) == 2:  # compare on the cases both have
        a, b = (dict((r["id"], r) for r in rs) for rs in rows.values())
        common = [i for i in a if i in b]
        rows = {run: [lookup[i] for i in common] for run, lookup in zip(rows, (a, b), strict=True)}
    stats = {run: summary(rs, args.steps) for run, rs in rows.items()}
    for run, s in stats.items():
        print(f"{run}: " + ", ".join(f"{k} {v:.3g}" for k, v in s.items()))
    if len(stats) == 2:
        first, second = stats.values()
        print(f"time ratio {second['seconds_per_edit'] / first['seconds_per_edit']:.3f} = steps ratio "
              f"{second['steps_per_edit'] / first['steps_per_edit']:.3f} x per-step ratio "
              f"{second['seconds_per_step'] / first['seconds_per_step']:.3f} (on {first['cases']} common cases)")
        one, two = rows.values()
        per_case = [(b["edit_seconds"] / b["z_steps"]) / (a["edit_seconds"] / a["z_steps"])
                    for a, b in zip(one, two, strict=True)]
        print(f"per-step ratio case by case (same prompts on both sides): median {np.median(per_case):.3f}")


if __name__ == "__main__":
    main()

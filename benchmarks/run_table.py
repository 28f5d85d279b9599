"""Run several kelight experiments on the same cases, in parallel processes, and print one table.

Plain HF forwards of a small model are launch-bound on a GPU, so a few processes sharing one
device raise throughput; on CPU use ``--parallel 1``.

A row is a config name under ``configs/<model>/`` (``none`` = the unedited model), optionally with
``@STEPS`` to override its z-steps: the SADR paper's step counts (ROME/MEMIT 80, PMET 40 on
TinyLlama) next to the plain editors at the same steps are ``rome@80 rome_sadr memit@80 memit_sadr
pmet@40 pmet_sadr`` (rows ``rome_80steps``, ...).

Example:
    python benchmarks/run_table.py --out runs/table --model smollm2 --limit 200 \
        --data ../shared/data/counterfact_mix/dev.json --parallel 7 none rome rome_sadr memit memit_sadr pmet pmet_sadr
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from kelight.runs.report import report


def parse_row(spec: str) -> tuple[str, str, list[str]]:
    """``(run directory name, config name, extra arguments)`` of a row spec ``name[@STEPS]``."""
    name, _, steps = spec.partition("@")
    if not steps:
        return name, name, []
    if not steps.isdigit() or int(steps) <= 0 or name == "none":
        raise SystemExit(f"row {spec!r}: expected NAME@STEPS with a positive integer and an editor, e.g. rome@80")
    return f"{name}_{steps}steps", name, ["--model.editor.steps", steps]


def command(spec: str, model: str, data: str, limit: int, out: Path, extra: list[str]) -> list[str]:
    """The ``kelight`` call for one row; ``none`` is the unedited model (``validate``)."""
    run, config, row_extra = parse_row(spec)
    sub, config = ("validate", "rome") if config == "none" else ("fit", config)
    return [sys.executable, "-m", "kelight.cli", sub, "--config", f"configs/{model}/{config}.yaml",
            "--data.path", data, "--data.limit", str(limit), "--trainer.default_root_dir", str(out / run),
            *row_extra, *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("methods", nargs="+")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", required=True)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--extra", default="", help="extra CLI arguments for every run, space separated")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for spec in args.methods:
        parse_row(spec)  # fail before anything runs
    pending = list(args.methods)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    while pending or running:
        while pending and len(running) < args.parallel:
            m = pending.pop(0)
            log = (args.out / f"{parse_row(m)[0]}.log").open("w")
            cmd = command(m, args.model, args.data, args.limit, args.out, args.extra.split())
            running[m] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time())
        for m, (proc, t0) in list(running.items()):
            if proc.poll() is not None:
                sys.stdout.write(f"{m}: exit {proc.returncode} after {time.time() - t0:.0f} s\n")
                sys.stdout.flush()
                del running[m]
        time.sleep(2)
    runs = [args.out / parse_row(m)[0] for m in args.methods]
    done = [d for d in runs if (d / "metrics.json").exists()]
    sys.stdout.write(report(done) + "\n")


if __name__ == "__main__":
    main()

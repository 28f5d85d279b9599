"""``kelight sweep SPEC --count N [--out DIR] [-- EXTRA FIT ARGS]``: a W&B sweep, locally and offline.

The open-source W&B sweep engine (``sweeps.next_run``: grid, random, bayes) proposes each trial's
parameters from the spec and the trials so far. Each trial is launched as ``wandb agent`` launches
it: the spec's ``command`` with the agent's macros (``${env}`` → ``/usr/bin/env``,
``${interpreter}`` → ``python``, ``${program}``, ``${args}`` → ``--model.editor.sadr_gamma=0.01`` …,
``${envvar:NAME}``), expanded by wandb's own helpers, with ``WANDB_SWEEP_ID``, ``WANDB_RUN_ID`` and
``WANDB_SWEEP_PARAM_PATH`` (a YAML of the parameters) in its environment and ``WANDB_MODE=offline``.
Two additions: ``EXTRA`` fit arguments go just before ``${args}`` (the swept values win), and
``--trainer.default_root_dir=OUT/trials/<run id>`` goes last, so each trial has its own directory.

The metric (``spec.metric.name``, e.g. ``fit/Avg.S``; a ``fit/`` prefix — the key W&B sees — is
dropped) is read from the trial's ``metrics.json`` and fed to the next ``next_run``. A trial that
exits non-zero or writes no metrics is recorded as crashed (exit code, stderr tail), one stopped by
SIGTERM or Ctrl-C as failed, and the sweep goes on. ``OUT`` gets ``summary.json``, ``summary.md`` and ``tradeoff.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kelight.files import read_json, read_yaml

STAGE_PREFIXES = ("fit/", "validate/", "test/")
SUMMARY_COLUMNS = ("ES", "PS", "NS", "RS", "DNS", "EM", "PM", "RM", "DNM", "Avg.S", "n_cases", "seconds_per_edit")


@dataclass
class Trial:
    """One launched trial: parameters, command, outcome."""

    index: int
    run_id: str
    params: dict
    command: list[str]
    directory: str
    state: str = "running"  # finished | failed (stopped by a signal) | crashed
    returncode: int | None = None
    metric: float | None = None
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    stderr_tail: str = ""


def _engine():
    """The ``sweeps`` package (imports scipy/sklearn; its pydantic-v1 config warns once on import)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps  # noqa: PLC0415

    return sweeps


def load_spec(path: str | Path) -> dict:
    """Read a sweep spec and check it with the sweep engine's own schema.

    Raises:
        ValueError: naming the file and every schema violation, a missing block-list
            ``command``/``metric``, or where the file is not valid YAML.
    """
    spec = read_yaml(path, "fix the spec (see sweeps/*.yaml for examples)")
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a YAML mapping (a W&B sweep spec)")
    problems = list(_engine().schema_violations_from_proposed_config(spec))
    if not isinstance(spec.get("command"), list):
        problems.append("`command` must be a block list ending in ${args}, e.g. [${env}, kelight, fit, ...]")
    if not isinstance(spec.get("metric"), dict) or "name" not in spec["metric"]:
        problems.append("`metric: {name: fit/Avg.S, goal: maximize}` is required to rank trials")
    if problems:
        raise ValueError(f"{path}: invalid sweep spec:\n  " + "\n  ".join(problems))
    return spec


def plain(value: object) -> object:
    """numpy scalars from the engine as Python numbers (YAML/JSON-safe)."""
    return value.item() if isinstance(value, np.generic) else value


def expand_command(spec: dict, params: dict, extra_args: tuple[str, ...] = (),
                   args_json_file: str = "") -> list[str]:
    """The agent's expansion of ``spec["command"]`` for ``params`` (wandb's helpers), plus ``extra_args``."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils  # noqa: PLC0415

    command = sweep_utils.create_sweep_command(list(spec.get("command") or sweep_utils.DEFAULT_SWEEP_COMMAND))
    macros = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros.update(interpreter=["python"], program=[str(spec.get("program", ""))], env=["/usr/bin/env"],
                  args_json_file=[args_json_file])
    out: list[str] = []
    for chunk in map(str, command):
        if chunk.startswith("${") and chunk.endswith("}"):
            if chunk.startswith("${args"):
                out += list(extra_args)
                extra_args = ()
            out += macros.get(chunk[2:-1]) or []
        else:
            out.append(chunk)
    return out + list(extra_args)


def read_metric(metrics: dict, name: str) -> float | None:
    """``metrics[name]``, else without a stage prefix (``fit/Avg.S`` → ``Avg.S``); ``None`` if absent/NaN."""
    value = metrics.get(name)
    if value is None:
        for prefix in STAGE_PREFIXES:
            if name.startswith(prefix):
                value = metrics.get(name.removeprefix(prefix))
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def _trial_env(sweep_id: str, trial: Trial, param_file: Path, wandb_mode: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE=wandb_mode, WANDB_SWEEP_ID=sweep_id, WANDB_RUN_ID=trial.run_id,
               WANDB_SWEEP_PARAM_PATH=str(param_file), WANDB_SILENT="true")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])  # this venv first
    return env


# Exit statuses of a trial stopped by SIGTERM or SIGINT: kelight's own (128 + signal, Lightning's 1 is a crash),
# or the signal itself as subprocess reports it (negative).
STOPPED = frozenset({128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT})


def run_trial(spec: dict, trial: Trial, sweep_id: str, wandb_mode: str = "offline",
              timeout: float | None = None) -> Trial:
    """Launch one trial (blocking), then read its ``metrics.json``; crashes are recorded, not raised."""
    from wandb.sdk.lib import config_util  # noqa: PLC0415

    directory = Path(trial.directory)
    directory.mkdir(parents=True, exist_ok=True)
    param_file = directory / "sweep-params.yaml"
    config_util.save_config_file_from_dict(str(param_file), {k: {"value": v} for k, v in trial.params.items()})
    start = time.perf_counter()
    with (directory / "stdout.log").open("w") as out, (directory / "stderr.log").open("w") as err:
        try:
            proc = subprocess.run(trial.command, env=_trial_env(sweep_id, trial, param_file, wandb_mode),
                                  stdout=out, stderr=err, timeout=timeout, check=False)
            trial.returncode = proc.returncode
        except subprocess.TimeoutExpired:
            trial.returncode = -9
            err.write(f"\nkelight sweep: trial killed after the {timeout} s timeout\n")
        except OSError as error:  # e.g. the command's program does not exist
            trial.returncode = 127
            err.write(f"\nkelight sweep: could not start {trial.command[0]!r}: {error}\n")
    trial.seconds = time.perf_counter() - start
    metrics_file = directory / "metrics.json"
    problem = None
    if trial.returncode == 0 and metrics_file.exists():
        try:  # a metrics.json cut short (e.g. a full disk) crashes this trial, not the sweep
            trial.metrics = read_json(metrics_file, "the trial is recorded as crashed")
            trial.metric = read_metric(trial.metrics, spec["metric"]["name"])
            trial.state = "finished"
            return trial
        except ValueError as error:
            problem = str(error)
    trial.state = "failed" if trial.returncode in STOPPED else "crashed"
    lines = (directory / "stderr.log").read_text(errors="replace").splitlines() + ([problem] if problem else [])
    trial.stderr_tail = "\n".join(lines[-20:])
    return trial


def _as_sweep_run(trial: Trial, metric_name: str):
    engine = _engine()
    metrics = {} if trial.metric is None else {metric_name: trial.metric}
    state = {"finished": engine.RunState.finished, "failed": engine.RunState.failed}.get(trial.state,
                                                                                        engine.RunState.crashed)
    return engine.SweepRun(name=trial.run_id, state=state, config={k: {"value": v} for k, v in trial.params.items()},
                    summary_metrics=metrics, history=[metrics] if metrics else [])


def run_sweep(spec_path: str | Path, count: int, out: str | Path, extra_args: tuple[str, ...] = (),
              seed: int = 0, wandb_mode: str = "offline", timeout: float | None = None) -> dict:
    """Run up to ``count`` trials of the spec (fewer if a grid is exhausted); returns the summary."""
    next_run = _engine().next_run
    spec = load_spec(spec_path)
    out = Path(out)
    sweep_id = f"local-{uuid.uuid4().hex[:8]}"
    random.seed(seed)
    np.random.seed(seed)  # the engine draws from both generators
    trials: list[Trial] = []
    runs: list = []
    for index in range(count):
        proposal = next_run(spec, runs, validate=False)
        if proposal is None:  # grid exhausted
            break
        params = {k: plain(v["value"]) for k, v in proposal.config.items()}
        run_id = f"{sweep_id.removeprefix('local-')}-{index:03d}"
        directory = out / "trials" / run_id
        command = expand_command(spec, params, extra_args) + [f"--trainer.default_root_dir={directory}"]
        trial = run_trial(spec, Trial(index, run_id, params, command, str(directory)), sweep_id, wandb_mode, timeout)
        trials.append(trial)
        runs.append(_as_sweep_run(trial, spec["metric"]["name"]))
        summary = write_summary(out, spec, str(spec_path), sweep_id, trials)
        print(f"[{index + 1}/{count}] {run_id} {trial.state} {params} {spec['metric']['name']}={trial.metric}",
              file=sys.stderr)
    summary = write_summary(out, spec, str(spec_path), sweep_id, trials)
    if any(t.state == "finished" for t in trials):
        from kelight.analysis.tradeoff import plot_tradeoff  # noqa: PLC0415

        plot_tradeoff(summary, out / "tradeoff.png")
    return summary


def _best(trials: list[Trial], goal: str) -> dict | None:
    scored = [t for t in trials if t.metric is not None]
    if not scored:
        return None
    pick = max if goal == "maximize" else min
    best = pick(scored, key=lambda t: t.metric)
    return {"run_id": best.run_id, "params": best.params, "metric": best.metric}


def markdown_table(summary: dict) -> str:
    """One row per trial: parameters, state, the metric and the main edit scores."""
    trials = summary["trials"]
    names = sorted({k for t in trials for k in t["params"]})
    cols = [c for c in SUMMARY_COLUMNS if any(c in t["metrics"] for t in trials)]
    lines = ["| trial | state | " + " | ".join([*names, summary["metric"]["name"], *cols]) + " |",
             "|---" * (3 + len(names) + len(cols)) + "|"]
    for t in trials:
        state = t["state"] if t["state"] == "finished" else f"{t['state']} (exit {t['returncode']})"
        metric = "–" if t["metric"] is None else f"{t['metric']:.2f}"
        cells = [f"{t['params'].get(n, '–')}" for n in names] + [metric]
        cells += [f"{t['metrics'][c]:.2f}" if isinstance(t["metrics"].get(c), int | float) else "–" for c in cols]
        lines.append(f"| {t['run_id']} | {state} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(out: Path, spec: dict, spec_path: str, sweep_id: str, trials: list[Trial]) -> dict:
    """Write ``summary.json`` and ``summary.md`` (rewritten after every trial); returns the summary."""
    metric = spec["metric"]
    summary = {"spec": spec_path, "sweep_id": sweep_id, "method": spec["method"], "metric": metric,
               "best": _best(trials, metric.get("goal", "maximize")), "trials": [asdict(t) for t in trials]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    crashed = [t for t in trials if t.state == "crashed"]
    notes = [f"\n### crashed: {t.run_id} (exit {t.returncode})\n```\n{t.stderr_tail}\n```" for t in crashed]
    best = summary["best"]
    head = f"# sweep {spec_path} ({spec['method']}, {len(trials)} trials, {sweep_id})\n\n"
    tail = f"\n\nbest: {best['run_id']} {best['params']} {metric['name']} = {best['metric']:.2f}" if best else ""
    (out / "summary.md").write_text(head + markdown_table(summary) + tail + "\n" + "\n".join(notes) + "\n")
    return summary


def _exit_on_sigterm() -> None:
    """Make SIGTERM raise ``SystemExit`` so that ``subprocess.run`` kills the running trial with the sweep."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv: list[str]) -> dict:
    """``kelight sweep SPEC --count N [--out DIR] [--seed S] [--wandb-mode M] [--timeout T] [-- ARGS]``."""
    _exit_on_sigterm()
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="kelight sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="a W&B sweep spec, e.g. sweeps/rome_sadr_gamma_grid.yaml")
    parser.add_argument("--count", type=int, required=True, help="number of trials (a grid may stop earlier)")
    parser.add_argument("--out", default=None, help="output directory (default runs/sweeps/<spec>-<time>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the engine's random/bayes proposals")
    parser.add_argument("--wandb-mode", default="offline", choices=("offline", "disabled", "online"))
    parser.add_argument("--timeout", type=float, default=None, help="seconds before a trial is killed")
    args = parser.parse_args(argv)
    try:
        load_spec(args.spec)  # a missing or malformed spec: one line, before any trial
    except (OSError, ValueError) as err:
        raise SystemExit(f"kelight sweep: {err}") from None
    out = args.out or str(Path("runs") / "sweeps" / f"{Path(args.spec).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
    summary = run_sweep(args.spec, args.count, out, tuple(extra), args.seed, args.wandb_mode, args.timeout)
    sys.stdout.write((Path(out) / "summary.md").read_text())
    return summary

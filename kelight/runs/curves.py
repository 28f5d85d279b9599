"""Scores against the number of edits in place: the sequential/consecutive regimes' ``sequential.jsonl``.

A run with ``--model.eval_every N`` evaluates the cases edited so far every N edits; each line of
``sequential.jsonl`` is one such point (``{"edits": n, "ES": .., ...}``, percent, pooled as ``metrics.json``).
``kelight curve OUT.png RUN_DIR...`` prints the Markdown table of the runs' points and plots one panel
per score, one line per run — the edit-count curves of sequential-editing papers (AlphaEdit, PAC).

Example:
    kelight curve runs/curve.png runs/memit_seq runs/alphaedit_seq
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from kelight.evaluation.judge import WILD_SCORES
from kelight.files import read_jsonl
from kelight.runs.outputs import finite_value, sequential_path, sequential_ranks
from kelight.runs.report import run_names

# the scores drawn, in this order, where a run has them (CounterFact-style, EasyEdit-style, then generated answers)
CURVE_METRICS = ("ES", "PS", "NS", "RS", "DNS", "Avg.S", "Efficacy", "Generality", "Locality", "Score", *WILD_SCORES)


def read_curve(run_dir: str | Path, rank: int = 0) -> list[dict]:
    """The points of ``run_dir/sequential.jsonl`` (process ``rank``'s file under DDP) in edit order.

    Raises:
        FileNotFoundError: without the file (the run did not set ``--model.eval_every``).
        ValueError: a point without ``edits`` or a corrupt line (the file and line are named).
    """
    path = sequential_path(run_dir, rank)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run `kelight fit` with --model.regime sequential (or "
                                f"consecutive) and --model.eval_every N into {run_dir}")
    points = read_jsonl(path, "rerun the fit into this directory")
    for i, point in enumerate(points, 1):
        if not isinstance(point, Mapping) or not isinstance(point.get("edits"), int):
            raise ValueError(f"{path}, line {i}: expected an object with an integer 'edits', got {point!r}")
    return sorted(points, key=lambda p: p["edits"])


def run_curves(name: str, run_dir: str | Path) -> dict[str, list[dict]]:
    """``{name: points}`` of a run; a run over N processes made N independent sequences, one file each:
    ``{"name (process 0)": .., "name (process 1)": ..}``."""
    ranks = sequential_ranks(run_dir)
    if len(ranks) == 1:
        return {name: read_curve(run_dir)}
    return {f"{name} (process {rank})": read_curve(run_dir, rank) for rank in ranks}


def curve_metrics(curves: Mapping[str, Sequence[Mapping]]) -> list[str]:
    """The :data:`CURVE_METRICS` with a finite value in some point of some run."""
    return [m for m in CURVE_METRICS
            if any(finite_value(p, m) is not None for points in curves.values() for p in points)]


def curve_table(curves: Mapping[str, Sequence[Mapping]]) -> str:
    """Markdown: one row per (run, point), one column per score."""
    metrics = curve_metrics(curves)
    lines = ["| run | edits | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for name, points in curves.items():
        for p in points:
            cells = ["–" if (v := finite_value(p, m)) is None else f"{v:.1f}" for m in metrics]
            lines.append(f"| {name} | {p['edits']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(curves: Mapping[str, Sequence[Mapping]], path: str | Path, title: str = "") -> Path:
    """One panel per score (y: percent), x: edits in place; one line per run."""
    from kelight.analysis.plots import figure, save  # noqa: PLC0415 (matplotlib only when plotting)

    metrics = curve_metrics(curves)
    if not metrics:
        raise ValueError(f"no score in the runs' sequential.jsonl; expected some of {list(CURVE_METRICS)}")
    cols = min(len(metrics), 4)
    fig, axes = figure((len(metrics) + cols - 1) // cols, cols, size=(3.2, 2.6))
    for i, metric in enumerate(metrics):
        ax = axes[i // cols][i % cols]
        for name, points in curves.items():
            xy = [(p["edits"], v) for p in points if (v := finite_value(p, metric)) is not None]
            if xy:
                ax.plot(*zip(*xy, strict=True), marker="o", markersize=3, label=name)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("edits in place", fontsize=8)
        ax.set_ylabel(f"{metric} (%)", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_xlim(left=0)
        ax.tick_params(labelsize=7)
    for j in range(len(metrics), axes.shape[0] * cols):  # empty cells of the last row
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7, loc="lower left")
    return save(fig, path, title)


def curve_report(out_png: str | Path, run_dirs: Sequence[str | Path]) -> str:
    """Read the runs' curves (row name = the run directory's name, :func:`~kelight.runs.report.run_names`; one
    row per process for a run over several, :func:`run_curves`), plot them into ``out_png`` and return
    the Markdown table."""
    if Path(out_png).is_dir():  # matplotlib would write OUT.png beside it, and the run would not be drawn
        raise ValueError(f"{out_png} is a directory; expected the plot file first: kelight curve OUT.png RUN_DIR...")
    curves = {key: points for name, d in zip(run_names(run_dirs), run_dirs, strict=True)
              for key, points in run_curves(name, d).items()}
    path = plot_curves(curves, out_png)
    return f"{curve_table(curves)}\n\nwrote {path}"

"""Trade-off of a sweep (paper Figure 7): Edit Success = mean(EM, PM) against RM and DNM.

Finished trials are grouped into series by every swept parameter except γ (``model.editor.sadr_gamma``);
each series is a line through its trials in γ order, every point labelled with its γ. A sweep
over γ alone is one line (Figure 7's SADR curve); a sweep over steps/lr/ω gives one point per
setting, labelled with the parameters that differ.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

GAMMA = "model.editor.sadr_gamma"
SPECIFICITY = (("RM", "Relation: RM = mean P(o_true)"), ("DNM", "Distracting neighbourhood: DNM"))


def edit_success(metrics: dict) -> float | None:
    """``mean(EM, PM)`` in percent, or ``None`` if either is missing."""
    em, pm = metrics.get("EM"), metrics.get("PM")
    return None if em is None or pm is None else (em + pm) / 2


def _short(name: str) -> str:
    return {"model.editor.sadr_gamma": "γ", "model.editor.kl_factor": "ω", "model.editor.contrastive_lambda": "λ"}.get(
        name, name.removeprefix("model.editor.").removeprefix("model."))


def tradeoff_points(summary: dict) -> dict[str, list[dict]]:
    """Series label -> points ``{"x": edit success, "RM", "DNM", "label", "gamma"}`` sorted by γ."""
    series: dict[str, list[dict]] = defaultdict(list)
    for trial in summary["trials"]:
        x = edit_success(trial["metrics"]) if trial["state"] == "finished" else None
        if x is None:
            continue
        others = {k: v for k, v in sorted(trial["params"].items()) if k != GAMMA}
        key = ", ".join(f"{_short(k)}={v:.3g}" if isinstance(v, float) else f"{_short(k)}={v}"
                        for k, v in others.items()) or "SADR γ"
        gamma = trial["params"].get(GAMMA)
        point = {"x": x, "gamma": gamma, "label": "" if gamma is None else f"γ={gamma:g}"}
        point.update({name: trial["metrics"].get(name) for name, _ in SPECIFICITY})
        series[key].append(point)
    for points in series.values():
        points.sort(key=lambda p: -1.0 if p["gamma"] is None else p["gamma"])
    return dict(series)


def plot_tradeoff(summary: dict, path: str | Path, title: str = "") -> Path:
    """Two panels (RM, DNM) against Edit Success; one line per series (see module docstring)."""
    from kelight.analysis.plots import figure, save  # noqa: PLC0415

    series = tradeoff_points(summary)
    fig, axes = figure(1, 2, size=(5.2, 4.0))
    many = len(series) > 6  # a random/bayes sweep: one point per trial, labels would collide
    for ax, (name, label) in zip(axes[0], SPECIFICITY, strict=True):
        for key, points in series.items():
            pts = [p for p in points if p[name] is not None]
            xs, ys = [p["x"] for p in pts], [p[name] for p in pts]
            ax.plot(xs, ys, marker="o", ms=4, lw=1, label=None if many else key)
            for p, x, y in zip(pts, xs, ys, strict=True):
                if p["label"] and not many:
                    ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
        if not any(p[name] is not None for points in series.values() for p in points):
            ax.text(0.5, 0.5, f"no {name} in these runs' metrics", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("Edit Success = mean(EM, PM)  [%]", fontsize=9)
        ax.set_ylabel(f"{name}  [%]", fontsize=9)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        if not many and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    n = sum(len(p) for p in series.values())
    head = title or f"{summary.get('spec', 'sweep')}: {n} finished trials ({summary.get('method', '')})"
    return save(fig, path, head)

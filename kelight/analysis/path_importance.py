"""Path importance (PAC Figure 4): impact scores of the critical path's nodes, layer × rank.

For every layer the scores of the ``path_size`` selected keys (rows of the FFN input matrix) and
values (columns of the output matrix) are shown in rank order, next to each other; over several
tracings (e.g. one per edit in the consecutive regime) the ranked scores are averaged. Written as
``path_importance.png`` and ``path_importance.json`` (the same numbers, plus the neuron indices
of a single tracing).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from kelight.analysis.common import write_json
from kelight.analysis.plots import figure, heatmap, save
from kelight.editors.pac.deltas import KINDS, PathSelection

STEM = "path_importance"


def ranked_importance(selections: Sequence[PathSelection]) -> dict[str, torch.Tensor]:
    """``{"key": (L, path_size), "value": (L, path_size)}`` ranked scores averaged over ``selections``.

    Raises:
        ValueError: if ``selections`` is empty or their shapes differ.
    """
    if not selections:
        raise ValueError("expected at least one path tracing to plot, got none")
    shapes = {tuple(s.key_pos.shape) for s in selections}
    if len(shapes) != 1:
        raise ValueError(f"expected tracings of one model and path_size, got path shapes {sorted(shapes)}")
    return {kind: torch.stack([s.ranked(kind).float().cpu() for s in selections]).mean(0) for kind in KINDS}


def save_path_importance(out_dir: str | Path, selections: Sequence[PathSelection], title: str = "",
                         stem: str = STEM) -> tuple[Path, Path]:
    """Write the layer × rank heat maps (keys, values) as PNG and the numbers as JSON.

    Returns:
        ``(png_path, json_path)``.
    """
    ranked = ranked_importance(selections)
    n_layers, path_size = ranked["key"].shape
    payload = {"n_tracings": len(selections), "n_layers": n_layers, "path_size": path_size,
               "key_scores": ranked["key"], "value_scores": ranked["value"]}
    if len(selections) == 1:
        payload.update(key_index=selections[0].key_pos, value_index=selections[0].value_pos)
    json_path = write_json(Path(out_dir) / f"{stem}.json", payload)
    fig, axes = figure(1, 2, size=(4.5, max(3.0, 0.18 * n_layers + 1.0)))
    rows, cols = [str(layer) for layer in range(n_layers)], [str(rank + 1) for rank in range(path_size)]
    for ax, kind in zip(axes[0], KINDS, strict=True):
        what = "FFN input rows" if kind == "key" else "FFN output columns"
        heatmap(ax, ranked[kind].numpy(), rows, cols, title=f"{kind}s ({what})", cmap="viridis", symmetric=False,
                cbar_label="impact score")  # one colour scale per panel: value scores have outlier neurons
        ax.set_xlabel("rank on the critical path", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
    suffix = f" (mean of {len(selections)} tracings)" if len(selections) > 1 else ""
    png_path = save(fig, Path(out_dir) / f"{stem}.png", title=title + suffix)
    return png_path, json_path

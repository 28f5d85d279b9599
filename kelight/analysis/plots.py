"""Matplotlib helpers shared by the analyses (headless ``Agg`` backend, one style)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def figure(rows: int, cols: int, size: tuple[float, float] = (4.0, 3.0)):
    """A ``rows × cols`` grid of axes (always 2-D indexable) with ``size`` inches per panel."""
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False,
                             layout="constrained")  # room for colour bars and a multi-line title
    return fig, axes


def save(fig, path: str | Path, title: str = "") -> Path:
    """Title, write PNG (150 dpi), close; returns the path written (``.png`` added to a path without a
    suffix, as matplotlib does, so the returned path is the file)."""
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def heatmap(ax, values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], *, title: str,
            cmap: str = "RdBu_r", symmetric: bool = True, vmax: float | None = None, cbar_label: str = ""):
    """``values`` ``(R, C)`` as an image with labelled rows/columns; diverging around 0 if ``symmetric``."""
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    top = vmax if vmax is not None else (float(np.abs(finite).max()) if finite.size else 1.0) or 1.0
    limits = {"vmin": -top, "vmax": top} if symmetric else {"vmin": 0.0, "vmax": top}
    image = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest", **limits)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    step = max(1, len(col_labels) // 15)
    ax.set_xticks(range(0, len(col_labels), step), [col_labels[i] for i in range(0, len(col_labels), step)],
                  fontsize=7)
    ax.set_title(title, fontsize=9)
    bar = ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02)
    bar.ax.tick_params(labelsize=7)
    if cbar_label:
        bar.set_label(cbar_label, fontsize=8)
    return image

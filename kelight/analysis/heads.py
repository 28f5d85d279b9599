"""Head-selection statistics of SADR: how many heads it restrains, where, and when.

SADR keeps ``selected``: per optimisation step an ``(L', H)`` count of rewriting prompts whose
head ``(l, h)`` it restrained (layers after the edit point), and ``vanilla`` ``(L', P, H, T)``,
whose ``P`` turns counts into fractions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.analysis.common import EditFn, edited, save_outputs
from kelight.objectives.sadr import SADR
from kelight.types import EditCase


def sadr_term(editor) -> SADR:
    """The editor's SADR term (it must have one: ``sadr_gamma > 0``)."""
    terms = [t for t in getattr(editor, "extra_losses", ()) if isinstance(t, SADR)]
    if not terms:
        raise ValueError(
            f"{type(editor).__name__} has no SADR term; head-selection statistics need sadr_gamma > 0 "
            f"(e.g. --config configs/smollm2/rome_sadr.yaml)"
        )
    return terms[0]


def selection_fractions(sadr: SADR) -> torch.Tensor:
    """``(S, L', H)``: fraction of rewriting prompts selecting each head at each step of the last edit."""
    if not sadr.selected or sadr.vanilla is None:
        raise ValueError("SADR has not run yet; edit with it first")
    return torch.stack(sadr.selected).float().cpu() / sadr.vanilla.shape[1]


def head_selection(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, cases: Sequence[EditCase], edit: EditFn, sadr: SADR,
) -> dict:
    """Edit each case (restored after) and pool SADR's selections over cases.

    Returns:
        ``{"first_layer", "n_cases", "per_step_layer": (S, L') mean heads selected per prompt,
        "per_layer_head": (L', H) fraction of (steps × prompts) selecting the head, "per_case_total": [..]}``;
        steps a case did not run (early stop) do not count towards that step's mean.
    """
    if not cases:
        raise ValueError("expected at least one case to edit, got none; select data with cases (--data.limit ≥ 1)")
    fractions = []
    for case in cases:
        with edited(model, tok, case.request, edit):
            fractions.append(selection_fractions(sadr))  # (S_i, L', H)
    steps = max(f.shape[0] for f in fractions)
    total = torch.zeros(steps, *fractions[0].shape[1:])  # (S, L', H)
    count = torch.zeros(steps, 1, 1)
    for f in fractions:
        total[: f.shape[0]] += f
        count[: f.shape[0]] += 1
    per_step = total / count  # (S, L', H) mean over the cases that ran the step
    return {
        "first_layer": sadr.first_layer,
        "n_cases": len(fractions),
        "per_step_layer": per_step.sum(-1),  # (S, L') heads selected per prompt
        "per_layer_head": torch.cat(fractions).mean(0),  # (L', H)
        "per_case_total": [float(f.sum(dim=(1, 2)).mean()) for f in fractions],  # heads per prompt per step
    }


def plot_heads(result: dict, path: str | Path, title: str = "") -> Path:
    """Left: heads selected per prompt, layer × step. Right: selection frequency, layer × head."""
    from kelight.analysis.plots import figure, heatmap, save  # noqa: PLC0415

    per_step = torch.as_tensor(result["per_step_layer"])  # (S, L')
    per_head = torch.as_tensor(result["per_layer_head"])  # (L', H)
    layers = [str(result["first_layer"] + i) for i in range(per_step.shape[1])]
    fig, axes = figure(1, 2, size=(5.0, max(3.0, 0.2 * len(layers) + 1.2)))
    heatmap(axes[0][0], per_step.T.numpy(), layers, [str(s) for s in range(per_step.shape[0])], symmetric=False,
            cmap="viridis", title=f"heads selected per prompt (mean of {result['n_cases']} cases)",
            cbar_label="heads selected per prompt")
    axes[0][0].set_xlabel("optimisation step", fontsize=8)
    axes[0][0].set_ylabel("layer", fontsize=8)
    heatmap(axes[0][1], per_head.numpy(), layers, [str(h) for h in range(per_head.shape[1])], symmetric=False,
            cmap="viridis", vmax=1.0, title="fraction of steps × prompts selecting the head",
            cbar_label="fraction selected")
    axes[0][1].set_xlabel("head", fontsize=8)
    axes[0][1].set_ylabel("layer", fontsize=8)
    return save(fig, path, title)


def run_heads(model, tok, cases, edit, sadr: SADR, out_dir: str | Path, title: str = "") -> dict:
    """:func:`head_selection`, then ``heads.json`` and ``heads.png`` in ``out_dir``."""
    return save_outputs(head_selection(model, tok, cases, edit, sadr), out_dir, "heads", plot_heads, title)

"""Attention-weight patching (paper §3.4, Figure 5): does undoing the drift undo the failure?

The vanilla model scores a case's specificity prompts (teacher-forced, o_true and o_edit) while
every layer's attention weights are recorded. The edited model then scores the same batch with the
weights of a window of ``k`` layers starting at layer ``l`` replaced by the vanilla ones. The curve
over ``l`` of P(o_true) and P(o_edit) (``exp(-mean token NLL)``, as the metrics) shows where the
drift matters; the unpatched edited model and the vanilla model are its reference lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.analysis.attention import record_attention, replace_attention
from kelight.analysis.common import SPECIFICITY_TASKS, EditFn, edited, probabilities, probes_of, save_outputs
from kelight.models.adapters import adapter_for
from kelight.types import EditCase


def _window_starts(n_layers: int, window: int) -> list[int]:
    if not 1 <= window <= n_layers:
        raise ValueError(f"expected a window of 1..{n_layers} layers, got {window}")
    return list(range(n_layers - window + 1))


def case_patching(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, case: EditCase, edit: EditFn,
    tasks: Sequence[str] = SPECIFICITY_TASKS, window: int = 10,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per task: P(o_true)/P(o_edit) ``(N,)`` vanilla, edited, and patched ``(S, N)`` for each window start."""
    n_layers = adapter_for(model).n_layers(model)
    starts = _window_starts(n_layers, window)
    batches = {task: probes for task in tasks if (probes := probes_of(case, task))}
    if not batches:
        return {}  # nothing to patch: do not edit
    vanilla: dict[str, tuple] = {}
    for task, probes in batches.items():
        with record_attention(model) as records:
            p = probabilities(model, tok, probes)
        vanilla[task] = (p, [layer[0] for layer in records])  # one forward: (B, H, T, T) per layer
    out = {}
    with edited(model, tok, case.request, edit):
        for task, probes in batches.items():
            (p_true, p_edit), weights = vanilla[task]
            e_true, e_edit = probabilities(model, tok, probes)
            patched = []
            for start in starts:
                with replace_attention(model, {i: weights[i] for i in range(start, start + window)}):
                    patched.append(torch.stack(probabilities(model, tok, probes)))  # (2, N)
            patched_t = torch.stack(patched)  # (S, 2, N)
            out[task] = {"vanilla_true": p_true, "vanilla_edit": p_edit, "edited_true": e_true,
                         "edited_edit": e_edit, "patched_true": patched_t[:, 0], "patched_edit": patched_t[:, 1]}
    return out


def attention_patching(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, cases: Sequence[EditCase], edit: EditFn,
    tasks: Sequence[str] = SPECIFICITY_TASKS, window: int = 10,
) -> dict:
    """Mean over all prompts of all cases, per task: the patched curves and reference values.

    Returns:
        ``{"window", "starts", "tasks": {task: {"n_prompts", "vanilla_true", ..., "patched_true": [S],
        "patched_edit": [S]}}}``.

    Raises:
        ValueError: if the window does not fit the model, or no case has a prompt of ``tasks``.
    """
    pooled: dict[str, dict[str, list[torch.Tensor]]] = {}
    for case in cases:
        for task, values in case_patching(model, tok, case, edit, tasks, window).items():
            for key, value in values.items():
                pooled.setdefault(task, {}).setdefault(key, []).append(value)
    if not pooled:
        raise ValueError(f"none of the {len(cases)} cases has a prompt of the tasks {list(tasks)}; choose tasks the "
                         f"data has (--tasks, from {','.join(SPECIFICITY_TASKS)})")
    result = {"window": window, "starts": _window_starts(adapter_for(model).n_layers(model), window), "tasks": {}}
    for task, values in pooled.items():
        summary = {key: float(torch.cat(v).mean()) for key, v in values.items() if not key.startswith("patched")}
        for key in ("patched_true", "patched_edit"):
            summary[key] = torch.cat(values[key], dim=1).mean(dim=1).tolist()  # (S,)
        summary["n_prompts"] = int(sum(v.numel() for v in values["vanilla_true"]))
        result["tasks"][task] = summary
    return result


def plot_patching(result: dict, path: str | Path, title: str = "") -> Path:
    """P(o_true) and P(o_edit) against the first patched layer, one panel per task (Figure 5 style)."""
    from kelight.analysis.plots import figure, save  # noqa: PLC0415

    tasks = list(result["tasks"])
    fig, axes = figure(1, max(1, len(tasks)), size=(4.4, 3.3))
    for ax, task in zip(axes[0], tasks, strict=False):
        data = result["tasks"][task]
        for key, colour, name in (("true", "tab:green", "o_true"), ("edit", "tab:red", "o_edit")):
            ax.plot(result["starts"], data[f"patched_{key}"], marker="o", ms=3, color=colour,
                    label=f"P({name}) patched")
            ax.axhline(data[f"edited_{key}"], color=colour, ls="--", lw=1, label=f"P({name}) edited")
            ax.axhline(data[f"vanilla_{key}"], color=colour, ls=":", lw=1, label=f"P({name}) vanilla")
        ax.set_title(f"{task} (n = {data['n_prompts']})", fontsize=9)
        ax.set_xlabel(f"first patched layer (window {result['window']})", fontsize=8)
        ax.set_ylabel("probability", fontsize=8)
        ax.legend(fontsize=6)
    return save(fig, path, title)


def run_patching(model, tok, cases, edit, out_dir: str | Path, title: str = "", **kwargs) -> dict:
    """:func:`attention_patching`, then ``patching.json`` and ``patching.png`` in ``out_dir``."""
    result = attention_patching(model, tok, cases, edit, **kwargs)
    return save_outputs(result, out_dir, "patching", plot_patching, title)

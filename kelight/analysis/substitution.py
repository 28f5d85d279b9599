"""Contaminating substitution (paper §3.2, Figure 3): where does the edit contaminate the forward?

The edited model runs once on a specificity prompt (teacher-forced with o_true and with o_edit)
and the outputs of every attention, MLP and block module are recorded. Then the *clean* model
runs with the outputs of one kind of module over a window of ``k`` layers centred on layer ``l``
at prompt token ``t`` replaced by the recorded ones. The tracing effect of cell ``(t, l)`` is
``P_subst(o) − P_clean(o)`` for o = o_true and o_edit, with ``P = exp(-mean token NLL)`` as in the
metrics. All tokens of one ``(kind, l)`` run in one batch: row ``2t`` (o_true) and ``2t + 1`` (o_edit).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.analysis.common import EditFn, edited, layer_window, probabilities, probes_of, save_outputs
from kelight.lm.hooks import edit_output, trace
from kelight.models.adapters import adapter_for
from kelight.types import EditCase, ScoredPrompt

KINDS = ("attn", "mlp", "block")


def module_paths(model: PreTrainedModel, kind: str) -> list[str]:
    """Path of the ``kind`` module (``attn``, ``mlp`` or ``block``) of every layer, from the adapter."""
    adapter = adapter_for(model)
    if kind not in KINDS:
        raise ValueError(f"unknown module kind {kind!r}; expected one of {list(KINDS)}")
    layers = range(adapter.n_layers(model))
    return [adapter.block_path(i) if kind == "block" else adapter.path(kind, i) for i in layers]


def _substitute(recorded: torch.Tensor, n_rows: int):
    """``edit_output`` function: row ``r`` takes the recorded output at token ``r // 2`` (row ``r % 2``)."""

    def fn(output: torch.Tensor) -> torch.Tensor:  # (2n, T, D)
        rows = torch.arange(n_rows, device=output.device)
        out = output.clone()
        out[rows, rows // 2] = recorded[rows % 2, rows // 2].to(out.dtype)
        return out

    return fn


def _effects_for_layer(model, tok, probe: ScoredPrompt, n_tokens: int, paths: Sequence[str],
                       recorded: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with ExitStack() as stack:
        for path in paths:
            stack.enter_context(edit_output(model, path, _substitute(recorded[path], 2 * n_tokens)))
        return probabilities(model, tok, [probe] * n_tokens)  # (n_tokens,) each


def substitution_map(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, case: EditCase, edit: EditFn,
    task: str = "distracted_neighbor", prompt_index: int = 0, window: int = 6, kinds: Sequence[str] = KINDS,
) -> dict:
    """Tracing effects ``(T_prompt, L)`` per module kind on P(o_true) and P(o_edit) for one prompt.

    Returns:
        ``{"prompt", "tokens", "p_clean": {true, edit}, "p_edited": {...}, "effect": {kind: {"true":
        (T, L), "edit": (T, L)}}, ...}``. The model is unchanged afterwards.
    """
    probes = probes_of(case, task)
    if not probes:
        raise ValueError(f"case {case.case_id!r} has no {task!r} prompts; choose another task or case")
    if not 0 <= prompt_index < len(probes):
        raise ValueError(f"case {case.case_id!r} has {len(probes)} {task!r} prompts; expected a prompt index in "
                         f"0..{len(probes) - 1}, got {prompt_index} (--prompt)")
    probe = probes[prompt_index]
    prompt_ids = tok(probe.prompt, add_special_tokens=True)["input_ids"]
    n_tokens, n_layers = len(prompt_ids), adapter_for(model).n_layers(model)
    paths = {kind: module_paths(model, kind) for kind in kinds}
    p_true, p_edit = probabilities(model, tok, [probe])
    with edited(model, tok, case.request, edit):
        with trace(model, [p for kind in kinds for p in paths[kind]]) as recorded:
            e_true, e_edit = probabilities(model, tok, [probe])
        recorded = dict(recorded)  # (2, T, D) per path: row 0 o_true, row 1 o_edit
    effect: dict[str, dict[str, torch.Tensor]] = {}
    for kind in kinds:
        true_map = torch.zeros(n_tokens, n_layers)
        edit_map = torch.zeros(n_tokens, n_layers)
        for layer in range(n_layers):
            window_paths = [paths[kind][i] for i in layer_window(layer, window, n_layers)]
            s_true, s_edit = _effects_for_layer(model, tok, probe, n_tokens, window_paths, recorded)
            true_map[:, layer], edit_map[:, layer] = s_true - p_true, s_edit - p_edit
        effect[kind] = {"true": true_map, "edit": edit_map}
    return {
        "case_id": case.case_id, "task": task, "prompt": probe.prompt, "o_true": probe.right, "o_edit": probe.wrong,
        "tokens": [tok.decode([i]) for i in prompt_ids], "window": window,
        "p_clean": {"true": float(p_true), "edit": float(p_edit)},
        "p_edited": {"true": float(e_true), "edit": float(e_edit)}, "effect": effect,
    }


def plot_substitution(result: dict, path: str | Path, title: str = "", vmax: float | None = None) -> Path:
    """Heat maps token × layer, one column per module kind, rows: effect on P(o_true), on P(o_edit)."""
    from kelight.analysis.plots import figure, heatmap, save  # noqa: PLC0415

    kinds = list(result["effect"])
    tokens = [repr(t)[1:-1] for t in result["tokens"]]
    layers = [str(i) for i in range(len(next(iter(result["effect"].values()))["true"][0]))]
    fig, axes = figure(2, len(kinds), size=(4.6, 0.28 * len(tokens) + 1.6))
    for j, kind in enumerate(kinds):
        for i, (target, name) in enumerate((("true", "o_true"), ("edit", "o_edit"))):
            clean, after = result["p_clean"][target], result["p_edited"][target]
            heatmap(axes[i][j], result["effect"][kind][target], tokens, layers, vmax=vmax,
                    title=f"{kind}: Δ P({name})  [clean {clean:.3f}, edited {after:.3f}]",
                    cbar_label=f"P_subst({name}) − P_clean({name})")
            axes[i][j].set_xlabel(f"layer (window {result['window']})", fontsize=8)
            axes[i][j].set_ylabel("substituted prompt token", fontsize=8)
    head = f"{result['task']}: {result['prompt']!r} → true {result['o_true']!r} / edit {result['o_edit']!r}"
    return save(fig, path, f"{title}\n{head}" if title else head)


def run_substitution(model, tok, case, edit, out_dir: str | Path, title: str = "", **kwargs) -> dict:
    """:func:`substitution_map`, then ``substitution.json`` and ``substitution.png`` in ``out_dir``."""
    result = substitution_map(model, tok, case, edit, **kwargs)
    return save_outputs(result, out_dir, "substitution", plot_substitution, title)

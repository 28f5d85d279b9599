"""Attention drift vs specificity failure (paper §3.3, Figure 4 and Table 2).

For every specificity prompt, the last token's attention rows of every layer and head are read
before (``W``, vanilla) and after (``W*``, edited) the case's edit, and three factors are formed:

- ``kl``:       Σ_l Σ_h KL(W_lh ‖ W*_lh)                 (Figure 4)
- ``max_drift``: Σ_l max_h (W*_lh[s] − W_lh[s])          (Table 2, row 1)
- ``sum_drift``: Σ_l Σ_h (W*_lh[s] − W_lh[s])            (Table 2, row 3)

with ``s`` the edited subject's last token. The paper writes row 1 as ``W[s] − W*[s]``, but its
claim is *over*-attention of the edited model to ``s`` (and it finds a positive correlation with
P(o_edit)), so the drift is taken as edited minus vanilla here. Each factor and P(o_edit) is
averaged over a case's prompts of the task; the Pearson correlation runs over cases.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.analysis.attention import last_token_rows
from kelight.analysis.common import EditFn, edited, probabilities, probes_of, save_outputs
from kelight.evaluation.stats import pearson
from kelight.lm.tokens import pad_id, subject_last_index, target_ids
from kelight.models.adapters import adapter_for
from kelight.objectives.sadr import sadr_loss
from kelight.types import EditCase, EditInputError, ScoredPrompt

FACTORS = ("kl", "max_drift", "sum_drift")
DRIFT_TASKS = ("distracted_neighbor", "relation")


def attention_kl(vanilla: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Σ_l Σ_h KL(vanilla ‖ edited) per prompt, ``(L, P, H, T)`` each -> ``(P,)``.

    Computed by SADR's own KL (:func:`kelight.objectives.sadr.sadr_loss`, same ε) over every head
    (``selective=False``), one prompt at a time (the loss averages over the prompts it is given).
    """
    column = torch.zeros(1, dtype=torch.long, device=vanilla.device)  # unused: every head is kept
    n_prompts = vanilla.shape[1]
    return torch.stack([sadr_loss(vanilla[:, i : i + 1], edited[:, i : i + 1], column, selective=False)[0]
                        for i in range(n_prompts)])


def drift_factors(vanilla: torch.Tensor, edited: torch.Tensor, subject_pos: torch.Tensor) -> dict[str, torch.Tensor]:
    """The three factors per prompt, each ``(P,)``, from ``(L, P, H, T)`` rows and ``(P,)`` subject columns."""
    cols = subject_pos.view(1, -1, 1, 1).expand(*vanilla.shape[:3], 1)  # (L, P, H, 1)
    diff = (edited.gather(-1, cols) - vanilla.gather(-1, cols)).squeeze(-1)  # (L, P, H)
    return {
        "kl": attention_kl(vanilla, edited),
        "max_drift": diff.max(dim=-1).values.sum(0),
        "sum_drift": diff.sum(dim=(0, 2)),
    }


def _prompt_ids(tok: PreTrainedTokenizerBase, probes: Sequence[ScoredPrompt], subject: str) -> tuple[
    list[ScoredPrompt], list[list[int]], torch.Tensor
]:
    """Probes whose prompt contains the subject, their prompt token ids and subject columns."""
    kept, seqs, cols = [], [], []
    for probe in probes:
        try:
            col = subject_last_index(tok, probe.prompt, subject)
        except EditInputError:
            continue  # e.g. a plain neighbourhood prompt: no edited subject to attend to
        kept.append(probe)
        seqs.append(target_ids(tok, probe.prompt, probe.wrong)[0])  # the prompt's ids, as scored
        cols.append(col)
    return kept, seqs, torch.tensor(cols, dtype=torch.long)


def _readout(model, tok, prepared: dict, pick) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per task: last-token attention rows ``(L, P, H, T)`` and P(o_edit) ``(P,)``."""
    pad = pad_id(tok)
    return {task: (last_token_rows(model, seqs, pad)[pick], probabilities(model, tok, probes)[1])
            for task, (probes, seqs, _) in prepared.items()}


def case_drift(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, case: EditCase, edit: EditFn,
    tasks: Sequence[str] = DRIFT_TASKS, layers: Sequence[int] | None = None,
) -> dict[str, dict]:
    """Per task the case has: the factors and P(o_edit) (before/after) averaged over its prompts."""
    prepared = {task: _prompt_ids(tok, probes_of(case, task), case.request.subject) for task in tasks}
    prepared = {task: value for task, value in prepared.items() if value[0]}
    if not prepared:
        return {}
    pick = slice(None) if layers is None else list(layers)
    before = _readout(model, tok, prepared, pick)
    with edited(model, tok, case.request, edit):  # one edit per case, restored in finally
        after = _readout(model, tok, prepared, pick)
    rows = {}
    for task, (probes, _, cols) in prepared.items():
        (vanilla, p_before), (drifted, p_edit) = before[task], after[task]
        factors = drift_factors(vanilla, drifted, cols.to(vanilla.device))
        rows[task] = {"id": case.case_id, **{k: float(v.mean()) for k, v in factors.items()},
                      "p_edit": float(p_edit.mean()), "p_edit_vanilla": float(p_before.mean()),
                      "n_prompts": len(probes)}
    return rows


def _check_layers(model: PreTrainedModel, layers: Sequence[int] | None) -> list[int] | None:
    """``layers`` as a list if they are distinct layers of ``model`` (``None``: every layer)."""
    if layers is None:
        return None
    n_layers, layers = adapter_for(model).n_layers(model), list(layers)
    if not layers or len(set(layers)) != len(layers) or any(not 0 <= layer < n_layers for layer in layers):
        raise ValueError(f"expected distinct layers in 0..{n_layers - 1}, got {layers}; "
                         f"this model has {n_layers} layers (--layers lo:hi with hi ≤ {n_layers})")
    return layers


def attention_drift(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, cases: Sequence[EditCase], edit: EditFn,
    tasks: Sequence[str] = DRIFT_TASKS, layers: Sequence[int] | None = None,
) -> dict:
    """Per-case drift factors and their Pearson correlation with P(o_edit), per task.

    Returns:
        ``{"layers": ..., "tasks": {task: {"cases": [...], "correlation": {factor: {"r", "p", "n"}}}}}``.

    Raises:
        ValueError: if ``layers`` are not distinct layers of the model, or no case has a prompt of
            ``tasks`` that contains its edited subject (there is then nothing to measure).
    """
    layers = _check_layers(model, layers)
    per_task: dict[str, list[dict]] = {task: [] for task in tasks}
    for case in cases:
        for task, row in case_drift(model, tok, case, edit, tasks, layers).items():
            per_task[task].append(row)
    out: dict = {"layers": None if layers is None else list(layers), "tasks": {}}
    for task, rows in per_task.items():
        if not rows:
            continue  # no case of this task among the selected data
        corr = {}
        for factor in FACTORS:
            r, p = pearson([row[factor] for row in rows], [row["p_edit"] for row in rows])
            corr[factor] = {"r": r, "p": p, "n": len(rows)}
        out["tasks"][task] = {"cases": rows, "correlation": corr}
    if not out["tasks"]:
        raise ValueError(
            f"none of the {len(cases)} cases has a prompt of the tasks {list(tasks)} that contains its edited "
            f"subject; attention drift is measured with the subject in context: use the tasks "
            f"{','.join(DRIFT_TASKS)} (--tasks) on data that has them"
        )
    return out


def plot_drift(result: dict, path: str | Path, title: str = "") -> Path:
    """Scatter of each factor against P(o_edit), one column per task (Figure 4 style)."""
    from kelight.analysis.plots import figure, save  # noqa: PLC0415

    tasks = list(result["tasks"])
    fig, axes = figure(len(FACTORS), len(tasks), size=(4.2, 3.2))
    labels = {"kl": "Σ_l Σ_h KL(W ‖ W*)", "max_drift": "Σ_l max_h (W*[s] − W[s])",
              "sum_drift": "Σ_l Σ_h (W*[s] − W[s])"}
    for j, task in enumerate(tasks):
        data = result["tasks"][task]
        for i, factor in enumerate(FACTORS):
            ax = axes[i][j]
            xs = [row[factor] for row in data["cases"]]
            ax.scatter(xs, [row["p_edit"] for row in data["cases"]], s=14, alpha=0.7)
            c = data["correlation"][factor]
            r, p = ("n/a" if v is None or v != v else f"{v:{f}}" for v, f in ((c["r"], ".2f"), (c["p"], ".2g")))
            ax.set_title(f"{task}: r = {r}, p = {p} (n = {c['n']})", fontsize=9)
            ax.set_xlabel(labels[factor], fontsize=9)
            ax.set_ylabel("P(o_edit)", fontsize=9)
    return save(fig, path, title)


def run_drift(model, tok, cases, edit, out_dir: str | Path, title: str = "", **kwargs) -> dict:
    """:func:`attention_drift`, then ``drift.json`` and ``drift.png`` in ``out_dir``."""
    return save_outputs(attention_drift(model, tok, cases, edit, **kwargs), out_dir, "drift", plot_drift, title)

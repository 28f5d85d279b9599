"""One optimisation step shared by every editor's inner loop (z optimisation, FT, PathEdit):
the forward to log-probs, the state extra loss terms see (:class:`~kelight.objectives.base.StepState`), and the
finite-loss check.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

from kelight.editors.prefix import PrefixCache
from kelight.lm.attention_rows import query_row_attention
from kelight.lm.forward import head
from kelight.objectives.base import ExtraLoss, RewriteBatch, StepState


class EditOptimizationError(FloatingPointError):
    """An editor's optimisation (z, FT, PathEdit) produced NaN/inf; the model is left unchanged."""




def forward_logprobs(model: PreTrainedModel, batch: RewriteBatch, want_attn: bool,
                     prefix: PrefixCache | None = None,
                     base: Callable[..., object] | None = None) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Log-probs at the target and essence positions of ``batch`` (on ``prefix``'s cache when given),
    the transformer body run by ``base`` (default ``model.base_model``; e.g. a compiled one)."""
    kwargs = (prefix.forward_kwargs(model) if prefix is not None
              else {"attention_mask": batch.attention_mask, "use_cache": False})
    base = model.base_model if base is None else base
    out = base(input_ids=batch.input_ids, output_attentions=want_attn, **kwargs)  # False with rows
    hidden = out.last_hidden_state  # (B, T, D)
    tgt = head(model, hidden[batch.target_rows, batch.target_cols]).float().log_softmax(-1)  # (N, V)
    ess_rows = torch.arange(batch.n_rewrite, batch.input_ids.shape[0], device=hidden.device)
    ess = head(model, hidden[ess_rows, batch.essence_pos]).float().log_softmax(-1)  # (E, V)
    return tgt, ess, out


def step_forward(model: PreTrainedModel, batch: RewriteBatch, step: int,
                 want_rows: bool) -> tuple[torch.Tensor, StepState]:
    """Log-probs ``(N, V)`` at the target positions of a full-model forward and what extra terms
    see. With ``want_rows`` the state carries every layer's attention row at each batch row's query
    (:mod:`kelight.lm.attention_rows`, as in the z optimisation) instead of eager ``T × T`` weights.
    Used by the editors that train weights (PathEdit, FT)."""
    if not want_rows:
        tgt, _, outputs = forward_logprobs(model, batch, want_attn=False)
        return tgt, StepState(step, batch, outputs)
    with query_row_attention(model, torch.cat([batch.query_pos, batch.essence_pos])) as recorder:
        tgt, _, outputs = forward_logprobs(model, batch, want_attn=False)
        rows = recorder.take()  # (L, B, H, T): every layer ran, so no offset
    return tgt, StepState(step, batch, outputs, rows=rows)


def finish_loss(
    loss: torch.Tensor, extra_losses: Sequence[ExtraLoss], state: StepState, lr: float, what: str = "z optimisation"
) -> torch.Tensor:
    """``loss + Σ term(state)`` over the extra terms (e.g. γ·SADR), checked to be finite.

    Shared by every editor's inner loop (z optimisation, FT), which writes no weight before it ends.
    ``loss`` is a scalar (one joint objective) or ``(R,)`` per request of a merged batch; terms
    return ``(R,)`` per request and are summed into a scalar loss.

    Raises:
        EditOptimizationError: if the total is NaN/inf, naming ``what`` and ``state.step``.
    """
    for term in extra_losses:
        value = term(state)
        loss = loss + (value.sum() if loss.dim() == 0 else value)
    if not torch.isfinite(loss).all():
        bad = "" if loss.dim() == 0 else f" for request(s) {torch.nonzero(~torch.isfinite(loss)).flatten().tolist()}"
        raise EditOptimizationError(
            f"{what} diverged at step {state.step}{bad} (loss {loss.detach().sum().item()}); lower lr "
            f"(now {lr}) or use float32; the model weights were not changed"
        )
    return loss

"""Sparse path deltas of PathEdit: the only trainable tensors, added to the FFN through hooks.

Packing (PAC §4.2): key ``j`` of layer ``l`` is row ``j`` of the FFN input matrix (``up_proj``,
GPT-J ``fc_in``, GPT-2 ``c_fc``, GPT-NeoX ``dense_h_to_4h``) and value ``j`` is column ``j`` of the
output matrix (``down_proj``, ``fc_out``, ``c_proj``, ``dense_4h_to_h``), both in linear convention
``(d_out, d_in)``; the adapter declares GPT-2's transposed ``Conv1D``. A gated MLP's gate stays
frozen. :class:`PathDeltas` holds, per layer, one ``(n, d_model)`` delta per selected key and per
selected value, for the critical path T+ (``path_size``) and the negative path τ− (``neg_path_size``).
An optional per-layer weight ``w_l`` scales layer ``l``'s T+ deltas (:func:`layer_weights`; all 1 = PAC).

While :meth:`PathDeltas.attached`, forward hooks make every FFN compute as if its weights held the
deltas: ``up(x)[..., j] += x · Δk_j`` and ``down(h) += Σ_j h_j Δv_j``. The model's weights are not
touched until :meth:`PathDeltas.fold_into` writes the selected rows/columns (and nothing else)
through :class:`~kelight.editors.undo.UndoLog`, so weights off the path are bit-identical and an
optimiser, whose only parameters are these deltas, cannot move them through momentum.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kelight.editors.undo import UndoLog
from kelight.models.adapters import ArchAdapter

Part = Literal["all", "pos", "neg"]
KINDS = ("key", "value")  # key: rows of mlp_in; value: columns of mlp_out
MODULE_OF = {"key": "mlp_in", "value": "mlp_out"}


@dataclass(frozen=True)
class PathSelection:
    """Per-layer indices of the critical (``*_pos``) and negative (``*_neg``) paths, and their scores.

    Attributes:
        key_pos, value_pos: ``(L, path_size)`` FFN neuron indices, highest impact first.
        key_neg, value_neg: ``(L, neg_path_size)`` indices, lowest impact first; disjoint from ``*_pos``.
        key_scores, value_scores: ``(L, d_ff)`` impact scores of every key / value.
    """

    key_pos: torch.Tensor
    key_neg: torch.Tensor
    value_pos: torch.Tensor
    value_neg: torch.Tensor
    key_scores: torch.Tensor
    value_scores: torch.Tensor

    def ranked(self, kind: str) -> torch.Tensor:
        """``(L, path_size)`` scores of the critical path's nodes, in rank order (Figure 4 of PAC)."""
        scores, pos = getattr(self, f"{kind}_scores"), getattr(self, f"{kind}_pos")
        return scores.gather(1, pos.to(scores.device))


def layer_weights(ranked: torch.Tensor, power: float) -> torch.Tensor:
    """Layer-aware weights of the critical path: ``w_l = s_l^p / mean_l(s_l^p)``.

    ``s_l`` is the mean impact score of layer ``l``'s critical-path nodes, so layers whose paths
    matter more (PAC Figure 4: the middle layers) get larger weights, and the weights average 1
    (the same total step as uniform weighting). PAC's §6.2.1 suggests this re-weighting as future
    work; ``p = 0`` is PAC's uniform optimisation.

    Args:
        ranked: ``(L, path_size)`` scores of the critical-path nodes (:meth:`PathSelection.ranked`).
        power: the exponent ``p ≥ 0``.

    Returns:
        ``(L,)`` float32 weights; all ones when ``p = 0`` or every score is 0 (nothing to rank by).
    """
    s = ranked.float().mean(dim=1)  # (L,)
    if power == 0 or not bool((s > 0).any()):
        return torch.ones_like(s)
    w = s.clamp_min(0).pow(power)  # (L,)
    return w / w.mean()


class PathDeltas(nn.Module):
    """Trainable deltas of the critical and negative paths of every layer (float32).

    Args:
        n_layers: number of decoder blocks L.
        d_model: residual width (length of a key row / value column).
        path_size: keys and values per layer on the critical path T+.
        neg_path_size: keys and values per layer on the negative path τ−.
        device: where the deltas live (the model's device).
    """

    def __init__(self, n_layers: int, d_model: int, path_size: int, neg_path_size: int,
                 device: torch.device | str) -> None:
        super().__init__()
        self.n_layers = n_layers
        for kind in KINDS:
            for part, n in (("pos", path_size), ("neg", neg_path_size)):
                self.register_parameter(f"{kind}_{part}",
                                        nn.Parameter(torch.zeros(n_layers, n, d_model, device=device)))  # (L, n, D)
                self.register_buffer(f"{kind}_{part}_idx", torch.zeros(n_layers, n, dtype=torch.long, device=device),
                                     persistent=False)  # (L, n)
            self.register_buffer(f"{kind}_weight", torch.ones(n_layers, device=device), persistent=False)  # (L,)
        self.part: Part = "all"
        self.selected = False  # True while the deltas hold a selection's change that is not folded yet

    @torch.no_grad()
    def select(self, selection: PathSelection, layer_weighting: float = 0.0) -> None:
        """Point the deltas at ``selection``'s neurons and zero them (fold first to keep a change).

        ``layer_weighting`` > 0 weights each layer's T+ deltas by :func:`layer_weights` of the
        selection's scores (keys and values separately); 0 keeps every weight at 1.
        """
        for kind in KINDS:
            getattr(self, f"{kind}_weight").copy_(layer_weights(selection.ranked(kind), layer_weighting))
            for part in ("pos", "neg"):
                getattr(self, f"{kind}_{part}_idx").copy_(getattr(selection, f"{kind}_{part}"))
                getattr(self, f"{kind}_{part}").zero_()
        self.selected = True

    @torch.no_grad()
    def discard(self) -> None:
        """Zero the deltas and forget the selection without writing anything (after a failed edit)."""
        for p in self.parameters():
            p.zero_()
        self.selected = False

    @contextmanager
    def training_part(self, part: Part) -> Iterator[None]:
        """Forwards inside see both paths, but gradients reach only ``part`` (``"pos"``: T+, ``"neg"``: τ−)."""
        before, self.part = self.part, part
        try:
            yield
        finally:
            self.part = before

    def delta(self, kind: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices ``(n,)`` and deltas ``(n, D)`` of ``kind`` at ``layer``: T+ rows (× layer weight), then τ−."""
        pos, neg = getattr(self, f"{kind}_pos")[layer], getattr(self, f"{kind}_neg")[layer]  # (P, D), (N, D)
        if self.part == "neg":
            pos = pos.detach()
        elif self.part == "pos":
            neg = neg.detach()
        pos = pos * getattr(self, f"{kind}_weight")[layer]
        idx = torch.cat([getattr(self, f"{kind}_pos_idx")[layer], getattr(self, f"{kind}_neg_idx")[layer]])
        return idx, torch.cat([pos, neg])

    def _key_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            idx, delta = self.delta("key", layer)  # (n,), (n, D)
            extra = F.linear(args[0].to(delta.dtype), delta)  # (..., n)
            return output.index_add(-1, idx, extra.to(output.dtype))  # (..., d_ff)

        return hook

    def _value_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            idx, delta = self.delta("value", layer)  # (n,), (n, D)
            act = args[0].index_select(-1, idx).to(delta.dtype)  # (..., n)
            return output + (act @ delta).to(output.dtype)  # (..., D)

        return hook

    @contextmanager
    def attached(self, model: nn.Module, adapter: ArchAdapter) -> Iterator[None]:
        """Hooks on every layer's ``mlp_in`` and ``mlp_out``, removed on exit (zero deltas add nothing)."""
        with ExitStack() as stack:
            for layer in range(self.n_layers):
                for kind, make in (("key", self._key_hook), ("value", self._value_hook)):
                    handle = adapter.module(model, MODULE_OF[kind], layer).register_forward_hook(make(layer))
                    stack.callback(handle.remove)
            yield

    @torch.no_grad()
    def fold_into(self, model: nn.Module, adapter: ArchAdapter, logs: Sequence[UndoLog]) -> None:
        """Add the deltas to the selected rows/columns of the weights, then zero the deltas.

        Every weight is remembered in each of ``logs`` before it changes; only the selected
        rows (keys) and columns (values) are written.

        Raises:
            FloatingPointError: if a delta is NaN/inf (nothing is written).
        """
        if not self.selected:
            return
        if not all(torch.isfinite(p).all() for p in self.parameters()):
            raise FloatingPointError("refusing to fold path deltas with NaN/inf entries; nothing was written")
        for layer in range(self.n_layers):
            for kind in KINDS:
                idx, delta = self.delta(kind, layer)  # (n,), (n, D)
                weight = adapter.module(model, MODULE_OF[kind], layer).weight
                for log in logs:
                    log.remember(weight)
                linear = adapter.as_linear(weight)  # (d_ff, D) for keys, (D, d_ff) for values; a view
                if kind == "key":
                    linear.index_add_(0, idx, delta.to(weight.dtype))  # rows j of mlp_in
                else:
                    linear.index_add_(1, idx, delta.T.to(weight.dtype))  # columns j of mlp_out
        for p in self.parameters():
            p.zero_()
        self.selected = False  # folded: a later fold must not write these neurons again

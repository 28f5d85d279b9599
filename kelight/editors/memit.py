"""MEMIT (Meng et al. 2023) and PMET (Li et al. 2024): edits spread over the MLPs of layers R.

Both optimise a value vector per request at the last layer L of R (MEMIT: the block output, or
the MLP output where the architecture normalises it before the residual stream; PMET: separate
attention and MLP outputs, keeping only the MLP part), then for each layer
l ∈ R in ascending order write the remaining residual, divided by the layers left, with the
least-squares solve ``Δ = R Kᵀ (λ C + K Kᵀ)⁻¹``. AlphaEdit (:mod:`kelight.editors.alphaedit`) shares this
machinery (:class:`SpreadEditor`) with another solve.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.checks import check_layers, check_number
from kelight.editors.base import EditInfo
from kelight.editors.locate.editor import LocateEditor, z_info
from kelight.editors.locate.hparams import LocateHParams
from kelight.editors.locate.keys import mean_keys
from kelight.editors.locate.solve import least_squares_update
from kelight.editors.locate.zopt import ZResult
from kelight.editors.undo import UndoLog
from kelight.lm.hooks import trace
from kelight.lm.tokens import pad_batch, pad_id, subject_last_index
from kelight.objectives.base import ExtraLoss
from kelight.types import EditInputError, EditRequest, check_joint_requests

log = logging.getLogger(__name__)


@torch.no_grad()
def post_norm_preimage(norm: torch.nn.Module, m: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """The change of an MLP output ``m`` ``(D, n)`` (before its post-norm) that turns the normalised
    output ``y = norm(m)`` towards ``y + resid`` (float64 ``(D, n)``).

    A normalised output has a fixed size (``norm(c·x) = norm(x)`` for c > 0), so it can only turn:
    the new MLP output is the multiple of the pre-image direction ``u = (y + resid) / gain`` closest
    to ``m`` (least change); ``norm(m + Δ)`` then points along ``y + resid`` exactly where the gain
    is uniform. Writing ``resid`` itself, in the residual stream's units, into the MLP output
    overshoots by orders of magnitude on Gemma-3, whose residual stream is far larger than an MLP
    output (docs/results.md).
    """
    dtype = next(norm.parameters()).dtype
    y = norm(m.T.to(dtype)).double().T  # (D, n)
    gain = norm(torch.ones(1, m.shape[0], dtype=dtype, device=m.device)).double()[0]  # (D,) up to a constant
    usable = gain.abs() > 1e-6 * gain.abs().max()
    u = torch.where(usable[:, None], (y + resid) / torch.where(usable, gain, 1.0)[:, None], 0.0)  # (D, n)
    scale = (m * u).sum(0) / (u * u).sum(0).clamp(min=1e-30)  # (n,) nearest multiple of u to m
    scale = torch.where(scale > 0, scale, m.norm(dim=0) / u.norm(dim=0).clamp(min=1e-30))
    return scale * u - m


@dataclass(frozen=True)
class SpreadHParams(LocateHParams):
    """What MEMIT, PMET and AlphaEdit share besides :class:`LocateHParams`: the layers an edit is spread over.

    Attributes:
        layers: the edited MLP layers R, ascending.
        value_at: the value vector's module at R's last layer L: ``block`` (L's block output, MEMIT's paper) or
            ``mlp`` (L's MLP output before any post-norm, the units the update writes, as PMET's); unset:
            ``mlp`` on architectures that normalise the MLP output before the residual stream (Gemma-3), else
            ``block``.
    """

    context_templates: tuple[tuple[int, int], ...] = ((10, 5),)  # MEMIT's
    layers: tuple[int, ...] = (2, 3, 4, 5, 6)
    value_at: Literal["block", "mlp"] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", check_layers("layers", self.layers))
        if self.value_at not in (None, "block", "mlp"):
            raise EditInputError(f"expected value_at 'block', 'mlp' or None (architecture default), got "
                                 f"{self.value_at!r}")


@dataclass(frozen=True)
class MemitHParams(SpreadHParams):
    """MEMIT's hyper-parameters.

    Attributes:
        mom2_update_weight: λ of ``(λ C + K Kᵀ)``, weighing the preserved keys against the new ones.
    """

    mom2_update_weight: float = 15000.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("mom2_update_weight", self.mom2_update_weight, positive=True)


@dataclass(frozen=True)
class PmetHParams(MemitHParams):
    """PMET's hyper-parameters: MEMIT's; its value vector is always the MLP output."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.value_at == "block":
            raise EditInputError("PMET's value vector is the MLP output; value_at='block' is MEMIT's, drop it or use "
                                 "MEMIT")


class SpreadEditor(LocateEditor):
    """MEMIT's machinery, shared by MEMIT, PMET and AlphaEdit: one z per request at R's last layer L, then for
    each layer of R in ascending order the remaining residual, divided by the layers left, written at the
    requests' keys by :meth:`solve`."""

    hp: SpreadHParams
    pmet = False  # PMET: z at L's attention and MLP outputs, only the MLP part written

    def __init__(self, hparams: SpreadHParams, extra_losses: Sequence[ExtraLoss] = ()) -> None:
        super().__init__(hparams, extra_losses)
        self.mom2: dict[int, torch.Tensor] = {}

    @property
    def edited_layers(self) -> tuple[int, ...]:
        return self.hp.layers

    @property
    def last_layer(self) -> int:
        return self.hp.layers[-1]

    @property
    def value_at(self) -> str:
        """``"block"`` or ``"mlp"``: the module at L whose output is the value vector (after setup)."""
        assert self.adapter is not None
        if self.pmet:
            return "mlp"
        if self.hp.value_at is not None:
            return self.hp.value_at
        return "block" if self.adapter.mlp_post_norm is None else "mlp"

    def target_path(self) -> str:
        """Where the value is read and the residual measured: L's block output or MLP output."""
        assert self.adapter is not None
        if self.value_at == "mlp":
            return self.adapter.path("mlp_out", self.last_layer)
        return self.adapter.block_path(self.last_layer)

    def z_paths(self) -> list[str]:
        assert self.adapter is not None
        if self.pmet:  # attention and MLP deltas at L; only the MLP one is written
            return [self.adapter.path("mlp_out", self.last_layer), self.adapter.path("attn", self.last_layer)]
        return [self.target_path()]

    def prepare_statistics(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
        """C at every layer of R, in one pass over the corpus (or from the cache)."""
        if self._through_post_norm:
            assert self.adapter is not None
            log.warning("%s with value_at='block' on %s: the MLP output is normalised before the residual "
                        "stream, so the block-output target can only be turned towards, not written "
                        "(post_norm_preimage); on Gemma-3-270M such edits barely take (docs/results.md). "
                        "Leave value_at unset (the MLP output) for this family",
                        type(self).__name__.removesuffix("Editor"), self.adapter.family)
        from kelight.editors.stats.moments import second_moments  # noqa: PLC0415

        self.mom2 = second_moments(model, tok, list(self.hp.layers), corpus=self.hp.mom2_corpus,
                                   n_tokens=self.hp.mom2_n_tokens)

    def edit(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: list[EditRequest],
             undo: UndoLog, zs: Sequence[ZResult] | None = None) -> EditInfo:
        """Edit all ``requests`` jointly (the batch regime; one request = the single regime).

        ``zs``: their value vectors if already optimised on the current weights (:meth:`compute_zs`).
        """
        check_joint_requests(requests)
        if zs is not None and len(zs) != len(requests):
            raise ValueError(f"expected one precomputed z per request, got {len(zs)} for {len(requests)} requests")
        assert self.adapter is not None
        zs = list(zs) if zs is not None else self.compute_zs(model, tok, requests)
        targets = torch.stack([z.v_init[0] + z.delta[0] for z in zs], dim=1).double()  # (D, n)
        written: dict[int, torch.Tensor] = {}  # layer -> the keys (d_in, n) its update wrote at
        for i, layer in enumerate(self.hp.layers):
            keys = self._mean_keys(model, tok, layer, requests)  # (d_in, n)
            # one forward: this layer's MLP output where a norm follows it, then the target module's output
            paths = [self.adapter.path("mlp_out", layer)] if self._through_post_norm else []
            *mlp_out, current = self._values_at(model, tok, requests, [*paths, self.target_path()])  # (D, n) each
            resid = (targets - current) / (len(self.hp.layers) - i)  # spread over the layers left
            if mlp_out:
                resid = post_norm_preimage(self.adapter.module(model, "mlp_post_norm", layer), mlp_out[0], resid)
            undo.add_(self.adapter.out_weight(model, layer), self.solve(layer, keys, resid),
                      transposed=self.adapter.mlp_conv1d)
            written[layer] = keys
        self.record_written(written, undo)
        return z_info(zs)

    @abstractmethod
    def solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """This layer's weight change ``(d_out, d_in)`` writing ``resid`` ``(D, n)`` at ``keys`` ``(d_in, n)``."""

    def record_written(self, written: dict[int, torch.Tensor], undo: UndoLog) -> None:
        """After an edit wrote at ``written`` keys per layer (AlphaEdit keeps them); a failed edit never gets here."""

    def _mean_keys(self, model, tok, layer: int, requests: Sequence[EditRequest]) -> torch.Tensor:
        assert self.adapter is not None and self.templates is not None
        cols = [mean_keys(model, tok, self.adapter, layer, r, self.templates) for r in requests]
        return torch.stack(cols, dim=1)  # (d_in, n)

    @property
    def _through_post_norm(self) -> bool:
        """A block-output value on an architecture that normalises the MLP output before the residual."""
        return self.adapter is not None and self.adapter.mlp_post_norm is not None and self.value_at == "block"

    def _current_values(self, model, tok, requests: Sequence[EditRequest]) -> torch.Tensor:
        """Output of the target module at each request's subject (plain prompt), ``(D, n)``."""
        return self._values_at(model, tok, requests, [self.target_path()])[0]

    @torch.no_grad()
    def _values_at(self, model, tok, requests: Sequence[EditRequest], paths: Sequence[str]) -> list[torch.Tensor]:
        """Output of each module in ``paths`` at each request's subject (plain prompt), ``(D, n)``
        float64 each, from one forward that stops after ``paths[-1]`` (list them in forward order)."""
        ids = [list(tok(r.prompt)["input_ids"]) for r in requests]
        pos = torch.tensor([subject_last_index(tok, r.prompt, r.subject) for r in requests])
        input_ids, mask = pad_batch(ids, pad_id(tok), next(model.parameters()).device)
        with trace(model, list(paths), stop=True) as rec:
            model.base_model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        rows = torch.arange(len(requests), device=input_ids.device)
        return [rec[path][rows, pos.to(input_ids.device)].double().T for path in paths]


class MemitEditor(SpreadEditor):
    """MEMIT: each layer's update is the least-squares ``Δ = R Kᵀ (λ C + K Kᵀ)⁻¹``."""

    hp: MemitHParams

    def solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        return least_squares_update(keys, resid, self.mom2[layer].to(keys.device), self.hp.mom2_update_weight)


class PmetEditor(MemitEditor):
    """PMET: MEMIT's update from the MLP part of value vectors optimised at L's attention and MLP outputs."""

    hp: PmetHParams
    pmet = True

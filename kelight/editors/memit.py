"""MEMIT (Meng et al. 2023), PMET (Li et al. 2024), AlphaEdit (Fang et al. 2025): edits spread over
the MLPs of layers R.

Both optimise a value vector per request at the last layer L of R (MEMIT: the block output, or
the MLP output where the architecture normalises it before the residual stream; PMET: separate
attention and MLP outputs, keeping only the MLP part), then for each layer
l ∈ R in ascending order write the remaining residual, divided by the layers left, with the
shared least-squares solve ``Δ = R Kᵀ (λ C + K Kᵀ)⁻¹`` — or, with a null-space threshold (AlphaEdit),
``Δ = R Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + α I)⁻¹``: projected onto the null space P of the preserved keys'
second moment C, and keeping the keys K_p edited before on the same weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.editors.checks import check_context_templates, check_layers, check_number
from kelight.editors.context import build_rewrite_batch, sample_context_templates
from kelight.editors.corpus import CorpusSpec
from kelight.editors.keys import mean_keys
from kelight.editors.rome import EditInfo
from kelight.editors.steps import ExtraLoss
from kelight.editors.update import UndoLog, least_squares_update, nullspace_projector, nullspace_update
from kelight.editors.zopt import ZConfig, ZResult, optimise_zs
from kelight.hooks import trace
from kelight.models.adapters import ArchAdapter, adapter_for
from kelight.tokens import pad_batch, pad_id, subject_last_index
from kelight.types import EditInputError, EditRequest, check_joint_requests

log = logging.getLogger(__name__)
ALPHAEDIT_THRESHOLD = 2e-2  # the AlphaEdit paper's null-space threshold on C's eigenvalues


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
class MemitHParams:
    """MEMIT/PMET hyper-parameters.

    Attributes:
        layers: the edited MLP layers R (ascending).
        z: value-vector optimisation settings.
        context_templates: ``[length, count]`` pairs of sampled prefixes (MEMIT: [[10, 5]]).
        mom2_update_weight: λ weighing preserved keys (C) against the new keys.
        mom2_n_tokens / mom2_corpus: corpus for C (see :mod:`kelight.editors.covariance`).
        pmet: optimise attention + MLP deltas at L and keep the MLP part (PMET).
        value_at: MEMIT's value vector: ``"block"`` (L's block output, the paper) or ``"mlp"`` (L's MLP
            output before any post-norm, the units the update writes, as PMET's). ``None``: ``"mlp"``
            where the adapter declares ``mlp_post_norm`` (Gemma-3), else ``"block"``. PMET: always MLP.
        nullspace_threshold: AlphaEdit: project each update onto the eigenvectors of C with eigenvalue
            below this (the paper: 2e-2) and keep the keys edited before on the same weights
            (:func:`~kelight.editors.update.nullspace_update`); ``mom2_update_weight`` is then unused.
            ``None``: MEMIT's solve.
        nullspace_l2: AlphaEdit's α, the weight of the update's own norm (the reference's ``L2``: 10).
        seed: seed of the context-template sampling.
    """

    layers: tuple[int, ...] = (2, 3, 4, 5, 6)
    z: ZConfig = field(default_factory=ZConfig)
    context_templates: tuple[tuple[int, int], ...] = ((10, 5),)
    mom2_update_weight: float = 15000.0
    mom2_n_tokens: int = 100_000
    mom2_corpus: str | CorpusSpec | None = None
    pmet: bool = False
    value_at: Literal["block", "mlp"] | None = None
    nullspace_threshold: float | None = None
    nullspace_l2: float = 10.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_layers("layers", self.layers)
        check_context_templates(self.context_templates)
        check_number("mom2_update_weight", self.mom2_update_weight, positive=True)
        if self.value_at not in (None, "block", "mlp"):
            raise EditInputError(f"expected value_at 'block', 'mlp' or None (architecture default), got "
                                 f"{self.value_at!r}")
        if self.nullspace_threshold is not None:
            check_number("nullspace_threshold", self.nullspace_threshold, positive=True)
        check_number("nullspace_l2", self.nullspace_l2, positive=True)
        if self.pmet and self.value_at == "block":
            raise EditInputError("PMET's value vector is the MLP output; value_at='block' is MEMIT's, "
                                 "drop it or use MEMIT")


class MemitEditor:
    """Computes and applies MEMIT (PMET, AlphaEdit) batch updates; ``setup`` once per unedited model.

    AlphaEdit (``nullspace_threshold`` set) also remembers ``K_p K_pᵀ``, the keys it has written into the
    current weights (``edited_gram``); the undo log that holds those edits forgets them on restore.
    """

    def __init__(self, hparams: MemitHParams, extra_losses: Sequence[ExtraLoss] = ()) -> None:
        self.hp = hparams
        self.extra_losses = tuple(extra_losses)
        self.templates: list[str] | None = None
        self.mom2: dict[int, torch.Tensor] = {}
        self.adapter: ArchAdapter | None = None
        self.projectors: dict[int, torch.Tensor] = {}  # AlphaEdit: layer -> null-space projector P
        self.edited_gram: dict[int, torch.Tensor] = {}  # AlphaEdit: layer -> K_p K_pᵀ of the edits in place

    @property
    def last_layer(self) -> int:
        return self.hp.layers[-1]

    @property
    def value_at(self) -> str:
        """``"block"`` or ``"mlp"``: the module at L whose output is the value vector (after setup)."""
        assert self.adapter is not None
        if self.hp.pmet:
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

    def setup(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
        self.adapter = adapter_for(model)
        for layer in self.hp.layers:
            self.adapter.check_layer(model, layer)
        if self._through_post_norm:
            log.warning("MEMIT with value_at='block' on %s: the MLP output is normalised before the residual "
                        "stream, so the block-output target can only be turned towards, not written "
                        "(post_norm_preimage); on Gemma-3-270M such edits barely take (docs/results.md). "
                        "Leave value_at unset (the MLP output) for this family", self.adapter.family)
        self.templates = sample_context_templates(model, tok, self.hp.context_templates, self.hp.seed)
        from kelight.editors.covariance import second_moments  # noqa: PLC0415

        self.mom2 = second_moments(model, tok, list(self.hp.layers), corpus=self.hp.mom2_corpus,
                                   n_tokens=self.hp.mom2_n_tokens)
        self.edited_gram = {}
        if self.hp.nullspace_threshold is not None:
            self.projectors = {layer: self._projector(layer, self.hp.nullspace_threshold) for layer in self.hp.layers}

    def _projector(self, layer: int, threshold: float) -> torch.Tensor:
        projector, rank = nullspace_projector(self.mom2[layer], threshold)
        dim = projector.shape[0]
        if rank == 0:
            smallest = torch.linalg.eigvalsh(self.mom2[layer].double()).min().item()
            raise EditInputError(f"nullspace_threshold={threshold:g} leaves no null space at layer {layer}: every "
                                 f"eigenvalue of its key second moment C is above it (the smallest is {smallest:.3g});"
                                 f" raise nullspace_threshold above {smallest:.3g}")
        log.info("AlphaEdit null space at layer %d: %d of %d key directions (eigenvalues of C < %g)", layer, rank,
                 dim, threshold)
        return projector

    def compute_zs(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                   requests: Sequence[EditRequest]) -> list[ZResult]:
        """z of each request on the current weights, ``hp.z.z_batch`` requests per batch."""
        if self.templates is None or self.adapter is None:
            raise RuntimeError("call setup(model, tokenizer) before applying edits")
        device = next(model.parameters()).device
        batches = [build_rewrite_batch(tok, r, self.templates, device) for r in requests]
        if self.hp.pmet:  # attention and MLP deltas at L; only the MLP one is written
            paths = [self.adapter.path("mlp_out", self.last_layer), self.adapter.path("attn", self.last_layer)]
        else:
            paths = [self.target_path()]
        return optimise_zs(model, paths, batches, self.hp.z, self.extra_losses, want_attn=bool(self.extra_losses),
                           first_edited_block=self.last_layer, pad_id=pad_id(tok))

    def apply(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest], undo: UndoLog,
        zs: Sequence[ZResult] | None = None,
    ) -> EditInfo:
        """Edit all ``requests`` jointly (the batch regime; one request = the single regime).

        ``zs``: their value vectors if already optimised on the current weights (:meth:`compute_zs`).
        """
        if self.templates is None or self.adapter is None:
            raise RuntimeError("call setup(model, tokenizer) before applying edits")
        check_joint_requests(requests)
        if zs is not None and len(zs) != len(requests):
            raise ValueError(f"expected one precomputed z per request, got {len(zs)} for {len(requests)} requests")
        zs = list(zs) if zs is not None else self.compute_zs(model, tok, requests)
        targets = torch.stack([z.v_init[0] + z.delta[0] for z in zs], dim=1).double()  # (D, n)
        grams: dict[int, torch.Tensor] = {}  # AlphaEdit: this edit's K Kᵀ, recorded once every layer is written
        for i, layer in enumerate(self.hp.layers):
            keys = self._mean_keys(model, tok, layer, requests)  # (d_in, n)
            # one forward: this layer's MLP output where a norm follows it, then the target module's output
            paths = [self.adapter.path("mlp_out", layer)] if self._through_post_norm else []
            *mlp_out, current = self._values_at(model, tok, requests, [*paths, self.target_path()])  # (D, n) each
            resid = (targets - current) / (len(self.hp.layers) - i)  # spread over the layers left
            if mlp_out:
                resid = post_norm_preimage(self.adapter.module(model, "mlp_post_norm", layer), mlp_out[0], resid)
            delta = self._solve(layer, keys, resid)
            undo.add_(self.adapter.out_weight(model, layer), delta, transposed=self.adapter.mlp_conv1d)
            if self.projectors:
                grams[layer] = keys.double() @ keys.double().T
        if self.projectors:  # AlphaEdit: these keys now hold edits that later ones must keep; a failed apply
            # (whose weight changes its caller undoes) never gets here, so the record matches the weights
            for layer, gram in grams.items():
                self.edited_gram[layer] = self.edited_gram[layer] + gram if layer in self.edited_gram else gram
            undo.on_restore(self.edited_gram.clear)
        return EditInfo(z=zs)

    def _solve(self, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """This layer's weight change writing ``resid`` at ``keys``: MEMIT's least squares, or AlphaEdit's
        null-space projected solve that also keeps the keys edited before."""
        if self.projectors:
            projector = self.projectors[layer].to(keys.device)
            prior = self.edited_gram.get(layer)
            return nullspace_update(keys, resid, projector, None if prior is None else prior.to(keys.device),
                                    self.hp.nullspace_l2)
        return least_squares_update(keys, resid, self.mom2[layer].to(keys.device), self.hp.mom2_update_weight)

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

"""ROME: rank-one model editing at one MLP (Meng et al. 2022), on any adapted architecture."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.editors.checks import check_context_templates, check_layer
from kelight.editors.context import build_rewrite_batch, sample_context_templates
from kelight.editors.corpus import CorpusSpec
from kelight.editors.keys import templated_keys
from kelight.editors.steps import ExtraLoss
from kelight.editors.update import UndoLog, rank_one_update
from kelight.editors.zopt import ZConfig, ZResult, optimise_zs
from kelight.models.adapters import ArchAdapter, adapter_for
from kelight.tokens import pad_id
from kelight.types import EditRequest, require_requests

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RomeHParams:
    """ROME hyper-parameters (method settings only; no architecture facts).

    Attributes:
        layer: edit layer l (ROME uses 5 of 28 on GPT-J; scale for small models).
        z: value-vector optimisation settings.
        context_templates: ``[length, count]`` pairs of model-sampled prefixes.
        mom2_adjustment: use the key second moment C (else C = I).
        mom2_n_tokens: tokens of corpus text for C.
        mom2_corpus: corpus for C (None: WikiText-2 from the shared data, else model samples).
        mean_key_insertion: store v* at the template-averaged key k* too (R-ROME). Default: ROME's
            reference, which inserts at the plain prompt's key (its direction C⁻¹k* from k*).
        seed: seed of the context-template sampling.
    """

    layer: int = 4
    z: ZConfig = field(default_factory=ZConfig)
    context_templates: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    mom2_adjustment: bool = True
    mom2_n_tokens: int = 100_000
    mom2_corpus: str | CorpusSpec | None = None
    mean_key_insertion: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_layer("layer", self.layer)
        check_context_templates(self.context_templates)


@dataclass
class EditInfo:
    """What one edit did: per-request z results and timing, for logs and cases.jsonl."""

    z: list[ZResult] = field(default_factory=list)


class RomeEditor:
    """Computes and applies ROME updates; ``setup`` once per (unedited) model.

    Example:
        >>> editor = RomeEditor(RomeHParams(layer=4))  # doctest: +SKIP
        >>> editor.setup(model, tok); undo = UndoLog()  # doctest: +SKIP
        >>> editor.apply(model, tok, [request], undo)  # doctest: +SKIP
    """

    def __init__(self, hparams: RomeHParams, extra_losses: Sequence[ExtraLoss] = ()) -> None:
        self.hp = hparams
        self.extra_losses = tuple(extra_losses)
        self.templates: list[str] | None = None
        self.mom2: torch.Tensor | None = None
        self.adapter: ArchAdapter | None = None

    def setup(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
        """Validate the layer, sample context templates, load/compute C (on the unedited model)."""
        self.adapter = adapter_for(model)
        self.adapter.check_layer(model, self.hp.layer)
        self.templates = sample_context_templates(model, tok, self.hp.context_templates, self.hp.seed)
        if self.hp.mom2_adjustment:
            from kelight.editors.covariance import second_moment  # noqa: PLC0415

            self.mom2 = second_moment(
                model, tok, self.hp.layer, corpus=self.hp.mom2_corpus, n_tokens=self.hp.mom2_n_tokens
            )

    def compute_zs(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase,
                   requests: Sequence[EditRequest]) -> list[ZResult]:
        """z of each request on the current weights, ``hp.z.z_batch`` requests per batch (independent edits)."""
        if self.templates is None or self.adapter is None:
            raise RuntimeError("call setup(model, tokenizer) before computing edits")
        device = next(model.parameters()).device
        batches = [build_rewrite_batch(tok, r, self.templates, device) for r in requests]
        return optimise_zs(
            model, self.adapter.path("mlp_out", self.hp.layer), batches, self.hp.z, self.extra_losses,
            want_attn=bool(self.extra_losses), first_edited_block=self.hp.layer, pad_id=pad_id(tok),
        )

    def compute(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, request: EditRequest,
                z: ZResult | None = None) -> tuple[torch.Tensor, ZResult]:
        """ΔW (linear convention, float64) for one request; the model is not modified.

        ``z``: the request's value vector if already optimised (:meth:`compute_zs` on these weights).
        """
        if self.templates is None or self.adapter is None:
            raise RuntimeError("call setup(model, tokenizer) before computing edits")
        device = next(model.parameters()).device
        z = z if z is not None else self.compute_zs(model, tok, [request])[0]
        # one pass over "{}" + the prefixes: the plain prompt's key is the "{}" row
        templates = self.templates if "{}" in self.templates else ["{}", *self.templates]
        keys = templated_keys(model, tok, self.adapter, self.hp.layer, request, templates)  # (P, d_in)
        k_plain = keys[templates.index("{}")]  # (d_in,) the key of the unmodified prompt
        k_mean = keys[[templates.index(t) for t in self.templates]].mean(0)  # (d_in,) k* over the templates
        k_star = k_mean if self.hp.mean_key_insertion else k_plain
        weight = self.adapter.out_weight_as_linear(model, self.hp.layer).detach()  # (d_out, d_in)
        v_star = weight.double() @ k_star.double() + z.delta[0].double()  # the value δ away from W k
        mom2 = self.mom2.to(device) if self.mom2 is not None else None
        return rank_one_update(weight, k_star, v_star, mom2, left_key=k_mean), z

    def apply(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest], undo: UndoLog,
        zs: Sequence[ZResult] | None = None,
    ) -> EditInfo:
        """Edit ``requests`` one after another (each sees the previous ones), logging into ``undo``.

        ``zs``: value vectors already optimised on the current weights (:meth:`compute_zs`), one per
        request; only valid for one request, since a later request's z must see the earlier edits.
        """
        require_requests(requests)
        if zs is not None and (len(zs) != len(requests) or len(requests) > 1):
            raise ValueError(f"expected precomputed z for exactly one request, got {len(zs)} for {len(requests)}; "
                             "ROME applies several requests in turn, each z computed on the edited weights")
        info = EditInfo()
        for i, request in enumerate(requests):
            delta, z = self.compute(model, tok, request, None if zs is None else zs[i])
            assert self.adapter is not None
            undo.add_(self.adapter.out_weight(model, self.hp.layer), delta, transposed=self.adapter.mlp_conv1d)
            info.z.append(z)
        return info

"""ROME: rank-one model editing at one MLP (Meng et al. 2022), on any adapted architecture."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.checks import check_layer
from kelight.editors.base import EditInfo
from kelight.editors.locate.editor import LocateEditor, z_info
from kelight.editors.locate.hparams import LocateHParams
from kelight.editors.locate.keys import templated_keys
from kelight.editors.locate.solve import rank_one_update
from kelight.editors.locate.zopt import ZResult
from kelight.editors.undo import UndoLog
from kelight.objectives.base import ExtraLoss
from kelight.types import EditRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RomeHParams(LocateHParams):
    """ROME's hyper-parameters: the shared locate-then-edit ones (:class:`LocateHParams`) and its own.

    Attributes:
        layer: the edit layer l (ROME uses 5 of 28 on GPT-J; scale for small models).
        mom2_adjustment: use the key second moment C (else C = I).
        mean_key_insertion: store v* at the template-averaged key k* too (R-ROME). Default: ROME's
            reference, which inserts at the plain prompt's key (its direction C⁻¹k* from k*).
    """

    layer: int = 4
    mom2_adjustment: bool = True
    mean_key_insertion: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer("layer", self.layer)


class RomeEditor(LocateEditor):
    """Computes and applies ROME updates; ``setup`` once per (unedited) model.

    Example:
        >>> editor = RomeEditor(RomeHParams(layer=4))  # doctest: +SKIP
        >>> editor.setup(model, tok); undo = UndoLog()  # doctest: +SKIP
        >>> editor.apply(model, tok, [request], undo)  # doctest: +SKIP
    """

    hp: RomeHParams

    def __init__(self, hparams: RomeHParams, extra_losses: Sequence[ExtraLoss] = ()) -> None:
        super().__init__(hparams, extra_losses)
        self.mom2: torch.Tensor | None = None

    @property
    def edited_layers(self) -> tuple[int, ...]:
        return (self.hp.layer,)

    def z_paths(self) -> list[str]:
        assert self.adapter is not None
        return [self.adapter.path("mlp_out", self.hp.layer)]

    def prepare_statistics(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
        """C at the edit layer (loaded from the cache or computed), unless ``mom2_adjustment`` is off."""
        self.mom2 = None
        if self.hp.mom2_adjustment:
            from kelight.editors.stats.moments import second_moment  # noqa: PLC0415

            self.mom2 = second_moment(model, tok, self.hp.layer, corpus=self.hp.mom2_corpus,
                                      n_tokens=self.hp.mom2_n_tokens)

    def compute(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, request: EditRequest,
                z: ZResult | None = None) -> tuple[torch.Tensor, ZResult]:
        """ΔW (linear convention, float64) for one request; the model is not modified.

        ``z``: the request's value vector if already optimised (:meth:`compute_zs` on these weights).
        """
        self.require_setup()
        assert self.adapter is not None
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

    def edit(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: list[EditRequest],
             undo: UndoLog, zs: Sequence[ZResult] | None = None) -> EditInfo:
        """Edit ``requests`` one after another (each sees the previous ones), logging into ``undo``.

        ``zs``: value vectors already optimised on the current weights (:meth:`compute_zs`), one per
        request; only valid for one request, since a later request's z must see the earlier edits.
        """
        if zs is not None and (len(zs) != len(requests) or len(requests) > 1):
            raise ValueError(f"expected precomputed z for exactly one request, got {len(zs)} for {len(requests)}; "
                             "ROME applies several requests in turn, each z computed on the edited weights")
        assert self.adapter is not None
        done = []
        for i, request in enumerate(requests):
            delta, z = self.compute(model, tok, request, None if zs is None else zs[i])
            undo.add_(self.adapter.out_weight(model, self.hp.layer), delta, transposed=self.adapter.mlp_conv1d)
            done.append(z)
        return z_info(done)

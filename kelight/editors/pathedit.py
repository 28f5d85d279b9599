"""PathEdit: edit FFN keys/values on gradient-traced critical paths across all layers (PAC).

PAC (Zhai et al., ACL 2025; reference ``SonglinZhai/PAC`` ``pac.py``):

1. **Tracing.** Sum the signed gradient of the target NLL over the edit batches for every FFN input
   matrix (keys = rows) and output matrix (values = columns). Per layer and matrix, viewed as
   ``G: (hidden, d_ff)``, z-score each hidden row across the FFN neurons, take ``|·|`` and average
   over the hidden dimension: one impact score per key and per value
   (:func:`~kelight.editors.pac.trace.impact_scores`).
2. **Paths.** In every layer the top ``path_size`` keys and values (ranked separately) form the
   critical path T+, the bottom ``neg_path_size`` the negative path τ−
   (:func:`~kelight.editors.pac.trace.select_paths`; disjoint by construction). Tracing is repeated every
   ``eta`` epochs on the model being edited.
3. **Editing.** Only the path deltas (:class:`~kelight.editors.pac.deltas.PathDeltas`) are
   trainable. Loss per batch: ``NLL(o_edit | prompt)`` with T+ trainable (+ extra terms such as
   γ·SADR) ``+ λ·CE(model(prompt + o_edit), unedited argmax)`` with τ− trainable
   (:mod:`kelight.objectives.contrastive`). Adam, lr 1e-5, 12 epochs, eta 2, λ 0.1 by default.

Differences from the reference, on purpose: (a) the reference keeps one Adam over the full FFN
matrices and zeroes gradients off the path, so momentum moves masked weights; here the deltas are
the optimiser's only parameters, and at every re-tracing they are folded into the weights and
Adam's state is reset (its moments belong to the old neurons). (b) The reference takes two Adam
steps per batch (NLL on T+, then λ·CE on τ−); here one step on the sum, each term's forward
detaching the other path, which gives T+ and τ− the same gradients except that the CE forward
sees T+ before rather than after that batch's step. (c) The GPT-J FFN biases are not edited.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.checks import check_count, check_number
from kelight.editors.base import EditInfo, Editor
from kelight.editors.pac.deltas import PathDeltas, PathSelection
from kelight.editors.pac.trace import trace_paths
from kelight.editors.rewrite import build_rewrite_batch, merge_rewrite_batches
from kelight.editors.steps import finish_loss, forward_logprobs, step_forward
from kelight.editors.undo import UndoLog
from kelight.lm.tokens import pad_id
from kelight.models.adapters import ArchAdapter, adapter_for
from kelight.objectives import rewrite_nll
from kelight.objectives.base import ExtraLoss, RewriteBatch
from kelight.objectives.contrastive import contrastive_loss, unedited_targets
from kelight.objectives.sadr import SadrOptions
from kelight.types import EditInputError, EditRequest, check_joint_requests

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PathHParams(SadrOptions):
    """PathEdit hyper-parameters (PAC reference defaults; method settings only), SADR's options (its drift is
    restrained from layer 1 on: PathEdit edits the FFNs of every layer) and the joint regime's epoch orders.

    Attributes:
        path_size: keys and values per layer on the critical path T+ (``--topk``).
        neg_path_size: keys and values per layer on the negative path τ− (``--bottomk``); 0 = none.
        eta: re-trace the paths every ``eta`` epochs.
        contrastive_lambda: λ of the contrastive term (0 = off).
        lr: Adam learning rate of the path deltas.
        epochs: passes over the edit set (per :meth:`PathEditor.apply` call: optimisation steps).
        layer_weighting: exponent ``p`` of the layer-aware weighting of T+
            (:func:`~kelight.editors.pac.deltas.layer_weights`): each layer's deltas are scaled by
            its paths' mean impact score to the power ``p``, normalised to mean 1. Under Adam this
            scales the layer's step, so high-impact (middle) layers move more. 0 = PAC (uniform).
        reshuffle: the joint regime draws a fresh seeded order of the edit set, and so new loader batches, every
            epoch, as PAC does (``false``: the loader's fixed batches every epoch). The references of every
            epoch's batches are made up front (with SADR, its records of the unedited attention too: memory grows
            with epochs × batches).
        shuffle_seed: seed of those orders.
    """

    path_size: int = 15
    neg_path_size: int = 1
    eta: int = 2
    contrastive_lambda: float = 0.1
    lr: float = 1e-5
    epochs: int = 12
    layer_weighting: float = 0.0
    reshuffle: bool = True
    shuffle_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, low in (("path_size", 1), ("neg_path_size", 0), ("eta", 1), ("epochs", 1), ("shuffle_seed", 0)):
            check_count(name, getattr(self, name), low)
        for name, positive in (("lr", True), ("contrastive_lambda", False), ("layer_weighting", False)):
            check_number(name, getattr(self, name), positive=positive)
        if not isinstance(self.reshuffle, bool):
            raise EditInputError(f"expected reshuffle to be true or false, got {self.reshuffle!r}")


def build_path_batch(tok: PreTrainedTokenizerBase, requests: Sequence[EditRequest],
                     device: torch.device | str) -> RewriteBatch:
    """One row ``prompt + target_new[:-1]`` per request (no context templates, no essence prompt).

    Raises:
        EditInputError: if ``requests`` is empty or two of them rewrite one prompt to different targets.
    """
    check_joint_requests(requests)
    parts = [build_rewrite_batch(tok, r, ("{}",), device, essence_templates=()) for r in requests]
    return merge_rewrite_batches(parts, pad_id(tok), independent=False)  # one joint objective (B, T)


class PathEditor(Editor):
    """Traces paths and trains their deltas; ``setup``/``apply`` as every editor (:mod:`kelight.editors.base`).

    ``apply`` runs ``epochs`` steps on the given requests as one batch (the per-batch regimes);
    :class:`kelight.methods.pathedit.PathEdit` drives the same pieces (``retrace``, ``loss``) from Lightning's
    loop for multi-epoch training over a whole edit set (its ``joint`` regime).

    Args:
        hparams: PathEdit's hyper-parameters.
        extra_losses: terms added to the path objective besides SADR, which ``hparams`` switches on.

    Example:
        >>> editor = PathEditor(PathHParams(path_size=15))  # doctest: +SKIP
        >>> editor.setup(model, tok); undo = UndoLog()  # doctest: +SKIP
        >>> editor.apply(model, tok, [request], undo)  # doctest: +SKIP
    """

    hp: PathHParams

    def __init__(self, hparams: PathHParams = PathHParams(), extra_losses: Sequence[ExtraLoss] = ()) -> None:  # noqa: B008
        super().__init__(hparams)
        self.extra_losses = (*hparams.sadr(1), *extra_losses)  # FFN paths in every layer: drift from layer 1 on
        self.adapter: ArchAdapter | None = None
        self.deltas: PathDeltas | None = None
        self.traces: list[PathSelection] = []  # the first tracing of every run

    def prepare(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
        """Check the architecture and path sizes against the model; create the (zero) deltas.

        Raises:
            EditInputError: unknown architecture, or paths wider than the FFN.
        """
        self.adapter = adapter_for(model)
        w_in = self.adapter.as_linear(self.adapter.module(model, "mlp_in", 0).weight)  # (d_ff, D)
        n_ff, d_model = w_in.shape
        if self.hp.path_size + self.hp.neg_path_size > n_ff:
            raise EditInputError(
                f"path_size + neg_path_size = {self.hp.path_size + self.hp.neg_path_size} exceeds the FFN width "
                f"d_ff = {n_ff} of this {self.adapter.family} model; expected at most {n_ff} (lower path_size)"
            )
        if w_in.dtype in (torch.bfloat16, torch.float16):
            log.warning("PathEdit on %s weights: its float32 deltas are folded into the weights at every "
                        "re-tracing, and a change below half a %s step of a weight rounds away (at lr %g many "
                        "do); edit a float32 copy (--model.dtype float32) for the edit to keep its size",
                        w_in.dtype, w_in.dtype, self.hp.lr)
        self.deltas = PathDeltas(self.adapter.n_layers(model), d_model, self.hp.path_size, self.hp.neg_path_size,
                                 w_in.device)

    def _parts(self) -> tuple[ArchAdapter, PathDeltas]:
        """The adapter and the path deltas (after :meth:`setup`)."""
        self.require_setup()
        assert self.adapter is not None and self.deltas is not None
        return self.adapter, self.deltas

    def retrace(self, model: PreTrainedModel, batches: Sequence[RewriteBatch], logs: Sequence[UndoLog],
                optimizer: torch.optim.Optimizer | None = None, first: bool = False) -> PathSelection:
        """Fold the current deltas into the weights, trace new paths, zero the deltas, reset Adam."""
        adapter, deltas = self._parts()
        deltas.fold_into(model, adapter, logs)
        selection = trace_paths(model, adapter, batches, self.hp.path_size, self.hp.neg_path_size)
        deltas.select(selection, self.hp.layer_weighting)
        if optimizer is not None:
            optimizer.state.clear()  # moments of the previous neurons must not move the new ones
        if first:
            self.traces.append(selection)
        return selection

    @torch.no_grad()
    def reference_ids(self, model: PreTrainedModel, batch: RewriteBatch) -> torch.Tensor:
        """``(N,)`` argmax of the model as it is now at the target positions (call before editing)."""
        tgt, _, _ = forward_logprobs(model, batch, want_attn=False)
        return unedited_targets(tgt)

    @torch.no_grad()
    def prime(self, model: PreTrainedModel, batch: RewriteBatch, extra_losses: Sequence[ExtraLoss]) -> None:
        """Let extra terms record their step-0 state on the model as it is (SADR: vanilla attention)."""
        if extra_losses:
            _, state = step_forward(model, batch, 0, want_rows=True)
            for term in extra_losses:
                term(state)

    def loss(self, model: PreTrainedModel, batch: RewriteBatch, reference_ids: torch.Tensor,
             extra_losses: Sequence[ExtraLoss], step: int) -> torch.Tensor:
        """NLL on T+ (+ extra terms on its forward) + λ·CE towards ``reference_ids`` on τ−; finite."""
        _, deltas = self._parts()
        with deltas.training_part("pos"):
            tgt, state = step_forward(model, batch, step, want_rows=bool(extra_losses))  # (N, V)
        loss = rewrite_nll(tgt, batch.target_ids, batch.target_rows, batch.n_rewrite)
        if self.hp.contrastive_lambda > 0 and self.hp.neg_path_size > 0:
            with deltas.training_part("neg"):
                tgt_neg, _, _ = forward_logprobs(model, batch, want_attn=False)  # (N, V)
            loss = loss + contrastive_loss(tgt_neg, reference_ids, batch.target_rows, batch.n_rewrite,
                                           self.hp.contrastive_lambda)
        return finish_loss(loss, extra_losses, state, self.hp.lr, "path editing")

    def edit(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: list[EditRequest],
             undo: UndoLog) -> EditInfo:
        """Train the path deltas for ``requests`` jointly for ``epochs`` steps and write them into the weights.

        Logged into ``undo``; if anything fails, this call's changes are undone before the error
        propagates (earlier calls' edits stay).

        Raises:
            EditOptimizationError: if the loss or the impact scores become NaN/inf.
        """
        adapter, deltas = self._parts()
        batch = build_path_batch(tok, requests, deltas.key_pos.device)
        reference = self.reference_ids(model, batch)
        local = UndoLog()
        try:
            losses = self._train(model, batch, reference, (undo, local))
            deltas.fold_into(model, adapter, (undo, local))
        except BaseException:
            local.restore()
            deltas.discard()  # a later apply would fold this edit's deltas at its first tracing
            raise
        return EditInfo(steps=(len(losses),) * len(requests), losses=(tuple(losses),) * len(requests))

    def _train(self, model: PreTrainedModel, batch: RewriteBatch, reference: torch.Tensor,
               logs: Sequence[UndoLog]) -> list[float]:
        adapter, deltas = self._parts()
        opt = torch.optim.Adam(deltas.parameters(), lr=self.hp.lr)
        losses = []
        with torch.enable_grad():
            for epoch in range(self.hp.epochs):
                if epoch % self.hp.eta == 0:
                    self.retrace(model, [batch], logs, opt, first=epoch == 0)
                with deltas.attached(model, adapter):
                    loss = self.loss(model, batch, reference, self.extra_losses, epoch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses

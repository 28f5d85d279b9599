"""FT-L: constrained fine-tuning of one MLP output matrix (Zhu et al. 2020; ROME's FT-L baseline).

The only trainable tensor is a delta ``ΔW`` (linear convention ``(d_out, d_in)``, float32), added
to the ``mlp_out`` weight of one layer by a forward hook: the module's output becomes
``W x + b + ΔW x`` (Conv1D included, through the adapter's convention). Adam minimises the rewrite
NLL of ``o_edit`` over the rewriting prompts ``prefix + prompt + target[:-1]`` (no essence KL in
FT-L) plus any extra terms (γ·SADR), and after every step clamps each element of ``ΔW`` to
``[-ε, ε]`` (ROME's FT-L: ``‖W' − W₀‖_∞ ≤ ε``). Only the final ``ΔW`` is written, via
:meth:`UndoLog.add_`, so a failed run leaves the weights untouched and ``restore`` is bit-exact.

Differences from ROME's ``ft_main``: the loss is the teacher-forced mean per-token NLL shared with
every editor (ROME's reads all target tokens off the last prompt position), and Adam's weight
decay acts on ``ΔW`` (an L2 pull towards the original weight), not on ``W``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.checks import check_context_templates, check_count, check_layer, check_number
from kelight.editors.base import EditInfo, Editor
from kelight.editors.rewrite import build_rewrite_batch, sample_context_templates
from kelight.editors.steps import finish_loss, step_forward
from kelight.editors.undo import UndoLog
from kelight.lm.hooks import added_weight
from kelight.models.adapters import ArchAdapter, adapter_for
from kelight.objectives import rewrite_nll
from kelight.objectives.base import ExtraLoss, RewriteBatch
from kelight.objectives.sadr import SadrOptions
from kelight.types import EditRequest


@dataclass(frozen=True)
class FTHParams(SadrOptions):
    """FT-L hyper-parameters (ROME's FT-L defaults; method settings only) and SADR's options (drift after
    ``layer``).

    Attributes:
        layer: the layer whose MLP output matrix is fine-tuned.
        steps: Adam steps (no early stop: ``steps_run == steps``).
        lr: Adam learning rate.
        norm_constraint: ε, the L∞ bound on each weight's change (``inf``: unconstrained FT).
        weight_decay: Adam weight decay on ``ΔW`` (0 in ROME's FT-L).
        context_templates: ``[length, count]`` pairs of model-sampled prefixes as in ROME;
            ``()`` (the default, as in ROME's FT-L) trains on the plain prompt ``"{}"`` only.
        seed: seed of the context-template sampling.
    """

    layer: int = 4
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 5e-4
    weight_decay: float = 0.0
    context_templates: tuple[tuple[int, int], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_layer("layer", self.layer)
        check_count("steps", self.steps)
        check_count("seed", self.seed, low=0)
        check_number("lr", self.lr, positive=True)
        check_number("norm_constraint", self.norm_constraint, positive=True, allow_inf=True)
        check_number("weight_decay", self.weight_decay, positive=False)
        object.__setattr__(self, "context_templates", check_context_templates(self.context_templates))


class FTEditor(Editor):
    """Constrained fine-tuning of one ``mlp_out`` matrix; ``setup``/``apply`` as every editor
    (:mod:`kelight.editors.base`).

    Args:
        hparams: FT's hyper-parameters.
        extra_losses: terms added to the fine-tuning loss besides SADR, which ``hparams`` switches on.

    Example:
        >>> editor = FTEditor(FTHParams(layer=4))  # doctest: +SKIP
        >>> editor.setup(model, tok); undo = UndoLog()  # doctest: +SKIP
        >>> editor.apply(model, tok, [request], undo)  # doctest: +SKIP
    """

    hp: FTHParams

    def __init__(self, hparams: FTHParams, extra_losses: Sequence[ExtraLoss] = ()) -> None:
        super().__init__(hparams)
        self.extra_losses = (*hparams.sadr(hparams.layer + 1), *extra_losses)
        self.templates: list[str] = []
        self.adapter: ArchAdapter | None = None

    def prepare(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
        """Validate the layer and sample the context templates (on the unedited model)."""
        self.adapter = adapter_for(model)
        self.adapter.check_layer(model, self.hp.layer)
        self.templates = sample_context_templates(model, tok, self.hp.context_templates, self.hp.seed)

    def compute(
        self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, request: EditRequest,
        applied: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[float]]:
        """``ΔW`` (linear convention, float32) for one request, and the loss of each step; the model is not
        modified.

        Args:
            applied: change already written to this weight by the current ``apply`` call; the bound
                holds for the total, ``‖applied + ΔW‖_∞ ≤ ε``.

        Raises:
            EditOptimizationError: if the loss becomes NaN/inf.
        """
        self.require_setup()
        assert self.adapter is not None
        weight = self.adapter.out_weight_as_linear(model, self.hp.layer).detach()  # (d_out, d_in)
        batch = build_rewrite_batch(tok, request, self.templates, weight.device, essence_templates=())
        delta = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device, requires_grad=True)
        applied = torch.zeros_like(delta, requires_grad=False) if applied is None else applied.float()
        low, high = -self.hp.norm_constraint - applied, self.hp.norm_constraint - applied  # (d_out, d_in)
        module = self.adapter.module(model, "mlp_out", self.hp.layer)
        with added_weight(module, [delta]):
            losses = self._optimise(model, batch, delta, low, high)
        return delta.detach(), losses

    def _optimise(self, model: PreTrainedModel, batch: RewriteBatch, delta: torch.Tensor, low: torch.Tensor,
                  high: torch.Tensor) -> list[float]:
        """Adam on ``delta`` with the box clamp after every step; returns the loss of each step."""
        opt = torch.optim.Adam([delta], lr=self.hp.lr, weight_decay=self.hp.weight_decay)
        losses = []
        for step in range(self.hp.steps):
            tgt, state = step_forward(model, batch, step, want_rows=bool(self.extra_losses))  # tgt: (N, V)
            loss = rewrite_nll(tgt, batch.target_ids, batch.target_rows, batch.n_rewrite)
            loss = finish_loss(loss, self.extra_losses, state, self.hp.lr, "fine-tuning")
            losses.append(loss.item())
            (delta.grad,) = torch.autograd.grad(loss, [delta])  # no gradient reaches the model's weights
            opt.step()
            with torch.no_grad():
                delta.copy_(torch.minimum(torch.maximum(delta, low), high))  # ‖applied + ΔW‖_∞ ≤ ε
        return losses

    def edit(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: list[EditRequest],
             undo: UndoLog) -> EditInfo:
        """Fine-tune for ``requests`` one after another (each sees the previous ones), logging into ``undo``.

        The L∞ bound holds for the total change of this call. If request ``i`` fails, requests
        ``< i`` stay applied; ``undo.restore()`` returns the exact original weights.
        """
        assert self.adapter is not None
        applied, losses = None, []
        weight = self.adapter.out_weight(model, self.hp.layer)
        for request in requests:
            delta, request_losses = self.compute(model, tok, request, applied)
            undo.add_(weight, delta, transposed=self.adapter.mlp_conv1d)
            applied = delta if applied is None else applied + delta
            losses.append(tuple(request_losses))
        return EditInfo(steps=tuple(len(x) for x in losses), losses=tuple(losses))

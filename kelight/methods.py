"""The edit methods as LightningModules: ROME, MEMIT, PMET, AlphaEdit (locate-then-edit) and FT (the baseline).

Each class turns its CLI/sweep arguments (``--model.layer`` ...) into an editor of
:mod:`kelight.editors`; the edit loop, regimes, evaluation and metrics are :class:`EditModule`'s.
PathEdit's module is :mod:`kelight.path_module`.
"""

from __future__ import annotations

from typing import Literal

from kelight.editors.checks import check_context_templates, check_layer, check_layers, check_number
from kelight.editors.ft import FTEditor, FTHParams
from kelight.editors.memit import ALPHAEDIT_THRESHOLD, MemitEditor, MemitHParams
from kelight.editors.rome import RomeEditor, RomeHParams
from kelight.editors.zopt import CompileMode, StopOn, ZConfig
from kelight.module import EditModule
from kelight.objectives.relations import check_relation_kl_factor, check_relation_prompts
from kelight.objectives.sadr import check_sadr_gamma, sadr_terms
from kelight.types import EditInputError, check_joint_requests


class LocateEditModule(EditModule):
    """Shared arguments of the locate-then-edit methods (value-vector z optimisation).

    Args:
        steps: z optimisation steps (ROME paper: 20; the SADR reference used 80 with SADR).
        lr: Adam learning rate of z.
        kl_factor: ω of the essence KL.
        relation_kl_factor: λ of the relation KL: keeps the next-token distribution on questions about the
            subject's other relations (generic templates filled with the subject, the edited relation left
            out; never a case's evaluation prompts) as the unedited model had it (0 = off).
        relation_prompts: N, how many relation prompts the relation KL averages over.
        weight_decay: weight of ‖δ‖/‖v‖².
        clamp_norm_factor: ‖δ‖ ≤ factor·‖v‖.
        context_templates: ``[length, count]`` pairs of model-sampled prefixes.
        mom2_n_tokens: corpus tokens for the key second moment C.
        mom2_corpus: corpus for C (None: WikiText-2 in the shared data, else model samples).
        sadr_gamma: γ of the SADR attention-drift term (0 = off).
        sadr_selective: restrain only the heads that over-attend the subject (SADR); ``false``
            restrains every head after the edit point (the paper's all-heads ablation).
        z_batch: optimise the z of this many independent edits together in one padded batch
            (single regime: the cases of a loader batch, so set ``--data.batch_size`` too; MEMIT/PMET's
            batch regime: the batch's requests). Same results up to float rounding; pays on GPUs,
            where a z-step is launch-bound. Not with the sequential regime or ROME's batch regime,
            where each z must see the edits before it.
        cache_prefix: run each z-step only on the tokens from the subject on, over a KV cache of
            the rest (same result, ~2.5× faster ROME steps on CPU); ``false`` runs the full prompts.
        early_stop_loss: stop an edit's z optimisation once its loss is below this (the reference: 0.05).
        early_stop_on: which loss the early stop tests: ``total`` (the reference; with SADR on, SADR's
            term is in it, so SADR edits rarely stop early) or ``edit`` (without SADR's term; SADR
            still slows the edit loss, so its edits still run most steps). The same when γ = 0. Both
            include the essence and relation KL.
        compile: ``off`` (eager), or the ``torch.compile`` mode of each z-step's forward (``default``,
            ``reduce-overhead`` = CUDA graphs, ``max-autotune``); compiled once per process with
            dynamic shapes. On CPU it pays only after some 200–500 edits (docs/performance.md).
        **kwargs: :class:`EditModule` arguments.
    """

    def __init__(
        self,
        steps: int = 20,
        lr: float = 0.5,
        kl_factor: float = 0.0625,
        relation_kl_factor: float = 0.0,
        relation_prompts: int = 8,
        weight_decay: float = 1e-3,
        clamp_norm_factor: float = 4.0,
        context_templates: list[list[int]] = [[5, 10], [10, 10]],  # noqa: B006 (CLI default)
        mom2_n_tokens: int = 100_000,
        mom2_corpus: str | None = None,
        sadr_gamma: float = 0.0,
        sadr_selective: bool = True,
        z_batch: int = 1,
        cache_prefix: bool = True,
        early_stop_loss: float = 5e-2,
        early_stop_on: StopOn = "total",
        compile: CompileMode = "off",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        check_sadr_gamma(sadr_gamma)
        check_relation_prompts(relation_prompts, check_relation_kl_factor(relation_kl_factor))
        check_context_templates(context_templates)
        if z_batch > 1 and self.hparams.regime == "sequential":
            raise EditInputError(f"z_batch={z_batch} optimises independent edits together, but in the sequential "
                             "regime each edit's z must see the edits before it; use z_batch 1")

    def sadr(self, edit_layer: int) -> tuple:
        """The SADR term for drift after ``edit_layer`` (empty when γ = 0)."""
        return sadr_terms(self.hparams.sadr_gamma, edit_layer + 1, self.hparams.sadr_selective)

    def z_config(self) -> ZConfig:
        h = self.hparams
        return ZConfig(steps=h.steps, lr=h.lr, kl_factor=h.kl_factor, relation_kl_factor=h.relation_kl_factor,
                       relation_prompts=h.relation_prompts, weight_decay=h.weight_decay,
                       clamp_norm_factor=h.clamp_norm_factor, z_batch=h.z_batch,
                       cache_prefix=h.cache_prefix, early_stop_loss=h.early_stop_loss,
                       early_stop_on=h.early_stop_on, compile=h.compile)

    def templates(self) -> tuple[tuple[int, int], ...]:
        return check_context_templates(self.hparams.context_templates)


class ROME(LocateEditModule):
    """ROME (Meng et al. 2022); every argument is a CLI/sweep key (``--model.layer`` ...).

    Args:
        layer: edit layer.
        mom2_adjustment: use the key second moment C (else C = I).
        mean_key_insertion: store v* at the template-averaged key (R-ROME) instead of the plain
            prompt's key (ROME's reference).
        **kwargs: :class:`LocateEditModule` and :class:`EditModule` arguments.
    """

    def __init__(self, layer: int = 4, mom2_adjustment: bool = True, mean_key_insertion: bool = False,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        check_layer("layer", layer)

    def build_editor(self) -> RomeEditor:
        h = self.hparams
        if h.z_batch > 1 and self.joint_batches:
            raise EditInputError(f"z_batch={h.z_batch}: ROME's {h.regime} regime applies the requests in turn, each z "
                                 "on the weights edited before it; use the single regime with --data.batch_size to "
                                 "optimise independent edits together")
        hp = RomeHParams(layer=h.layer, z=self.z_config(), context_templates=self.templates(),
                         mom2_adjustment=h.mom2_adjustment, mom2_n_tokens=h.mom2_n_tokens,
                         mom2_corpus=h.mom2_corpus, mean_key_insertion=h.mean_key_insertion)
        return RomeEditor(hp, self.sadr(h.layer))


class SpreadEditModule(LocateEditModule):
    """Shared arguments of the methods that spread an edit over the MLPs of layers R (MEMIT, PMET, AlphaEdit).

    Args:
        layers: edited layers R, ascending.
        value_at: ``"block"`` (L's block output, the paper) or ``"mlp"`` (L's MLP output); unset: the
            MLP output on architectures that normalise it before the residual stream (Gemma-3).
        **kwargs: :class:`LocateEditModule` and :class:`EditModule` arguments.
    """

    pmet = False

    def __init__(self, layers: list[int] = [2, 3, 4, 5, 6],  # noqa: B006 (CLI default)
                 value_at: Literal["block", "mlp"] | None = None, **kwargs) -> None:
        kwargs.setdefault("context_templates", [[10, 5]])
        super().__init__(**kwargs)
        self.save_hyperparameters()
        check_layers("layers", layers)

    def solve_options(self) -> dict:  # pragma: no cover - abstract
        """The :class:`MemitHParams` fields of the method's weight-update solve."""
        raise NotImplementedError

    def build_editor(self) -> MemitEditor:
        h = self.hparams
        hp = MemitHParams(layers=check_layers("layers", h.layers), z=self.z_config(),
                          context_templates=self.templates(), mom2_n_tokens=h.mom2_n_tokens,
                          mom2_corpus=h.mom2_corpus, pmet=self.pmet, value_at=h.value_at, **self.solve_options())
        return MemitEditor(hp, self.sadr(hp.layers[-1]))

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.hparams.regime == "batch":  # one joint update per loader batch: refuse conflicts first
            for batch in self.trainer.train_dataloader:
                if batch:
                    check_joint_requests([case.request for case in batch])


class MEMIT(SpreadEditModule):
    """MEMIT (Meng et al. 2023): the residual at the last layer of R spread over R's MLPs.

    Args:
        mom2_update_weight: λ of ``(λ C + K Kᵀ)``.
        **kwargs: :class:`SpreadEditModule` (``layers``, ``value_at``), :class:`LocateEditModule` and
            :class:`EditModule` arguments.
    """

    def __init__(self, mom2_update_weight: float = 15000.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        check_number("mom2_update_weight", mom2_update_weight, positive=True)

    def solve_options(self) -> dict:
        return {"mom2_update_weight": self.hparams.mom2_update_weight}


class PMET(MEMIT):
    """PMET (Li et al. 2024): attention and MLP deltas optimised at L, only the MLP one written."""

    pmet = True


class AlphaEdit(SpreadEditModule):
    """AlphaEdit (Fang et al. 2025): MEMIT's value vectors and layers, each update projected onto the null
    space of the preserved keys and keeping the edits made before on the same weights (the sequential
    regime's point): ``Δ = R Kᵀ P ((K Kᵀ + K_p K_pᵀ) P + α I)⁻¹``.

    Args:
        nullspace_threshold: P spans the eigenvectors of the key second moment C with eigenvalue below
            this (the paper's 2e-2; the count kept per layer is logged).
        nullspace_l2: α, the weight of the update's own norm (the reference's ``L2``: 10).
        **kwargs: :class:`SpreadEditModule` (``layers``, ``value_at``), :class:`LocateEditModule` and
            :class:`EditModule` arguments.
    """

    def __init__(self, nullspace_threshold: float = ALPHAEDIT_THRESHOLD, nullspace_l2: float = 10.0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        check_number("nullspace_threshold", nullspace_threshold, positive=True)
        check_number("nullspace_l2", nullspace_l2, positive=True)

    def solve_options(self) -> dict:
        return {"nullspace_threshold": self.hparams.nullspace_threshold, "nullspace_l2": self.hparams.nullspace_l2}


class FT(EditModule):
    """FT-L, constrained fine-tuning of one MLP output matrix (Zhu et al. 2020; ROME's baseline).

    Args:
        layer: the layer whose MLP output matrix is fine-tuned.
        steps: Adam steps.
        lr: Adam learning rate.
        norm_constraint: ε, L∞ bound on each weight's change (ROME's FT-L: 5e-4).
        weight_decay: Adam weight decay on the weight change.
        context_templates: ``[length, count]`` pairs of sampled prefixes (``[]``: the plain prompt only).
        sadr_gamma: γ of the SADR attention-drift term (0 = off); drift is measured after ``layer``.
        **kwargs: :class:`EditModule` arguments.
    """

    def __init__(
        self,
        layer: int = 4,
        steps: int = 25,
        lr: float = 5e-4,
        norm_constraint: float = 5e-4,
        weight_decay: float = 0.0,
        context_templates: list[list[int]] = [],  # noqa: B006 (CLI default)
        sadr_gamma: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        check_layer("layer", layer)
        check_context_templates(context_templates)
        check_sadr_gamma(sadr_gamma)

    def build_editor(self) -> FTEditor:
        h = self.hparams
        hp = FTHParams(layer=h.layer, steps=h.steps, lr=h.lr, norm_constraint=h.norm_constraint,
                       weight_decay=h.weight_decay,
                       context_templates=check_context_templates(h.context_templates))
        return FTEditor(hp, sadr_terms(h.sadr_gamma, h.layer + 1))

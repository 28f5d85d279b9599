"""UltraEdit (Gu et al. 2025, arXiv 2505.14679): training-, subject- and memory-free lifelong editing, with
StableEdit's warm-up and full whitening (Ma et al. 2026, arXiv 2605.11836) as options.

No value vector is optimised and no subject is located: one forward and one backward pass over a turn's
requests give, at every edited MLP output matrix ``W_l`` (``down_proj``; ``(d_out, d_in)`` in linear
convention) and every selected token ``i``, the editing feature (paper → here)

* ``h_i`` → ``k_i``, the matrix's input (``d_in``), and
* ``∇y_i`` → ``g_i = ∂L/∂(W_l k_i)``, the gradient of the turn's loss at the matrix's output (``d_out``),
  ``L = Σ_r Σ_j −log p(o_edit,r,j)`` over every target token of every request ``r`` of the turn,
  teacher-forced on ``prompt + target[:-1]`` (the plain prompt; no context templates).

Selected tokens (``tokens``): ``"target"`` — the positions that predict a target token (the reference's
``token: ans``); ``"all"`` — every token of ``prompt + target[:-1]`` (its ``token: mask``). The features of
this turn update the running moments (:mod:`kelight.editors.lifelong`, the paper's lifelong
normalisation: mean ``μ``, std ``σ`` of ``z = [k ; g]`` over every turn since the last restore, plus the
warm-up), then with the updated moments, for each edited layer::

    [k̂_i ; ĝ_i] = (z_i − μ) / (σ + ε)                  (ĝ fully whitened with StableEdit's whiten=True)
    v_i = −η ‖k̂_i‖² ĝ_i                                  (η: ``lr``; the output change of one normalised
                                                          gradient step, the paper's pseudo value)
    ΔW_l = argmin_Δ Σ_i ‖Δ k_i − v_i‖² + λ ‖Δ‖²_F        (λ: ``ridge``, the reference's identity weight)
         = Vᵀ K (KᵀK + λ I)⁻¹ = Vᵀ (K Kᵀ + λ I)⁻¹ K      (K: (n, d_in) raw keys, V: (n, d_out); the smaller
                                                          system is solved, in float64)

All layers' shifts come from the same pass on the turn's starting weights and are written together.

Differences from the reference code (XiaojieGu/UltraEdit, EasyEdit's ``ULTRAEDIT``, MINE-USTC/StableEdit):

* the moments are updated exactly (Chan et al.): the reference adds ``n`` × the turn's *unbiased*
  variance, which overcounts and is NaN for a one-token turn; here they equal the plain mean and
  variance of every feature seen (tested);
* the loss is summed over target tokens, the reference's is the mean over each sub-batch of 10
  requests: a constant factor per turn, which the normalisation cancels, but summing keeps the
  gradient scale independent of the turn size;
* ``pool_layers=True`` (default) keeps one set of moments for all edited layers, as the reference,
  whose normaliser is shared by modules of the same weight shape; ``False`` keeps one per layer;
* StableEdit's warm-up runs its editor on edits of a training split before the stream *and writes
  them into the weights*; here the warm-up requests (``warmup``) only initialise the moments, on the
  unedited model, and the weights change for the requested edits alone. After a restore the moments
  return to the warm-up's;
* full whitening floors the covariance's eigenvalues relative to their mean (``whiten_floor``), the
  reference at an absolute 1e-6, which depends on the gradients' scale.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.checks import check_count, check_layers, check_number
from kelight.editors.base import EditInfo, Editor
from kelight.editors.lifelong import LifelongStats, pseudo_values
from kelight.editors.rewrite import build_rewrite_batch, merge_rewrite_batches
from kelight.editors.steps import EditOptimizationError
from kelight.editors.undo import UndoLog
from kelight.lm.forward import head
from kelight.lm.hooks import edit_output, trace
from kelight.lm.tokens import pad_id
from kelight.models.adapters import ArchAdapter, adapter_for
from kelight.types import EditInputError, EditRequest, check_joint_requests

log = logging.getLogger(__name__)
Tokens = Literal["target", "all"]
StatsDtype = Literal["float32", "float64"]
SMOLLM2_LAYERS = (20, 21, 22, 23, 24, 25, 26, 27, 28)  # see configs/smollm2/ultraedit.yaml
WARMUP_CHUNK = 32  # warm-up requests per forward + backward
Features = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (keys (n, d_in), grads (n, d_out))
Moments = dict[int | None, LifelongStats]  # None: pooled over the layers, else one layer's


@dataclass(frozen=True)
class UltraEditHParams:
    """UltraEdit hyper-parameters (method settings only).

    Attributes:
        layers: layers whose MLP output matrix (``down_proj``) is edited, ascending. The reference
            configurations edit late layers' output matrices (Llama-3-8B on CounterFact: 23–31 of 32;
            GPT-J: 18–26 of 28; Mistral-7B: 28–30 of 32); the default is the same band of SmolLM2-135M's
            30 layers.
        lr: ``η`` of the pseudo values ``v = −η ‖k̂‖² ĝ`` (the reference: 1e-6 on 7–8B models, whose
            ``‖k̂‖² ≈ d_in`` is 9× SmolLM2's).
        ridge: ``λ`` of the ridge regression (the reference: 1).
        tokens: ``"target"`` (the positions predicting target tokens) or ``"all"`` (every token).
        pool_layers: one set of running moments for all edited layers (the reference) instead of one
            per layer.
        whiten: StableEdit's full whitening of the gradients (covariance instead of its diagonal).
        whiten_floor: eigenvalue floor of the whitening, relative to the mean eigenvalue.
        warmup_path: StableEdit's warm-up: a data file (any ``--data.format``) whose requests initialise the
            running moments before the first edit, on the unedited model, without editing them; unset: none.
            Without it a one-request turn is normalised by its own tokens alone (in ``single``, every turn).
        warmup_limit: the first this many records of ``warmup_path`` (after ``warmup_skip``).
        warmup_skip: leave out the first this many records of ``warmup_path`` (e.g. the ones being edited).
        stats_dtype: dtype of the moments and the normalisation (``"float64"`` or ``"float32"``).
    """

    layers: tuple[int, ...] = SMOLLM2_LAYERS
    lr: float = 3e-4
    ridge: float = 1.0
    tokens: Tokens = "target"
    pool_layers: bool = True
    whiten: bool = False
    whiten_floor: float = 1e-6
    warmup_path: str | None = None
    warmup_limit: int = 1000
    warmup_skip: int = 0
    stats_dtype: StatsDtype = "float64"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", check_layers("layers", self.layers))
        check_number("lr", self.lr, positive=True)
        check_number("ridge", self.ridge, positive=True, hint="; the ridge term keeps the solve well posed")
        check_number("whiten_floor", self.whiten_floor, positive=True)
        for name, choices in (("tokens", get_args(Tokens)), ("stats_dtype", get_args(StatsDtype))):
            if getattr(self, name) not in choices:
                raise EditInputError(f"expected {name} to be one of {list(choices)}, got {getattr(self, name)!r}")
        for name in ("pool_layers", "whiten"):
            if not isinstance(getattr(self, name), bool):
                raise EditInputError(f"expected {name} to be true or false, got {getattr(self, name)!r}")
        check_count("warmup_limit", self.warmup_limit)
        check_count("warmup_skip", self.warmup_skip, low=0)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.stats_dtype)


def _as_requests(items: object) -> tuple[EditRequest, ...]:
    if isinstance(items, str | Mapping) or not isinstance(items, Sequence):
        raise EditInputError(f"expected warmup to be a list of edit requests (or dicts of their fields), got "
                             f"{items!r:.200}")
    out = []
    for item in items:
        if not isinstance(item, EditRequest | Mapping):
            raise EditInputError(f"expected each warmup item to be an EditRequest or a dict of its fields, got "
                                 f"{item!r:.200}")
        out.append(item if isinstance(item, EditRequest) else EditRequest.from_dict(item))
    return tuple(out)


def ridge_update(keys: torch.Tensor, values: torch.Tensor, ridge: float) -> torch.Tensor:
    """``ΔW = argmin_Δ Σ_i ‖Δ k_i − v_i‖² + λ‖Δ‖²_F`` ``(d_out, d_in)``, float64.

    Solves the smaller of the primal ``Vᵀ K (KᵀK + λI)⁻¹`` (``d_in × d_in``) and the dual
    ``Vᵀ (KKᵀ + λI)⁻¹ K`` (``n × n``) systems; both are the same matrix.

    Args:
        keys: ``(n, d_in)`` keys ``K`` (rows).
        values: ``(n, d_out)`` values ``V`` to write at them.
        ridge: ``λ > 0``.
    """
    k, v = keys.double(), values.double()
    n, d_in = k.shape
    if n < d_in:
        gram = k @ k.T + ridge * torch.eye(n, dtype=k.dtype, device=k.device)  # (n, n)
        return torch.cholesky_solve(v, torch.linalg.cholesky(gram)).T @ k  # (d_out, n) @ (n, d_in)
    gram = k.T @ k + ridge * torch.eye(d_in, dtype=k.dtype, device=k.device)  # (d_in, d_in)
    return torch.cholesky_solve(k.T @ v, torch.linalg.cholesky(gram)).T  # ((d_in, d_out))ᵀ


def edit_features(model: PreTrainedModel, tok: PreTrainedTokenizerBase, adapter: ArchAdapter,
                  layers: Sequence[int], requests: Sequence[EditRequest], tokens: Tokens) -> tuple[Features, float]:
    """Keys and output gradients at the edited matrices, from one forward + backward over ``requests``.

    Returns:
        ``({layer: (keys (n, d_in), grads (n, d_out))}, mean NLL per target token)``; rows follow the
        selected tokens in batch order, in the model's dtype.
    """
    device = next(model.parameters()).device
    batches = [build_rewrite_batch(tok, r, ("{}",), device, essence_templates=()) for r in requests]
    batch = merge_rewrite_batches(batches, pad_id(tok), independent=False)
    if tokens == "target":
        rows, cols = batch.target_rows, batch.target_cols
    else:
        rows, cols = batch.attention_mask.nonzero(as_tuple=True)
    paths = [adapter.path("mlp_out", layer) for layer in layers]
    probes: dict[str, torch.Tensor] = {}

    def probe(path: str):
        def add(output: torch.Tensor) -> torch.Tensor:  # (B, T, d_out): a zero whose gradient is ∂L/∂output
            probes[path] = torch.zeros_like(output, requires_grad=True)
            return output + probes[path]

        return add

    with ExitStack() as stack, torch.enable_grad():
        inputs = stack.enter_context(trace(model, paths, inputs=True))
        for path in paths:
            stack.enter_context(edit_output(model, path, probe(path)))
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  use_cache=False).last_hidden_state  # (B, T, D)
        logits = head(model, hidden[batch.target_rows, batch.target_cols])  # (N, V)
        log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        nll = -log_probs.gather(1, batch.target_ids[:, None]).sum()
        grads = torch.autograd.grad(nll, [probes[path] for path in paths])
    features = {layer: (inputs[path][rows, cols], grad[rows, cols])
                for layer, path, grad in zip(layers, paths, grads, strict=True)}
    return features, nll.item() / len(batch.target_ids)


def warmup_requests(hparams: UltraEditHParams) -> tuple[EditRequest, ...]:
    """The requests of ``hparams.warmup_path`` (``warmup_skip``, ``warmup_limit``; read and checked as
    ``--data.*`` reads a data file), or none."""
    if hparams.warmup_path is None:
        return ()
    from kelight.data.datamodule import EditDataModule  # noqa: PLC0415 (only for a warm-up file)

    data = EditDataModule(path=hparams.warmup_path, limit=hparams.warmup_limit, skip=hparams.warmup_skip)
    data.setup()
    return tuple(case.request for case in data.cases)


class UltraEditor(Editor):
    """UltraEdit's turns on one model; ``setup`` once per (unedited) model, then ``apply`` per turn.

    The running moments persist across ``apply`` calls (the turns of one run) and return to the
    warm-up's when the undo log holding the edits restores. Its :class:`~kelight.editors.base.EditInfo` has no
    steps (no value vector is optimised).

    Args:
        hparams: UltraEdit's hyper-parameters.
        warmup: the warm-up requests (or dicts of their fields) whose features initialise the moments at setup,
            on the unedited model, without changing a weight (StableEdit's warm-up); by default those of
            ``hparams.warmup_path`` (:func:`warmup_requests`). Give one or the other.

    Example:
        >>> editor = UltraEditor(UltraEditHParams(layers=(20, 21, 22)))  # doctest: +SKIP
        >>> editor.setup(model, tok); undo = UndoLog()  # doctest: +SKIP
        >>> editor.apply(model, tok, requests, undo)  # one turn  # doctest: +SKIP
    """

    hp: UltraEditHParams

    def __init__(self, hparams: UltraEditHParams, warmup: Sequence[EditRequest | Mapping] = ()) -> None:
        super().__init__(hparams)
        if warmup and hparams.warmup_path is not None:
            raise EditInputError(f"expected the warm-up either as warmup_path ({hparams.warmup_path!r}) or as warmup "
                                 f"requests, got both; drop one")
        self.warmup = _as_requests(warmup) if warmup else warmup_requests(hparams)
        self.adapter: ArchAdapter | None = None
        self.initial: Moments = {}  # after the warm-up
        self.stats: Moments = {}  # now

    def _key(self, layer: int) -> int | None:
        return None if self.hp.pool_layers else layer

    def prepare(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
        """Check the layers and run the warm-up (features of the warm-up requests on the unedited model)."""
        self.adapter = adapter_for(model)
        weight = None
        for layer in self.hp.layers:
            weight = self.adapter.out_weight_as_linear(model, layer)  # checks the layer index
        d_out, d_in = weight.shape
        device = weight.device
        stats = {self._key(layer): LifelongStats.empty(d_in, d_out, self.hp.dtype, device, self.hp.whiten)
                 for layer in self.hp.layers}
        for start in range(0, len(self.warmup), WARMUP_CHUNK):
            features, _ = edit_features(model, tok, self.adapter, self.hp.layers,
                                        self.warmup[start:start + WARMUP_CHUNK], self.hp.tokens)
            stats = self._updated(stats, features)
        if self.warmup:
            log.info("UltraEdit warm-up: moments of %d features from %d requests", next(iter(stats.values())).count,
                     len(self.warmup))
        self.initial = self.stats = stats

    def reset(self) -> None:
        """The moments as after setup (the warm-up's): the editor behaves as fresh."""
        self.stats = self.initial

    def _updated(self, stats: Moments, features: Features) -> Moments:
        """``stats`` after also seeing ``features`` (pooled: every layer's features into one set)."""
        for layer, (keys, grads) in features.items():
            if not (torch.isfinite(keys).all() and torch.isfinite(grads).all()):
                raise EditOptimizationError(f"UltraEdit: the keys or the loss gradient at layer {layer}'s MLP output "
                                            "are not finite; the model weights were not changed")
        out = dict(stats)
        for layer, (keys, grads) in features.items():
            key = self._key(layer)
            out[key] = out[key].updated(torch.cat([keys, grads], dim=1))  # (n, d_in + d_out)
        if not all(s.is_finite() for s in out.values()):
            raise EditOptimizationError("UltraEdit: the running moments overflowed (not finite); the model weights "
                                        "were not changed; use stats_dtype float64")
        return out

    def edit(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase, requests: list[EditRequest],
             undo: UndoLog) -> EditInfo:
        """One turn: edit ``requests`` jointly, logging into ``undo``; on any error no weight and no moment
        has changed.

        Raises:
            EditInputError: for no requests, or two that rewrite one prompt to different targets.
            EditOptimizationError: if a gradient, the moments or a shift is not finite.
        """
        check_joint_requests(requests)
        assert self.adapter is not None
        features, _ = edit_features(model, tok, self.adapter, self.hp.layers, requests, self.hp.tokens)
        stats = self._updated(self.stats, features)
        deltas, _ = self._shifts(stats, features)
        self._write(model, deltas, undo)
        self.stats = stats  # the turn is in the weights: its features stay in the moments until they restore
        undo.on_restore(self.reset)
        return EditInfo()

    def _shifts(self, stats: Moments, features: Features) -> tuple[dict[int, torch.Tensor], float]:
        """Each layer's ``ΔW`` (linear convention, float64) from the updated moments, and their joint Frobenius norm.

        Raises:
            EditOptimizationError: naming the first layer whose shift is not finite.
        """
        whiteners = {key: s.grad_whitener(self.hp.whiten_floor) for key, s in stats.items()}  # None: diagonal
        deltas, squares = {}, []
        for layer, (keys, grads) in features.items():
            key = self._key(layer)
            values = pseudo_values(stats[key], keys, grads, self.hp.lr, whiteners[key])  # (n, d_out)
            deltas[layer] = ridge_update(keys, values, self.hp.ridge)  # (d_out, d_in)
            squares.append(deltas[layer].square().sum())  # NaN/inf propagate: one pass also checks finiteness
            if not torch.isfinite(squares[-1]):
                raise EditOptimizationError(f"UltraEdit: the shift of layer {layer} is not finite; the model weights "
                                            f"were not changed; lower lr (now {self.hp.lr}) or raise ridge")
        return deltas, torch.stack(squares).sum().sqrt().item()

    def _write(self, model: PreTrainedModel, deltas: dict[int, torch.Tensor], undo: UndoLog) -> None:
        """Add every shift to its weight, logged into ``undo``; if one write fails, the others are undone."""
        assert self.adapter is not None
        local = UndoLog()
        try:
            for layer, delta in deltas.items():
                weight = self.adapter.out_weight(model, layer)
                local.add_(weight, delta.to(weight.dtype), transposed=self.adapter.mlp_conv1d)
        except BaseException:
            local.restore()
            raise
        undo.absorb(local)

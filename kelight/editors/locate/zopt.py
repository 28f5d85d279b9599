"""Optimisation of the value vector z (ROME/MEMIT/PMET's ``compute_v``/``compute_z``), once.

``z = δ`` is added to the output of one module (ROME: the MLP output at the edit layer; MEMIT:
the block output at the last layer of R) at the subject's last token of every prompt, and
optimised for  NLL(o_edit) + ω·KL(essence) + λ·KL(relations) + wd·‖δ‖/‖v‖² (+ extra terms such as
γ·SADR), with ‖δ‖ clamped to ``clamp_norm_factor·‖v‖``. The relation term (λ > 0) holds the subject's
other relations still (:mod:`kelight.objectives.relations`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.fx.experimental._config as fx_config
from transformers import PreTrainedModel

from kelight.checks import check_number
from kelight.editors.prefix import PrefixCache, split_at_subject
from kelight.editors.rewrite import add_relation_rows, merge_rewrite_batches
from kelight.editors.steps import finish_loss, forward_logprobs
from kelight.lm.attention_rows import query_row_attention
from kelight.lm.forward import attention_implementation
from kelight.lm.hooks import edit_output, map_tensors, replay_blocks, trace
from kelight.models.adapters import adapter_for
from kelight.objectives.base import ExtraLoss, RewriteBatch, StepState
from kelight.objectives.essence import essence_kl_rows
from kelight.objectives.relations import (
    check_relation_kl_factor,
    check_relation_leak_factor,
    check_relation_prompts,
    relation_leak_rows,
)
from kelight.objectives.rewrite import per_prompt_nll
from kelight.types import EditInputError

StopOn = Literal["total", "edit"]  # which loss the early stop tests (ZConfig.early_stop_on)
CompileMode = Literal["off", "default", "reduce-overhead", "max-autotune"]  # ZConfig.compile


@dataclass(frozen=True)
class ZConfig:
    """Hyper-parameters of the z optimisation (ROME paper defaults).

    Attributes:
        steps: optimisation steps (20 in ROME; the SADR reference used 80 with SADR).
        lr: Adam learning rate.
        kl_factor: ω, weight of the essence KL.
        relation_kl_factor: λ, weight of the relation KL (:mod:`kelight.objectives.relations`): the mean
            KL between the unedited and the current next-token distribution on ``relation_prompts``
            questions about the subject's other relations, z injected as in the rewriting prompts.
            0 (the default) turns it off and runs no relation prompt.
        relation_leak_factor: μ, weight of the relation leak term (:mod:`kelight.objectives.relations`):
            the mean rise of o_edit's first token's log-prob, where it rises, on the same relation
            prompts. 0 (the default) turns it off; either factor > 0 runs the relation prompts.
        relation_prompts: N, how many relation prompts (1 … ``MAX_RELATION_PROMPTS``; the first N
            relation templates that do not ask for the edited relation).
        weight_decay: weight of ‖δ‖/‖v‖².
        clamp_norm_factor: ‖δ‖ ≤ clamp_norm_factor·‖v‖.
        early_stop_loss: stop once the loss named by ``early_stop_on`` is below this.
        early_stop_on: ``"total"`` (the reference): the whole loss, extra terms such as γ·SADR
            included, so a SADR edit rarely stops early and runs ~2× the steps of the plain one;
            ``"edit"``: the loss without the extra terms (rewrite NLL + essence KL + relation KL + weight decay),
            so the threshold ignores SADR's term (the trajectory is still SADR's: measured on
            SmolLM2 at 80 steps, MEMIT+SADR edits then take 75.0 steps instead of 80.0, ROME+SADR
            70.7 instead of 78.9; the plain methods 45.7 and 38.1).
            The same when there are no extra terms. The relation terms (KL, leak) are terms of the edit
            objective, like the essence KL: both values test them, so an edit stops only once its other
            relations have moved little too.
        reuse_prefix: after step 0, replay the recorded output of the blocks below the first edited
            one instead of recomputing them (they do not depend on z); same result, less compute.
        attention_rows: when a term needs attention weights (SADR), compute only each prompt's
            query row (:mod:`kelight.lm.attention_rows`) instead of eager ``T × T`` matrices.
        cache_prefix: run every step on each prompt's tokens from the subject's last one on, over a
            KV cache of the tokens before it (computed once: in a causal model they do not depend
            on z); same result, a fraction of the tokens (:func:`~kelight.editors.prefix.split_at_subject`).
        z_batch: independent requests whose z are optimised together in one padded batch
            (:func:`optimise_zs`). Each keeps its own loss, Adam state, clamp and early stop, so the
            result equals one-at-a-time up to float rounding; it pays where a step is launch-bound
            (GPUs), not on CPU. Only for z computed on the same weights (single regime, MEMIT's batch).
        compile: ``"off"`` (eager), or a ``torch.compile`` mode for the model forward of each z-step
            (``"default"``, ``"reduce-overhead"``: CUDA graphs, ``"max-autotune"``). Compiled with
            dynamic shapes once per process and edit site (two graphs: step 0 and the steps on
            replayed blocks); edits with other prompt lengths reuse them. Each other edit site
            (layer, module) compiles anew, and past torch's recompile limit (8) torch runs eager.
            The same δ as eager up to float rounding. Measured on CPU (SmolLM2-135M, 1 thread,
            ROME, 20 steps): 5–7 min to compile (cold), then 1.06–1.10× faster edits, so it pays
            only after some 200–500 edits there (docs/performance.md); on a GPU not measured yet.
            SADR's query rows (:mod:`kelight.lm.attention_rows`) are traced with the step.
    """

    steps: int = 20
    lr: float = 0.5
    kl_factor: float = 0.0625
    relation_kl_factor: float = 0.0
    relation_leak_factor: float = 0.0
    relation_prompts: int = 8
    weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    early_stop_loss: float = 5e-2
    early_stop_on: StopOn = "total"
    reuse_prefix: bool = True
    attention_rows: bool = True
    cache_prefix: bool = True
    z_batch: int = 1
    compile: CompileMode = "off"

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise EditInputError(f"expected steps to be a positive integer, got {self.steps!r}")
        if not isinstance(self.z_batch, int) or self.z_batch < 1:
            raise EditInputError(f"expected z_batch to be a positive integer (1 = one request at a time), "
                                 f"got {self.z_batch!r}")
        if self.early_stop_on not in get_args(StopOn):
            raise EditInputError(f"expected early_stop_on to be 'total' (the whole loss, as the reference) or 'edit' "
                                 f"(the loss without extra terms such as SADR), got {self.early_stop_on!r}")
        if self.compile not in get_args(CompileMode):
            modes = ", ".join(map(repr, get_args(CompileMode)))
            raise EditInputError(f"expected compile to be one of {modes} ('off' = eager, else a torch.compile mode), "
                                 f"got {self.compile!r}")
        for name in ("lr", "kl_factor", "weight_decay", "clamp_norm_factor", "early_stop_loss"):
            check_number(name, getattr(self, name), positive=name in ("lr", "clamp_norm_factor"))
        kl = check_relation_kl_factor(self.relation_kl_factor)
        check_relation_prompts(self.relation_prompts, max(kl, check_relation_leak_factor(self.relation_leak_factor)))

    @property
    def relation_rows(self) -> int:
        """How many relation prompts each request's batch runs: ``relation_prompts`` when either relation
        term is on, else 0."""
        return self.relation_prompts if max(self.relation_kl_factor, self.relation_leak_factor) > 0 else 0


@dataclass
class ZResult:
    delta: torch.Tensor  # (M, D) optimised z, one row per injected module
    v_init: torch.Tensor  # (M, D) module outputs at the subject of the plain prompt, step 0
    losses: list[float]
    steps_run: int


class _Injector:
    """Adds ``delta[r, i]`` to module ``i``'s output at the subject of every row of request ``r``."""

    def __init__(self, delta: torch.Tensor, batch: RewriteBatch) -> None:
        self.delta, self.rows, self.cols = delta, batch.rows, batch.subject_pos  # delta: (R, M, D)
        self.request = batch.request_of_row  # (B,)
        self.first = batch.first_rows  # (R,)
        self.v_init: dict[int, torch.Tensor] = {}  # module -> (R, D)

    def fn(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def inject(output: torch.Tensor) -> torch.Tensor:  # (B, T, D)
            if i not in self.v_init:
                self.v_init[i] = output[self.first, self.cols[self.first]].detach().float().clone()
            out = output.clone()
            out[self.rows, self.cols] = out[self.rows, self.cols] + self.delta[self.request, i].to(out.dtype)
            return out

        return inject

    def init(self) -> torch.Tensor:
        return torch.stack([self.v_init[i] for i in range(len(self.v_init))], dim=1)  # (R, M, D)

    def init_norms(self) -> torch.Tensor:
        return self.init().norm(dim=-1)  # (R, M)


def _attn_offset(model: PreTrainedModel, outputs: object, rows: torch.Tensor | None) -> int:
    attentions = getattr(outputs, "attentions", None) if rows is None else rows
    return adapter_for(model).n_layers(model) - len(attentions) if attentions is not None and len(attentions) else 0


def _held_terms(ess: torch.Tensor, ess_init: torch.Tensor, batch: RewriteBatch, cfg: ZConfig) -> torch.Tensor | None:
    """``ω·KL(essence) + λ·KL(relations) + μ·leak(relations)`` of each request, ``(R,)``; ``None``
    without rows after the rewriting ones.

    ``ess``/``ess_init``: ``(R·(E + N), V)`` log-probs now and at step 0 at the last token of the rows
    after the rewriting ones, each request's ``E`` essence rows then its ``N`` relation rows."""
    if not ess.shape[0]:
        return None
    n = batch.n_requests
    kl = essence_kl_rows(ess, ess_init).view(n, -1)  # (R, E + N)
    n_rel = batch.n_relation // n
    n_ess = kl.shape[1] - n_rel
    total = cfg.kl_factor * kl[:, :n_ess].mean(1) if n_ess else torch.zeros_like(kl[:, 0])
    if n_rel and cfg.relation_kl_factor > 0:
        total = total + cfg.relation_kl_factor * kl[:, n_ess:].mean(1)
    if n_rel and cfg.relation_leak_factor > 0:
        rel, rel_init = (x.view(n, -1, x.shape[-1])[:, n_ess:] for x in (ess, ess_init))  # (R, N, V)
        total = total + cfg.relation_leak_factor * relation_leak_rows(rel, rel_init, batch.first_target_ids).mean(1)
    return total


def _request_losses(model, batch, cfg, injector, extra_losses, want_attn, step, ess_init, prefix, recorder, base):
    """``(R,)`` total loss of each request of ``batch`` (they share no term), the ``(R,)`` loss the
    early stop tests (:attr:`ZConfig.early_stop_on`; detached) and the essence and relation log-probs
    at step 0."""
    tgt, ess, outputs = forward_logprobs(model, batch, want_attn and recorder is None, prefix, base)
    rows = recorder.take() if recorder is not None else None
    ess_init = ess.detach() if ess_init is None else ess_init
    n = batch.n_requests
    loss = per_prompt_nll(tgt, batch.target_ids, batch.target_rows, batch.n_rewrite).view(n, -1).mean(1)
    kl = _held_terms(ess, ess_init, batch, cfg)
    if kl is not None:
        loss = loss + kl
    loss = loss + cfg.weight_decay * (injector.delta.norm(dim=-1) / injector.init_norms() ** 2).sum(1)
    state = StepState(step, batch, outputs, attn_offset=_attn_offset(model, outputs, rows), rows=rows)
    total = finish_loss(loss, extra_losses, state, cfg.lr)
    return total, (loss if cfg.early_stop_on == "edit" else total).detach(), ess_init


def optimise_z(
    model: PreTrainedModel,
    module_paths: str | Sequence[str],
    batch: RewriteBatch,
    cfg: ZConfig,
    extra_losses: tuple[ExtraLoss, ...] = (),
    want_attn: bool = False,
    first_edited_block: int = 0,
    pad_id: int = 0,
) -> ZResult:
    """Optimise one δ per module in ``module_paths``, added to its output at the subject.

    The model's weights are never changed here (forward hooks only, removed on exit). Blocks
    below ``first_edited_block`` (none of ``module_paths`` is inside them) are computed once and
    replayed at later steps when ``cfg.reuse_prefix``.

    Raises:
        EditOptimizationError: if the loss becomes NaN/inf.
    """
    if batch.n_requests != 1:
        raise EditInputError(f"expected a one-request batch, got {batch.n_requests} requests; use optimise_zs")
    return optimise_zs(model, module_paths, [batch], cfg, extra_losses, want_attn, first_edited_block, pad_id)[0]


def optimise_zs(
    model: PreTrainedModel,
    module_paths: str | Sequence[str],
    batches: Sequence[RewriteBatch],
    cfg: ZConfig,
    extra_losses: tuple[ExtraLoss, ...] = (),
    want_attn: bool = False,
    first_edited_block: int = 0,
    pad_id: int = 0,
) -> list[ZResult]:
    """:func:`optimise_z` for independent requests, ``cfg.z_batch`` of them per padded batch.

    Every request keeps its own loss, Adam moments, norm clamp and early stop; its δ sees only its
    own rows, so the results equal one-at-a-time optimisation up to float rounding (padding).
    With a relation term on (``cfg.relation_rows``) each request's relation prompts are added to its batch first
    (:func:`~kelight.editors.rewrite.add_relation_rows`; batches from
    :func:`~kelight.editors.rewrite.build_rewrite_batch` carry them).
    The extra terms must return one value per request (``(R,)``, like :class:`~kelight.objectives.sadr.SADR`).

    Raises:
        EditOptimizationError: if any request's loss becomes NaN/inf (no result is returned).
        EditInputError: if the relation term is on and a batch carries too few relation prompts.
    """
    if cfg.relation_rows:
        batches = [add_relation_rows(b, cfg.relation_rows, pad_id) for b in batches]
    results: list[ZResult] = []
    for start in range(0, len(batches), cfg.z_batch):
        group = list(batches[start : start + cfg.z_batch])
        batch = group[0] if len(group) == 1 else merge_rewrite_batches(group, pad_id)
        results += _optimise_merged(model, module_paths, batch, cfg, extra_losses, want_attn, first_edited_block,
                                    pad_id)
    return results


def _compiled_body(model: PreTrainedModel, cfg: ZConfig, want_attn: bool) -> Callable[..., object] | None:
    """``model.base_model`` under ``torch.compile`` (:attr:`ZConfig.compile`), or ``None`` (eager).

    The compiled code is cached by torch on the module's ``forward`` (guarded), so a wrapper made
    per optimisation reuses it: edits with other prompt lengths run without recompiling, also when
    sizes coincided in the request that compiled it (no duck sizing).

    Raises:
        EditInputError: for eager ``T × T`` attention weights (``attention_rows`` off with a term
            that reads attention): transformers' attention capture breaks the graph.
    """
    if cfg.compile == "off":
        return None
    if want_attn and not cfg.attention_rows:
        raise EditInputError(
            f"compile={cfg.compile!r} needs attention_rows on when a term reads attention (SADR): eager "
            "T x T weights are captured by transformers outside the compiled graph; set attention_rows True "
            "or compile 'off'")
    compiled = torch.compile(model.base_model, mode=cfg.compile, dynamic=True)

    def body(*args: object, **kwargs: object) -> object:
        # Torch's duck sizing gives sizes that happen to be equal while it traces one symbol (e.g. a
        # request whose prefix and suffix are both 22 tokens), and each later request whose sizes differ
        # compiles again, until the recompile limit turns the step eager. Fresh symbols per size instead
        # (torch names this private switch in its own recompile message).
        with fx_config.patch(use_duck_shape=False):
            return compiled(*args, **kwargs)

    return body


def _stops_here(r: int, below: bool, step: int, steps_run: list[int], delta: torch.Tensor,
                frozen: torch.Tensor) -> bool:
    """Whether request ``r`` stops at ``step`` (its stop loss is ``below`` the threshold), before
    its update: then it ran ``step + 1`` steps and its δ is frozen as it is."""
    if below:
        steps_run[r] = step + 1
        with torch.no_grad():
            frozen[r] = delta[r]
    return below


def _owned(record: dict[str, object], cuda_graphs: bool) -> object:
    """The one recorded block output in ``record``, copied out of a CUDA graph's buffers (the next
    replay may reuse them) when ``cuda_graphs``."""
    value = next(iter(record.values()))
    return map_tensors(value, torch.clone) if cuda_graphs else value


@torch.no_grad()
def _clamp_(delta: torch.Tensor, max_norm: torch.Tensor, done: torch.Tensor, frozen: torch.Tensor) -> None:
    """Clamp each ``‖δ_ri‖`` to ``max_norm[r, i]`` in place; stopped requests keep their frozen δ."""
    scale = (max_norm / delta.norm(dim=-1).clamp(min=1e-12)).clamp(max=1.0)  # (R, M)
    delta.mul_(scale[..., None])
    delta[done] = frozen[done]


@contextmanager
def _frozen_weights(model: PreTrainedModel) -> Iterator[None]:
    """The model's parameters need no gradient inside (z is the only leaf that does: no ``.grad`` is
    written into the model, also when its caller left ``requires_grad`` on); their flags are restored."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _require_gradient(grad: torch.Tensor | None, stopped: list[bool], paths: Sequence[str]) -> None:
    """Fail when a request's δ gets no gradient at step 0: nothing it changes reaches the target.

    At δ = 0 the essence KL and SADR are at their minimum; the rewrite NLL alone must move δ. An
    exactly zero gradient means the injected module, at the subject's last token, feeds no position
    that predicts the target — e.g. the model's last layer when the subject does not end the prompt.
    """
    reached = [False] * len(stopped) if grad is None else grad.flatten(1).any(1).tolist()  # one host sync
    dead = [r for r, done in enumerate(stopped) if not done and not reached[r]]
    if dead:
        raise EditInputError(
            f"the value vector at {', '.join(paths)} gets no gradient (request {dead[0]} of this batch): a change "
            "there at the subject's last token does not reach the positions that predict the target, so the edit "
            "cannot take. Choose an earlier layer (the last layer only sees its own position)")


def _optimise_merged(
    model: PreTrainedModel,
    module_paths: str | Sequence[str],
    batch: RewriteBatch,
    cfg: ZConfig,
    extra_losses: tuple[ExtraLoss, ...],
    want_attn: bool,
    first_edited_block: int,
    pad_id: int,
) -> list[ZResult]:
    paths = [module_paths] if isinstance(module_paths, str) else list(module_paths)
    param = next(model.parameters())
    d_model = model.get_input_embeddings().embedding_dim  # block / MLP / attention outputs: residual width
    n = batch.n_requests
    split = split_at_subject(batch, pad_id) if cfg.cache_prefix else None
    prefix = PrefixCache.build(model, split) if split is not None else None  # before any hook is on
    batch = prefix.split.suffix if prefix is not None else batch  # from here on: columns from each subject
    delta = torch.zeros(n, len(paths), d_model, device=param.device, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=cfg.lr)  # element-wise: each request's moments are its own
    injector = _Injector(delta, batch)
    ess_init, losses = None, [[] for _ in range(n)]
    stopped = [False] * n  # host-side flags: no device sync per request and step
    frozen = torch.zeros_like(delta, requires_grad=False)  # δ of each request at its early stop
    steps_run = [cfg.steps] * n
    n_replay = first_edited_block if cfg.reuse_prefix else 0
    layers = adapter_for(model).layers
    base = _compiled_body(model, cfg, want_attn)
    cuda_graphs = cfg.compile == "reduce-overhead" and param.device.type == "cuda"
    with ExitStack() as stack:
        stack.enter_context(_frozen_weights(model))
        recorder = None
        if want_attn and cfg.attention_rows:  # every batch row's query: rewriting prompts, then essence
            recorder = stack.enter_context(query_row_attention(model, torch.cat([batch.query_pos, batch.essence_pos])))
        else:
            stack.enter_context(attention_implementation(model, "eager" if want_attn else None))
        for i, path in enumerate(paths):
            stack.enter_context(edit_output(model, path, injector.fn(i)))
        for step in range(cfg.steps):
            if cuda_graphs:  # this step's CUDA-graph replay may reuse the buffers of the last one
                torch.compiler.cudagraph_mark_step_begin()
            with trace(model, [f"{layers}.{n_replay - 1}"] if step == 0 and n_replay else [], raw=True) as rec:
                loss, stop_loss, ess_init = _request_losses(model, batch, cfg, injector, extra_losses, want_attn,
                                                            step, ess_init, prefix, recorder, base)
            if rec:  # hidden states below the edit do not depend on z: replay them from now on
                stack.enter_context(replay_blocks(model, layers, n_replay, _owned(rec, cuda_graphs)))
            values, stop_values = torch.stack([loss.detach(), stop_loss]).cpu().tolist()  # one host sync
            for r in range(n):
                if not stopped[r]:
                    losses[r].append(values[r])
                    stopped[r] = _stops_here(r, stop_values[r] < cfg.early_stop_loss, step, steps_run, delta, frozen)
            if all(stopped):
                break
            done = torch.tensor(stopped, device=param.device)
            opt.zero_grad(set_to_none=True)
            loss[~done].sum().backward()
            if step == 0:
                _require_gradient(delta.grad, stopped, paths)
            opt.step()
            _clamp_(delta, cfg.clamp_norm_factor * injector.init_norms(), done, frozen)
    v_init = injector.init()
    return [ZResult(delta[r].detach(), v_init[r], losses[r], steps_run[r]) for r in range(n)]

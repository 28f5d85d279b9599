"""What ``edit_speed.py`` and ``compile_check.py`` share: the models they time (real ones or random
weights of real shapes), the forward+backward floors, and the timed arms (ROME and its levers, ROME+SADR,
MEMIT, PMET, PathEdit), each built only when selected. See ``edit_speed.py`` for what every arm does.

A sibling module of the scripts (``python benchmarks/edit_speed.py`` puts this folder on ``sys.path``),
not part of the package.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from torch._dynamo.utils import counters

from kelight.editors.locate.zopt import ZConfig
from kelight.editors.memit import MemitEditor, MemitHParams
from kelight.editors.pathedit import PathEditor, PathHParams
from kelight.editors.rewrite import build_rewrite_batch, merge_rewrite_batches, sample_context_templates
from kelight.editors.rome import RomeEditor, RomeHParams
from kelight.editors.undo import UndoLog
from kelight.lm.forward import head
from kelight.models import load
from kelight.models.adapters import adapter_for
from kelight.objectives.sadr import SADR

SHAPES = {  # real model shapes with random weights
    "llama3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "gptj-6b": ("gptj", dict(n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400, n_positions=2048)),
    "llama-tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8,  # dry runs on CPU
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=49152)),
}


def load_model(name: str, dtype: str, device: str, tokenizer: str | None = None):
    """A real model, or ``shape:<name>``: random weights of that shape with ``tokenizer`` (a saved
    tokenizer directory; default the byte tokenizer, whose prompts are ~4.4x longer than SmolLM2's BPE)."""
    if not name.startswith("shape:"):
        return load(name, dtype=dtype, device=device)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    from kelight.models.tiny import byte_tokenizer  # noqa: PLC0415

    shape = name.split(":", 1)[1]
    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; known: {', '.join(f'shape:{k}' for k in SHAPES)}")
    family, kwargs = SHAPES[shape]
    config = AutoConfig.for_model(family, **kwargs)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else byte_tokenizer()
    if len(tok) > config.vocab_size:
        raise SystemExit(f"tokenizer {tokenizer!r} has {len(tok)} tokens, more than {name}'s vocabulary "
                         f"({config.vocab_size}); use a smaller one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.eval().requires_grad_(False), tok


def compile_mode(device: torch.device | str) -> str:
    """The ``torch.compile`` mode timed on ``device``: CUDA graphs on a GPU (the lever there), inductor's
    default on the CPU (which has no CUDA graphs)."""
    return "reduce-overhead" if torch.device(device).type == "cuda" else "default"


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (CUDA); a no-op on the CPU, so timings there need none."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _floor_loss(model, embeds: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                targets: torch.Tensor) -> torch.Tensor:
    hidden = model.base_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    logits = head(model, hidden[rows, cols]).float()  # (N, V)
    return logits.log_softmax(-1).gather(1, targets[:, None]).sum().neg()


def floor_step(model, batch) -> None:
    """One plain forward + backward of ``batch`` (gradient to the input embeddings)."""
    embeds = model.get_input_embeddings()(batch.input_ids).detach().requires_grad_(True)  # (B, T, D)
    _floor_loss(model, embeds, batch.attention_mask, batch.target_rows, batch.target_cols, batch.target_ids).backward()


def _compiled_step(loss_fn: Callable, model, embeds: torch.Tensor, args: tuple, device: torch.device) -> None:
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()  # each step may reuse the CUDA graph's buffers
    loss_fn(model, embeds.clone().requires_grad_(True), *args).backward()


def compiled_floor(model, batches, steps: int, device: torch.device, compile_seconds: list[float]) -> float:
    """Steady seconds of ``steps`` compiled forward+backward steps per batch (compiled per batch shape;
    the two warm-up steps that compile and record go to ``compile_seconds``)."""
    mode = compile_mode(device)
    total = 0.0
    for batch in batches:
        torch._dynamo.reset()  # one shape per request: compile afresh rather than hit the recompile limit
        loss_fn = torch.compile(_floor_loss, mode=mode, dynamic=False)
        embeds = model.get_input_embeddings()(batch.input_ids).detach()  # (B, T, D)
        args = (batch.attention_mask, batch.target_rows, batch.target_cols, batch.target_ids)

        for _ in range(2):  # compile, then record
            sync(device)
            t0 = time.perf_counter()
            _compiled_step(loss_fn, model, embeds, args, device)
            sync(device)
            compile_seconds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(steps):
            _compiled_step(loss_fn, model, embeds, args, device)
        sync(device)
        total += time.perf_counter() - t0
    return total


Builders = dict[str, Callable[[], Callable]]


def _ready(editor, model, tok, run: Callable) -> Callable[[], Callable]:
    """A builder that sets ``editor`` up (templates, C) only when its arm is selected, then returns ``run``."""

    def build() -> Callable:
        editor.setup(model, tok)
        return run

    return build


def build_arms(args, model, tok) -> Builders:
    """Name -> builder of function(requests) running the timed work of a group of requests; only the
    arms ``--arms`` selects are built, so a short GPU call pays no other arm's setup."""
    z = ZConfig(steps=args.steps, early_stop_loss=0.0)
    mom2 = not args.model.startswith("shape:")
    common = dict(context_templates=((5, 10), (10, 10)), mom2_adjustment=mom2)
    sadr = (SADR(args.gamma, args.layer + 1),)
    z_compiled = replace(z, compile=compile_mode(args.device))
    rome_arms = {
        "rome_recompute": RomeEditor(RomeHParams(layer=args.layer, z=replace(z, reuse_prefix=False), **common)),
        "rome_full_prompts": RomeEditor(RomeHParams(layer=args.layer, z=replace(z, cache_prefix=False), **common)),
        "rome": RomeEditor(RomeHParams(layer=args.layer, z=z, **common)),
        "rome_sadr_eager": RomeEditor(RomeHParams(layer=args.layer, z=replace(z, attention_rows=False), **common),
                                      sadr),
        "rome_sadr": RomeEditor(RomeHParams(layer=args.layer, z=z, **common), sadr),
        "rome_zcompile": RomeEditor(RomeHParams(layer=args.layer, z=z_compiled, **common)),
        "rome_sadr_zcompile": RomeEditor(RomeHParams(layer=args.layer, z=z_compiled, **common), sadr),
    }
    device = next(model.parameters()).device
    templates = functools.cache(lambda: sample_context_templates(model, tok, common["context_templates"], 0))

    def floor(rs) -> None:
        for r in rs:
            batch = build_rewrite_batch(tok, r, templates(), device)
            for _ in range(args.steps):
                floor_step(model, batch)

    out: Builders = {"floor": lambda: floor}
    for name, editor in rome_arms.items():
        out[name] = _ready(editor, model, tok, lambda rs, e=editor: [e.compute(model, tok, r) for r in rs])
    if args.compile_floor:
        args.compile_seconds = []

        def floor_compiled(rs) -> float:
            batches = [build_rewrite_batch(tok, r, templates(), device) for r in rs]
            return compiled_floor(model, batches, args.steps, device, args.compile_seconds)

        out["floor_compiled"] = lambda: floor_compiled
    if args.z_batch > 1:
        out.update(_zbatch_arms(args, model, tok, replace(z, z_batch=args.z_batch), common, templates))
    out.update(_path_arms(args, model, tok))
    if mom2:  # MEMIT/PMET need C for their solve; shapes time ROME's family only
        layers = tuple(range(max(args.layer - 2, 0), min(args.layer + 3, adapter_for(model).n_layers(model))))
        for name, pmet in (("memit", False), ("pmet", True)):
            editor = MemitEditor(MemitHParams(layers=layers, z=z, mom2_update_weight=1400.0, pmet=pmet,
                                              mom2_n_tokens=args.mom2_tokens))
            out[name] = _ready(editor, model, tok, lambda rs, e=editor: [_edit_once(model, tok, e, r) for r in rs])
    return out


def _path_arms(args, model, tok) -> Builders:
    """PathEdit without and with SADR (from layer 1: PathEdit edits every layer), one request at a time,
    with ``--pathedit-config``'s method settings and ``--path-epochs`` steps."""
    init = yaml.safe_load(Path(args.pathedit_config).read_text())["model"]["init_args"]
    fields = {f.name for f in dataclasses.fields(PathHParams)} - {"epochs"}
    hp = PathHParams(**{k: v for k, v in init.items() if k in fields}, epochs=args.path_epochs)
    out: Builders = {}
    for name, terms in (("pathedit", ()), ("pathedit_sadr", (SADR(args.gamma, 1),))):
        editor = PathEditor(hp, terms)
        out[name] = _ready(editor, model, tok, lambda rs, e=editor: [_edit_once(model, tok, e, r) for r in rs])
    return out


def _zbatch_arms(args, model, tok, z: ZConfig, common: dict, templates: Callable[[], list[str]]) -> Builders:
    """ROME and ROME+SADR with the z of a group optimised together, and that group's plain floor."""
    out: Builders = {}
    for name, extra in (("rome_zbatch", ()), ("rome_sadr_zbatch", (SADR(args.gamma, args.layer + 1),))):
        editor = RomeEditor(RomeHParams(layer=args.layer, z=z, **common), extra)
        out[name] = _ready(editor, model, tok, lambda rs, e=editor: [
            e.compute(model, tok, r, zr) for r, zr in zip(rs, e.compute_zs(model, tok, rs), strict=True)])
    device = next(model.parameters()).device

    def merged(rs):
        parts = [build_rewrite_batch(tok, r, templates(), device) for r in rs]
        return merge_rewrite_batches(parts, tok.pad_token_id or 0) if len(parts) > 1 else parts[0]

    def floor_zbatch(rs) -> None:
        batch = merged(rs)
        for _ in range(args.steps):
            floor_step(model, batch)

    out["floor_zbatch"] = lambda: floor_zbatch
    if args.compile_floor:

        def floor_zbatch_compiled(rs) -> float:
            return compiled_floor(model, [merged(rs)], args.steps, device, args.compile_seconds)

        out["floor_zbatch_compiled"] = lambda: floor_zbatch_compiled
    return out


def select_arms(all_arms: Builders, names: str) -> dict[str, Callable]:
    """The arms named in ``names`` (comma-separated; empty = all), in their usual order, built."""
    wanted = [n for n in names.split(",") if n]
    unknown = sorted(set(wanted) - set(all_arms))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; this run has {list(all_arms)} "
                         "(z-batch arms need --z-batch N, compiled floors --compile-floor, memit/pmet a real model)")
    return {k: build() for k, build in all_arms.items() if not wanted or k in wanted}


def _edit_once(model, tok, editor: MemitEditor | PathEditor, request) -> None:
    """One whole edit (its weight update included), undone afterwards."""
    undo = UndoLog()
    try:
        editor.apply(model, tok, [request], undo)
    finally:
        undo.restore()


def compile_stats() -> dict[str, int]:
    """What ``torch.compile`` did in this process: distinct graphs captured (a recompile adds graphs),
    graph breaks, and the graphs inductor refused to CUDA-graph (``reduce-overhead`` then runs them
    without CUDA graphs, the very lever a compiled z-step on a GPU is for; torch logs why)."""
    return {
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
    }

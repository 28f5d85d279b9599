"""Per-edit seconds of ROME, ROME+SADR, MEMIT, PMET, PathEdit side by side, the forward+backward floor and
evaluation throughput, all measured in one run; prints ratios and writes JSON.

Every arm optimises the same cases for exactly ``--steps`` steps (early stopping off), interleaved
case by case so that machine noise hits every arm alike. Arms:

* ``floor``: one plain forward + backward of the same rewriting batch per step (no hooks, no
  extra loss; the gradient flows to the input embeddings), the cost any z-step must pay;
* ``rome_recompute`` / ``rome``: ROME with the blocks below the edit layer recomputed at every
  step / replayed from step 0 (:attr:`kelight.editors.zopt.ZConfig.reuse_prefix`);
  ``rome_full_prompts``: ROME with every step over the whole prompts instead of only the tokens
  from the subject on over a KV cache of the rest (:attr:`~kelight.editors.zopt.ZConfig.cache_prefix`);
* ``rome_sadr_eager`` / ``rome_sadr``: ROME + SADR with eager ``T × T`` attention weights / with
  only the query rows (:mod:`kelight.attention_rows`); ``memit``, ``pmet``;
* ``rome_zcompile`` / ``rome_sadr_zcompile``: ROME / ROME+SADR with each z-step's forward under ``torch.compile``
  (:attr:`~kelight.editors.zopt.ZConfig.compile`: ``reduce-overhead``, i.e. CUDA graphs, on a GPU;
  inductor's default on CPU), compiled once with dynamic shapes during its warm-up request
  (``warmup_seconds`` in the JSON), then reused for every prompt length;
* ``pathedit`` / ``pathedit_sadr``: PathEdit (configs/smollm2/pathedit.yaml's method settings) on
  one request at a time, without / with SADR from layer 1 on; its steps are ``--path-epochs``
  (PAC: 12, re-tracing every 2), not ``--steps``, and its seconds per step are per epoch;
* with ``--z-batch N``: ``rome_zbatch`` / ``rome_sadr_zbatch``, the z of N independent requests
  optimised together (:func:`kelight.editors.zopt.optimise_zs`), then each ΔW; ``floor_zbatch``,
  the plain forward + backward of those N requests' merged batch. Seconds are per request;
* with ``--compile-floor``: ``floor_compiled``, the floor's forward + backward under
  ``torch.compile`` (``reduce-overhead``, i.e. CUDA graphs, on a GPU; inductor's default on CPU),
  compiled afresh for each request's shape; only the steady steps after two warm-up steps count
  (the compile time is reported separately), so it is the floor a compiled z-step could reach;
  with ``--z-batch N`` also ``floor_zbatch_compiled``, the same for the merged batch of N requests
  (one compile per group).

``--arms`` keeps only the named arms (a GPU acceptance run on an 8B shape cannot afford all of them
in one 10-minute call). Arms that edit one request at a time warm up on one request, group arms on
one group; compiled arms compile and record inside their own call and count only steady steps.

Model shapes: a real model (``smollm2-135m``, ``gemma3-270m``, a hub id) or a random-weight model
of a real shape (``shape:llama3-8b``, ``shape:gptj-6b``; byte tokenizer, C = I), e.g. in bf16 on
a GPU — timing needs no trained weights.

Examples:
    python benchmarks/edit_speed.py --cases 3 --steps 20                       # CPU, SmolLM2
    python benchmarks/edit_speed.py --model shape:llama3-8b --tokenizer .devdata/tok_smollm2 --dtype bfloat16 \
        --steps 80 --layer 5 --z-batch 8 --cases 8 --arms rome_zbatch,rome_sadr_zbatch,floor_zbatch
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import yaml

from kelight.data import load_records, parse_record
from kelight.editors.context import build_rewrite_batch, merge_rewrite_batches, sample_context_templates
from kelight.editors.memit import MemitEditor, MemitHParams
from kelight.editors.pathedit import PathEditor, PathHParams
from kelight.editors.rome import RomeEditor, RomeHParams
from kelight.editors.update import UndoLog
from kelight.editors.zopt import ZConfig
from kelight.evaluation import encode_pairs, evaluate_case, locality_reference
from kelight.lm import head
from kelight.models import load
from kelight.models.adapters import adapter_for
from kelight.objectives.sadr import SADR
from kelight.paths import default_data_root
from kelight.readouts import readouts, shared_prompt_readouts

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

    family, kwargs = SHAPES[name.split(":", 1)[1]]
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


def _sync(device: torch.device) -> None:
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
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    total = 0.0
    for batch in batches:
        torch._dynamo.reset()  # one shape per request: compile afresh rather than hit the recompile limit
        loss_fn = torch.compile(_floor_loss, mode=mode, dynamic=False)
        embeds = model.get_input_embeddings()(batch.input_ids).detach()  # (B, T, D)
        args = (batch.attention_mask, batch.target_rows, batch.target_cols, batch.target_ids)

        for _ in range(2):  # compile, then record
            _sync(device)
            t0 = time.perf_counter()
            _compiled_step(loss_fn, model, embeds, args, device)
            _sync(device)
            compile_seconds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(steps):
            _compiled_step(loss_fn, model, embeds, args, device)
        _sync(device)
        total += time.perf_counter() - t0
    return total


Builders = dict[str, Callable[[], Callable]]


def _ready(editor, model, tok, run: Callable) -> Callable[[], Callable]:
    """A builder that sets ``editor`` up (templates, C) only when its arm is selected, then returns ``run``."""

    def build() -> Callable:
        editor.setup(model, tok)
        return run

    return build


def arms(args, model, tok) -> Builders:
    """Name -> builder of function(requests) running the timed work of a group of requests; only the
    arms ``--arms`` selects are built, so a short GPU call pays no other arm's setup."""
    z = ZConfig(steps=args.steps, early_stop_loss=0.0)
    mom2 = not args.model.startswith("shape:")
    common = dict(context_templates=((5, 10), (10, 10)), mom2_adjustment=mom2)
    sadr = (SADR(args.gamma, args.layer + 1),)
    z_compiled = replace(z, compile="reduce-overhead" if args.device.startswith("cuda") else "default")
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


def time_arms(arms_: dict[str, Callable], warmup, requests, group: int, device: torch.device,
              warmup_seconds: dict[str, float]) -> dict[str, float]:
    """Mean seconds per request of each arm, arms interleaved group by group (after a warm-up: one
    request, or the warm-up group for group arms, its seconds put in ``warmup_seconds``; compiled
    floors warm up inside their own call). An arm that returns a number has those seconds counted
    instead of its wall time."""
    for name, fn in arms_.items():
        if not name.endswith("_compiled"):
            _sync(device)
            t0 = time.perf_counter()
            fn(warmup if name.endswith("_zbatch") else warmup[:1])  # z-batch arms work a group at once
            _sync(device)
            warmup_seconds[name] = time.perf_counter() - t0
    totals = dict.fromkeys(arms_, 0.0)
    for start in range(0, len(requests), group):
        rs = requests[start : start + group]
        for name, fn in arms_.items():
            _sync(device)
            t0 = time.perf_counter()
            counted = fn(rs)
            _sync(device)
            totals[name] += counted if isinstance(counted, float) else time.perf_counter() - t0
    return {name: total / len(requests) for name, total in totals.items()}


def eval_throughput(model, tok, cases, fluency: bool, device: torch.device) -> float:
    """Cases per second of the full evaluation of each case (locality reference included)."""
    _sync(device)
    t0 = time.perf_counter()
    for case in cases:
        evaluate_case(model, tok, case, fluency=fluency, pre_locality=locality_reference(model, tok, case))
    _sync(device)
    return len(cases) / (time.perf_counter() - t0)


def scoring_paths(model, tok, cases, device: torch.device) -> dict[str, float]:
    """Seconds per case of the teacher-forced scoring, full sequences vs shared prompts, and the
    largest log-prob difference between the two paths (they compute the same numbers)."""
    timings, logprobs = {}, {}
    for name in ("full_sequences", "shared_prompts"):
        _sync(device)
        t0 = time.perf_counter()
        logprobs[name] = []
        for case in cases:
            pairs = [(p.prompt, t) for probes in case.probes.values() for p in probes for t in (p.right, p.wrong)]
            prompts, targets = encode_pairs(tok, pairs)
            if name == "full_sequences":
                seqs = [p + t for p, t in zip(prompts, targets, strict=True)]
                out = readouts(model, seqs, [len(p) for p in prompts], tok.pad_token_id, 128)
            else:
                out = shared_prompt_readouts(model, prompts, targets, tok.pad_token_id, 128)
            logprobs[name] += [lp for lp, _, _ in out]
        _sync(device)
        timings[f"{name}_seconds_per_case"] = (time.perf_counter() - t0) / len(cases)
    diff = max(float((a - b).abs().max()) for a, b in zip(*logprobs.values(), strict=True))
    speedup = timings["full_sequences_seconds_per_case"] / timings["shared_prompts_seconds_per_case"]
    return {**timings, "speedup": speedup, "max_abs_logprob_diff": diff}


RATIOS = {  # name: (numerator arm, denominator arm, minus one?)
    "rome_over_floor": ("rome", "floor", False),
    "pathedit_over_rome": ("pathedit", "rome", False),
    "sadr_overhead_pathedit": ("pathedit_sadr", "pathedit", True),
    "prefix_reuse_speedup": ("rome_recompute", "rome", False),
    "cached_prefix_speedup": ("rome_full_prompts", "rome", False),
    "sadr_overhead": ("rome_sadr", "rome", True),
    "sadr_overhead_eager_attention": ("rome_sadr_eager", "rome", True),
    "row_kernel_speedup": ("rome_sadr_eager", "rome_sadr", False),
    "rome_over_compiled_floor": ("rome", "floor_compiled", False),
    "rome_sadr_over_compiled_floor": ("rome_sadr", "floor_compiled", False),
    "zcompile_speedup_rome": ("rome", "rome_zcompile", False),
    "zcompile_speedup_rome_sadr": ("rome_sadr", "rome_sadr_zcompile", False),
    "sadr_overhead_zcompile": ("rome_sadr_zcompile", "rome_zcompile", True),
    "rome_zcompile_over_compiled_floor": ("rome_zcompile", "floor_compiled", False),
    "zbatch_speedup_rome": ("rome", "rome_zbatch", False),
    "zbatch_speedup_rome_sadr": ("rome_sadr", "rome_sadr_zbatch", False),
    "rome_zbatch_over_floor_zbatch": ("rome_zbatch", "floor_zbatch", False),
    "sadr_overhead_zbatch": ("rome_sadr_zbatch", "rome_zbatch", True),
    "rome_sadr_zbatch_over_compiled_floor_zbatch": ("rome_sadr_zbatch", "floor_zbatch_compiled", False),
    "rome_zbatch_over_compiled_floor_zbatch": ("rome_zbatch", "floor_zbatch_compiled", False),
}


def ratios(seconds: dict[str, float]) -> dict[str, float]:
    """Every ratio of :data:`RATIOS` whose two arms were timed."""
    out = {}
    for name, (num, den, minus_one) in RATIOS.items():
        if num in seconds and den in seconds:
            out[name] = seconds[num] / seconds[den] - (1.0 if minus_one else 0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gamma", type=float, default=0.08)
    parser.add_argument("--path-epochs", type=int, default=12, help="PathEdit's steps (epochs) per edit")
    parser.add_argument("--pathedit-config", default=str(Path(__file__).resolve().parents[1] / "configs" / "smollm2"
                                                          / "pathedit.yaml"), help="PathEdit's settings (not epochs)")
    parser.add_argument("--mom2-tokens", type=int, default=100_000)
    parser.add_argument("--z-batch", type=int, default=1, help="also time z of N requests optimised together")
    parser.add_argument("--compile-floor", action="store_true",
                        help="also time the floor under torch.compile (CUDA graphs on a GPU)")
    parser.add_argument("--tokenizer", default=None,
                        help="saved tokenizer directory for shape: models (default: bytes), e.g. SmolLM2's BPE")
    parser.add_argument("--arms", default="", help="comma-separated arms to time (default: all)")
    parser.add_argument("--data", default=str(default_data_root() / "counterfact_mix" / "dev.json"))
    parser.add_argument("--out", default="benchmarks/results/edit_speed.json")
    args = parser.parse_args()
    model, tok = load_model(args.model, args.dtype, args.device, args.tokenizer)
    device = next(model.parameters()).device
    group = max(args.z_batch, 1)
    records = load_records(args.data).select(range(max(args.cases + group, 8)))
    cases = [parse_record(r, i) for i, r in enumerate(records)]
    requests = [c.request for c in cases[group : args.cases + group]]  # the first group only warms up
    warmup = [c.request for c in cases[:group]]
    warmup_seconds: dict[str, float] = {}
    seconds = time_arms(select_arms(arms(args, model, tok), args.arms), warmup, requests, group, device,
                        warmup_seconds)
    per_step = {k: v / (args.path_epochs if k.startswith("pathedit") else args.steps) for k, v in seconds.items()}
    result = {
        "model": args.model, "tokenizer": args.tokenizer or ("bytes" if args.model.startswith("shape:") else "model's"),
        "dtype": args.dtype, "device": str(device), "threads": torch.get_num_threads(),
        "cases": len(requests), "steps": args.steps, "path_epochs": args.path_epochs,
        "seconds_per_edit": seconds, "seconds_per_step": per_step,
        "ratios": ratios(seconds), "warmup_seconds": warmup_seconds,
    }
    if args.compile_floor:
        result["compile_seconds_per_shape"] = sum(args.compile_seconds) / max(len(args.compile_seconds) / 2, 1)
    if group > 1:
        result["z_batch"] = group
    if not args.model.startswith("shape:"):
        result["scoring"] = scoring_paths(model, tok, cases[:8], device)
        result["eval_cases_per_second"] = {
            "scores_only": eval_throughput(model, tok, cases[:8], False, device),
            "with_fluency": eval_throughput(model, tok, cases[:8], True, device),
        }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Per-edit seconds of ROME, ROME+SADR, MEMIT, PMET, PathEdit side by side, the forward+backward floor and
evaluation throughput, all measured in one run; prints ratios and writes JSON.

Every arm optimises the same cases for exactly ``--steps`` steps (early stopping off), interleaved
case by case so that machine noise hits every arm alike. Arms:

* ``floor``: one plain forward + backward of the same rewriting batch per step (no hooks, no
  extra loss; the gradient flows to the input embeddings), the cost any z-step must pay;
* ``rome_recompute`` / ``rome``: ROME with the blocks below the edit layer recomputed at every
  step / replayed from step 0 (:attr:`kelight.editors.locate.zopt.ZConfig.reuse_prefix`);
  ``rome_full_prompts``: ROME with every step over the whole prompts instead of only the tokens
  from the subject on over a KV cache of the rest (:attr:`~kelight.editors.locate.zopt.ZConfig.cache_prefix`);
* ``rome_sadr_eager`` / ``rome_sadr``: ROME + SADR with eager ``T × T`` attention weights / with
  only the query rows (:mod:`kelight.lm.attention_rows`); ``memit``, ``pmet``;
* ``rome_zcompile`` / ``rome_sadr_zcompile``: ROME / ROME+SADR with each z-step's forward under ``torch.compile``
  (:attr:`~kelight.editors.locate.zopt.ZConfig.compile`: ``reduce-overhead``, i.e. CUDA graphs, on a GPU;
  inductor's default on CPU), compiled once with dynamic shapes during its warm-up request
  (``warmup_seconds`` in the JSON), then reused for every prompt length;
* ``pathedit`` / ``pathedit_sadr``: PathEdit (configs/smollm2/pathedit.yaml's method settings) on
  one request at a time, without / with SADR from layer 1 on; its steps are ``--path-epochs``
  (PAC: 12, re-tracing every 2), not ``--steps``, and its seconds per step are per epoch;
* with ``--z-batch N``: ``rome_zbatch`` / ``rome_sadr_zbatch``, the z of N independent requests
  optimised together (:func:`kelight.editors.locate.zopt.optimise_zs`), then each ΔW; ``floor_zbatch``,
  the plain forward + backward of those N requests' merged batch. Seconds are per request;
* with ``--compile-floor``: ``floor_compiled``, the floor's forward + backward under
  ``torch.compile`` (``reduce-overhead``, i.e. CUDA graphs, on a GPU; inductor's default on CPU),
  compiled afresh for each request's shape; only the steady steps after two warm-up steps count
  (the compile time is reported separately), so it is the floor a compiled z-step could reach;
  with ``--z-batch N`` also ``floor_zbatch_compiled``, the same for the merged batch of N requests
  (one compile per group).

The arms and the floors are built in ``speed_arms.py`` (shared with ``compile_check.py``). The JSON
is rewritten after each arm's warm-up and after every request group (``requests_timed``), so a GPU call cut
short by its time limit still returns what it measured; ``compile_stats`` says what ``torch.compile``
did (graphs, graph breaks, graphs run without CUDA graphs).

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
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from speed_arms import build_arms, compile_stats, load_model, select_arms, sync

from kelight.data import load_records, parse_record
from kelight.data.root import default_data_root
from kelight.evaluation.scoring import encode_pairs, evaluate_case, locality_reference
from kelight.lm.readouts import readouts, shared_prompt_readouts

Progress = Callable[[dict[str, float], int], None]


def time_arms(arms_: dict[str, Callable], warmup, requests, group: int, device: torch.device,
              warmup_seconds: dict[str, float], progress: Progress) -> dict[str, float]:
    """Mean seconds per request of each arm, arms interleaved group by group (after a warm-up: one
    request, or the warm-up group for group arms, its seconds put in ``warmup_seconds``; compiled
    floors warm up inside their own call). An arm that returns a number has those seconds counted
    instead of its wall time. ``progress(seconds per request so far, requests timed)`` is called after
    each warm-up and after every group, so a run cut short still leaves what it measured."""
    for name, fn in arms_.items():
        if not name.endswith("_compiled"):
            sync(device)
            t0 = time.perf_counter()
            fn(warmup if name.endswith("_zbatch") else warmup[:1])  # z-batch arms work a group at once
            sync(device)
            warmup_seconds[name] = time.perf_counter() - t0
            progress({}, 0)
    totals, done = dict.fromkeys(arms_, 0.0), 0
    for start in range(0, len(requests), group):
        rs = requests[start : start + group]
        for name, fn in arms_.items():
            sync(device)
            t0 = time.perf_counter()
            counted = fn(rs)
            sync(device)
            totals[name] += counted if isinstance(counted, float) else time.perf_counter() - t0
        done += len(rs)
        progress({name: total / done for name, total in totals.items()}, done)
    return {name: total / done for name, total in totals.items()}


def eval_throughput(model, tok, cases, fluency: bool, device: torch.device) -> float:
    """Cases per second of the full evaluation of each case (locality reference included)."""
    sync(device)
    t0 = time.perf_counter()
    for case in cases:
        evaluate_case(model, tok, case, fluency=fluency, pre_locality=locality_reference(model, tok, case))
    sync(device)
    return len(cases) / (time.perf_counter() - t0)


def scoring_paths(model, tok, cases, device: torch.device) -> dict[str, float]:
    """Seconds per case of the teacher-forced scoring, full sequences vs shared prompts, and the
    largest log-prob difference between the two paths (they compute the same numbers)."""
    timings, logprobs = {}, {}
    for name in ("full_sequences", "shared_prompts"):
        sync(device)
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
        sync(device)
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
    result: dict = {}

    def record(seconds: dict[str, float], timed: int) -> None:
        result.update({
            "model": args.model, "dtype": args.dtype, "device": str(device), "threads": torch.get_num_threads(),
            "tokenizer": args.tokenizer or ("bytes" if args.model.startswith("shape:") else "model's"),
            "cases": len(requests), "requests_timed": timed, "steps": args.steps, "path_epochs": args.path_epochs,
            "seconds_per_edit": seconds,
            "seconds_per_step": {k: v / (args.path_epochs if k.startswith("pathedit") else args.steps)
                                 for k, v in seconds.items()},
            "ratios": ratios(seconds), "warmup_seconds": warmup_seconds, "compile_stats": compile_stats(),
        })
        if args.compile_floor:
            result["compile_seconds_per_shape"] = sum(args.compile_seconds) / max(len(args.compile_seconds) / 2, 1)
        if group > 1:
            result["z_batch"] = group
        if device.type == "cuda":
            result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out.write_text(json.dumps(result, indent=2))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record(time_arms(select_arms(build_arms(args, model, tok), args.arms), warmup, requests, group, device,
                     warmup_seconds, record), len(requests))
    if not args.model.startswith("shape:"):
        result["scoring"] = scoring_paths(model, tok, cases[:8], device)
        result["eval_cases_per_second"] = {
            "scores_only": eval_throughput(model, tok, cases[:8], False, device),
            "with_fluency": eval_throughput(model, tok, cases[:8], True, device),
        }
        out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Does a compiled z-step (``ZConfig.compile``) edit as the eager one does, and what does it cost?

For each request, ROME's (``--gamma``: ROME+SADR's) ΔW and z are computed twice on the same weights,
eager and compiled (early stop on, as in a run), and the relative differences, the steps taken and
the two times are printed; then the compile cost (the first compiled request less its eager time),
the steady speed-up (the other requests) and the break-even number of edits. The first request compiles; later ones have
other prompt lengths and must reuse its graphs (dynamic shapes). Set ``TORCHINDUCTOR_CACHE_DIR`` to
a fresh folder for a cold compile (inductor caches compiled graphs across processes). The summary
ends with ``compile_stats`` (``speed_arms.py``): graphs captured (2 expected), graph breaks, graphs
inductor ran without CUDA graphs. ``--model shape:llama3-8b --tokenizer DIR`` checks a random-weight
model of a real shape (``mom2_adjustment`` is off in every case here: C = I).

Examples:
    TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) python benchmarks/compile_check.py --cases 6 --steps 20 --gamma 0.08
    python benchmarks/compile_check.py --model shape:llama3-8b --tokenizer .devdata/tok_smollm2 --dtype bfloat16 \
        --layer 5 --steps 80 --cases 3                                                    # GPU: CUDA graphs
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from speed_arms import compile_mode, compile_stats, load_model, sync

from kelight.data import load_records, parse_record
from kelight.data.root import default_data_root
from kelight.editors.locate.zopt import ZConfig
from kelight.editors.rome import RomeEditor, RomeHParams
from kelight.objectives.sadr import SADR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gamma", type=float, default=0.0, help="SADR's γ (0: plain ROME)")
    parser.add_argument("--mode", default=None, help="torch.compile mode (default: reduce-overhead on a GPU, "
                                                     "else default)")
    parser.add_argument("--tokenizer", default=None, help="saved tokenizer directory for shape: models")
    parser.add_argument("--data", default=str(default_data_root() / "counterfact_mix" / "dev.json"))
    args = parser.parse_args()
    mode = args.mode or compile_mode(args.device)
    model, tok = load_model(args.model, args.dtype, args.device, args.tokenizer)
    device = next(model.parameters()).device
    records = load_records(args.data).select(range(args.cases))
    requests = [parse_record(r, i).request for i, r in enumerate(records)]
    sadr = (SADR(args.gamma, args.layer + 1),) if args.gamma else ()
    editors = {m: RomeEditor(RomeHParams(layer=args.layer, z=ZConfig(steps=args.steps, compile=m),
                                         context_templates=((5, 10), (10, 10)), mom2_adjustment=False), sadr)
               for m in ("off", mode)}
    for editor in editors.values():
        editor.setup(model, tok)
    rows = []
    for request in requests:
        out, seconds = {}, {}
        for m, editor in editors.items():
            sync(device)
            t0 = time.perf_counter()
            out[m] = editor.compute(model, tok, request)
            sync(device)
            seconds[m] = time.perf_counter() - t0
        (w_eager, z_eager), (w_comp, z_comp) = out["off"], out[mode]
        rows.append({
            "subject": request.subject, "steps": [z_eager.steps_run, z_comp.steps_run],
            "dW_rel_diff": ((w_comp - w_eager).norm() / w_eager.norm()).item(),
            "z_rel_diff": ((z_comp.delta - z_eager.delta).norm() / z_eager.delta.norm()).item(),
            "loss_max_abs_diff": max(abs(a - b) for a, b in zip(z_eager.losses, z_comp.losses, strict=False)),
            "seconds_eager": seconds["off"], "seconds_compiled": seconds[mode],
        })
        print(json.dumps(rows[-1]), flush=True)
    compile_s = rows[0]["seconds_compiled"] - rows[0]["seconds_eager"]
    eager = sum(r["seconds_eager"] for r in rows[1:])
    saved = (eager - sum(r["seconds_compiled"] for r in rows[1:])) / max(len(rows) - 1, 1)
    summary = {"mode": mode, "gamma": args.gamma, "device": args.device, "threads": torch.get_num_threads(),
               "compile_seconds": compile_s,
               "speedup_after_compile": eager / max(sum(r["seconds_compiled"] for r in rows[1:]), 1e-9),
               "break_even_edits": compile_s / saved if saved > 0 else None,
               "max_dW_rel_diff": max(r["dW_rel_diff"] for r in rows), **compile_stats()}
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

"""Time the z optimisation with and without SADR (same steps, same cases, one run) and print ratios.

Early stopping is off so both arms run exactly ``--steps`` steps; plain ROME runs with the model's
default attention kernel (SDPA) and ROME+SADR with the eager kernel it needs for attention weights,
plus an eager-without-SADR arm to separate the kernel's cost from the loss's.

Example:
    python benchmarks/sadr_overhead.py --cases 3 --steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch

from kelight.data.builtin import builtin_cases
from kelight.editors.context import build_rewrite_batch, sample_context_templates
from kelight.editors.zopt import ZConfig, optimise_z
from kelight.models import adapter_for, load
from kelight.objectives.sadr import SADR


def _time(model, path, batches, cfg, terms, want_attn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch in batches:
        optimise_z(model, path, batch, cfg, terms, want_attn=want_attn)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (len(batches) * cfg.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gamma", type=float, default=0.08)
    args = parser.parse_args()
    model, tok = load(args.model)
    path = adapter_for(model).path("mlp_out", args.layer)
    templates = sample_context_templates(model, tok, ((5, 10), (10, 10)))
    device = next(model.parameters()).device
    batches = [build_rewrite_batch(tok, c.request, templates, device) for c in builtin_cases()[: args.cases]]
    cfg = replace(ZConfig(steps=args.steps), early_stop_loss=0.0)
    _time(model, path, batches[:1], replace(cfg, steps=2), (), False)  # warm-up
    plain = _time(model, path, batches, cfg, (), False)
    eager = _time(model, path, batches, cfg, (lambda state: state.batch.input_ids.new_zeros((), dtype=torch.float32),),
                  True)
    sadr = _time(model, path, batches, cfg, (SADR(args.gamma, args.layer + 1),), True)
    out = {"device": str(device), "prompts_per_step": int(batches[0].input_ids.shape[0]),
           "seconds_per_step": {"rome_sdpa": plain, "rome_eager_attn": eager, "rome_sadr": sadr},
           "sadr_over_rome": sadr / plain, "sadr_over_eager_rome": sadr / eager}
    sys.stdout.write(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Operators dispatched per z-step (forward + backward) of ROME and ROME+SADR: a machine-independent
count of the kernel launches that bound a single request's step on a GPU (docs/performance.md:
one request at a time, an 8B-shape step is launch-bound, and SADR's overhead is its extra kernels).

Counts every ATen operator that reaches a backend (below autograd, so the backward's operators are
counted too), over steps 3..5 of one request's optimisation, per step: all of them (each costs
dispatch overhead on the host) and those that are not views (each a kernel launch on a GPU).

Example:
    python benchmarks/op_count.py --model smollm2-135m --layer 4
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

from kelight.data import load_records, parse_record
from kelight.data.root import default_data_root
from kelight.editors.locate.zopt import ZConfig, optimise_z
from kelight.editors.rewrite import build_rewrite_batch
from kelight.editors.rome import RomeEditor, RomeHParams
from kelight.models import load
from kelight.objectives.sadr import SADR


class OpCounter(TorchDispatchMode):
    """Counts the operators dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.ops[str(func.overloadpacket.__name__)] += 1
        self.kernels += not func.is_view
        return func(*args, **(kwargs or {}))


def ops_per_step(model, path: str, batch, cfg: ZConfig, terms: tuple, layer: int, pad_id: int,
                 steps: tuple[int, int] = (3, 6)) -> tuple[float, float, Counter[str]]:
    """Dispatched operators and non-view operators per step, and the operator counts of the extra
    steps, from the difference of a short and a longer optimisation."""
    counters = []
    for n in steps:
        with OpCounter() as counter:
            optimise_z(model, path, batch, ZConfig(**{**vars(cfg), "steps": n}), terms, want_attn=bool(terms),
                       first_edited_block=layer, pad_id=pad_id)
        counters.append(counter)
    diff, n_steps = counters[1].ops - counters[0].ops, steps[1] - steps[0]
    return sum(diff.values()) / n_steps, (counters[1].kernels - counters[0].kernels) / n_steps, diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--gamma", type=float, default=0.08)
    parser.add_argument("--data", default=str(default_data_root() / "counterfact_mix" / "dev.json"))
    parser.add_argument("--out", default="benchmarks/results/op_count.json")
    args = parser.parse_args()
    model, tok = load(args.model)
    request = parse_record(load_records(args.data)[0], 0).request
    editor = RomeEditor(RomeHParams(layer=args.layer, context_templates=((5, 10), (10, 10))))
    editor.setup(model, tok)
    batch = build_rewrite_batch(tok, request, editor.templates, "cpu")
    path = editor.adapter.path("mlp_out", args.layer)
    cfg = ZConfig(early_stop_loss=0.0)
    result = {"model": args.model, "layer": args.layer, "prompts": batch.n_rewrite}
    for name, terms, c in (("rome", (), cfg), ("rome_sadr", (SADR(args.gamma, args.layer + 1),), cfg),
                           ("rome_sadr_eager", (SADR(args.gamma, args.layer + 1),),
                            ZConfig(early_stop_loss=0.0, attention_rows=False))):
        per_step, kernels, diff = ops_per_step(model, path, batch, c, terms, args.layer, tok.pad_token_id or 0)
        result[name] = {"ops_per_step": per_step, "non_view_ops_per_step": kernels, "top": dict(diff.most_common(12))}
    for key in ("ops_per_step", "non_view_ops_per_step"):
        result[f"sadr_extra_{key}"] = result["rome_sadr"][key] - result["rome"][key]
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

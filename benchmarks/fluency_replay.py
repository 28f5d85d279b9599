"""Fluency samples of single edits: one edited model at a time against every edit replayed on its own rows.

The single-edit regime restores the weights after each case, so each case's fluency texts used to be sampled on
its own edited model, three prompts in a batch, 100 decode steps each. ``kelight fit`` now keeps each edit's
weight change, restores, and samples the texts of a whole loader batch together, each change added on its
case's rows only (:func:`kelight.lm.hooks.row_weight_changes`). This script times both ways, interleaved in one
run, on the built-in cases with a rank-one change of ROME's shape (``mlp.down_proj`` of layer 4; the timing does
not depend on the values, so the changes are random), and counts the texts that came out the same.

Example:
    python benchmarks/fluency_replay.py --cases 8
"""

from __future__ import annotations

import argparse
import time

import torch

import kelight
from kelight.editors.undo import UndoLog
from kelight.evaluation.scoring import fluency_samples
from kelight.lm.hooks import linear_weight_changes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cases", type=int, default=8, help="built-in cases (one edit each)")
    parser.add_argument("--layer", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=100, help="new tokens per fluency text")
    args = parser.parse_args(argv)
    model, tok = kelight.load(args.model)[:2]
    model.eval()
    cases = kelight.load_cases(None, limit=args.cases)
    weight = model.get_submodule(f"model.layers.{args.layer}.mlp.down_proj").weight
    gen = torch.Generator().manual_seed(0)
    deltas = [torch.outer(torch.randn(weight.shape[0], generator=gen), torch.randn(weight.shape[1], generator=gen))
              * 1e-2 for _ in cases]

    start = time.perf_counter()  # one edited model at a time (the old way)
    one_by_one, changes = {}, {}
    for case, delta in zip(cases, deltas, strict=True):
        undo = UndoLog()
        undo.add_(weight, delta)
        one_by_one.update(fluency_samples(model, tok, [case], args.tokens))
        changes[case.case_id] = linear_weight_changes(model, undo.changes())
        undo.restore()
    alone = time.perf_counter() - start

    start = time.perf_counter()  # every change replayed on its rows, all cases together
    together = fluency_samples(model, tok, cases, args.tokens, changes=changes)
    joint = time.perf_counter() - start

    texts = sum(len(t) for t in one_by_one.values())
    print(f"{len(cases)} cases, {texts} texts of {args.tokens} tokens, {torch.get_num_threads()} threads")
    print(f"one edited model at a time: {alone:.1f} s ({alone / len(cases):.2f} s/case)")
    print(f"changes replayed together:  {joint:.1f} s ({joint / len(cases):.2f} s/case)")
    print(f"speed-up: {alone / joint:.1f}x")
    print("same texts (a text depends on the batch it is sampled in):",
          sum(a == b for c in one_by_one for a, b in zip(one_by_one[c], together[c], strict=True)), "of", texts)


if __name__ == "__main__":
    main()

"""Generations of single edits: one edited model at a time against every edit replayed on its own rows.

The single-edit regime restores the weights after each case, so each case's fluency texts and wild answers used
to be generated on its own edited model: three fluency prompts in a batch, 100 decode steps each, and a case's
few wild prompts in a batch. ``kelight fit`` now keeps each edit's weight change, restores, and generates for a
whole loader batch together, each change added on its case's rows only (:func:`kelight.lm.hooks.row_weight_changes`).
This script times both ways, interleaved in one run, on the built-in cases with a rank-one change of ROME's shape
(``mlp.down_proj`` of layer 4; the timing does not depend on the values, so the changes are random), and counts
the texts and answers that came out the same.

Example:
    python benchmarks/generation_replay.py --cases 8
"""

from __future__ import annotations

import argparse
import time

import torch

import kelight
from kelight.editors.undo import UndoLog
from kelight.evaluation.scoring import fluency_samples
from kelight.evaluation.wild import WildConfig, generate_answers, replayed_answers
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

    wild = WildConfig()
    # one edited model at a time (the old way)
    one_by_one, answers, changes, seconds = {}, {}, {}, {"fluency": 0.0, "wild": 0.0}
    for case, delta in zip(cases, deltas, strict=True):
        undo = UndoLog()
        undo.add_(weight, delta)
        t0 = time.perf_counter()
        one_by_one.update(fluency_samples(model, tok, [case], args.tokens))
        t1 = time.perf_counter()
        answers[case.case_id] = generate_answers(model, tok, [case], wild)
        seconds["wild"] += time.perf_counter() - t1
        seconds["fluency"] += t1 - t0
        changes[case.case_id] = linear_weight_changes(model, undo.changes())
        undo.restore()

    t0 = time.perf_counter()  # every change replayed on its rows, all cases together
    together = fluency_samples(model, tok, cases, args.tokens, changes=changes)
    t1 = time.perf_counter()
    replayed = replayed_answers(model, tok, cases, wild, changes)
    joint = {"fluency": t1 - t0, "wild": time.perf_counter() - t1}

    texts = sum(len(t) for t in one_by_one.values())
    n_answers = sum(len(a) for a in answers.values())
    print(f"{len(cases)} cases, {texts} fluency texts of {args.tokens} tokens, {n_answers} wild answers, "
          f"{torch.get_num_threads()} threads")
    for what in ("fluency", "wild"):
        print(f"{what:8s} one edited model at a time: {seconds[what]:.1f} s ({seconds[what] / len(cases):.2f} s/case); "
              f"replayed together: {joint[what]:.1f} s ({joint[what] / len(cases):.2f} s/case); "
              f"speed-up {seconds[what] / joint[what]:.1f}x")
    print("same fluency texts (a text depends on the batch it is sampled in):",
          sum(a == b for c in one_by_one for a, b in zip(one_by_one[c], together[c], strict=True)), "of", texts)
    print("same wild answers:", sum(replayed[c][p] == a for c in answers for p, a in answers[c].items()), "of",
          n_answers)


if __name__ == "__main__":
    main()

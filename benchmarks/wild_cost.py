"""What the wild (generated-answer) evaluation costs per case, against the teacher-forced one, in one process.

Loads the model once, takes the first N cases of a data file, records each case's pre-edit reference
(untimed) and then times :func:`kelight.evaluation.scoring.evaluate_case` per case under ``teacher_forced``, ``wild``
and ``both``, the three protocols in a rotating order per case and repeat (so that load drift on a shared
machine hits them alike), after one untimed warm-up of each. It evaluates the unedited model: an edit changes
what is generated, not how much work a token is. It also times the answers of all N cases generated in one
call against one call per case (what the sequential regime's batching across cases saves), and checks that
a rerun gives the same answers.

Example:
    OMP_NUM_THREADS=1 python benchmarks/wild_cost.py --cases 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import kelight
from kelight.evaluation.scoring import evaluate_case, locality_reference
from kelight.evaluation.wild import WildConfig, generate_answers, wild_probes

PROTOCOLS = ("teacher_forced", "wild", "both")


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_protocols(model, tok, cases, wild: WildConfig, repeats: int) -> dict[str, list[float]]:
    """Seconds per case of each protocol (one entry per case and repeat)."""
    refs = [locality_reference(model, tok, case, protocol="both", wild=wild) for case in cases]
    for protocol in PROTOCOLS:  # warm-up: first-call allocations, lazy imports
        evaluate_case(model, tok, cases[0], fluency=False, pre_locality=refs[0], protocol=protocol, wild=wild)
    times: dict[str, list[float]] = {p: [] for p in PROTOCOLS}
    for r in range(repeats):
        for i, (case, ref) in enumerate(zip(cases, refs, strict=True)):
            shift = (i + r) % len(PROTOCOLS)
            for protocol in PROTOCOLS[shift:] + PROTOCOLS[:shift]:
                times[protocol].append(_seconds(lambda p=protocol, c=case, f=ref: evaluate_case(
                    model, tok, c, fluency=False, pre_locality=f, protocol=p, wild=wild)))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/counterfact_mix/dev.json")
    parser.add_argument("--cases", type=int, default=5)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--template", default="bare", choices=("bare", "qa"))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    model, tok = kelight.load(args.model)
    cases = kelight.load_cases(args.data, limit=args.cases)
    wild = WildConfig(template=args.template, max_new_tokens=args.max_new_tokens)
    print(f"{args.model}, {len(cases)} cases of {args.data}, torch threads {torch.get_num_threads()}, "
          f"wild_template {args.template}, wild_max_new_tokens {args.max_new_tokens}")
    prompts = [len(wild_probes(case)) for case in cases]
    targets = [2 * sum(len(p) for p in case.probes.values()) + sum(len(p) for p in case.token_probes.values())
               for case in cases]
    print(f"per case: {statistics.mean(targets):.1f} teacher-forced targets, {statistics.mean(prompts):.1f} prompts "
          f"answered")
    times = time_protocols(model, tok, cases, wild, args.repeats)
    base = statistics.mean(times["teacher_forced"])
    for protocol, seconds in times.items():
        print(f"{protocol:>14}: {statistics.mean(seconds):.3f} s/case (median {statistics.median(seconds):.3f}), "
              f"{statistics.mean(seconds) / base:.2f}x teacher_forced")
    per_case = sum(_seconds(lambda c=case: generate_answers(model, tok, [c], wild)) for case in cases)
    answers: dict[str, str] = {}
    together = _seconds(lambda: answers.update(generate_answers(model, tok, cases, wild)))
    print(f"answers of all {len(cases)} cases: {together:.2f} s in one call vs {per_case:.2f} s one call per case "
          f"({per_case / together:.2f}x)")
    rerun = generate_answers(model, tok, cases, wild)
    print(f"deterministic: {'yes' if rerun == answers else 'NO'} ({len(answers)} answers, a rerun gives the same)")
    for prompt, answer in list(answers.items())[:5]:
        print(f"  {prompt!r} -> {answer!r}")


if __name__ == "__main__":
    main()

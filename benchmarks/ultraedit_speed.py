"""Seconds per edit of UltraEdit's edit alone (no evaluation), for several turn sizes, in one process.

The model is loaded once; for each turn size T the first ``--requests`` requests of the data file are
edited in turns of T (the consecutive regime: every turn kept, the running moments carried over), the
weights restored afterwards, and the next size starts from the unedited model. Reported per size:
seconds per edit of the whole turn (``apply``), of its forward + backward alone (the features, timed on
the same turns again, weights and moments untouched), their ratio, and the extrapolation to 10,000
edits. ``--repeat`` runs every size that many times, interleaved, and keeps each size's best.

Example:
    OMP_NUM_THREADS=1 python benchmarks/ultraedit_speed.py --sizes 1 10 100 --requests 100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import kelight
from kelight.editors.ultraedit import UltraEditHParams, UltraEditor, edit_features
from kelight.editors.undo import UndoLog

DATA = Path(__file__).resolve().parents[2] / "shared/data/counterfact_edit/counterfact_edit.json"


def time_size(model, tok, editor: UltraEditor, requests: list, size: int) -> dict[str, float]:
    """Edit ``requests`` in turns of ``size``; seconds per edit of the turns and of their features alone."""
    turns = [requests[i:i + size] for i in range(0, len(requests), size)]
    undo = UndoLog()
    t0 = time.perf_counter()
    for turn in turns:
        editor.apply(model, tok, turn, undo)
    edit = (time.perf_counter() - t0) / len(requests)
    undo.restore()
    t0 = time.perf_counter()
    for turn in turns:
        edit_features(model, tok, editor.adapter, editor.hp.layers, turn, editor.hp.tokens)
    features = (time.perf_counter() - t0) / len(requests)
    return {"s_per_edit": edit, "features_s_per_edit": features}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--requests", type=int, default=100, help="requests edited per turn size")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="default: UltraEditHParams'")
    parser.add_argument("--tokens", default="target")
    parser.add_argument("--whiten", action="store_true")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args()

    model, tok = kelight.load(args.model)
    requests = [case.request for case in kelight.load_cases(args.data, limit=args.requests)]
    options = {"tokens": args.tokens, "whiten": args.whiten}
    if args.layers:
        options["layers"] = tuple(args.layers)
    editor = UltraEditor(UltraEditHParams(**options))
    editor.setup(model, tok)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    best: dict[int, dict[str, float]] = {}
    for _ in range(args.repeat):
        for size in args.sizes:
            result = time_size(model, tok, editor, requests, size)
            if size not in best or result["s_per_edit"] < best[size]["s_per_edit"]:
                best[size] = result
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items()), "weights not restored"
    base = best[args.sizes[0]]["s_per_edit"]
    print(f"threads {torch.get_num_threads()}, {args.requests} requests per size, layers {list(editor.hp.layers)}")
    print("| turn size | s/edit | forward+backward s/edit | share | vs size " f"{args.sizes[0]} | 10,000 edits (min) |")
    print("|---|---|---|---|---|---|")
    for size, r in best.items():
        print(f"| {size} | {r['s_per_edit']:.4f} | {r['features_s_per_edit']:.4f} | "
              f"{r['features_s_per_edit'] / r['s_per_edit']:.2f} | {base / r['s_per_edit']:.1f}x | "
              f"{r['s_per_edit'] * 10_000 / 60:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"layers": list(editor.hp.layers), "requests": args.requests,
                                               "threads": torch.get_num_threads(), "sizes": best}, indent=1))


if __name__ == "__main__":
    main()

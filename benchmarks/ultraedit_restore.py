"""A long UltraEdit stream through ``kelight.EditSession``, then ``restore()``: the edit time without evaluation,
and every parameter compared bit for bit with a copy taken before the first edit.

The requests are edited in turns of ``--turn`` (split where a request rewrites the prompt of an earlier one of
its turn to another target, as the consecutive regime of ``kelight fit`` splits them), with the options of
``configs/smollm2/ultraedit.yaml``.

Example:
    OMP_NUM_THREADS=1 python benchmarks/ultraedit_restore.py --limit 10000 --turn 100
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

import kelight
from kelight.types import split_at_conflicts

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data/counterfact_edit/counterfact_edit.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA), help="a counterfact_edit/zsre/counterfact_mix file")
    parser.add_argument("--limit", type=int, default=None, help="requests (default: the whole file)")
    parser.add_argument("--turn", type=int, default=100, help="requests per turn")
    parser.add_argument("--config", default=str(ROOT / "configs/smollm2/ultraedit.yaml"))
    args = parser.parse_args(argv)
    init = yaml.safe_load(Path(args.config).read_text())["model"]["init_args"]
    model, tok = kelight.load(init["model_name"])[:2]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    requests = [case.request for case in kelight.load_cases(args.data, limit=args.limit)]
    session = kelight.EditSession(model, tok, method="ultraedit", **init["editor"])
    start = time.perf_counter()
    for first in range(0, len(requests), args.turn):
        turn = requests[first : first + args.turn]
        bounds = [0, *split_at_conflicts(turn), len(turn)]
        for a, b in zip(bounds, bounds[1:], strict=False):
            session.edit(turn[a:b])
    seconds = time.perf_counter() - start
    changed = sum(not torch.equal(before[name], p) for name, p in model.named_parameters())
    session.restore()
    differ = [name for name, p in model.named_parameters() if not torch.equal(before[name], p)]
    print(f"{len(requests)} edits in {seconds:.0f} s ({seconds / len(requests):.3f} s/edit); {changed} of "
          f"{len(before)} parameter tensors changed by the edits; after restore() {len(differ)} differ bit for bit"
          + (f": {differ[:5]}" if differ else ""))


if __name__ == "__main__":
    main()

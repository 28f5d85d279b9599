"""Share of the specificity damage an objective wins back: (with − without) / (none − without).

Reads ``metrics.json`` of three runs on the same cases (unedited, editor, editor+SADR) and prints
the share for RS, DNS, RM, DNM (and the ES/PS change), per the SADR paper's Table 3 reading.

Example:
    python benchmarks/won_back.py runs/none runs/rome runs/rome_sadr
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ("RS", "DNS", "RM", "DNM", "NS", "NM")


def won_back(none: dict, without: dict, with_: dict, key: str) -> float | None:
    """``(with − without) / (none − without)``; ``None`` when the editor did no damage on ``key``."""
    if key not in none or key not in without or key not in with_:
        return None
    damage = none[key] - without[key]
    return None if abs(damage) < 1e-9 else (with_[key] - without[key]) / damage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("none")
    parser.add_argument("without")
    parser.add_argument("with_")
    args = parser.parse_args()
    runs = [json.loads((Path(d) / "metrics.json").read_text()) for d in (args.none, args.without, args.with_)]
    if len({r.get("n_cases") for r in runs}) != 1:
        raise SystemExit(f"expected the same cases in all three runs, got n_cases {[r.get('n_cases') for r in runs]}")
    out = {k: won_back(*runs, k) for k in KEYS}
    out.update({f"Δ{k}": runs[2][k] - runs[1][k] for k in ("ES", "PS", "EM", "PM") if k in runs[1]})
    print(json.dumps({k: (round(v, 3) if v is not None else None) for k, v in out.items()}))


if __name__ == "__main__":
    main()

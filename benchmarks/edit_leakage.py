"""How far a ROME edit moves the residual stream on prompts that do not contain the subject.

For each case with neighbourhood prompts, the block output ``h`` at the edit layer is read before
and after the edit (the config's method settings, undone bit-exactly after each case):
neighbourhood prompts give ``max_t |Δh_t| / |h_t|`` over positions ``t ≥ 1``, the rewrite prompt the
same at the subject's last token. Prints, per config, the means and their ratio (neighbourhood /
rewrite); with two configs, the ratio of the two models' neighbourhood changes measured in this run.
docs/results.md uses it to compare Gemma-3 (post-MLP norm) with SmolLM2 (NS damage).

Example:
    python benchmarks/edit_leakage.py configs/gemma3/rome.yaml configs/smollm2/rome.yaml --cases 20
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import yaml

from kelight.api import method_hparams
from kelight.data import load_records, parse_record
from kelight.data.root import default_data_root
from kelight.editors.rome import RomeEditor, RomeHParams
from kelight.editors.undo import UndoLog
from kelight.lm.hooks import trace
from kelight.lm.tokens import subject_last_index
from kelight.models import load

ROME_KEYS = ("layer", "mom2_adjustment", "context_templates", "steps", "lr", "kl_factor", "weight_decay",
             "clamp_norm_factor", "mom2_n_tokens", "mean_key_insertion")


@torch.no_grad()
def block_output(model, tok, path: str, prompt: str) -> torch.Tensor:
    """``(T, D)`` float64 output of the block at ``path`` for one prompt."""
    ids = torch.tensor([tok(prompt)["input_ids"]], device=next(model.parameters()).device)
    with trace(model, [path], stop=True) as rec:
        model.base_model(input_ids=ids, use_cache=False)
    return rec[path][0].double()


def leakage(config: str, data: str, n_cases: int) -> dict[str, float | int | str]:
    """Mean relative change of the edit layer's block output: rewrite subject vs. neighbourhood prompts."""
    init = yaml.safe_load(Path(config).read_text())["model"]["init_args"]
    model, tok = load(init["model_name"])
    editor = RomeEditor(method_hparams(RomeHParams, "rome", **{k: init[k] for k in ROME_KEYS if k in init}))
    editor.setup(model, tok)
    assert editor.adapter is not None
    path = editor.adapter.block_path(editor.hp.layer)
    cases = [parse_record(r, i) for i, r in enumerate(load_records(data).select(range(n_cases)))]
    rewrite, neighbour, ratio = [], [], []
    for case in cases:
        prompts = [p.prompt for p in case.probes.get("neighbor", ())]
        if not prompts:
            continue
        r = case.request
        before = [block_output(model, tok, path, p) for p in [r.prompt, *prompts]]
        undo = UndoLog()
        try:
            editor.apply(model, tok, [r], undo)
            after = [block_output(model, tok, path, p) for p in [r.prompt, *prompts]]
        finally:
            undo.restore()
        j = subject_last_index(tok, r.prompt, r.subject)
        rw = ((after[0][j] - before[0][j]).norm() / before[0][j].norm()).item()
        nb = [((a - b).norm(dim=-1)[1:] / b.norm(dim=-1)[1:]).max().item()
              for a, b in zip(after[1:], before[1:], strict=True)]
        rewrite.append(rw)
        neighbour.extend(nb)
        ratio.append(statistics.mean(nb) / rw)
    if not rewrite:
        raise SystemExit(f"none of the first {n_cases} cases of {data} has neighbourhood prompts; raise --cases")
    return {"config": config, "layer": editor.hp.layer, "cases": len(rewrite), "neighbour_prompts": len(neighbour),
            "rewrite_rel_change": statistics.mean(rewrite), "neighbour_max_rel_change": statistics.mean(neighbour),
            "neighbour_over_rewrite": statistics.mean(ratio),
            "share_neighbour_rel_change_over_0.1": sum(x > 0.1 for x in neighbour) / len(neighbour)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="ROME configs (configs/<model>/rome.yaml)")
    parser.add_argument("--cases", type=int, default=20, help="first N dataset cases (those with neighbours count)")
    parser.add_argument("--data", default=str(default_data_root() / "counterfact_mix" / "dev.json"))
    parser.add_argument("--out", default="benchmarks/results/edit_leakage.json")
    args = parser.parse_args()
    rows = [leakage(c, args.data, args.cases) for c in args.configs]
    result: dict[str, object] = {"runs": rows}
    if len(rows) == 2:
        result["neighbour_change_first_over_second"] = (rows[0]["neighbour_max_rel_change"]
                                                        / rows[1]["neighbour_max_rel_change"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""``kelight analyze drift|substitution|patching|heads --config C [--model.* ...] [--data.* ...] --out DIR``.

The edit is described exactly as for ``kelight fit``: the same config files and ``--model.*`` /
``--data.*`` overrides (a ``trainer:`` section is accepted and ignored). Each analysis writes
``<name>.json``, ``<name>.png`` and the resolved ``config.yaml`` into ``--out``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile
from lightning.pytorch.cli import LightningArgumentParser

from kelight.data import EditDataModule
from kelight.methods.base import EditModule

log = logging.getLogger(__name__)
ANALYSES = ("drift", "substitution", "patching", "heads")


def _int_list(text: str) -> list[int]:
    """``"3:10"`` (range) or ``"3,4,5"``."""
    try:
        if ":" in text:
            lo, hi = text.split(":")
            return list(range(int(lo), int(hi)))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected --layers as 'lo:hi' or 'a,b,c', got {text!r}; e.g. --layers 5:30") from None


def build_parser(name: str) -> LightningArgumentParser:
    """The parser of ``kelight analyze <name>``: model/data like ``kelight fit``, plus its own options."""
    parser = LightningArgumentParser(prog=f"kelight analyze {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile, help="a fit config: configs/<model>/<method>.yaml")
    parser.add_lightning_class_args(EditModule, "model", subclass_mode=True, required=True)
    parser.add_lightning_class_args(EditDataModule, "data")
    parser.add_argument("--seed_everything", type=int | bool | None, default=0)
    parser.add_argument("--trainer", type=dict | None, default=None, help="ignored (configs share it with fit)")
    parser.add_argument("--out", type=str, required=True, help="output directory")
    parser.add_argument("--title", type=str, default="", help="plot title (default: method and γ)")
    if name in ("drift", "patching"):
        default = "distracted_neighbor,relation" if name == "drift" else "neighbor,distracted_neighbor,relation"
        parser.add_argument("--tasks", type=str, default=default, help="comma-separated specificity tasks")
    if name == "drift":
        parser.add_argument("--layers", type=str | None, default=None, help="layers to sum over, e.g. 5:30")
    if name in ("substitution", "patching"):
        parser.add_argument("--window", type=int, default=6 if name == "substitution" else 10)
    if name == "substitution":
        parser.add_argument("--case", type=int, default=0, help="index of the case among the selected data")
        parser.add_argument("--task", type=str, default="distracted_neighbor")
        parser.add_argument("--prompt", type=int, default=0, help="index of the prompt within the task")
        parser.add_argument("--kinds", type=str, default="attn,mlp,block")
    return parser


def _title(module: EditModule) -> str:
    editor = module.hparams.get("editor")
    parts = [type(module).__name__, str(module.hparams.get("model_name"))]
    parts += [f"{k}={getattr(editor, k)}" for k in ("sadr_gamma", "steps", "layer") if hasattr(editor, k)]
    return " ".join(parts)


def _dispatch(name: str, cfg, module, editor, cases, out: Path) -> dict:
    from kelight.analysis import drift, heads, patching, substitution  # noqa: PLC0415
    from kelight.analysis.common import editor_edit  # noqa: PLC0415

    model, tok, edit = module.lm, module.tok, editor_edit(editor)
    title = cfg.title or _title(module)
    if name == "drift":
        layers = _int_list(cfg.layers) if cfg.layers else None
        return drift.run_drift(model, tok, cases, edit, out, title, tasks=cfg.tasks.split(","), layers=layers)
    if name == "patching":
        return patching.run_patching(model, tok, cases, edit, out, title, tasks=cfg.tasks.split(","),
                                     window=cfg.window)
    if name == "substitution":
        if not 0 <= cfg.case < len(cases):
            raise ValueError(f"expected --case in 0..{len(cases) - 1} (the selected data has {len(cases)} cases), "
                             f"got {cfg.case}; pick another case or select more data (--data.limit)")
        return substitution.run_substitution(model, tok, cases[cfg.case], edit, out, title, task=cfg.task,
                                             prompt_index=cfg.prompt, window=cfg.window,
                                             kinds=cfg.kinds.split(","))
    return heads.run_heads(model, tok, cases, edit, heads.sadr_term(editor), out, title)


def main(argv: list[str]) -> dict:
    """Run ``kelight analyze <name> ...``; returns the analysis result."""
    if not argv or argv[0] not in ANALYSES:
        raise SystemExit(f"usage: kelight analyze {{{'|'.join(ANALYSES)}}} --config C --out DIR [options]; "
                         f"`kelight analyze drift --help` lists the options")
    name = argv[0]
    parser = build_parser(name)
    cfg = parser.parse_args(argv[1:])
    init = parser.instantiate(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    parser.save(cfg, out / "config.yaml", overwrite=True)
    seed = cfg.seed_everything
    torch.manual_seed(seed if isinstance(seed, int) and not isinstance(seed, bool) else 0)
    module, data = init.model, init.data
    module.configure_model()
    editor = module.build_editor()
    editor.setup(module.lm, module.tok)
    data.setup()
    result = _dispatch(name, cfg, module, editor, data.cases, out)
    log.info("wrote %s/%s.json and %s.png", out, name, name)
    return result

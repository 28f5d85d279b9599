"""``kelight fit|validate --config ...``: LightningCLI over the edit modules and the data module.

W&B logs offline by default (``WANDB_MODE=offline`` unless the user set it); each run's files
(``metrics.json``, ``cases.jsonl``, ``config.yaml``, ``wandb/``) live in ``trainer.default_root_dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import os
import re
import signal
import sys
import time
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from kelight.data import EditDataModule
from kelight.methods.base import EditModule
from kelight.methods.distributed import EditDDPStrategy
from kelight.methods.registry import METHODS, method_of_module
from kelight.runs.merge import merge_runs
from kelight.runs.report import report
from kelight.types import EditInputError

_TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "logger": False,
    "accelerator": "auto",
    "devices": 1,
}


class KelightCLI(LightningCLI):
    """LightningCLI that gives every run its own directory and a W&B logger inside it."""

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        if not cfg.trainer.get("default_root_dir"):
            cfg.trainer.default_root_dir = str(default_run_dir())
        self._use_wandb = cfg.trainer.get("logger") in (None, False, True) and self._wandb_wanted()

    @staticmethod
    def _wandb_wanted() -> bool:
        return os.environ.get("WANDB_MODE", "offline") != "disabled"

    def instantiate_trainer(self, **kwargs):
        root = self.config[self.subcommand].trainer.default_root_dir
        if self._use_wandb:
            from lightning.pytorch.loggers import WandbLogger  # noqa: PLC0415

            Path(root).mkdir(parents=True, exist_ok=True)
            logger = WandbLogger(project=os.environ.get("WANDB_PROJECT", "kelight"), save_dir=root)
            # Lightning passes anonymous=None to wandb.init, which wandb >= 0.19 answers with a deprecation
            # warning on every run; the setting has no effect, so it is not passed at all.
            logger._wandb_init.pop("anonymous", None)
            kwargs["logger"] = logger
        if self.config[self.subcommand].trainer.get("strategy") == "ddp":
            kwargs["strategy"] = EditDDPStrategy()  # DDP processes without the gradient wrapper
        return super().instantiate_trainer(**kwargs)

    def _finish_wandb(self) -> None:
        wandb = sys.modules.get("wandb")
        if wandb is not None and wandb.run is not None:
            wandb.finish()

    after_fit = after_validate = after_test = _finish_wandb


def default_run_dir() -> Path:
    """``runs/<sweep id>/<run id>`` under a W&B agent (two agents may start in the same second),
    else ``runs/<timestamp>``."""
    sweep, run = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if sweep and run:
        return Path("runs") / sweep / run
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


# Lightning warnings that are expected for edit runs (frozen eval-mode model, no optimiser, text
# batches, one case per step) and only bury the results table.
_EXPECTED_WARNINGS = (
    r".*configure_optimizers.*returned `None`.*",
    r".*overridden `transfer_batch_to_device`.*",
    r".*module\(s\) in eval mode at the start of training.*",
    r".*does not have many workers.*",
    r".*smaller than the logging interval.*",
    r".*LightningCLI's args parameter is intended to run from within Python.*",  # main() passes argv on
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning's own use of a torch 2.13 deprecation
)


def _quiet_expected_warnings() -> None:
    for pattern in _EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_no_tips)


def _no_tips(record: logging.LogRecord) -> bool:
    """Drop Lightning's advertisements ("Tip: ... try installing ...") from the run's output."""
    return "Tip:" not in record.getMessage()


def _environment_defaults() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    for key, value in {"WANDB_SILENT": "true", "WANDB_CONSOLE": "off", "WANDB_X_DISABLE_STATS": "true",
                       "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
                       "WANDB_ERROR_REPORTING": "false", "HF_DATASETS_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)


# Subcommands that are not LightningCLI runs, imported when used: module with a ``main(argv)``.
_TOOLS = {"sweep": "kelight.cli.sweep", "analyze": "kelight.cli.analyze"}
# Subcommands that read finished run directories: usage and the least number of arguments.
_FILE_TOOLS = {
    "report": ("RUN_DIR [RUN_DIR ...]   (one Markdown row per run's metrics.json)", 1),
    "merge": ("OUT_DIR RUN_DIR RUN_DIR [...]   (join runs of one config on disjoint cases, e.g. --data.skip; "
              "metrics recomputed from cases.jsonl)", 3),
    "compare": ("BASE_DIR RUN_DIR [RUN_DIR ...]   (each run − the base per score over their common cases, with "
                "paired case-bootstrap 95% intervals)", 2),
    "curve": ("OUT.png RUN_DIR [RUN_DIR ...]   (scores against edits in place from each run's sequential.jsonl, "
              "written by --model.eval_every N)", 2),
    "gap": ("RUN_DIR [RUN_DIR ...] [--examples K]   (teacher-forced − generated-answer score per score of runs "
            "with --model.eval_protocol both, paired case-bootstrap 95% intervals, and K missed answers each)", 1),
}


_OVERVIEW = "".join([
    "usage: kelight SUBCOMMAND ...\n\n",
    "  fit       --config C [--data.path P] [--data.limit N] [--trainer.default_root_dir D]\n",
    "            [--model.editor.KEY V ...] [--model.KEY V ...]   (the method's options, the run's options)\n",
    "            edit the cases and evaluate each edit; writes D/metrics.json and D/cases.jsonl\n",
    f"            (`kelight fit --model.help kelight.ROME` lists a method's options; the methods: "
    f"{', '.join(m.module.__name__ for m in METHODS.values())})\n",
    "  validate  the same arguments: evaluate the unedited model with the same output contract\n",
    *(f"  {name:<9} {usage}\n" for name, (usage, _) in _FILE_TOOLS.items()),
    "  sweep     SPEC --count N [-- FIT ARGS]   (a W&B sweep, offline by default; `kelight sweep --help`)\n",
    "  analyze   drift|substitution|patching|heads --config C --out DIR   (plots; `kelight analyze drift --help`)\n",
    "\nConfigs: configs/smollm2/*.yaml, configs/gemma3/*.yaml (one per method, e.g. rome_sadr.yaml).\n",
])


def _examples_option(args: list[str]) -> tuple[int, list[str]]:
    """``--examples K`` (default 2) and the other arguments of ``kelight gap``."""
    if "--examples" not in args:
        return 2, args
    at = args.index("--examples")
    value = args[at + 1] if at + 1 < len(args) else ""
    if not value.isdigit():
        raise ValueError(f"--examples expects a whole number of answers to quote (0 for none), "
                         f"got {value!r}")
    rest = args[:at] + args[at + 2 :]
    if not rest:
        raise ValueError("expected at least one RUN_DIR besides --examples K")
    return int(value), rest


def _file_tool(name: str, args: list[str]) -> None:
    """``kelight report`` / ``merge`` / ``compare`` / ``curve`` / ``gap``: read run directories; errors are one
    line, not tracebacks."""
    usage, n_min = _FILE_TOOLS[name]
    usage = f"usage: kelight {name} {usage}"
    if any(a in ("-h", "--help") for a in args):
        sys.stdout.write(usage + "\n")
        return
    if len(args) < n_min:
        raise SystemExit(usage)
    try:
        if name == "report":
            sys.stdout.write(report(args) + "\n")
        elif name == "compare":
            from kelight.runs.compare import compare_report  # noqa: PLC0415

            sys.stdout.write(compare_report(args) + "\n")
        elif name == "gap":
            from kelight.runs.gap import gap_report  # noqa: PLC0415

            examples, dirs = _examples_option(args)
            sys.stdout.write(gap_report(dirs, examples) + "\n")
        elif name == "curve":
            from kelight.runs.curves import curve_report  # noqa: PLC0415 (matplotlib only for this tool)

            sys.stdout.write(curve_report(args[0], args[1:]) + "\n")
        else:
            path = merge_runs(args[0], args[1:])
            sys.stdout.write(f"wrote {path}\n{report([args[0]])}\n")
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"kelight {name}: {err}") from None


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``kelight`` console script (``fit``, ``validate``, ``report DIR...``, ``merge OUT DIR...``,
    ``curve OUT.png DIR...``, ``compare BASE DIR...``, ``gap DIR...``,
    ``sweep SPEC --count N``, ``analyze drift|substitution|patching|heads ...``).

    Returns ``None`` so that the console script exits with status 0 (``sys.exit(main())``); a run stopped by
    SIGTERM exits with 143 (128 + 15) after the run's last line says what it kept (Lightning's own handler would
    exit 0), one stopped by Ctrl-C with Lightning's 1.
    """
    argv = sys.argv[1:] if args is None else list(args)
    debug = "--debug" in argv or os.environ.get("KELIGHT_DEBUG", "0") not in ("", "0")
    try:
        run([a for a in argv if a != "--debug"])
    except SIGTERMException:
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as err:
        problem = user_error(err, argv)
        if problem is None or debug:
            raise
        sys.stderr.write(f"kelight: error: {problem}\n(for the traceback: add --debug or set KELIGHT_DEBUG=1)\n")
        raise SystemExit(2) from None


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from, outermost first."""
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def user_error(err: BaseException, argv: list[str] = ()) -> str | None:
    """The one-line message of a user's mistake behind ``err`` (wrapped by the argument parser or Lightning), or
    ``None`` for anything else (a bug, whose traceback is shown).

    A user's mistake is an :class:`~kelight.types.EditInputError` (a bad option, record, request or model name),
    a path that does not exist, or an argument the parser refused (an unknown key, a value of the wrong type, a
    ``--config`` file that is not YAML; ``argv`` names that file).
    """
    chain = _chain(err)
    for cause in chain:
        if isinstance(cause, EditInputError | FileNotFoundError):
            return str(cause)
    if not any(isinstance(cause, argparse.ArgumentError) for cause in chain):
        return None
    deepest = str(chain[-1]).strip().splitlines()[0]
    if "Problems parsing config" in str(err):
        configs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == "--config"]
        detail = " ".join(line.strip() for line in str(chain[-1]).splitlines()).replace('in "<unicode string>", ', "")
        return f"--config {' '.join(configs)}: not valid YAML ({detail}); fix the file"
    keys = list(dict.fromkeys(m.group(1) for c in chain if (m := re.match(r'Parser key "([\w.]+)"', str(c).strip()))))
    method = next((m.group(1) for c in chain if (m := re.search(r"class_path '([\w.]+)'", str(c)))), None)
    where = f"--{keys[0]}.{keys[-1]}" if len(keys) > 1 else (f"--{keys[0]}" if keys else None)
    hint = f" (the options of {method}: kelight fit --model.help {method})" if method else ""
    return f"{where or method or 'arguments'}: {deepest}{hint}{_moved_option_hint(deepest, method)}"


def _moved_option_hint(message: str, class_path: str | None) -> str:
    """For a method option given at its pre-2026-12-07 key (``--model.layer``): where it lives now."""
    refused = re.search(r"Option '(\w+)' is not accepted", message)
    if not refused or not class_path:
        return ""
    try:
        method = method_of_module(class_path)
    except EditInputError:  # not a method's module
        return ""
    name = refused.group(1)
    if name not in {field.name for field in dataclasses.fields(method.hparams)}:
        return ""
    return f"; method options are under --model.editor since 2026-12-07: use --model.editor.{name}"


def run(args: list[str] | None = None) -> KelightCLI | None:
    """Parse ``args`` (default: ``sys.argv[1:]``) and run; returns the CLI (``None`` for the other tools)."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] and argv[0] in _TOOLS:  # `kelight sweep ...`, `kelight analyze ...`
        _environment_defaults()
        _quiet_expected_warnings()
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        importlib.import_module(_TOOLS[argv[0]]).main(argv[1:])
        return None
    if argv[:1] and argv[0] in _FILE_TOOLS:
        _file_tool(argv[0], argv[1:])
        return None
    if not argv or argv[0] in ("-h", "--help"):  # LightningCLI's own help knows only fit/validate/test/predict
        sys.stdout.write(_OVERVIEW)
        if not argv:
            raise SystemExit(2)
        return None
    _environment_defaults()
    _quiet_expected_warnings()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return KelightCLI(
        EditModule,
        EditDataModule,
        subclass_mode_model=True,
        trainer_defaults=_TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False},  # errors reach main(), which prints them as one line
        args=argv,
        auto_configure_optimizers=False,
        # the modules get their `editor` hyper-parameters as the dataclass, not as Lightning's copy of the config
        # (a dict); runs are not resumed from Lightning checkpoints
        load_from_checkpoint_support=False,
    )

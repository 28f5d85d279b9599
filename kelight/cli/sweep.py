"""``kelight sweep``: the spec's parameters are checked against its method's options (resolved through the
registry) before the first trial starts; then :func:`kelight.runs.sweep.main` runs the sweep."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping

from kelight.files import read_yaml
from kelight.methods.base import EditModule
from kelight.methods.registry import method_of_module
from kelight.runs import sweep
from kelight.types import EditInputError


def check_parameters(spec_path: str) -> None:
    """Refuse a spec whose ``model.*`` parameters are not options of the method its ``--config`` names (every
    trial would fail on the unknown key); ``data.*``/``trainer.*`` parameters are left to the trials.

    Raises:
        EditInputError: naming the parameter, the method and where its options are listed.
    """
    spec = sweep.load_spec(spec_path)
    command = [str(part) for part in spec["command"]]
    if "--config" not in command[:-1]:
        return
    config = read_yaml(command[command.index("--config") + 1], "fix the config the sweep's command names")
    class_path = config.get("model", {}).get("class_path") if isinstance(config, Mapping) else None
    if not class_path:
        return
    method = method_of_module(class_path)
    editor = {field.name for field in dataclasses.fields(method.hparams)}
    run = set(inspect.signature(EditModule.__init__).parameters) | set(inspect.signature(method.module).parameters)
    for name in spec.get("parameters") or {}:
        key, known = (name.removeprefix("model.editor."), editor) if name.startswith("model.editor.") else (
            name.removeprefix("model."), run - {"editor", "self", "kwargs"})
        if name.startswith("model.") and key not in known:
            where = "model.editor." if known is editor else "model."
            moved = (f"; since 2026-12-07 method options are model.editor.*: use 'model.editor.{key}'"
                     if known is not editor and key in editor else "")
            raise EditInputError(f"{spec_path}: parameter {name!r} is not an option of {method.name} ({class_path}); "
                                 f"its options are {where}{{{', '.join(sorted(known))}}} (kelight fit --model.help "
                                 f"{class_path}){moved}")


def main(argv: list[str]) -> dict | None:
    """``kelight sweep SPEC ...`` (:func:`kelight.runs.sweep.main`), after :func:`check_parameters`."""
    spec = next((arg for arg in argv if not arg.startswith("-")), None)
    if spec is not None and "-h" not in argv and "--help" not in argv:
        try:
            check_parameters(spec)
        except (OSError, ValueError) as err:
            raise SystemExit(f"kelight sweep: {err}") from None
    return sweep.main(argv)

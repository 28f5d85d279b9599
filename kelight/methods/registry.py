"""One table from a method's name to its pieces: hyper-parameters, editor and LightningModule.

The Python API (:func:`kelight.edit`, :class:`kelight.EditSession`), the command line's overview and
``kelight sweep``'s check of a spec resolve methods here; nothing else dispatches on method names. Adding a
method adds one line to :data:`METHODS` (docs/design.md, "Adding an editor").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from kelight.editors.alphaedit import AlphaEditHParams, AlphaEditor
from kelight.editors.base import Editor
from kelight.editors.ft import FTEditor, FTHParams
from kelight.editors.memit import MemitEditor, MemitHParams, PmetEditor, PmetHParams
from kelight.editors.pathedit import PathEditor, PathHParams
from kelight.editors.rome import RomeEditor, RomeHParams
from kelight.editors.ultraedit import UltraEditHParams, UltraEditor
from kelight.methods.alphaedit import AlphaEdit
from kelight.methods.base import EditModule
from kelight.methods.ft import FT
from kelight.methods.memit import MEMIT, PMET
from kelight.methods.pathedit import PathEdit
from kelight.methods.rome import ROME
from kelight.methods.ultraedit import UltraEdit
from kelight.types import EditInputError


@dataclass(frozen=True)
class Method:
    """A method's pieces.

    Attributes:
        name: its name in the API and the docs (``"rome"``); its configs are ``configs/<model>/<name>.yaml``.
        hparams: its hyper-parameter dataclass (``--model.editor.*``).
        editor: builds its editor from the hyper-parameters.
        module: its LightningModule (``class_path`` of its configs).
    """

    name: str
    hparams: type
    editor: Callable[[Any], Editor]
    module: type[EditModule]

    def build_hparams(self, **options: object) -> Any:
        """The hyper-parameters from flat keywords (``layer=4, steps=20, sadr_gamma=0.01``), as the API takes
        them; lists are turned into the tuples the dataclasses hold.

        Raises:
            EditInputError: naming any option the method does not have, with the ones it has.
        """
        names = [field.name for field in dataclasses.fields(self.hparams)]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise EditInputError(f"unknown {self.name} option(s) {unknown}; valid options: {sorted(names)}")
        values = {k: _as_tuples(v) for k, v in options.items()}
        return self.hparams(**values)


def _as_tuples(value: object) -> object:
    """Lists (e.g. ``layers=[2, 3]``, ``context_templates=[[5, 10]]``) as tuples, recursively."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


METHODS: Mapping[str, Method] = MappingProxyType({method.name: method for method in (
    Method("rome", RomeHParams, RomeEditor, ROME),
    Method("memit", MemitHParams, MemitEditor, MEMIT),
    Method("pmet", PmetHParams, PmetEditor, PMET),
    Method("alphaedit", AlphaEditHParams, AlphaEditor, AlphaEdit),
    Method("ft", FTHParams, FTEditor, FT),
    Method("pathedit", PathHParams, PathEditor, PathEdit),
    Method("ultraedit", UltraEditHParams, UltraEditor, UltraEdit),
)})


def method(name: str) -> Method:
    """The method called ``name`` (case-insensitive).

    Raises:
        EditInputError: an unknown name, with the known ones.
    """
    found = METHODS.get(str(name).lower())
    if found is None:
        raise EditInputError(f"unknown method {name!r}; expected one of {list(METHODS)}")
    return found


def method_of_module(module: type | str) -> Method:
    """The method whose LightningModule is ``module`` (a class, or its ``class_path`` such as ``kelight.ROME``).

    Raises:
        EditInputError: a class that is no method's.
    """
    name = module if isinstance(module, str) else module.__name__
    for candidate in METHODS.values():
        if name.rsplit(".", 1)[-1] == candidate.module.__name__:
            return candidate
    raise EditInputError(f"{name!r} is not the LightningModule of a kelight method; expected one of "
                         f"{[f'kelight.{m.module.__name__}' for m in METHODS.values()]}")

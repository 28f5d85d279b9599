"""kelight: knowledge editing of language models with PyTorch Lightning.

Example:
    >>> import kelight
    >>> model, tok = kelight.load("smollm2-135m")  # doctest: +SKIP
    >>> req = kelight.EditRequest("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris")
    >>> model, undo = kelight.edit(model, tok, req, method="rome")  # doctest: +SKIP
    >>> undo.restore()  # doctest: +SKIP
"""

from kelight.api import EditSession, edit, evaluate, load_cases, unedited_predictions
from kelight.methods import FT, MEMIT, PMET, ROME, AlphaEdit, EditModule, PathEdit, UltraEdit
from kelight.models.loading import load
from kelight.types import EditCase, EditInputError, EditRequest

__all__ = ["FT", "MEMIT", "PMET", "ROME", "AlphaEdit", "EditCase", "EditInputError", "EditModule", "EditRequest",
           "EditSession", "PathEdit", "UltraEdit", "edit", "evaluate", "load", "load_cases", "unedited_predictions"]
__version__ = "0.1.0"

"""The methods as LightningModules, one module per method (the names of :mod:`kelight.editors` and ``configs/``).

:class:`~kelight.methods.base.EditModule` is the experiment loop they share (regimes, evaluation, the output
contract); :mod:`kelight.methods.registry` maps each method's name to its pieces.
"""

from kelight.methods.alphaedit import AlphaEdit
from kelight.methods.base import EditModule
from kelight.methods.ft import FT
from kelight.methods.memit import MEMIT, PMET
from kelight.methods.pathedit import PathEdit
from kelight.methods.rome import ROME
from kelight.methods.ultraedit import UltraEdit

__all__ = ["FT", "MEMIT", "PMET", "ROME", "AlphaEdit", "EditModule", "PathEdit", "UltraEdit"]

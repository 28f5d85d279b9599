"""The hyper-parameters every locate-then-edit editor shares (ROME, MEMIT, PMET, AlphaEdit), declared once.

Each method's dataclass (:class:`~kelight.editors.rome.RomeHParams`, ...) extends :class:`LocateHParams` with its
own fields; the LightningModules take it as one argument (``--model.editor.*`` on the command line, the
``editor:`` block of a config), and :func:`kelight.edit` builds it from flat keywords. So an option, its
default, its bound and its help are written here once and reach the CLI, the YAML configs and the API.
"""

from __future__ import annotations

from dataclasses import dataclass

from kelight.checks import check_context_templates, check_count

# CompileMode/StopOn: jsonargparse resolves the string annotations of every inherited field in the namespaces of
# the first-base chain only (RomeHParams -> LocateHParams -> SadrOptions), which misses ZConfig's module; without
# them here all fields of the subclasses go unvalidated on the CLI (and a YAML default 'off' reads as false).
from kelight.editors.locate.zopt import CompileMode, StopOn, ZConfig  # noqa: F401
from kelight.objectives.sadr import SadrOptions


@dataclass(frozen=True)
class LocateHParams(SadrOptions, ZConfig):
    """The value-vector optimisation (the fields of :class:`~kelight.editors.locate.zopt.ZConfig`), SADR's
    options, the context templates and the key statistics.

    Attributes:
        context_templates: ``[length, count]`` pairs of model-sampled prefixes the rewrite prompt is also
            optimised behind (ROME: [[5, 10], [10, 10]]; MEMIT: [[10, 5]]); ``[]``: the plain prompt only.
        mom2_n_tokens: corpus tokens for the key second moment C.
        mom2_corpus: where C's texts come from: ``null`` (WikiText-2 of the shared data folder when found, else
            text sampled from the model), ``model``, ``wikitext2``, a .txt/.json/.jsonl file, or a ``datasets``
            hub name (:func:`~kelight.editors.stats.corpus.as_corpus`).
        seed: seed of the context-template sampling.
    """

    context_templates: tuple[tuple[int, int], ...] = ((5, 10), (10, 10))
    mom2_n_tokens: int = 100_000
    mom2_corpus: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        ZConfig.__post_init__(self)
        SadrOptions.__post_init__(self)
        object.__setattr__(self, "context_templates", check_context_templates(self.context_templates))
        check_count("mom2_n_tokens", self.mom2_n_tokens)
        check_count("seed", self.seed, low=0)

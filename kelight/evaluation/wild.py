"""The wild evaluation protocol's model side: options, the prompts answered, batched answers, judged cases.

``eval_protocol`` (``--model.eval_protocol``) chooses ``teacher_forced`` (the default: likelihoods of the
targets, no generation), ``wild`` (generated answers) or ``both``. Under ``wild`` every probe prompt of a group
with a wild score (:data:`~kelight.types.WILD_GROUPS`) is framed by ``WILD_TEMPLATES[wild_template]`` and answered
greedily up to its natural end (:func:`kelight.lm.generation.greedy_answers`): no target token is fed and the
answer is not cut to the target's length. Answers are generated for many prompts at once, across cases where
several are evaluated on one model state (:func:`generate_answers`) or several edits replayed on their own rows
(:func:`replayed_answers`), and judged per case (:func:`judge_case`,
with the rules of :mod:`kelight.evaluation.judge`). The answers of the unedited model that the neighbourhood and
locality judgments compare with are part of the pre-edit reference
(:func:`kelight.evaluation.scoring.locality_reference`, key ``"wild"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.evaluation.judge import WildAnswer, judge
from kelight.lm.generation import greedy_answers
from kelight.types import WILD_GROUPS, EditCase, EditInputError, TokenProbe

WILD = "wild"  # the pre-edit reference's key of the unedited model's answers (framed prompt -> answer)
EvalProtocol = Literal["teacher_forced", "wild", "both"]
EVAL_PROTOCOLS: tuple[str, ...] = ("teacher_forced", "wild", "both")
#: How a probe prompt is framed for its generated answer: the bare prompt (WILD's default, "question only"),
#: or WILD's question-answering instruction ("qa_inst").
WILD_TEMPLATES: Mapping[str, str] = MappingProxyType(
    {"bare": "{prompt}", "qa": "Please answer the question:\n\nQ: {prompt}\nA:"}
)


@dataclass(frozen=True)
class WildConfig:
    """How the wild protocol generates answers.

    Attributes:
        template: a key of :data:`WILD_TEMPLATES` (``--model.wild_template``).
        max_new_tokens: the cap on an answer's tokens (``--model.wild_max_new_tokens``; WILD's is 50, but an
            answer rarely needs more than a few words before its natural end).
        batch_size: prompts per generation batch.

    Raises:
        ValueError: an unknown template, or a count below 1 (named as its ``wild_*`` option).
    """

    template: str = "bare"
    max_new_tokens: int = 32
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.template not in WILD_TEMPLATES:
            raise EditInputError(f"expected wild_template to be one of {list(WILD_TEMPLATES)}, got {self.template!r}")
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EditInputError(f"expected wild_{name} to be an integer >= 1, got {value!r}")

    def frame(self, prompt: str) -> str:
        """The text the model continues for ``prompt``."""
        return WILD_TEMPLATES[self.template].format(prompt=prompt)


def check_eval_protocol(eval_protocol: str, wild_template: str = "bare", wild_max_new_tokens: int = 32) -> WildConfig:
    """Validate the evaluation options where they enter (CLI, API); returns the :class:`WildConfig`.

    Raises:
        ValueError: naming the option, the values it takes and the value given.
    """
    if eval_protocol not in EVAL_PROTOCOLS:
        raise EditInputError(f"expected eval_protocol to be one of {list(EVAL_PROTOCOLS)} (teacher_forced: likelihoods "
                         f"of the targets; wild: generated answers; both), got {eval_protocol!r}")
    return WildConfig(template=wild_template, max_new_tokens=wild_max_new_tokens)


def wild_probes(case: EditCase, reference_only: bool = False) -> list[tuple[str, str, str]]:
    """``(group, prompt, target)`` of every probe the wild protocol answers (:data:`~kelight.types.WILD_GROUPS`;
    the target is the right one, o_edit for the groups whose answers should avoid it), probe groups first.
    ``reference_only``: only the groups compared with the unedited model's answers."""
    out = []
    for group, prompts in (*case.probes.items(), *case.token_probes.items()):
        kind = WILD_GROUPS.get(group, ("", None))[1]
        if kind is None or (reference_only and kind == "gives"):
            continue
        for p in prompts:
            target = p.target if isinstance(p, TokenProbe) else p.wrong if kind == "avoids" else p.right
            out.append((group, p.prompt, target))
    return out


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, cases: Sequence[EditCase], wild: WildConfig,
    answers: dict[str, str] | None = None, reference_only: bool = False,
) -> dict[str, str]:
    """The model's greedy answers to the cases' wild prompts, framed by ``wild.template`` (framed prompt ->
    answer), generated across cases in batches of ``wild.batch_size``.

    Args:
        model: the model as it is now.
        tok: its tokenizer.
        cases: the cases whose prompts are answered (each distinct framed prompt once).
        wild: template, token cap, batch size.
        answers: answers of this same model (and template) already generated; reused, and extended in place.
        reference_only: only the prompts of the groups compared with the unedited model's answers.
    """
    answers = {} if answers is None else answers
    framed = dict.fromkeys(wild.frame(p) for case in cases for _, p, _ in wild_probes(case, reference_only))
    missing = [p for p in framed if p not in answers]
    if missing:
        answers.update(zip(missing, greedy_answers(model, tok, missing, wild.max_new_tokens, wild.batch_size),
                           strict=True))
    return answers


@torch.no_grad()
def replayed_answers(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, cases: Sequence[EditCase], wild: WildConfig,
    changes: Mapping[str | int, Mapping[nn.Module, torch.Tensor]],
) -> dict[str | int, dict[str, str]]:
    """Each case's answers to its wild prompts (case id -> framed prompt -> answer) on the model with the case's
    own weight changes added on its rows (:func:`~kelight.lm.generation.greedy_answers` ``changes``): the
    single-edit regime's edited models, each restored before the next edit, answered together afterwards in
    batches of ``wild.batch_size`` prompts across the cases.

    Args:
        model: the unedited model.
        tok: its tokenizer.
        cases: the cases, each with an entry in ``changes``.
        wild: template, token cap, batch size.
        changes: each case's weight changes (:func:`~kelight.lm.hooks.linear_weight_changes`).
    """
    ids = [case.case_id for case in cases]
    prompts = [(k, framed) for k, case in enumerate(cases)
               for framed in dict.fromkeys(wild.frame(p) for _, p, _ in wild_probes(case))]
    answers = greedy_answers(model, tok, [framed for _, framed in prompts], wild.max_new_tokens, wild.batch_size,
                             changes=[changes[i] for i in ids], groups=[k for k, _ in prompts]) if prompts else []
    out: dict[str | int, dict[str, str]] = {i: {} for i in ids}
    for (k, framed), answer in zip(prompts, answers, strict=True):
        out[ids[k]][framed] = answer
    return out


def _unedited_answers(case: EditCase, pre_edit: Mapping[str, object] | None, wild: WildConfig) -> dict[str, str]:
    """The unedited model's answers the case's wild scores compare with, checked to cover every such prompt."""
    needed = [wild.frame(p) for _, p, _ in wild_probes(case, reference_only=True)]
    reference = (pre_edit or {}).get(WILD) or {}
    missing = [p for p in needed if p not in reference]
    if missing:
        raise EditInputError(
            f"case {case.case_id!r}: expected the unedited model's answers to its {len(needed)} neighbourhood/"
            f"locality prompts (framed with wild_template {wild.template!r}), got none for {len(missing)} of them, "
            f"e.g. {missing[0]!r}; call locality_reference(model, tok, case, protocol='wild', wild=...) with the "
            f"same wild settings before the edit and pass it as pre_locality"
        )
    return reference


def judge_case(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, case: EditCase, pre_edit: Mapping[str, object] | None,
    wild: WildConfig, answers: dict[str, str] | None,
) -> tuple[WildAnswer, ...]:
    """Generate (or reuse) the answer to every wild prompt of the case and judge it.

    Args:
        model: the model to evaluate.
        tok: its tokenizer.
        case: the case.
        pre_edit: the case's pre-edit reference (:func:`kelight.evaluation.scoring.locality_reference`), whose
            ``"wild"`` answers the neighbourhood/locality judgments compare with.
        wild: how answers are generated.
        answers: answers of this model already generated (:func:`generate_answers`), reused and extended.

    Raises:
        ValueError: ``pre_edit`` lacks an unedited answer a judgment needs.
    """
    probes = wild_probes(case)
    if not probes:
        return ()
    unedited = _unedited_answers(case, pre_edit, wild)
    answers = generate_answers(model, tok, [case], wild, answers)
    return tuple(judge(group, prompt, target, answers[wild.frame(prompt)],
                       unedited[wild.frame(prompt)] if WILD_GROUPS[group][1] != "gives" else None)
                 for group, prompt, target in probes)

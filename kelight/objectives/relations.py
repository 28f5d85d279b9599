"""Relation preservation: keep the subject's *other* facts while the value vector z is optimised.

After ROME/MEMIT edit "Isabel May's country of citizenship → X", most other questions about Isabel
May answer X too (the SADR paper's Relation task, RS; "editing overfit" in Zhang et al., ICLR 2025;
"knowledge distortion" in Li et al., ICLR 2024). ROME's essence term already holds one prompt about
the subject still (``"{subject} is a"``, weight ω). This term holds ``N`` questions about the subject's
other relations still, with their own weight λ.

Math. For a request ``(s, r, o_true → o_edit)`` let ``p_1 … p_N`` be the first ``N`` templates of
:data:`RELATION_TEMPLATES` that do not ask for the edited relation ``r``, filled with ``s``
(:func:`relation_prompts`). With z added at the subject's last token of each ``p_j``, exactly as in the
rewriting prompts (ROME: the MLP output at the edit layer; MEMIT/PMET/AlphaEdit: the value module at
the last layer of R), and ``P_z(· | p_j)`` the next-token distribution at ``p_j``'s last position:

    L_rel(z) = 1/N · Σ_j KL( P_z(· | p_j) ‖ P_0(· | p_j) )

``P_0`` is recorded once per request at step 0, where z = 0, so ``L_rel(0) = 0`` exactly and the
term only pulls z back where it moves another relation's answer (the direction of ROME's essence
KL: it is largest where z puts mass on tokens the unedited model found unlikely for that question,
as o_edit for an unrelated relation). The z objective of each request becomes

    NLL(o_edit) + ω · KL_essence + λ · L_rel + wd · ‖δ‖ / ‖v‖²  (+ extra terms such as γ · SADR)

with λ = :attr:`~kelight.editors.locate.zopt.ZConfig.relation_kl_factor` (0 = off, the default: no
relation prompt is even run) and N = :attr:`~kelight.editors.locate.zopt.ZConfig.relation_prompts`.

The KL holds every token of every relation prompt's next-token distribution. The damage RS counts is
narrower: another question about ``s`` answering o_edit. The leak term holds only that, on the same
prompts, with its own weight μ (:attr:`~kelight.editors.locate.zopt.ZConfig.relation_leak_factor`):

    L_leak(z) = 1/N · Σ_j max(0, log P_z(t | p_j) − log P_0(t | p_j))

with ``t`` the first token of o_edit (:attr:`~kelight.objectives.base.RewriteBatch.first_target_ids`).
It is 0 at z = 0 and wherever z does not raise the new object on another question, so it leaves z free
to move the rest of those distributions. A first token shared with the other relation's own answer
("New" of "New York" against "New Jersey") is held down too: the term reads one token, not the object.
Both terms may be on; the relation prompts run once for both. The
relation prompts run in the same forward as the rewriting and essence prompts (their rows follow each
request's essence rows in a :class:`~kelight.editors.rewrite.RewriteBatch`), so they share the prefix
cache, the replayed blocks and ``z_batch`` merging; z is the only tensor with a gradient. Like the
essence KL, ``λ · L_rel`` is part of the loss the early stop tests for both ``early_stop_on`` values
(it is a term of the edit objective, not an extra term).

The prompts come from the edit request alone: a fixed list of generic WikiData-relation templates,
worded unlike the prompts of the CounterFact and WikiData_counterfact evaluation sets (checked on the
counterfact_mix dev split: no filled template equals any of its probe or generation prompts), never
from a case's evaluation prompts. The edited relation is left out: every template whose WikiData id
(or that of a relation as close, :attr:`RelationTemplate.also`) is the request's ``relation_id``, and
every template with a keyword (e.g. "born", "birth" for P19) in the rewrite prompt without its subject
(the only test for records without a relation id, as the WikiData half of counterfact_mix).
"""

from __future__ import annotations

import re
from itertools import cycle, islice
from typing import NamedTuple

import torch

from kelight.checks import check_number
from kelight.types import EditInputError, EditRequest


class RelationTemplate(NamedTuple):
    """One question about a subject: ``text`` with ``"{}"`` where the subject goes."""

    relation_id: str  # WikiData property id, e.g. "P19" (place of birth)
    text: str
    keywords: tuple[str, ...]  # a rewrite prompt containing one (as a word start) asks for this relation
    also: tuple[str, ...] = ()  # ids of relations so close that editing one edits this one (P103 for P1412)


_BIRTH = ("born", "birth", "native", "originat", "originally")
_CITIZEN = ("citizen", "nationality", "passport")
_JOB = ("occupation", "profession", "works as", "job", "living as")
_SPEAKS = ("language", "speak", "spoke", "tongue", "fluent", "writes in", "native")
_EMPLOYER = ("employ", "works for", "employer", "payroll", "company")
_RELIGION = ("religio", "faith", "follower", "follows")
_SPOUSE = ("spouse", "married", "wife", "husband")
_SCHOOL = ("alma mater", "graduat", "studied", "educated", "universit", "attended")
_AWARD = ("award", "prize", "won", "honou", "received")
_DEATH = ("died", "death", "passed away", "expired", "life ended", "succumbed", "killed", "lost their")
_FIELD = ("field", "expert", "domain", "area of work", "speciali")
_GENDER = ("gender", "sex")

#: The relation prompts, in the order they are taken (the first N that the edit does not ask for). Twelve
#: relations of persons (most counterfact_mix subjects) come in two frames, the relation named before
#: the subject ("The birthplace of {} is") and the subject first ("{} was born in the city of"): the
#: first 12 templates alternate the frames over them, the next 12 give each its other frame, then one
#: frame each for relations of places, organisations and works.
RELATION_TEMPLATES: tuple[RelationTemplate, ...] = (
    RelationTemplate("P27", "The nationality of {} is", _CITIZEN),
    RelationTemplate("P106", "{} earns a living as a", _JOB),
    RelationTemplate("P19", "The birthplace of {} is", _BIRTH),
    RelationTemplate("P1412", "{} is fluent in", _SPEAKS, also=("P103",)),
    RelationTemplate("P108", "The company that employs {} is", _EMPLOYER),
    RelationTemplate("P140", "{} practises the religion of", _RELIGION),
    RelationTemplate("P26", "The husband or wife of {} is", _SPOUSE),
    RelationTemplate("P69", "{} graduated from", _SCHOOL),
    RelationTemplate("P166", "The prize received by {} is", _AWARD),
    RelationTemplate("P20", "{} spent the last days of their life in", _DEATH),
    RelationTemplate("P101", "The area of expertise of {} is", _FIELD),
    RelationTemplate("P21", "In terms of gender, {} is", _GENDER),
    RelationTemplate("P27", "{} holds the nationality of", _CITIZEN),
    RelationTemplate("P106", "The job of {} is", _JOB),
    RelationTemplate("P19", "{} was born in the city of", _BIRTH),
    RelationTemplate("P1412", "The language spoken by {} is", _SPEAKS, also=("P103",)),
    RelationTemplate("P108", "{} has been employed at", _EMPLOYER),
    RelationTemplate("P140", "The faith of {} is", _RELIGION),
    RelationTemplate("P26", "{} is married to", _SPOUSE),
    RelationTemplate("P69", "The university attended by {} is", _SCHOOL),
    RelationTemplate("P166", "{} was awarded the", _AWARD),
    RelationTemplate("P20", "The city where {} died is", _DEATH),
    RelationTemplate("P101", "{} is an expert in the field of", _FIELD),
    RelationTemplate("P21", "The sex of {} is", _GENDER),
    RelationTemplate("P131", "{} is situated in", ("located", "location", "situated", "can be found", "is within"),
                     also=("P276",)),
    RelationTemplate("P159", "{} has its head office in", ("headquarter", "head office", "based in")),
    RelationTemplate("P17", "{} lies in the country of", ("country", "lies in")),
    RelationTemplate("P172", "{} belongs to the ethnic group of", ("ethnic",)),
    RelationTemplate("P22", "{} is the child of", ("father", "mother", "parent", "child of"), also=("P25",)),
    RelationTemplate("P40", "{} is the parent of", ("child", "son", "daughter", "parent of")),
    RelationTemplate("P3373", "{} is the sibling of", ("sibling", "brother", "sister")),
    RelationTemplate("P39", "{} served in the office of", ("position", "office", "served")),
    RelationTemplate("P54", "{} plays for the team", ("team", "plays for", "club", "league")),
    RelationTemplate("P641", "{} competes in the sport of", ("sport", "competes")),
    RelationTemplate("P1303", "The instrument played by {} is", ("instrument", "plays the", "playing the",
                                                                 "performing on", "performs on")),
    RelationTemplate("P136", "{} is associated with the musical genre", ("genre", "music", "perform", "play")),
    RelationTemplate("P264", "{} records for the label", ("label", "record", "represented by")),
    RelationTemplate("P176", "{} is manufactured by", ("manufactur", "produced", "created", "developed", "made by",
                                                        "product"), also=("P178",)),
    RelationTemplate("P178", "{} was designed by the company", ("develop", "designed", "product", "created"),
                     also=("P176",)),
    RelationTemplate("P127", "{} is the property of", ("owner", "owned", "property")),
    RelationTemplate("P449", "{} was broadcast on", ("network", "aired", "broadcast", "channel", "show", "debut",
                                                     "premiere", "released on")),
    RelationTemplate("P495", "{} comes from the country of", ("origin", "comes from", "country")),
    RelationTemplate("P30", "{} lies on the continent of", ("continent",)),
    RelationTemplate("P36", "{} has its seat of government in", ("capital", "seat of government")),
    RelationTemplate("P37", "The language of administration in {} is", ("official language", "language",
                                                                         "administration"), also=("P103", "P1412")),
    RelationTemplate("P463", "{} belongs to the organisation", ("member", "organi", "belongs to")),
    RelationTemplate("P119", "{} was laid to rest in", ("buried", "burial", "laid to rest", "grave")),
    RelationTemplate("P112", "{} was established by", ("founder", "founded", "established")),
    RelationTemplate("P937", "{} had their workplace in",
                     ("work location", "worked in", "workplace", "office is", "work in", "used to work", "took up")),
    RelationTemplate("P1340", "The colour of the eyes of {} is", ("eye", "colour", "color")),
)
MAX_RELATION_PROMPTS = len(RELATION_TEMPLATES)


def _asks_for(template: RelationTemplate, request: EditRequest) -> bool:
    """Whether ``template`` asks for the relation that ``request`` edits (same id, or a keyword of the
    template's relation starts a word of the rewrite prompt without its subject)."""
    if request.relation_id is not None and request.relation_id.strip().upper() in (template.relation_id,
                                                                                   *template.also):
        return True
    wording = request.prompt.replace(request.subject, " ").casefold()
    return any(re.search(r"\b" + re.escape(word), wording) for word in template.keywords)


def relation_prompts(request: EditRequest, n: int) -> list[str]:
    """The ``n`` relation prompts of ``request``: the first ``n`` of :data:`RELATION_TEMPLATES` that do
    not ask for the edited relation, filled with the subject (cycled if fewer are left).

    Args:
        request: the edit; only its subject, rewrite prompt and relation id are read.
        n: how many prompts, ``1 … MAX_RELATION_PROMPTS``.

    Raises:
        EditInputError: if ``n`` is out of range or every template asks for the edited relation.

    Example:
        >>> r = EditRequest("The place of birth of Ada Lovelace is", "Ada Lovelace", "Paris", "London")
        >>> relation_prompts(r, 3)
        ['The nationality of Ada Lovelace is', 'Ada Lovelace earns a living as a', 'Ada Lovelace is fluent in']
    """
    check_relation_prompts(n, 1.0)
    kept = [t.text.replace("{}", request.subject) for t in RELATION_TEMPLATES if not _asks_for(t, request)]
    if not kept:
        raise EditInputError(f"case {request.case_id!r}: every relation template asks for the edited relation of "
                             f"{request.prompt!r}; set relation_kl_factor and relation_leak_factor to 0 for this edit")
    return list(islice(cycle(kept), n))


def relation_leak_rows(log_probs: torch.Tensor, log_probs_init: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """``max(0, log P_z(t_r) − log P_0(t_r))`` of each relation prompt of each request, ``(R, N)``.

    Args:
        log_probs: ``(R, N, V)`` next-token log-probs at the relation prompts' ends now.
        log_probs_init: ``(R, N, V)`` the same at step 0 (z = 0; detached).
        token_ids: ``(R,)`` each request's first o_edit token ``t_r``.
    """
    index = token_ids.view(-1, 1, 1).expand(-1, log_probs.shape[1], 1)
    return torch.relu(log_probs.gather(-1, index) - log_probs_init.gather(-1, index)).squeeze(-1)


def check_relation_kl_factor(value: object) -> float:
    """``value`` if it is a valid relation KL weight λ: a finite number ≥ 0 (0 = off)."""
    return check_number("relation_kl_factor", value, positive=False, hint="; use 0 to turn the relation term off")


def check_relation_leak_factor(value: object) -> float:
    """``value`` if it is a valid relation leak weight μ: a finite number ≥ 0 (0 = off)."""
    return check_number("relation_leak_factor", value, positive=False, hint="; use 0 to turn the leak term off")


def check_relation_prompts(value: object, factor: float) -> int:
    """``value`` if it is a valid relation prompt count for a relation term of weight ``factor`` (the
    larger of λ and μ): an integer in ``1 … MAX_RELATION_PROMPTS`` (``0`` only with both terms off)."""
    low = 0 if factor == 0 else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_RELATION_PROMPTS:
        hint = " (the term is on: relation_kl_factor or relation_leak_factor > 0 needs a prompt)" if value == 0 else ""
        raise EditInputError(f"expected relation_prompts to be an integer from {low} to {MAX_RELATION_PROMPTS} "
                             f"(the relation templates there are), got {value!r}{hint}")
    return value

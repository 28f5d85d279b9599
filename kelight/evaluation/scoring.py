"""Model-side evaluation of an edit case: teacher-forced scoring, token argmax, generated answers, sampling,
perplexity.

Two protocols (``eval_protocol``): ``teacher_forced`` (the default) feeds each target after its prompt and
reads its likelihood; ``wild`` lets the model answer each probe prompt greedily, with no target tokens fed
and no cut to the target's length, and judges the answer (:mod:`kelight.evaluation.judge`); ``both`` does both.

Every teacher-forced read-out is batched and runs the LM head only on the positions that are scored
(:mod:`kelight.lm.readouts`). Targets follow the prompt after one space (:func:`kelight.lm.tokens.
target_ids`), and the logits at position ``t`` predict token ``t + 1``.
A prompt's score is the *mean per-token* NLL of a target (see :mod:`kelight.evaluation.functional`).
Generated answers come from :mod:`kelight.evaluation.wild` (prompts framed by ``wild_template``, greedy decoding to the
answer's natural end). The math that turns these read-outs into scores lives in :mod:`kelight.evaluation.metrics`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.data.root import default_data_root
from kelight.editors.stats.corpus import read_corpus_file
from kelight.evaluation import functional as F
from kelight.evaluation.judge import WildAnswer, count_key, wild_items
from kelight.evaluation.wild import (
    WILD,
    EvalProtocol,
    WildConfig,
    check_eval_protocol,
    generate_answers,
    judge_case,
    wild_probes,
)
from kelight.lm.generation import generate
from kelight.lm.hooks import row_weight_changes
from kelight.lm.readouts import Readout, readouts, shared_prompt_readouts
from kelight.lm.tokens import pad_id, target_ids
from kelight.types import PROBE_GROUPS, TOKEN_GROUPS, EditCase, EditInputError, ScoredPrompt, TokenProbe

# probe group -> (nll_right, nll_wrong); token group -> (per-prompt predictions, references).
GroupScores = dict[str, tuple[torch.Tensor, torch.Tensor]]
GroupTokens = dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]
LOCALITY = "locality"  # the token group scored against the pre-edit predictions


@dataclass
class CaseResult:
    """Everything measured on one case, before pooling into :class:`kelight.evaluation.metrics.EditMetrics`.

    Attributes:
        case_id: the case's id.
        scores: probe group -> ``(nll_right, nll_wrong)``, ``(N,)`` float32 mean per-token NLLs.
        tokens: token group -> ``(predictions, references)``, per prompt ``(T_i,)`` token ids; the
            references are the target ids, or the pre-edit predictions for ``"locality"``.
        texts: generated texts for fluency (prompt included, as in ROME); empty if not generated.
        perplexity: ``(summed NLL, token count)`` on a reference corpus, or ``None``.
        wild: the generated answers of the wild protocol, judged; empty under ``teacher_forced``.
    """

    case_id: str | int
    scores: GroupScores = field(default_factory=dict)
    tokens: GroupTokens = field(default_factory=dict)
    texts: tuple[str, ...] = ()
    perplexity: tuple[float, int] | None = None
    wild: tuple[WildAnswer, ...] = ()


def _check_positive(value: int, what: str) -> None:
    if value < 1:
        raise ValueError(f"expected {what} >= 1, got {value}")


def encode_pairs(
    tok: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]]
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt and of its target."""
    prompts, targets = [], []
    for prompt, target in pairs:
        prompt_ids, tgt = target_ids(tok, prompt, target)
        if not prompt_ids:
            raise EditInputError(
                f"prompt {prompt!r} tokenises to no tokens; a target needs a non-empty prompt to follow"
            )
        prompts.append(prompt_ids)
        targets.append(tgt)
    return prompts, targets


def _teacher_forced(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], chunk: int
) -> list[Readout]:
    if not pairs:
        return []
    prompts, targets = encode_pairs(tok, pairs)
    return shared_prompt_readouts(model, prompts, targets, pad_id(tok), chunk)


def _mean_nll(readouts: Sequence[Readout]) -> torch.Tensor:
    if not readouts:
        return torch.zeros(0)
    return torch.stack([-logprobs.mean() for logprobs, _, _ in readouts])  # (N,)


def _pair_up(nll: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return nll[0::2].contiguous(), nll[1::2].contiguous()  # interleaved right, wrong


def _scored_pairs(probes: Sequence[ScoredPrompt]) -> list[tuple[str, str]]:
    return [(p.prompt, target) for p in probes for target in (p.right, p.wrong)]


@torch.no_grad()
def score_prompts(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, probes: Sequence[ScoredPrompt], batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token teacher-forced NLL of ``right`` and of ``wrong`` after each prompt.

    Args:
        model: a causal LM.
        tok: its tokenizer.
        probes: the prompts to score.
        batch_size: probes per forward; each forward holds both targets, ``2 * batch_size`` rows.

    Returns:
        ``(nll_right, nll_wrong)``, ``(N,)`` float32 on CPU each.

    Raises:
        EditInputError: if a target (or prompt) is empty or tokenises to nothing.

    Example:
        >>> from kelight.models.tiny import tiny_model
        >>> model, tok = tiny_model("llama")
        >>> right, wrong = score_prompts(model, tok, [ScoredPrompt("The sky is", "blue", "green")])
        >>> right.shape
        torch.Size([1])
    """
    _check_positive(batch_size, "batch_size")
    return _pair_up(_mean_nll(_teacher_forced(model, tok, _scored_pairs(probes), 2 * batch_size)))


@torch.no_grad()
def token_argmax(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, probes: Sequence[TokenProbe], batch_size: int = 64
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Teacher-forced argmax predictions over each target's tokens, and the target ids.

    Returns:
        ``(predictions, targets)``: one ``(T_i,)`` long CPU tensor per probe in each list.
    """
    _check_positive(batch_size, "batch_size")
    readouts = _teacher_forced(model, tok, [(p.prompt, p.target) for p in probes], batch_size)
    return [preds for _, preds, _ in readouts], [tgt for _, _, tgt in readouts]


PPL_CORPORA = {"corpus50": "ppl/corpus50.json"}  # named probes, in the shared data folder


def load_ppl_texts(corpus: str | os.PathLike | None, field: str = "Text") -> tuple[str, ...]:
    """The texts of a perplexity probe: a name of ``PPL_CORPORA`` (in the shared data folder, see
    :func:`kelight.data.root.default_data_root`) or a .txt/.json/.jsonl file (records read at ``field``);
    ``None`` gives none.

    Raises:
        FileNotFoundError: the corpus is neither a known name nor an existing file.
        ValueError: the file holds no text.
    """
    if corpus is None:
        return ()
    name = os.fspath(corpus)
    if name in PPL_CORPORA:
        root = default_data_root()
        if root is None or not (root / PPL_CORPORA[name]).is_file():
            raise FileNotFoundError(f"ppl_corpus {name!r} is {PPL_CORPORA[name]} of the shared data folder, not found "
                                    f"under {root or '../shared/data'}; set KELIGHT_DATA to the folder that holds "
                                    f"{PPL_CORPORA[name].split('/')[0]}/, or give the file's path")
        path = root / PPL_CORPORA[name]
    else:
        path = Path(name)
        if path.suffix not in (".txt", ".json", ".jsonl") or not path.is_file():
            raise FileNotFoundError(f"expected ppl_corpus to be one of {sorted(PPL_CORPORA)} or an existing "
                                    f".txt/.json/.jsonl file, got {name!r}")
    try:
        texts = tuple(read_corpus_file(path, field))
    except ValueError as err:
        raise ValueError(f"ppl_corpus {path}: {err}; its records' text field is set with ppl_field "
                         f"(now {field!r})") from err
    if not texts:
        raise ValueError(f"ppl_corpus {path} holds no text; give a file with at least one non-blank text")
    return texts


@torch.no_grad()
def perplexity_stats(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int = 100,
    batch_size: int = 16,
) -> tuple[float, int]:
    """Summed NLL and number of predicted tokens over ``texts``, each cut to ``max_tokens`` tokens.

    ``exp(nll / count)`` is the perplexity. The reference (``perplexity`` in ROME/EasyEdit) scores
    the joined Corpus-50 cut to 100 tokens and divides by all ``N`` tokens although only ``N - 1``
    are predicted; here the count is the predicted tokens. Texts of fewer than 2 tokens add nothing.
    """
    _check_positive(max_tokens, "max_tokens")
    _check_positive(batch_size, "batch_size")
    seqs = [list(tok(t, add_special_tokens=True)["input_ids"])[:max_tokens] for t in texts]
    seqs = [s for s in seqs if len(s) >= 2]
    if not seqs:
        return 0.0, 0
    out = readouts(model, seqs, [1] * len(seqs), pad_id(tok), batch_size)
    nll = -sum(float(logprobs.double().sum()) for logprobs, _, _ in out)
    return nll, sum(len(s) - 1 for s in seqs)


@torch.no_grad()
def locality_reference(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, case: EditCase, batch_size: int = 64,
    protocol: EvalProtocol = "teacher_forced", wild: WildConfig | None = None, answers: dict[str, str] | None = None,
) -> dict[str, object]:
    """The pre-edit reference of a case; call it before the edit (on the unedited model).

    Args:
        model: the unedited model.
        tok: its tokenizer.
        case: the case.
        batch_size: token probes per forward.
        protocol: ``teacher_forced`` records the locality predictions, ``wild`` the unedited answers, ``both``
            both.
        wild: how answers are generated (default :class:`WildConfig`).
        answers: answers of this unedited model already generated (:func:`generate_answers`), reused.

    Returns:
        ``{"locality": predictions}`` (one ``(T_i,)`` tensor per locality probe) under the teacher-forced
        protocol, and ``{"wild": {framed prompt: answer}}`` for the prompts whose answers are compared with
        the unedited model's (neighbourhood, relation, distracted neighbourhood, locality) under the wild one;
        keys without probes are left out (``{}`` when there is nothing to record).
    """
    out: dict[str, object] = {}
    probes = case.token_probes.get(LOCALITY, ())
    if protocol != "wild" and probes:
        out[LOCALITY] = token_argmax(model, tok, probes, batch_size)[0]
    if protocol != "teacher_forced":
        wild = wild or WildConfig()
        prompts = [wild.frame(p) for _, p, _ in wild_probes(case, reference_only=True)]
        if prompts:
            answers = generate_answers(model, tok, [case], wild, answers, reference_only=True)
            out[WILD] = {p: answers[p] for p in prompts}
    return out


def _check_locality(case: EditCase, pre_locality: Mapping[str, object] | None) -> None:
    probes = case.token_probes.get(LOCALITY, ())
    if not probes:
        return
    reference = (pre_locality or {}).get(LOCALITY)
    if reference is None or len(reference) != len(probes):
        got = "nothing" if reference is None else f"{len(reference)} predictions"
        raise ValueError(
            f"case {case.case_id!r}: expected pre-edit predictions for its {len(probes)} locality probes, "
            f"got {got}; call locality_reference(model, tok, case) before the edit and pass it as "
            f"pre_locality"
        )


def _split_readouts(
    readouts: Sequence[Readout], case: EditCase, pre_locality: Mapping[str, object] | None
) -> tuple[GroupScores, GroupTokens]:
    """Undo the concatenation of :func:`evaluate_case`: scored groups first, then token groups."""
    pos, scores, tokens = 0, GroupScores(), GroupTokens()
    for name, probes in case.probes.items():
        scores[name] = _pair_up(_mean_nll(readouts[pos : pos + 2 * len(probes)]))
        pos += 2 * len(probes)
    for name, probes in case.token_probes.items():
        chunk = readouts[pos : pos + len(probes)]
        pos += len(probes)
        preds = [p for _, p, _ in chunk]
        refs = list(pre_locality[LOCALITY]) if name == LOCALITY and probes else [t for _, _, t in chunk]
        tokens[name] = (preds, refs)
    assert pos == len(readouts), "every read-out belongs to exactly one probe"
    return scores, tokens


@torch.no_grad()
def evaluate_case(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, case: EditCase, *, fluency: bool,
    pre_locality: Mapping[str, object] | None = None, perplexity: tuple[float, int] | None = None,
    batch_size: int = 64, max_new_tokens: int = 100, seed: int = 0, protocol: EvalProtocol = "teacher_forced",
    wild: WildConfig | None = None, answers: dict[str, str] | None = None,
    fluency_texts: Sequence[str] | None = None, judge_wild: bool = True,
) -> CaseResult:
    """Evaluate every probe of ``case`` on the (edited) model.

    Teacher-forced: all probe groups' targets and all token probes go through one pass, chunked at
    ``2 * batch_size`` targets; each distinct prompt runs once and its targets run on its KV cache
    (:func:`kelight.lm.readouts.shared_prompt_readouts`). Wild: every probe prompt of a group with a wild
    score is answered greedily, all in one left-padded, KV-cached batch (:func:`generate_answers`).

    Args:
        model: the model to evaluate (usually just edited).
        tok: its tokenizer.
        case: the case whose probes are scored.
        fluency: also sample the generation prompts (``max_new_tokens``, top-5, ``seed``).
        pre_locality: :func:`locality_reference` of the unedited model (same ``protocol`` and ``wild``);
            required with locality probes (teacher-forced) or neighbourhood/locality prompts (wild).
        perplexity: the model's :func:`perplexity_stats` on a corpus, computed once per model state and
            passed to every case scored on it; ``None``: no PPL.
        batch_size: probes per forward (see :func:`score_prompts`).
        max_new_tokens: generation length for fluency.
        seed: generation seed.
        protocol: ``teacher_forced`` (no generation besides fluency), ``wild`` (generated answers only) or
            ``both``.
        wild: how answers are generated (default :class:`WildConfig`).
        answers: answers of this model as it is now, already generated for these prompts across cases
            (:func:`generate_answers`); reused, and extended in place.
        fluency_texts: this case's fluency samples, already drawn across cases (:func:`fluency_samples`);
            ``None`` samples them here.
        judge_wild: ``False`` leaves the result's wild judgments empty under ``wild``/``both``, for the caller
            to judge later (:func:`~kelight.evaluation.wild.judge_case`) from answers generated with the edit
            replayed (:func:`~kelight.evaluation.wild.replayed_answers`).

    Raises:
        ValueError: if ``pre_locality`` does not cover the probes the protocol compares with the unedited model.
    """
    _check_positive(batch_size, "batch_size")
    check_eval_protocol(protocol)
    judged: tuple[WildAnswer, ...] = ()
    if protocol != "teacher_forced" and judge_wild:
        judged = judge_case(model, tok, case, pre_locality, wild or WildConfig(), answers)
    scores, tokens = GroupScores(), GroupTokens()
    if protocol != "wild":
        _check_locality(case, pre_locality)
        pairs = [pair for probes in case.probes.values() for pair in _scored_pairs(probes)]
        pairs += [(p.prompt, p.target) for probes in case.token_probes.values() for p in probes]
        scores, tokens = _split_readouts(_teacher_forced(model, tok, pairs, 2 * batch_size), case, pre_locality)
    texts: tuple[str, ...] = ()
    if fluency and fluency_texts is not None:
        texts = tuple(fluency_texts)
    elif fluency and case.generation_prompts:
        texts = tuple(generate(model, tok, case.generation_prompts, max_new_tokens, seed=seed))
    return CaseResult(case.case_id, scores, tokens, texts, perplexity, judged)


@torch.no_grad()
def fluency_samples(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, cases: Sequence[EditCase], max_new_tokens: int = 100,
    seed: int = 0, batch_size: int = 64, changes: Mapping[str | int, Mapping[nn.Module, torch.Tensor]] | None = None,
) -> dict[str, tuple[str, ...]]:
    """Every case's fluency samples (case id -> texts) on the model as it is now, drawn across cases in
    batches of ``batch_size`` prompts (batch ``i`` seeded ``seed + i``): one KV-cached batch for many cases
    instead of one per case. A prompt's sample depends on its batch (:func:`generate`), so FL from a
    cross-case pass differs from a per-case pass within sampling noise, and is the same on every rerun.

    ``changes``: each case's own weight changes (case id -> :func:`~kelight.lm.hooks.linear_weight_changes`),
    applied to its prompts' rows only (:func:`~kelight.lm.hooks.row_weight_changes`): the single-edit regime's
    edited models, each restored before the next edit, sampled together afterwards."""
    _check_positive(batch_size, "batch_size")
    prompts = [(case.case_id, p) for case in cases for p in case.generation_prompts]
    texts: dict[str, list[str]] = {case.case_id: [] for case in cases}
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start : start + batch_size]
        ids = list(dict.fromkeys(case_id for case_id, _ in chunk))
        rows = [ids.index(case_id) for case_id, _ in chunk]
        with row_weight_changes([changes[i] for i in ids] if changes else [], rows):
            samples = generate(model, tok, [p for _, p in chunk], max_new_tokens, seed=seed + index)
        for (case_id, _), text in zip(chunk, samples, strict=True):
            texts[case_id].append(text)
    return {case_id: tuple(t) for case_id, t in texts.items()}


def case_summary(result: CaseResult) -> dict[str, float]:
    """Per-case values for ``cases.jsonl``: success fraction and magnitude per probe group, token
    accuracies and wild scores (all in percent; ``<name>_sq``: the mean squared per-prompt value, for the
    pooled CI), ``FL`` (×100) and ``PPL`` where measured; empty groups omitted.
    ``n_<score>`` (e.g. ``n_RS``, ``n_Efficacy``; ``n_PPL`` counts tokens) is the number of prompts
    behind each score, so that pooled values (:func:`kelight.runs.merge.metrics_from_rows`, ``kelight
    merge``) and case-bootstrap intervals (:func:`kelight.evaluation.stats.won_back_interval`) can be
    recomputed from ``cases.jsonl`` alone."""
    out: dict[str, float] = {}
    for group, (nll_right, nll_wrong) in result.scores.items():
        if nll_right.numel():
            score_name, magnitude_name = PROBE_GROUPS[group]
            success, magnitude = F.pairwise_scores(nll_right.double(), nll_wrong.double())  # as EditMetrics
            out[score_name] = 100.0 * float(success.double().mean())
            out[magnitude_name] = 100.0 * float(magnitude.double().mean())
            out[f"n_{score_name}"] = int(nll_right.numel())
    for group, (preds, refs) in result.tokens.items():
        if preds:
            acc = F.token_accuracies(preds, refs).double()
            out[TOKEN_GROUPS[group]] = 100.0 * float(acc.mean())
            out[f"{TOKEN_GROUPS[group]}_sq"] = 100.0 * float(acc.square().mean())  # for the pooled CI
            out[f"n_{TOKEN_GROUPS[group]}"] = len(preds)
    if result.texts:
        out["FL"] = 100.0 * F.n_gram_entropy(result.texts)
    if result.perplexity is not None and result.perplexity[1] > 0:
        out["PPL"] = F.perplexity(*result.perplexity)
        out["n_PPL"] = int(result.perplexity[1])  # tokens
    for name, values in wild_items(result.wild).items():
        items = torch.tensor(values, dtype=torch.float64)
        out[name] = 100.0 * float(items.mean())
        out[f"{name}_sq"] = 100.0 * float(items.square().mean())  # for the pooled CI, as the token accuracies
        out[count_key(name)] = len(values)
    return out


def wild_rows(result: CaseResult) -> list[dict[str, object]]:
    """The case's generated answers for ``cases.jsonl`` (its ``"wild"`` list): group, prompt, target, answer,
    ``match``/``f1`` against the target and, where compared, ``unedited``/``same``/``same_f1``."""
    return [answer.as_row() for answer in result.wild]

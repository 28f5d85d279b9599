"""Model-side evaluation against slow one-prompt-at-a-time references on tiny models."""

from __future__ import annotations

import dataclasses
import doctest
import math

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import kelight.evaluation.scoring
from kelight.editors.undo import UndoLog
from kelight.evaluation.metrics import EditMetrics
from kelight.evaluation.scoring import (
    case_summary,
    evaluate_case,
    fluency_samples,
    locality_reference,
    perplexity_stats,
    score_prompts,
    token_argmax,
)
from kelight.lm.generation import generate
from kelight.lm.hooks import linear_weight_changes
from kelight.lm.tokens import target_ids
from kelight.models.tiny import TINY_CONFIGS, tiny_model
from kelight.types import PROBE_GROUPS, EditCase, EditInputError, EditRequest, ScoredPrompt, TokenProbe

Model = tuple[PreTrainedModel, PreTrainedTokenizerBase]

PROBES = [
    ScoredPrompt("The Eiffel Tower is located in", "Paris", "Rome"),
    ScoredPrompt("A much longer prompt, so the batch needs right padding:", "x", "a longer wrong target"),
    ScoredPrompt("Q", "multi word right target", "w"),
]


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request: pytest.FixtureRequest) -> Model:
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def llama() -> Model:
    return tiny_model("llama")


def _slow_nll(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, target: str) -> torch.Tensor:
    prompt_ids, tgt = target_ids(tok, prompt, target)
    logprobs = model(torch.tensor([prompt_ids + tgt])).logits[0].double().log_softmax(-1)  # (T, V)
    return -torch.stack([logprobs[len(prompt_ids) - 1 + j, t] for j, t in enumerate(tgt)]).mean()


def _slow_argmax(model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompt: str, target: str
                 ) -> torch.Tensor:
    prompt_ids, tgt = target_ids(tok, prompt, target)
    logits = model(torch.tensor([prompt_ids + tgt])).logits[0]  # (T, V)
    return logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(tgt)].argmax(-1)


@torch.no_grad()
def test_score_prompts_equals_full_logits_reference(tiny: Model) -> None:
    model, tok = tiny
    right, wrong = score_prompts(model, tok, PROBES)
    assert right.dtype == wrong.dtype == torch.float32 and right.shape == wrong.shape == (len(PROBES),)
    expected_right = torch.stack([_slow_nll(model, tok, p.prompt, p.right) for p in PROBES]).float()
    expected_wrong = torch.stack([_slow_nll(model, tok, p.prompt, p.wrong) for p in PROBES]).float()
    torch.testing.assert_close(right, expected_right, atol=1e-5, rtol=0)
    torch.testing.assert_close(wrong, expected_wrong, atol=1e-5, rtol=0)


def test_score_prompts_is_batch_invariant(tiny: Model) -> None:
    model, tok = tiny
    one = score_prompts(model, tok, PROBES, batch_size=1)
    many = score_prompts(model, tok, PROBES, batch_size=64)
    torch.testing.assert_close(one, many, atol=1e-6, rtol=0)


@torch.no_grad()
def test_token_argmax_equals_full_logits_reference(tiny: Model) -> None:
    model, tok = tiny
    probes = [TokenProbe(p.prompt, p.wrong) for p in PROBES]
    preds, targets = token_argmax(model, tok, probes)
    for probe, pred, tgt in zip(probes, preds, targets, strict=True):
        assert torch.equal(pred, _slow_argmax(model, tok, probe.prompt, probe.target))
        assert tgt.tolist() == target_ids(tok, probe.prompt, probe.target)[1]


def test_empty_probes_and_errors(llama: Model) -> None:
    model, tok = llama
    right, wrong = score_prompts(model, tok, [])
    assert right.shape == wrong.shape == (0,)
    with pytest.raises(EditInputError, match="non-empty target"):
        score_prompts(model, tok, [ScoredPrompt("The sky is", "", "green")])
    with pytest.raises(EditInputError, match="non-empty target"):
        token_argmax(model, tok, [TokenProbe("The sky is", "   ")])
    with pytest.raises(EditInputError, match="non-empty prompt"):
        score_prompts(model, tok, [ScoredPrompt("", "blue", "green")])
    with pytest.raises(ValueError, match="batch_size >= 1"):
        score_prompts(model, tok, PROBES, batch_size=0)


@torch.no_grad()
def test_perplexity_stats_equals_full_logits_reference(tiny: Model) -> None:
    model, tok = tiny
    texts = ["Some text here for perplexity.", "x", "A second, longer text " * 10]
    nll, count = perplexity_stats(model, tok, texts, max_tokens=40, batch_size=2)
    expected_nll, expected_count = 0.0, 0
    for text in texts:
        ids = tok(text)["input_ids"][:40]
        logprobs = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)  # (T, V)
        expected_nll -= sum(float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1))
        expected_count += len(ids) - 1
    assert count == expected_count == len(texts[0]) - 1 + 39
    assert math.isclose(nll, expected_nll, rel_tol=1e-5)
    assert perplexity_stats(model, tok, []) == (0.0, 0)


def _case() -> EditCase:
    request = EditRequest("The Eiffel Tower is located in", "Eiffel Tower", "Rome", "Paris", case_id="c1")
    return EditCase(
        request,
        probes={
            "rewrite": (ScoredPrompt(request.prompt, "Rome", "Paris"),),
            "paraphrase": (ScoredPrompt("Where is the Eiffel Tower? It is in", "Rome", "Paris"),) * 2,
            "neighbor": (ScoredPrompt("The Louvre is located in", "Paris", "Rome"),),
            "reasoning": (),
        },
        token_probes={
            "efficacy": (TokenProbe(request.prompt, "Rome"),),
            "locality": (
                TokenProbe("The Louvre is in", "Paris, France"),
                TokenProbe("Big Ben is in", "London"),
            ),
        },
        generation_prompts=("The Eiffel Tower is", "Rome"),
    )


def _count_forwards(model: PreTrainedModel) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    handle = model.base_model.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_evaluate_case_matches_the_parts_in_one_batched_pass(tiny: Model) -> None:
    model, tok = tiny
    case = _case()
    pre = locality_reference(model, tok, case)
    calls, handle = _count_forwards(model)
    try:
        result = evaluate_case(model, tok, case, fluency=False, pre_locality=pre)
    finally:
        handle.remove()
    # one pass: every distinct prompt once, then every multi-token target on the prompts' KV cache
    assert len(calls) == 2 and result.case_id == "c1" and result.texts == () and result.perplexity is None
    for group, probes in case.probes.items():
        expected = score_prompts(model, tok, probes)
        torch.testing.assert_close(result.scores[group], expected, atol=1e-6, rtol=0)
    preds, targets = token_argmax(model, tok, case.token_probes["efficacy"])
    assert [p.tolist() for p in result.tokens["efficacy"][0]] == [p.tolist() for p in preds]
    assert [t.tolist() for t in result.tokens["efficacy"][1]] == [t.tolist() for t in targets]
    summary = case_summary(result)
    assert summary["Locality"] == 100.0  # unedited model: post-edit argmax equals the reference
    assert set(summary) == {"ES", "EM", "PS", "PM", "NS", "NM", "n_ES", "n_PS", "n_NS", "Efficacy", "Locality",
                            "n_Efficacy", "n_Locality", "Efficacy_sq", "Locality_sq"}
    assert summary["n_Efficacy"] == len(case.token_probes["efficacy"])
    for group, probes in case.probes.items():  # the prompt counts that pool per-case scores
        assert summary.get(f"n_{PROBE_GROUPS[group][0]}", 0) == len(probes)


def test_evaluate_case_fluency_perplexity_and_metrics(llama: Model) -> None:
    model, tok = llama
    case = _case()
    result = evaluate_case(model, tok, case, fluency=True, pre_locality=locality_reference(model, tok, case),
                           perplexity=perplexity_stats(model, tok, ["Some reference corpus text."]), max_new_tokens=12)
    assert len(result.texts) == 2 and result.texts[0].startswith("The Eiffel Tower is")
    assert result.perplexity is not None and result.perplexity[1] == len("Some reference corpus text.") - 1
    summary = case_summary(result)
    rewrite_right, rewrite_wrong = result.scores["rewrite"]
    assert summary["ES"] == 100.0 * float(rewrite_right[0] < rewrite_wrong[0])
    assert math.isclose(summary["EM"], 100.0 * math.exp(-float(rewrite_right[0])), rel_tol=1e-6)
    assert math.isclose(summary["PPL"], math.exp(result.perplexity[0] / result.perplexity[1]))
    metrics = EditMetrics()
    metrics.update(result)
    report = metrics.compute()
    for key in ("ES", "EM", "PS", "NS", "Efficacy", "Locality", "FL", "PPL"):
        assert math.isclose(report[key], summary[key], rel_tol=1e-6), key
    assert report["Score"] == pytest.approx((summary["Efficacy"] + summary["Locality"]) / 2)


def test_fluency_samples_across_cases_batch_by_batch(llama: Model) -> None:
    """Cross-case sampling equals drawing each batch of prompts with its own seed; a lone case gets what its
    own evaluation would sample; and the samples reach the case's FL unchanged."""
    model, tok = llama
    base = _case()
    cases = [dataclasses.replace(base, request=dataclasses.replace(base.request, case_id=f"c{i}"))
             for i in range(3)]  # 2 prompts each: 6 prompts
    texts = fluency_samples(model, tok, cases, max_new_tokens=6, seed=3, batch_size=4)
    prompts = [p for case in cases for p in case.generation_prompts]
    expected = generate(model, tok, prompts[:4], 6, seed=3) + generate(model, tok, prompts[4:], 6, seed=4)
    assert [t for case in cases for t in texts[case.case_id]] == expected
    assert fluency_samples(model, tok, cases[:1], max_new_tokens=6, seed=3)["c0"] == tuple(
        generate(model, tok, cases[0].generation_prompts, 6, seed=3))
    pre = locality_reference(model, tok, cases[0])
    given = evaluate_case(model, tok, cases[0], fluency=True, pre_locality=pre, fluency_texts=("a b a b", "c"))
    assert given.texts == ("a b a b", "c")
    with pytest.raises(ValueError, match="batch_size"):
        fluency_samples(model, tok, cases, batch_size=0)


def test_fluency_samples_replay_each_cases_own_edit(llama: Model) -> None:
    """With ``changes``, a case's samples are those of its own edited model (a lone case: the same texts as
    sampling the edited model), and a case without changes in the batch samples the unchanged model."""
    model, tok = llama
    base = _case()
    cases = [dataclasses.replace(base, request=dataclasses.replace(base.request, case_id=f"c{i}"))
             for i in range(2)]
    undo = UndoLog()
    weight = model.model.layers[0].mlp.down_proj.weight
    undo.add_(weight, 2.0 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    edited = tuple(generate(model, tok, cases[0].generation_prompts, 8, seed=3))
    change = linear_weight_changes(model, undo.changes())
    undo.restore()
    unedited = tuple(generate(model, tok, cases[0].generation_prompts, 8, seed=3))
    assert edited != unedited
    assert fluency_samples(model, tok, cases[:1], max_new_tokens=8, seed=3, changes={"c0": change})["c0"] == edited
    both = fluency_samples(model, tok, cases, max_new_tokens=8, seed=3, changes={"c0": change, "c1": {}})
    alone = fluency_samples(model, tok, cases, max_new_tokens=8, seed=3)
    assert both["c1"] == alone["c1"] and both["c0"] != alone["c0"]


def test_evaluate_case_requires_pre_locality(llama: Model) -> None:
    model, tok = llama
    with pytest.raises(ValueError, match="call locality_reference"):
        evaluate_case(model, tok, _case(), fluency=False)
    with pytest.raises(ValueError, match="got 1 predictions"):
        evaluate_case(model, tok, _case(), fluency=False, pre_locality={"locality": [torch.tensor([1])]})


def test_doctests() -> None:
    assert doctest.testmod(kelight.evaluation.scoring, raise_on_error=True).failed == 0


@pytest.mark.slow
def test_smollm2_knows_paris() -> None:
    from kelight.models.loading import load  # noqa: PLC0415 (slow path only)

    model, tok = load("smollm2-135m", device="cpu")
    right, wrong = score_prompts(model, tok, [ScoredPrompt("The Eiffel Tower is located in the city of",
                                                           "Paris", "Rome")])
    assert float(right[0]) < float(wrong[0])


def test_ppl_texts_reads_names_and_files_and_names_the_fix(tmp_path, monkeypatch):
    import json

    from kelight.evaluation.scoring import load_ppl_texts

    assert load_ppl_texts(None) == ()
    good = tmp_path / "t.jsonl"
    good.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_ppl_texts(good, field="text") == ("one", "two")
    with pytest.raises(ValueError, match=r"t.jsonl: .*'Text'.*set with ppl_field \(now 'Text'\)"):
        load_ppl_texts(good)
    blank = tmp_path / "blank.json"
    blank.write_text(json.dumps(["", "  "]))
    with pytest.raises(ValueError, match="blank.json holds no text"):
        load_ppl_texts(blank)
    monkeypatch.setenv("KELIGHT_DATA", str(tmp_path))  # a data folder without ppl/
    with pytest.raises(FileNotFoundError, match="'corpus50' is ppl/corpus50.json of the shared data folder, not "
                                                "found .*set KELIGHT_DATA to the folder that holds ppl/"):
        load_ppl_texts("corpus50")
    (tmp_path / "ppl").mkdir()
    (tmp_path / "ppl" / "corpus50.json").write_text(json.dumps([{"Text": "a text"}]))
    assert load_ppl_texts("corpus50") == ("a text",)

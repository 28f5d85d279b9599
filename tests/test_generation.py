"""Top-k sampling with a KV cache: batched equals one at a time, seeded, stops at EOS."""

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.generation import generate
from kelight.models.tiny import tiny_model

Model = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def test_generate_greedy_batched_equals_one_at_a_time(tiny: Model) -> None:
    # With top_k=1 sampling is greedy, so left padding and position ids must not change anything.
    model, tok = tiny
    prompts = ["Hello there, how are", "A", "Paris is the capital of"]
    batched = generate(model, tok, prompts, max_new_tokens=8, top_k=1)
    single = [generate(model, tok, [p], max_new_tokens=8, top_k=1)[0] for p in prompts]
    assert batched == single
    assert all(text.startswith(p) and len(text) > len(p) for text, p in zip(batched, prompts, strict=True))


def test_generate_is_seeded_and_leaves_global_rng_alone() -> None:
    model, tok = tiny_model("llama")
    prompts = ["Hello there", "The weather"]
    state = torch.get_rng_state()
    first = generate(model, tok, prompts, max_new_tokens=20, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert first == generate(model, tok, prompts, max_new_tokens=20, seed=3)
    assert first != generate(model, tok, prompts, max_new_tokens=20, seed=4)
    assert generate(model, tok, [], max_new_tokens=5) == []
    assert generate(model, tok, prompts, max_new_tokens=0) == prompts
    with pytest.raises(ValueError, match="top_k >= 1"):
        generate(model, tok, prompts, top_k=0)


def test_generate_stops_at_eos() -> None:
    model, tok = tiny_model("llama")
    with torch.no_grad():
        bias = torch.full((model.config.vocab_size,), -1e4)
        bias[tok.eos_token_id] = 1e4
        lm_head = model.get_output_embeddings()
        lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    try:
        assert generate(model, tok, ["Hi", "Hello"], max_new_tokens=10) == ["Hi", "Hello"]
    finally:
        lm_head.bias = None

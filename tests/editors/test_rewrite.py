"""Context templates: model-sampled prefixes as ROME draws them."""

from __future__ import annotations

import pytest
import torch

from kelight.editors.rewrite import sample_context_templates
from kelight.models.tiny import TINY_CONFIGS, tiny_model


def _reference(model, tok, length_params, seed):
    """ROME's loop without a KV cache: the full sequence every token, top-5 on CPU."""
    gen, out = torch.Generator().manual_seed(seed), ["{}"]
    starts = ("The", "Therefore", "Because", "I", "You")
    for length, n in length_params:
        for i in range(n):
            ids = torch.tensor([tok(starts[i % len(starts)]).input_ids])
            while ids.shape[1] < length:
                top = model(input_ids=ids).logits[0, -1].float().topk(5)
                pick = top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=gen)]
                ids = torch.cat([ids, pick[None]], 1)
            out.append(tok.decode(ids[0], skip_special_tokens=True).replace("{", " ").replace("}", " ") + ". {}")
    return out


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@torch.no_grad()
def test_templates_equal_a_reference_sampler_without_cache(family):
    model, tok = tiny_model(family)
    params = [[5, 3], [8, 2]]
    templates = sample_context_templates(model, tok, params, seed=1)
    assert templates == _reference(model, tok, params, seed=1)
    assert len(templates) == 1 + 3 + 2 and all(t.endswith(". {}") for t in templates[1:])
    assert templates != sample_context_templates(model, tok, params, seed=2)  # the seed matters
    state = torch.get_rng_state()
    sample_context_templates(model, tok, params, seed=1)
    assert torch.equal(state, torch.get_rng_state())  # a private generator: the global RNG is untouched


def test_a_tokenizer_without_pad_token_pads_with_zero():
    """Models passed in by users (``import kelight``) may come with a tokenizer that has no pad token."""
    from kelight.editors.rewrite import build_rewrite_batch
    from kelight.types import EditRequest

    _, tok = tiny_model("llama")
    request = EditRequest("The Eiffel Tower is located in", "Eiffel Tower", "Rome")
    with_pad = build_rewrite_batch(tok, request, ["{}", "Yes. {}"], "cpu")
    tok.pad_token = None
    assert tok.pad_token_id is None
    without = build_rewrite_batch(tok, request, ["{}", "Yes. {}"], "cpu")
    assert torch.equal(without.attention_mask, with_pad.attention_mask)
    pad = ~with_pad.attention_mask.bool()
    assert pad.any() and (without.input_ids[pad] == 0).all()
    assert torch.equal(without.input_ids[~pad], with_pad.input_ids[~pad])

"""Top-k sampling with a KV cache: batched equals one at a time, seeded, stops at EOS."""

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.lm.generation import answer_ended, answer_text, generate, greedy_answers, stop_ids
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


# ---- greedy answers (the wild evaluation protocol) ----------------------------------------
@pytest.mark.parametrize(("continuation", "answer", "ended"), [
    (" Paris, France. It is", "Paris, France", True),  # a comma does not end it; ". " does
    (" Paris.", "Paris", False),  # a closing terminator ends the text, but more tokens could follow it
    (" 3.5 million\nmore", "3.5 million", True),  # a decimal point is no sentence end; a line break is
    (" U.S. Navy", "U.S", True),  # an abbreviation's last dot followed by a space is (a known limit)
    (" Why? Because", "Why", True), (" yes! no", "yes", True), (" first; second", "first", True),
    ("\n\n  Rome\n", "Rome", True),  # leading line breaks are no answer yet
    ("\n\n", "", False), ("", "", False), (" Rome", "Rome", False),
])
def test_answer_text_and_its_end(continuation: str, answer: str, ended: bool) -> None:
    assert answer_text(continuation) == answer
    assert answer_ended(continuation) is ended


def _scripted_head(tok, scripts: list[str], calls: list[int]):
    """An LM head whose argmax emits each row's script byte by byte (``<eos>`` as its own entry), then 'x'."""
    rows = [[tok.eos_token_id if part == "<eos>" else tok.convert_tokens_to_ids(ch) for part in script
             for ch in ([part] if part == "<eos>" else tok.convert_ids_to_tokens(tok(part)["input_ids"]))]
            for script in [s.split("|") for s in scripts]]

    def head(model, hidden):
        step = len(calls)
        calls.append(step)
        logits = torch.zeros(hidden.shape[0], model.config.vocab_size)
        for i, ids in enumerate(rows):
            logits[i, ids[step] if step < len(ids) else tok.convert_tokens_to_ids("x")] = 1.0
        return logits

    return head


def test_greedy_answers_stop_at_the_natural_end(monkeypatch: pytest.MonkeyPatch) -> None:
    import kelight.lm.generation as gen

    model, tok = tiny_model("llama")
    scripts = [" Paris. The rest", " Rome\nmore", " Lyon|<eos>", " abc", "\n Oslo; x"]
    calls: list[int] = []
    monkeypatch.setattr(gen, "head", _scripted_head(tok, scripts, calls))
    answers = gen.greedy_answers(model, tok, ["a", "b", "c", "d", "e"], max_new_tokens=10, batch_size=8)
    assert answers == ["Paris", "Rome", "Lyon", "abcxxxxxx", "Oslo"]  # cap: 10 tokens, " abc" + 6 x
    assert len(calls) == 10  # the capped row ran to the cap; the batch stopped there


def test_greedy_decoding_stops_when_every_row_has_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    import kelight.lm.generation as gen

    model, tok = tiny_model("llama")
    calls: list[int] = []
    monkeypatch.setattr(gen, "head", _scripted_head(tok, [" Paris. More", " Rome|<eos>"], calls))
    assert gen.greedy_answers(model, tok, ["a", "b"], max_new_tokens=30) == ["Paris", "Rome"]
    assert len(calls) == len(" Paris. ")  # the end is certain once the space after "." is generated


def test_greedy_answers_batched_equal_one_at_a_time_and_are_deterministic(tiny: Model) -> None:
    model, tok = tiny
    model = model.double()  # float64: no argmax near-tie can flip with the padding
    prompts = ["Hello there, how are", "A", "Paris is the capital of", "The Eiffel Tower is in"]
    batched = greedy_answers(model, tok, prompts, max_new_tokens=12, batch_size=3)
    assert batched == [greedy_answers(model, tok, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == greedy_answers(model, tok, prompts, max_new_tokens=12, batch_size=3)  # a rerun
    assert any(batched)


def test_greedy_answers_replay_each_prompts_own_weight_change(tiny: Model) -> None:
    """With ``changes``/``groups`` a prompt is answered by its own changed model (row replay), the others by
    theirs or by the unchanged model, in one batch."""
    from kelight.editors.undo import UndoLog
    from kelight.lm.hooks import linear_weight_changes

    model, tok = tiny
    model = model.double()  # float64: replay rounding cannot flip an argmax
    prompts = ["Paris is the capital of", "The Eiffel Tower is in", "Hello there, how are"]
    from kelight.models.adapters import adapter_for

    weight = model.get_submodule(adapter_for(model).path("mlp_out", 0)).weight
    changes, alone = [], []
    for seed in (0, 1):
        undo = UndoLog()
        undo.add_(weight, 3.0 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)).double())
        alone.append(greedy_answers(model, tok, prompts, max_new_tokens=10))
        changes.append(linear_weight_changes(model, undo.changes()))
        undo.restore()
    plain = greedy_answers(model, tok, prompts, max_new_tokens=10)
    assert alone[0] != plain and alone[1] != plain
    groups = [0, 1, 2]  # group 2 has no change: the unchanged model
    replayed = greedy_answers(model, tok, prompts, max_new_tokens=10, batch_size=2, changes=[*changes, {}],
                              groups=groups)
    assert replayed == [alone[0][0], alone[1][1], plain[2]]
    with pytest.raises(ValueError, match="expected a group per prompt with changes, got 2 groups for 3 prompts"):
        greedy_answers(model, tok, prompts, changes=changes, groups=[0, 1])


def test_greedy_answers_errors() -> None:
    model, tok = tiny_model("llama")
    assert greedy_answers(model, tok, []) == []
    with pytest.raises(ValueError, match="expected max_new_tokens >= 1 and batch_size >= 1, got 0 and 64"):
        greedy_answers(model, tok, ["a"], max_new_tokens=0)
    assert tok.eos_token_id in stop_ids(model, tok) and tok.pad_token_id in stop_ids(model, tok)


def test_doctests() -> None:
    import doctest

    import kelight.lm.generation

    assert doctest.testmod(kelight.lm.generation, raise_on_error=True).failed == 0

"""Key second moments: streamed == brute force, one pass == per layer, cache keyed by content."""

from __future__ import annotations

import json
import logging
import random
import shutil
import string
from pathlib import Path

import pytest
import torch
from torch import nn

from kelight.editors.stats.corpus import CorpusSpec, as_corpus, clean_wikitext
from kelight.editors.stats.moments import second_moment, second_moments
from kelight.models.adapters import adapter_for
from kelight.models.loading import cache_dir
from kelight.models.tiny import TINY_CONFIGS, byte_tokenizer, tiny_model

FAMILIES = sorted(TINY_CONFIGS)
FAST = {"progress": False, "batch_size": 4}


pytestmark = pytest.mark.usefixtures("no_shared_data")  # the shared data stay hidden


def _texts(n: int = 12, seed: int = 0, lengths: tuple[int, int] = (5, 40)) -> tuple[str, ...]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + " .,"
    return tuple("".join(rng.choices(alphabet, k=rng.randint(*lengths))) for _ in range(n))


def _corpus(texts: tuple[str, ...] | None = None) -> CorpusSpec:
    return CorpusSpec(kind="texts", texts=texts or _texts(), shuffle=False)


def _brute_force(model: nn.Module, tok: object, layer: int, texts: tuple[str, ...], n: int | None = None):
    """E[k kᵀ] (float64) from full, unpadded forwards of each text with a plain hook."""
    keys: list[torch.Tensor] = []
    module = adapter_for(model).module(model, "mlp_out", layer)
    handle = module.register_forward_hook(lambda m, args, out: keys.append(args[0][0].double()))
    try:
        with torch.no_grad():
            for text in texts:
                model(input_ids=tok(text, return_tensors="pt")["input_ids"])
    finally:
        handle.remove()
    k = torch.cat(keys)[:n]  # (N, Dk)
    return k.T @ k / len(k)


def _count_forwards(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(1), with_kwargs=True)
    return calls


def _stats_files() -> list[Path]:
    return sorted((Path("cache") / "stats").glob("*.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streamed_equals_brute_force_without_pad_tokens(family: str, dtype: torch.dtype) -> None:
    model, tok = tiny_model(family)
    texts = _texts()
    assert len({len(t) for t in texts[:4]}) > 1  # batches of 4 carry padding
    got = second_moment(model, tok, 1, _corpus(texts), dtype=dtype, cache=False, **FAST)
    assert got.dtype == torch.float32 and got.shape == (96, 96)
    torch.testing.assert_close(got.double(), _brute_force(model, tok, 1, texts), rtol=1e-5, atol=1e-5)


def test_n_tokens_takes_the_first_tokens_in_corpus_order() -> None:
    model, tok = tiny_model("llama")
    texts = _texts()  # varied lengths: batching sorts by length, the token set must not change
    got = second_moment(model, tok, 2, _corpus(texts), n_tokens=100, **FAST)
    torch.testing.assert_close(got.double(), _brute_force(model, tok, 2, texts, n=100), rtol=1e-5, atol=1e-5)
    from safetensors import safe_open

    with safe_open(str(_stats_files()[0]), framework="pt") as f:
        assert f.metadata()["count"] == "100"


def test_a_lazy_stream_is_read_no_further_than_the_budget() -> None:
    """Texts are taken from the stream in chunks no larger than the tokens left need, so a model-sampled stream
    samples no batch it does not use (20,000 tokens of ~110-token samples: 182 texts, not 201)."""
    from kelight.editors.stats.moments import _sequences

    tok = byte_tokenizer()
    read = []

    def stream():
        for i in range(10_000):
            read.append(i)
            yield "".join(random.Random(i).choices(string.ascii_lowercase + " ", k=110))

    per_text = len(tok("a" * 110)["input_ids"])
    seqs = list(_sequences(tok, stream(), max_length=512, n_tokens=20_000))
    assert sum(map(len, seqs)) == 20_000
    assert len(read) == len(seqs) == -(-20_000 // per_text)


def test_several_layers_in_one_pass_equal_per_layer() -> None:
    model, tok = tiny_model("gpt2")
    calls = _count_forwards(model)
    both = second_moments(model, tok, [2, 0, 1], _corpus(), cache=False, **FAST)
    one_pass = len(calls)
    assert list(both) == [2, 0, 1]
    for layer in (0, 1, 2):
        alone = second_moment(model, tok, layer, _corpus(), cache=False, **FAST)
        torch.testing.assert_close(both[layer], alone)
    assert len(calls) == 4 * one_pass  # the three single-layer runs took one pass each


def test_cache_hit_returns_identical_tensor_without_forwards() -> None:
    model, tok = tiny_model("llama")
    calls = _count_forwards(model)
    first = second_moment(model, tok, 1, _corpus(), **FAST)
    assert calls and len(_stats_files()) == 1
    calls.clear()
    again = second_moment(model, tok, 1, _corpus(), **FAST)
    assert not calls and torch.equal(first, again)
    second_moments(model, tok, [1, 2], _corpus(), **FAST)  # layer 1 cached, layer 2 computed
    assert calls and len(_stats_files()) == 2


@pytest.mark.parametrize(
    ("param", "recomputes"),
    [
        ("model.embed_tokens.weight", True),
        ("model.layers.0.self_attn.q_proj.weight", True),
        ("model.layers.1.mlp.up_proj.weight", True),
        ("model.layers.1.mlp.down_proj.weight", False),  # mlp_out at the layer does not touch its input
        ("model.layers.2.mlp.up_proj.weight", False),
        ("lm_head.weight", False),
    ],
)
def test_cache_key_covers_exactly_the_weights_below_the_key(param: str, recomputes: bool) -> None:
    model, tok = tiny_model("llama")
    before = second_moment(model, tok, 1, _corpus(), **FAST)
    model.get_parameter(param).data.view(-1)[0] += 1.0
    calls = _count_forwards(model)
    second_moment(model, tok, 1, _corpus(), **FAST)
    assert bool(calls) == recomputes
    assert len(_stats_files()) == 1 + recomputes
    if not recomputes:  # the excluded weights truly leave the keys unchanged
        assert torch.equal(second_moment(model, tok, 1, _corpus(), cache=False, **FAST), before)


def test_cache_key_covers_the_tokenizer() -> None:
    from tokenizers.processors import TemplateProcessing

    model, tok = tiny_model("llama")
    before = second_moment(model, tok, 1, _corpus(), **FAST)
    with_bos = byte_tokenizer()
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", with_bos.bos_token_id)]
    )
    calls = _count_forwards(model)
    after = second_moment(model, with_bos, 1, _corpus(), **FAST)
    assert calls and len(_stats_files()) == 2 and not torch.equal(before, after)


@pytest.mark.parametrize("damage", ["truncate", "flip_data", "flip_header", "empty"])
def test_corrupt_cache_file_is_detected_and_rebuilt(damage: str, caplog: pytest.LogCaptureFixture) -> None:
    model, tok = tiny_model("gptj")
    first = second_moment(model, tok, 1, _corpus(), **FAST)
    (path,) = _stats_files()
    raw = path.read_bytes()
    damaged = {
        "truncate": raw[: len(raw) // 2],
        "flip_data": raw[:-8] + bytes(b ^ 0xFF for b in raw[-8:]),
        "flip_header": raw[:40] + bytes([raw[40] ^ 0x01]) + raw[41:],
        "empty": b"",
    }
    path.write_bytes(damaged[damage])
    calls = _count_forwards(model)
    with caplog.at_level(logging.WARNING, logger="kelight.editors.stats.cache"):
        rebuilt = second_moment(model, tok, 1, _corpus(), **FAST)
    assert calls and torch.equal(first, rebuilt)
    assert any(str(path) in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records)
    calls.clear()
    assert torch.equal(second_moment(model, tok, 1, _corpus(), **FAST), first) and not calls


def _model_corpus(**kwargs: object) -> CorpusSpec:
    return CorpusSpec(sample_prompts=("The", "In", "A"), sample_tokens=12, sample_batch=4, **kwargs)


def _sampled_batches() -> list[list[str]]:
    files = list((cache_dir() / "corpus").glob("model-*.jsonl"))
    assert len(files) == 1
    return [json.loads(line) for line in files[0].read_text().splitlines()]


def test_model_samples_are_seeded_lazy_and_quiet(caplog: pytest.LogCaptureFixture) -> None:
    model, tok = tiny_model("llama")
    rng = torch.get_rng_state()
    with caplog.at_level(logging.WARNING):
        first = second_moment(model, tok, 1, _model_corpus(kind="auto"), n_tokens=60, cache=False, **FAST)
    assert not caplog.records  # the default path says nothing
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert torch.isfinite(first).all() and torch.allclose(first, first.T)
    # 60 tokens of 13- to 16-token samples need 4 or 5 texts: one or two batches of 4, not an endless stream
    assert [len(b) for b in _sampled_batches()] in ([4], [4, 4])


def test_model_samples_equal_a_fresh_stream_when_read_from_the_cache() -> None:
    model, tok = tiny_model("llama")
    small = second_moment(model, tok, 1, _model_corpus(), n_tokens=40, cache=False, **FAST)
    grown = second_moment(model, tok, 1, _model_corpus(), n_tokens=400, cache=False, **FAST)  # cached + new
    batches = _sampled_batches()
    assert len(batches) > 2
    shutil.rmtree(cache_dir() / "corpus")
    assert torch.equal(second_moment(model, tok, 1, _model_corpus(), n_tokens=400, cache=False, **FAST), grown)
    assert _sampled_batches() == batches  # the same texts, batch for batch
    assert torch.equal(second_moment(model, tok, 1, _model_corpus(), n_tokens=40, cache=False, **FAST), small)
    other_seed = second_moment(model, tok, 1, _model_corpus(seed=1), n_tokens=40, cache=False, **FAST)
    assert not torch.equal(other_seed, small)


def test_a_damaged_sample_cache_is_dropped_and_resampled(caplog: pytest.LogCaptureFixture) -> None:
    model, tok = tiny_model("llama")
    first = second_moment(model, tok, 1, _model_corpus(), n_tokens=40, cache=False, **FAST)
    path = next((cache_dir() / "corpus").glob("model-*.jsonl"))
    path.write_text('["half a batch", \n')
    with caplog.at_level(logging.WARNING, logger="kelight.editors.stats.corpus"):
        again = second_moment(model, tok, 1, _model_corpus(), n_tokens=40, cache=False, **FAST)
    assert torch.equal(again, first)
    assert any("dropping the cached model samples" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["sample_tokens", "sample_top_k", "sample_batch"])
def test_model_sampling_options_are_checked(name: str) -> None:
    with pytest.raises(ValueError, match=f"expected CorpusSpec.{name} to be a positive integer, got 0"):
        CorpusSpec(kind="model", **{name: 0})


def test_wikitext_found_through_kelight_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [" = Title = ", " Some text @-@ based , with <unk> words here . ", "", " Another line of text ."]
    root = tmp_path / "data"
    (root / "wikitext2").mkdir(parents=True)
    for split in ("valid", "test"):
        (root / "wikitext2" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("KELIGHT_DATA", str(root))
    model, tok = tiny_model("gpt_neox")
    texts = tuple(t for t in map(clean_wikitext, lines * 2) if t)
    expected = second_moment(model, tok, 0, CorpusSpec(kind="texts", texts=texts), cache=False, **FAST)
    assert torch.equal(second_moment(model, tok, 0, None, cache=False, **FAST), expected)
    assert torch.equal(second_moment(model, tok, 0, "wikitext2", cache=False, **FAST), expected)


def test_clean_wikitext() -> None:
    line = " The lobster @-@ like animal , about 1 @,@ 000 of them ( 0 @.@ 5 kg ) , is a <unk> species . "
    assert clean_wikitext(line) == "The lobster-like animal, about 1,000 of them (0.5 kg), is a species."
    assert clean_wikitext(" = = Description = = ") is None
    assert clean_wikitext("   ") is None
    assert clean_wikitext(" <unk> <unk> , ") is None


def test_file_sources(tmp_path: Path) -> None:
    texts = ["first text of the file", "second text of the file"]
    (tmp_path / "c.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": t} for t in texts]))
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(t) for t in texts))
    model, tok = tiny_model("gemma3_text")
    expected = second_moment(model, tok, 1, CorpusSpec(kind="texts", texts=tuple(texts)), **FAST)
    for name in ("c.txt", "c.json", "c.jsonl"):
        assert torch.equal(second_moment(model, tok, 1, tmp_path / name, cache=False, **FAST), expected)
    (tmp_path / "bad.json").write_text(json.dumps([{"body": "x"}]))
    with pytest.raises(ValueError, match="expected strings or records with a string 'text'"):
        second_moment(model, tok, 1, str(tmp_path / "bad.json"), **FAST)
    with pytest.raises(FileNotFoundError, match="expected an existing"):
        as_corpus("missing.jsonl")


def test_hub_source(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    texts = ["a hub text number one", "a hub text number two"]
    seen = {}

    def fake_load(name: str, config: str | None, split: str) -> datasets.Dataset:
        seen.update(name=name, config=config, split=split)
        return datasets.Dataset.from_dict({"text": texts})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert as_corpus("org/corpus:en") == CorpusSpec(kind="hub", name="org/corpus", config="en")
    model, tok = tiny_model("llama")
    got = second_moment(model, tok, 0, CorpusSpec(kind="hub", name="org/corpus", shuffle=False), **FAST)
    assert seen == {"name": "org/corpus", "config": None, "split": "train"}
    expected = second_moment(model, tok, 0, CorpusSpec(kind="texts", texts=tuple(texts)), cache=False, **FAST)
    torch.testing.assert_close(got, expected)


def test_user_errors() -> None:
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match=r"layer 3 is out of range .* expected an integer in \[0, 2\]"):
        second_moment(model, tok, 3, _corpus(), **FAST)
    with pytest.raises(ValueError, match="out of range"):
        second_moments(model, tok, [0, -1], _corpus(), **FAST)
    with pytest.raises(ValueError, match="expected at least one layer"):
        second_moments(model, tok, [], _corpus(), **FAST)
    with pytest.raises(ValueError, match="expected a positive integer n_tokens"):
        second_moment(model, tok, 0, _corpus(), n_tokens=0, **FAST)
    with pytest.raises(ValueError, match="expected dtype"):
        second_moment(model, tok, 0, _corpus(), dtype=torch.float16, **FAST)
    with pytest.raises(ValueError, match="expects a non-empty path"):
        CorpusSpec(kind="file")
    with pytest.raises(FileNotFoundError, match="expected WikiText-2"):
        second_moment(model, tok, 0, "wikitext2", **FAST)
    with pytest.raises(ValueError, match="expected the corpus to yield tokens"):
        second_moment(model, tok, 0, CorpusSpec(kind="texts", texts=("",)), **FAST)

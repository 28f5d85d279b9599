"""Tiny random-weight models of each architecture family, for tests (seconds, no downloads)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from kelight.models.tokenizer import prepare_tokenizer

_COMMON = {"vocab_size": 260, "tie_word_embeddings": False}
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=256,
    ),
    "gemma3_text": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    ),
    "gpt2": dict(n_embd=48, n_inner=96, n_layer=3, n_head=4, n_positions=256),
    "gptj": dict(n_embd=48, n_inner=96, n_layer=3, n_head=4, n_positions=256, rotary_dim=4),
    "gpt_neox": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=256,
    ),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + bos/eos/pad/unk) that encodes any text."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<bos>", "<eos>", "<pad>", "<unk>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    return prepare_tokenizer(fast)


def tiny_model(family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
               **overrides: object) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A frozen random-weight model of ``family`` (a key of ``TINY_CONFIGS``) and a byte tokenizer.

    ``overrides`` replace config values (e.g. ``sliding_window=64``).
    """
    if family not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {sorted(TINY_CONFIGS)}")
    tok = byte_tokenizer()
    config = AutoConfig.for_model(
        family, **_COMMON, **{**TINY_CONFIGS[family], **overrides},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    return model, tok

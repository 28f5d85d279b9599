"""How kelight prepares every tokenizer it loads (packaged, hub, or the tiny test models')."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give the tokenizer a pad token and right padding (kelight indexes positions explicitly)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer

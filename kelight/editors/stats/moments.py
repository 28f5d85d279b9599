"""Second moments C = E[k kᵀ] of MLP keys, streamed over a text corpus and cached by content hash.

The key k at layer l is the input of the block's MLP output module (``adapter.path("mlp_out", l)``:
``down_proj``, ``fc_out``, GPT-2's ``c_proj``) at every non-pad token. C is uncentred, as in ROME's
``layer_stats`` (``mom2``). Several layers are collected in one pass, and each forward stops right
after the last requested layer, so the blocks above it and the LM head never run.

Precision: each batch's Gram matrix ``kᵀk`` is computed in ``dtype`` (float32 by default; BLAS
sums at most ``batch_size × max_length`` products, relative error ~1e-6) and added into a float64
accumulator, so the running sum over 10⁵-10⁶ tokens does not drift. Pass ``dtype=torch.float64``
for float64 products (about twice the Gram time on CPU). On CUDA keep TF32 matmuls off (the default).

Cache: content-addressed files with integrity checks (:mod:`kelight.editors.stats.cache`).

Example:
    >>> from kelight.models.tiny import tiny_model
    >>> model, tok = tiny_model("llama")
    >>> corpus = CorpusSpec(kind="texts", texts=("A small corpus.", "Of two texts."))
    >>> second_moment(model, tok, 1, corpus, n_tokens=16, cache=False, progress=False).shape
    torch.Size([96, 96])
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.editors.stats.cache import WeightHasher, cache_path, key_fields, load_moment, save_moment, tokenizer_digest
from kelight.editors.stats.corpus import (
    CorpusSpec,
    Source,
    as_corpus,
    content_digest,
    model_device,
    pad_token_id,
    resolve_corpus,
)
from kelight.lm.hooks import trace
from kelight.lm.tokens import pad_batch
from kelight.models.adapters import ArchAdapter, adapter_for

log = logging.getLogger(__name__)

_SORT_WINDOW = 32  # batches per length-sorted window
_TOKENIZE_CHUNK = 256  # texts tokenised per call


def _sequences(
    tok: PreTrainedTokenizerBase, texts: Iterable[str], max_length: int, n_tokens: int
) -> Iterator[list[int]]:
    """Token ids of the texts in corpus order, each truncated to ``max_length``; the last one is
    cut so that exactly ``n_tokens`` tokens come out (fewer if the corpus runs out)."""
    left, stream = n_tokens, iter(texts)
    # at most about half the texts the tokens left need (1 per 200 tokens; model samples hold ~110): a lazy
    # stream, such as model samples, is then read little past the budget (no batch sampled for nothing)
    while left > 0 and (chunk := list(itertools.islice(stream, min(_TOKENIZE_CHUNK, left // 200 + 1)))):
        for ids in tok(chunk, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]:
            taken = list(ids[:left])  # a prefix keeps its keys: the model is causal
            left -= len(taken)
            if taken:
                yield taken


def _batches(
    seqs: Iterable[list[int]], batch_size: int, pad_id: int, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Right-padded ``(input_ids, attention_mask)`` batches, ``(B, T)`` each. Sequences are sorted
    by length within windows of ``_SORT_WINDOW`` batches (less padding); which tokens are used was
    fixed by :func:`_sequences` before, so the sort cannot bias the sample."""
    stream = iter(seqs)
    while window := sorted(itertools.islice(stream, _SORT_WINDOW * batch_size), key=len):
        for i in range(0, len(window), batch_size):
            yield pad_batch(window[i: i + batch_size], pad_id, device)


def _accumulate(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, paths: dict[int, str], texts: Iterable[str],
    opts: _Options,
) -> tuple[dict[int, torch.Tensor], int]:
    """Sums of ``k kᵀ`` (float64) over the first ``opts.n_tokens`` tokens, and their count."""
    sums: dict[int, torch.Tensor] = {}
    count = 0
    seqs = _sequences(tok, texts, opts.max_length, opts.n_tokens)
    bar = tqdm(total=opts.n_tokens, unit="tok", desc=f"key moments {list(paths)}", disable=not opts.progress)
    with bar:
        for ids, mask in _batches(seqs, opts.batch_size, pad_token_id(tok), model_device(model)):
            real = mask.reshape(-1).bool()  # (B*T,) non-pad positions
            with torch.no_grad(), trace(model, list(paths.values()), inputs=True, stop=True) as rec:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            for layer, path in paths.items():
                k = rec[path].reshape(-1, rec[path].shape[-1])[real].to(opts.dtype)  # (N, Dk)
                gram = (k.T @ k).to(torch.float64)  # (Dk, Dk)
                sums[layer] = sums[layer].add_(gram) if layer in sums else gram
            count += int(real.sum())
            bar.update(int(real.sum()))
    return sums, count


@dataclass(frozen=True)
class _Options:
    n_tokens: int
    max_length: int
    batch_size: int
    dtype: torch.dtype
    progress: bool

    def __post_init__(self) -> None:
        for name in ("n_tokens", "max_length", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"expected a positive integer {name}, got {getattr(self, name)!r}")
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"expected dtype torch.float32 or torch.float64, got {self.dtype}")


def _key_dim(model: PreTrainedModel, adapter: ArchAdapter, layer: int) -> int:
    return adapter.out_weight_as_linear(model, layer).shape[1]  # (d_out, d_in): key dim is d_in


def _compute(model: PreTrainedModel, tok: PreTrainedTokenizerBase, adapter: ArchAdapter, layers: list[int],
             source: Source, opts: _Options) -> tuple[dict[int, torch.Tensor], int]:
    """E[k kᵀ] (CPU float32) at ``layers`` in one streamed pass, and the token count."""
    start, was_training = time.perf_counter(), model.training
    model.eval()
    try:
        paths = {layer: adapter.path("mlp_out", layer) for layer in layers}
        sums, count = _accumulate(model, tok, paths, source.texts(), opts)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("expected the corpus to yield tokens, got none; check the corpus texts")
    if count < opts.n_tokens:
        log.warning("corpus exhausted after %d of the requested %d tokens", count, opts.n_tokens)
    seconds = time.perf_counter() - start
    log.info("key second moments at layers %s: %d tokens in %.1f s", layers, count, seconds)
    return {layer: (s / count).float().cpu() for layer, s in sums.items()}, count


def second_moments(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layers: Sequence[int],
    corpus: CorpusSpec | str | os.PathLike | None = None,
    *,
    n_tokens: int = 100_000,
    max_length: int = 512,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    cache: bool = True,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Uncentred second moments C_l = E[k kᵀ] of the MLP keys at several layers, in one pass.

    Args:
        model: a causal LM with a kelight adapter (``adapter_for``).
        tok: its tokenizer.
        layers: layer indices (any order; duplicates are merged).
        corpus: a :class:`CorpusSpec` or anything :func:`as_corpus` accepts; ``None`` is ``"auto"``.
        n_tokens: number of non-pad tokens to use (fewer if the corpus runs out, with a warning).
        max_length: each text is truncated to this many tokens.
        batch_size: texts per forward pass.
        dtype: precision of each batch's ``kᵀk`` (the running sum is always float64).
        cache: read and write ``cache_dir()/stats``.
        progress: show a tqdm progress bar.

    Returns:
        ``{layer: C}`` with C ``(D_k, D_k)`` float32 on the model's device.

    Raises:
        ValueError: a layer out of range (the message names the valid range) or bad options.
    """
    adapter, opts = adapter_for(model), _Options(n_tokens, max_length, batch_size, dtype, progress)
    if not layers:
        raise ValueError("expected at least one layer, got none")
    for layer in layers:
        adapter.check_layer(model, layer)
    wanted = sorted(set(layers))  # ascending: trace stops after the last (highest) layer
    hasher = WeightHasher(model, adapter)
    tokenizer = tokenizer_digest(tok)
    source = resolve_corpus(as_corpus(corpus), model, tok, lambda: content_digest(hasher.full(), tokenizer))
    fields = {layer: key_fields(hasher, layer, source.digest, tokenizer, opts.n_tokens, opts.max_length, opts.dtype)
              for layer in wanted}
    dims = {layer: _key_dim(model, adapter, layer) for layer in wanted}
    found: dict[int, torch.Tensor | None] = {}
    if cache:
        found = {layer: load_moment(cache_path(fields[layer]), fields[layer], dims[layer]) for layer in wanted}
    missing = [layer for layer in wanted if found.get(layer) is None]
    if missing:
        computed, count = _compute(model, tok, adapter, missing, source, opts)
        for layer in missing:
            if cache:
                save_moment(cache_path(fields[layer]), computed[layer], fields[layer], count)
            found[layer] = computed[layer]
    return {layer: found[layer].to(model_device(model)) for layer in layers}


def second_moment(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    layer: int,
    corpus: CorpusSpec | str | os.PathLike | None = None,
    *,
    n_tokens: int = 100_000,
    max_length: int = 512,
    batch_size: int = 32,
    dtype: torch.dtype = torch.float32,
    cache: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """C = E[k kᵀ] ``(D_k, D_k)`` (float32, on the model's device) at one layer.

    Arguments are those of :func:`second_moments` with a single ``layer``.

    Example:
        >>> model, tok = load("smollm2-135m")  # doctest: +SKIP
        >>> second_moment(model, tok, 4).shape  # WikiText-2, 100k tokens, cached  # doctest: +SKIP
        torch.Size([1536, 1536])
    """
    return second_moments(
        model, tok, [layer], corpus, n_tokens=n_tokens, max_length=max_length, batch_size=batch_size,
        dtype=dtype, cache=cache, progress=progress,
    )[layer]

"""Second moments C = E[k kᵀ] of MLP keys, streamed over a text corpus and cached by content hash.

The key k at layer l is the input of the block's MLP output module (``adapter.path("mlp_out", l)``:
``down_proj``, ``fc_out``, GPT-2's ``c_proj``) at every non-pad token. C is uncentred, as in ROME's
``layer_stats`` (``mom2``). Several layers are collected in one pass, and each forward stops right
after the last requested layer, so the blocks above it and the LM head never run.

Precision: each batch's Gram matrix ``kᵀk`` is computed in ``dtype`` (float32 by default; BLAS
sums at most ``batch_size × max_length`` products, relative error ~1e-6) and added into a float64
accumulator, so the running sum over 10⁵-10⁶ tokens does not drift. Pass ``dtype=torch.float64``
for float64 products (about twice the Gram time on CPU). On CUDA keep TF32 matmuls off (the default).

Cache: ``cache_dir()/stats/<family>-l<layer>-<key>.safetensors`` with tensor ``mom2`` (float32)
and metadata (format, key, layer, weights and corpus digests, n_tokens, max_length, dtype, count,
sha256 of the tensor bytes and the other fields). The key is a sha256 of: the model config (minus volatile fields); the
bytes, dtypes and shapes of every state-dict tensor that precedes the decoder blocks (token and
position embeddings), of all tensors of blocks ``0..l-1`` and of block ``l`` except the
``mlp_out`` module itself (its weights do not influence its input, so a ROME/MEMIT update at
layer l keeps layer l's statistics valid); the corpus digest; the tokenizer's definition and its
encoding of a probe; n_tokens; max_length; dtype. The batch size is not in the key: the tokens
used are fixed before batching, so it changes only the float summation order.
Hashing reads each tensor once (SmolLM2-135M, 5 blocks: well under a second). Files are written
atomically (temporary file + rename); a file that fails to parse or verify is logged, deleted
and rebuilt.

Example:
    >>> from kelight.models.tiny import tiny_model
    >>> model, tok = tiny_model("llama")
    >>> corpus = CorpusSpec(kind="texts", texts=("A small corpus.", "Of two texts."))
    >>> second_moment(model, tok, 1, corpus, n_tokens=16, cache=False, progress=False).shape
    torch.Size([96, 96])
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.editors.corpus import (  # noqa: F401 (clean_wikitext: re-exported for callers of this module)
    FORMAT,
    CorpusSpec,
    Source,
    as_corpus,
    clean_wikitext,
    content_digest,
    model_device,
    pad_token_id,
    resolve_corpus,
)
from kelight.hooks import trace
from kelight.models.adapters import ArchAdapter, adapter_for
from kelight.models.loading import cache_dir
from kelight.tokens import pad_batch

log = logging.getLogger(__name__)

_SORT_WINDOW = 32  # batches per length-sorted window
_TOKENIZE_CHUNK = 256  # texts tokenised per call
_TOKENIZER_PROBE = "The Eiffel Tower, 1,000 ft (300 m) tall, is in Paris."
_VOLATILE_CONFIG = frozenset({"_name_or_path", "transformers_version", "_commit_hash", "name_or_path"})


class _WeightHasher:
    """Content digests of a model's weights; each tensor is read and hashed at most once."""

    def __init__(self, model: PreTrainedModel, adapter: ArchAdapter) -> None:
        self.adapter = adapter
        self.state = model.state_dict()  # ordered; embeddings precede the blocks in every family
        config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG}
        self.config = content_digest(json.dumps(config, sort_keys=True, default=str))
        self.digests: dict[str, str] = {}

    def _tensor(self, name: str) -> str:
        if name not in self.digests:
            t = self.state[name]
            head = content_digest(name, str(t.dtype), str(tuple(t.shape)))
            self.digests[name] = content_digest(head, _tensor_sha(t.detach().reshape(-1).view(torch.uint8)))
        return self.digests[name]

    def _influences(self, name: str, layer: int) -> bool:
        """Whether the tensor ``name`` (an embedding or a block's) influences keys at ``layer``."""
        prefix = self.adapter.layers + "."
        if not name.startswith(prefix):
            return True
        index = int(name[len(prefix):].split(".", 1)[0])
        if index == layer:
            return not name.startswith(self.adapter.path("mlp_out", layer) + ".")
        return index < layer

    def layer(self, layer: int) -> str:
        """Digest of the config and every tensor that influences the keys at ``layer``."""
        names, in_blocks = [], False
        for name in self.state:
            in_blocks = in_blocks or name.startswith(self.adapter.layers + ".")
            if in_blocks and not name.startswith(self.adapter.layers + "."):
                break  # final norm, LM head: after the blocks
            if self._influences(name, layer):
                names.append(name)
        return content_digest(self.config, *(self._tensor(n) for n in names))

    def full(self) -> str:
        """Digest of the config and all weights (model-sampled corpora depend on all of them)."""
        return content_digest(self.config, *(self._tensor(n) for n in self.state))


def _tokenizer_digest(tok: PreTrainedTokenizerBase) -> str:
    """Digest of the tokenizer's definition and of how it encodes a probe (special tokens too)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # truncation/padding are per-call state that encoding leaves behind
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        definition = json.dumps(spec, sort_keys=True)
    else:
        definition = json.dumps(sorted(tok.get_vocab().items()))
    probe = tok(_TOKENIZER_PROBE, add_special_tokens=True)["input_ids"]
    return content_digest(type(tok).__name__, definition, json.dumps(list(probe)))


def _sequences(
    tok: PreTrainedTokenizerBase, texts: Iterable[str], max_length: int, n_tokens: int
) -> Iterator[list[int]]:
    """Token ids of the texts in corpus order, each truncated to ``max_length``; the last one is
    cut so that exactly ``n_tokens`` tokens come out (fewer if the corpus runs out)."""
    left, stream = n_tokens, iter(texts)
    while left > 0 and (chunk := list(itertools.islice(stream, _TOKENIZE_CHUNK))):
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


def _key_fields(hasher: _WeightHasher, layer: int, corpus: str, tokenizer: str, opts: _Options) -> dict[
    str, str
]:
    fields = {
        "format": FORMAT, "family": hasher.adapter.family, "layer": str(layer), "weights": hasher.layer(layer),
        "corpus": corpus, "tokenizer": tokenizer, "n_tokens": str(opts.n_tokens),
        "max_length": str(opts.max_length), "dtype": str(opts.dtype).removeprefix("torch."),
    }
    return {**fields, "key": content_digest(*(f"{k}={v}" for k, v in fields.items()))}


def _cache_path(fields: dict[str, str]) -> Path:
    return cache_dir() / "stats" / f"{fields['family']}-l{fields['layer']}-{fields['key'][:32]}.safetensors"


def _tensor_sha(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (no copy beyond moving it to the CPU)."""
    return hashlib.sha256(memoryview(t.contiguous().cpu().numpy())).hexdigest()


def _file_sha(mom2: torch.Tensor, meta: dict[str, str]) -> str:
    """sha256 of the tensor's bytes and of every other metadata field (so that no byte of a readable
    header, e.g. the unchecked ``count``, can change unnoticed)."""
    others = {k: v for k, v in meta.items() if k != "sha256"}
    return content_digest(_tensor_sha(mom2), json.dumps(others, sort_keys=True))


def _load(path: Path, fields: dict[str, str], dim: int) -> torch.Tensor | None:
    """The cached ``mom2`` (CPU float32), or ``None``; an invalid file is logged and deleted."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, mom2 = f.metadata() or {}, f.get_tensor("mom2")
        bad = [k for k, v in fields.items() if meta.get(k) != v]
        if mom2.shape != (dim, dim) or mom2.dtype != torch.float32:
            bad.append(f"shape {tuple(mom2.shape)} {mom2.dtype}")
        if meta.get("sha256") != _file_sha(mom2, meta):
            bad.append("checksum")
        if not bad:
            return mom2
        reason = f"mismatching {', '.join(bad)}"
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = f"unreadable ({err})"
    log.warning("key statistics cache file %s is %s; deleting and rebuilding it", path, reason)
    path.unlink(missing_ok=True)
    return None


def _save(path: Path, mom2: torch.Tensor, fields: dict[str, str], count: int) -> None:
    """Write ``mom2`` with its metadata atomically (temporary file in the same folder + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        meta = {**fields, "count": str(count)}
        meta["sha256"] = _file_sha(mom2, meta)
        tmp.write_bytes(save({"mom2": mom2}, metadata=meta))  # save_file would create it 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    hasher = _WeightHasher(model, adapter)
    source = resolve_corpus(as_corpus(corpus), model, tok, hasher.full)
    tokenizer = _tokenizer_digest(tok)
    fields = {layer: _key_fields(hasher, layer, source.digest, tokenizer, opts) for layer in wanted}
    dims = {layer: _key_dim(model, adapter, layer) for layer in wanted}
    found: dict[int, torch.Tensor | None] = {}
    if cache:
        found = {layer: _load(_cache_path(fields[layer]), fields[layer], dims[layer]) for layer in wanted}
    missing = [layer for layer in wanted if found.get(layer) is None]
    if missing:
        computed, count = _compute(model, tok, adapter, missing, source, opts)
        for layer in missing:
            if cache:
                _save(_cache_path(fields[layer]), computed[layer], fields[layer], count)
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

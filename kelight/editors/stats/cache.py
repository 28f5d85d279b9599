"""Where second moments are cached: content-addressed safetensors files with integrity checks.

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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.editors.stats.corpus import FORMAT, content_digest
from kelight.models.adapters import ArchAdapter
from kelight.models.loading import cache_dir

log = logging.getLogger(__name__)

_TOKENIZER_PROBE = "The Eiffel Tower, 1,000 ft (300 m) tall, is in Paris."

_VOLATILE_CONFIG = frozenset({"_name_or_path", "transformers_version", "_commit_hash", "name_or_path"})


class WeightHasher:
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


def tokenizer_digest(tok: PreTrainedTokenizerBase) -> str:
    """Digest of the tokenizer's definition and of how it encodes a probe (special tokens too)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # truncation/padding are per-call state that encoding leaves behind
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        definition = json.dumps(spec, sort_keys=True)
    else:
        definition = json.dumps(sorted(tok.get_vocab().items()))
    probe = tok(_TOKENIZER_PROBE, add_special_tokens=True)["input_ids"]
    return content_digest(type(tok).__name__, definition, json.dumps(list(probe)))


def key_fields(hasher: WeightHasher, layer: int, corpus: str, tokenizer: str, n_tokens: int, max_length: int,
               dtype: torch.dtype) -> dict[str, str]:
    """The fields that identify one layer's statistics, and ``key``, their digest (the file name)."""
    fields = {
        "format": FORMAT, "family": hasher.adapter.family, "layer": str(layer), "weights": hasher.layer(layer),
        "corpus": corpus, "tokenizer": tokenizer, "n_tokens": str(n_tokens),
        "max_length": str(max_length), "dtype": str(dtype).removeprefix("torch."),
    }
    return {**fields, "key": content_digest(*(f"{k}={v}" for k, v in fields.items()))}


def cache_path(fields: dict[str, str]) -> Path:
    """``cache_dir()/stats/<family>-l<layer>-<key>.safetensors``."""
    return cache_dir() / "stats" / f"{fields['family']}-l{fields['layer']}-{fields['key'][:32]}.safetensors"


def _tensor_sha(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (no copy beyond moving it to the CPU)."""
    return hashlib.sha256(memoryview(t.contiguous().cpu().numpy())).hexdigest()


def _file_sha(mom2: torch.Tensor, meta: dict[str, str]) -> str:
    """sha256 of the tensor's bytes and of every other metadata field (so that no byte of a readable
    header, e.g. the unchecked ``count``, can change unnoticed)."""
    others = {k: v for k, v in meta.items() if k != "sha256"}
    return content_digest(_tensor_sha(mom2), json.dumps(others, sort_keys=True))


def load_moment(path: Path, fields: dict[str, str], dim: int) -> torch.Tensor | None:
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


def save_moment(path: Path, mom2: torch.Tensor, fields: dict[str, str], count: int) -> None:
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

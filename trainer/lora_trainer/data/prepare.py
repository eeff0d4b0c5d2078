"""From dataset URIs to packed rows: download, hash, validate, split, encode, fit, pack.

Records keep their file line through every step, so anything refused or dropped later is reported
as `file:line` (and `lora-trainer inspect` shows it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..io import storage
from ..io.cache import Cache
from . import token_cache
from .encoding import Drop, Encoding, Sourced, encode_records, fit, p95_length
from .packing import make_rows, padding_fraction
from .records import DataError, read_jsonl_lines, split_records

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything training needs from the data, plus what progress.json reports about it."""

    train_rows: list
    eval_rows: list
    row_len: int  # 0 = unpacked (one example per row, padded per batch)
    max_seq_length: int
    eval_jsonl: Path  # held-out records, for the evaluation stage
    dataset_hashes: dict = field(default_factory=dict)
    skipped_lines: int = 0  # invalid lines and records the template refused (onInvalidLine: skip)
    truncated: int = 0  # examples cut after their last whole turn (onOverlong: truncate)
    dropped: int = 0  # examples left out by fitting (too long, nothing to train)
    n_train: int = 0
    n_eval: int = 0
    train_tokens: int = 0
    padding_fraction: float = 0.0
    p95: int = 0  # p95 of the training examples' lengths
    train_examples: list = field(default_factory=list)  # kept training examples, in file order
    drops: list = field(default_factory=list)  # training Drops (refused and fitted out), for inspect

    def summary(self) -> str:
        return (f"{self.n_train} train / {self.n_eval} eval examples, {self.train_tokens} train "
                f"tokens, maxSeqLength {self.max_seq_length} (p95 {self.p95}), {len(self.train_rows)} rows of "
                f"{self.row_len or 'variable'} tokens, padding {self.padding_fraction:.1%}, "
                f"{self.dropped} dropped, {self.truncated} truncated, {self.skipped_lines} skipped")

    def stats(self) -> dict:
        """What progress.json and lora-metadata.json report about the data."""
        return {"maxSeqLength": self.max_seq_length, "droppedExamples": self.dropped,
                "truncatedExamples": self.truncated, "skippedLines": self.skipped_lines}


def fetch(uri: str, dest_dir: Path, **store_kw) -> Path:
    """Download one dataset file (or use it in place when local)."""
    store, key = storage.open_uri(uri, **store_kw)
    path = store.local_path(key)
    if path is not None:
        if not path.is_file():
            raise DataError(uri, None, "file not found")
        return path
    path = Path(dest_dir) / key.replace("/", "__")
    try:
        store.get_file(key, path)
    except storage.NotFound:
        raise DataError(uri, None, "file not found") from None
    return path


def _encode(dataset, tokenizer, pairs, uri: str):
    records, lines = [r for r, _ in pairs], [n for _, n in pairs]
    return encode_records(tokenizer, records, dataset.format, dataset.train_on_prompt,
                          template_kwargs=dataset.chat_template_kwargs, lines=lines,
                          on_invalid=dataset.on_invalid_line, name=uri)


def _encode_all(dataset, tokenizer, pairs: dict[str, list], hashes: dict,
                cache: Optional[Cache]) -> dict[str, Encoding]:
    """Encode both splits, or take them from `cache` (see data.token_cache for the key)."""
    names = {"train": dataset.train, "eval": dataset.eval or dataset.train}
    key = None
    if cache is not None:
        key = token_cache.encoding_key(dataset, token_cache.tokenizer_digest(tokenizer), hashes, pairs)
        found = cache.load(key)
        if found is not None:
            try:
                return token_cache.decode(*found, key, len(tokenizer))
            except Exception as exc:  # verified bytes that do not hold together: rebuild
                log.warning("ignoring the tokens cache entry %s: %s", key[:12], exc)
    out = {s: _encode(dataset, tokenizer, pairs[s], names[s]) for s in token_cache.SPLITS}
    if cache is not None:
        cache.save(key, *token_cache.encode(out, key))
    return out


def prepare_data(dataset, tokenizer, work_dir: Path, seed: int, *, cache: Optional[Cache] = None,
                 **store_kw) -> Prepared:
    """`dataset` is the spec's DatasetSpec. Deterministic for a given (files, spec, seed).
    `cache` (data.token_cache) keeps the encodings for retries, resumed attempts and re-runs."""
    data_dir = Path(work_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    hashes, skipped = {}, 0

    def load(uri) -> list[tuple[dict, int]]:
        nonlocal skipped
        path = fetch(uri, data_dir, **store_kw)
        hashes[uri] = "sha256:" + storage.file_sha256(path)
        records, lines, bad = read_jsonl_lines(path, dataset.format, dataset.on_invalid_line, name=uri)
        skipped += bad
        return list(zip(records, lines))

    train = load(dataset.train)
    if dataset.eval:
        held = load(dataset.eval)
    else:
        if len(train) < 2:
            raise DataError(dataset.train, None, "need at least 2 examples to hold some out")
        train, held = split_records(train, dataset.eval_fraction, seed)
    eval_jsonl = data_dir / "heldout.jsonl"
    eval_jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r, _ in held),
                          encoding="utf-8")

    encoded = _encode_all(dataset, tokenizer, {"train": train, "eval": held}, hashes, cache)
    enc_train, enc_eval = encoded["train"], encoded["eval"]
    skipped += len(enc_train.refused) + len(enc_eval.refused)
    p95 = p95_length(enc_train.examples)
    max_len = dataset.max_seq_length or p95
    fit_train = fit(enc_train.examples, max_len, dataset.on_overlong)
    fit_eval = fit(enc_eval.examples, max_len, dataset.on_overlong)
    for d in fit_train.dropped[:5]:
        log.warning("%s:%s: dropped: %s", dataset.train, d.line, d.reason)
    if not fit_train.kept:
        raise DataError(dataset.train, None, f"no training example fits maxSeqLength {max_len} "
                        f"({len(fit_train.dropped)} dropped)")
    train_rows, row_len = make_rows(fit_train.kept, max_len, dataset.packing)
    eval_rows, _ = make_rows(fit_eval.kept, max_len, dataset.packing)
    pad = padding_fraction(train_rows, row_len) if row_len else 0.0
    drops = sorted(enc_train.refused + fit_train.dropped, key=_order)
    return Prepared(
        train_rows=train_rows, eval_rows=eval_rows, row_len=row_len, max_seq_length=max_len,
        eval_jsonl=eval_jsonl, dataset_hashes=hashes, skipped_lines=skipped,
        truncated=fit_train.truncated + fit_eval.truncated,
        dropped=len(fit_train.dropped) + len(fit_eval.dropped), n_train=len(fit_train.kept),
        n_eval=len(fit_eval.kept), train_tokens=sum(len(e) for e in fit_train.kept), padding_fraction=pad,
        p95=p95, train_examples=fit_train.kept, drops=drops,
    )


def _order(item) -> tuple[int, int]:
    return (item.line or 0, item.turn or 0)


def inspection_items(prepared: Prepared) -> list[tuple[Sourced | None, Drop | None]]:
    """Kept training examples and dropped ones, in file order (line, then turn)."""
    items = [(ex, None) for ex in prepared.train_examples] + [(None, d) for d in prepared.drops]
    return sorted(items, key=lambda pair: _order(pair[0] if pair[0] is not None else pair[1]))

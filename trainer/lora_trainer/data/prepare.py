"""From dataset URIs to packed rows: download, hash, validate, split, tokenize, truncate, pack."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..io import storage
from .packing import make_rows, padding_fraction
from .records import DataError, encode_all, p95_length, read_jsonl, split_records, truncate

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
    skipped_lines: int = 0
    truncated: int = 0
    n_train: int = 0
    n_eval: int = 0
    train_tokens: int = 0
    padding_fraction: float = 0.0

    def summary(self) -> str:
        return (f"{self.n_train} train / {self.n_eval} eval examples, {self.train_tokens} train "
                f"tokens, maxSeqLength {self.max_seq_length}, {len(self.train_rows)} rows of "
                f"{self.row_len or 'variable'} tokens, padding {self.padding_fraction:.1%}, "
                f"{self.truncated} truncated, {self.skipped_lines} skipped")


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


def prepare_data(dataset, tokenizer, work_dir: Path, seed: int, **store_kw) -> Prepared:
    """`dataset` is the spec's DatasetSpec. Deterministic for a given (files, spec, seed)."""
    data_dir = Path(work_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    hashes, skipped = {}, 0

    def load(uri):
        nonlocal skipped
        path = fetch(uri, data_dir, **store_kw)
        hashes[uri] = "sha256:" + storage.file_sha256(path)
        records, bad = read_jsonl(path, dataset.format, dataset.on_invalid_line, name=uri)
        skipped += bad
        return records

    train = load(dataset.train)
    if dataset.eval:
        held = load(dataset.eval)
    else:
        if len(train) < 2:
            raise DataError(dataset.train, None, "need at least 2 examples to hold some out")
        train, held = split_records(train, dataset.eval_fraction, seed)
    eval_jsonl = data_dir / "heldout.jsonl"
    eval_jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held),
                          encoding="utf-8")

    train_ex = encode_all(tokenizer, train, dataset.format, dataset.train_on_prompt)
    eval_ex = encode_all(tokenizer, held, dataset.format, dataset.train_on_prompt)
    max_len = dataset.max_seq_length or p95_length(train_ex)
    train_ex, cut = truncate(train_ex, max_len)
    eval_ex, cut_eval = truncate(eval_ex, max_len)
    train_rows, row_len = make_rows(train_ex, max_len, dataset.packing)
    eval_rows, _ = make_rows(eval_ex, max_len, dataset.packing)
    pad = padding_fraction(train_rows, row_len) if row_len else 0.0
    return Prepared(
        train_rows=train_rows, eval_rows=eval_rows, row_len=row_len, max_seq_length=max_len,
        eval_jsonl=eval_jsonl, dataset_hashes=hashes, skipped_lines=skipped,
        truncated=cut + cut_eval, n_train=len(train_ex), n_eval=len(eval_ex),
        train_tokens=sum(len(e) for e in train_ex), padding_fraction=pad,
    )

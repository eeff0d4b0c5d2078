"""The tokenized-data cache: `encode_records` results, keyed by what they are computed from.

What is cached is the encoding (token ids, labels, turn ends, lines, refused records) of the
training and held-out records, the only expensive step of prepare. Reading, validation, the split,
fitting to maxSeqLength and packing run on every prepare: they are cheap and pure, so maxSeqLength,
onOverlong and packing stay out of the key and a job that changes them still hits the cache.

The key (`encoding_key`) covers: the records actually encoded (their canonical JSON and lines, so
the split's seed and evalFraction are covered), the dataset files' SHA-256, the tokenizer
(`tokenizer_digest`: its serialized model, chat template, special tokens, tokenizer files and the
library versions), format, trainOnPrompt, chatTemplateKwargs, onInvalidLine and FORMAT.

The payload is safetensors (tensors only, no code) with the key in its metadata; `io.cache`
verifies manifest and digest, and `decode` checks every structural invariant before an example is
built, so a tampered entry is rejected (and rebuilt) rather than trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path
from typing import Optional

import numpy as np

from ..io.cache import Cache, digest
from .encoding import Drop, Encoding, Sourced
from .records import IGNORE

log = logging.getLogger(__name__)

FORMAT = 1
SPLITS = ("train", "eval")
TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template",
                   "spiece", "sentencepiece")


def token_cache(local_dir: Optional[Path], store=None, prefix: str = "", write_remote: bool = False) -> Cache:
    return Cache("tokens", FORMAT, "safetensors", local_dir, store, prefix, write_remote)


def tokenizer_digest(tokenizer) -> str:
    """SHA-256 of everything about `tokenizer` that can change an encoding."""
    import tokenizers
    import transformers

    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    h.update(model.encode())
    h.update(digest({
        "class": type(tokenizer).__name__, "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__, "chatTemplate": tokenizer.chat_template,
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "added": sorted(tokenizer.get_added_vocab().items()),
    }).encode())
    source = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if source.is_dir():
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name.lower().startswith(TOKENIZER_FILES):
                h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def encoding_key(dataset, tok_digest: str, hashes: dict, pairs: dict[str, list]) -> str:
    """The cache key; `pairs` maps split -> [(record, line)] exactly as they are encoded."""
    return digest({
        "format": FORMAT, "tokenizer": tok_digest, "datasetHashes": hashes,
        "records": {s: digest([[r, n] for r, n in pairs[s]]) for s in SPLITS},
        "datasetFormat": dataset.format, "trainOnPrompt": dataset.train_on_prompt,
        "chatTemplateKwargs": dataset.chat_template_kwargs, "onInvalidLine": dataset.on_invalid_line,
    })


def _opt(value: Optional[int]) -> int:
    return -1 if value is None else int(value)


def encode(encodings: dict[str, Encoding], key: str) -> tuple[bytes, dict]:
    """(safetensors payload, manifest extras) for `encodings` (split -> Encoding)."""
    from safetensors.numpy import save

    arrays, refused = {}, {}
    for split in SPLITS:
        exs = encodings[split].examples
        lengths = [len(e.ids) for e in exs]
        arrays[f"{split}.ids"] = np.array([t for e in exs for t in e.ids], dtype=np.int64)
        arrays[f"{split}.labels"] = np.array([t for e in exs for t in e.labels], dtype=np.int64)
        arrays[f"{split}.offsets"] = np.cumsum([0] + lengths, dtype=np.int64)
        arrays[f"{split}.lines"] = np.array([_opt(e.line) for e in exs], dtype=np.int64)
        arrays[f"{split}.turns"] = np.array([_opt(e.turn) for e in exs], dtype=np.int64)
        arrays[f"{split}.ends"] = np.array([t for e in exs for t in e.ends], dtype=np.int64)
        arrays[f"{split}.endOffsets"] = np.cumsum([0] + [len(e.ends) for e in exs], dtype=np.int64)
        refused[split] = [[d.line, d.turn, d.reason, d.tokens] for d in encodings[split].refused]
    return save(arrays, metadata={"key": key, "format": str(FORMAT)}), {"refused": refused}


def decode(payload: bytes, manifest: dict, key: str, vocab_size: int) -> dict[str, Encoding]:
    """The encodings of a verified entry; ValueError on anything that does not hold together."""
    from safetensors.numpy import load

    (size,) = struct.unpack("<Q", payload[:8]) if len(payload) >= 8 else (0,)
    header = json.loads(payload[8:8 + size]) if 0 < size <= len(payload) - 8 else None
    if not isinstance(header, dict) or (header.get("__metadata__") or {}).get("key") != key:
        raise ValueError("payload metadata names another key")
    arrays = load(payload)
    return {s: _split(arrays, s, manifest.get("refused", {}).get(s), vocab_size) for s in SPLITS}


def _int_array(arrays: dict, name: str) -> np.ndarray:
    a = arrays.get(name)
    if a is None or a.ndim != 1 or a.dtype != np.int64:
        raise ValueError(f"{name}: missing or not a 1-d int64 array")
    return a


def _offsets(arrays: dict, name: str, n: int, total: int) -> list[int]:
    off = _int_array(arrays, name)
    if len(off) != n + 1 or off[0] != 0 or off[-1] != total or np.any(np.diff(off) < 0):
        raise ValueError(f"{name}: inconsistent offsets")
    return off.tolist()


def _split(arrays: dict, s: str, refused, vocab_size: int) -> Encoding:
    ids, labels = _int_array(arrays, f"{s}.ids"), _int_array(arrays, f"{s}.labels")
    lines, turns = _int_array(arrays, f"{s}.lines"), _int_array(arrays, f"{s}.turns")
    ends = _int_array(arrays, f"{s}.ends")
    n = len(lines)
    if len(ids) != len(labels) or len(turns) != n:
        raise ValueError(f"{s}: array lengths disagree")
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{s}: token id outside the vocabulary")
    if np.any((labels != IGNORE) & (labels != ids)):
        raise ValueError(f"{s}: a label is neither ignored nor its token")
    off = _offsets(arrays, f"{s}.offsets", n, len(ids))
    eoff = _offsets(arrays, f"{s}.endOffsets", n, len(ends))
    ids_l, labels_l, ends_l = ids.tolist(), labels.tolist(), ends.tolist()
    examples = []
    for i in range(n):
        a, b = off[i], off[i + 1]
        ex_ends = tuple(ends_l[eoff[i]:eoff[i + 1]])
        if any(e < 0 or e > b - a for e in ex_ends):
            raise ValueError(f"{s}: a turn end lies outside its example")
        examples.append(Sourced(ids_l[a:b], labels_l[a:b], line=_none(lines[i]), turn=_none(turns[i]),
                                ends=ex_ends))
    return Encoding(examples, _drops(refused, s))


def _none(value) -> Optional[int]:
    return None if value < 0 else int(value)


def _drops(refused, s: str) -> list[Drop]:
    if not isinstance(refused, list):
        raise ValueError(f"refused.{s}: not a list")
    out = []
    for item in refused:
        ok = (isinstance(item, list) and len(item) == 4 and isinstance(item[2], str)
              and all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in
                      (item[0], item[1], item[3])))
        if not ok:
            raise ValueError(f"refused.{s}: malformed entry")
        out.append(Drop(item[0], item[1], item[2], item[3] or 0))
    return out

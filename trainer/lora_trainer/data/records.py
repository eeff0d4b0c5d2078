"""Reading and validating JSONL training data; the `Example` every later stage consumes.

Invariants of an encoded `Example`:
  * `labels[t]` is `ids[t]` where the loss applies and IGNORE (-100) elsewhere; by default only the
    tokens rendered for assistant turns (including the template's end-of-turn tokens) are trained.
  * `labels[0]` is always IGNORE. A causal LM never predicts its first token, and clearing it makes a
    packed row (where example B follows example A) give exactly the loss of the unpacked examples.
Rendering and masking are in `rendering` (which text trains, for any chat template) and `encoding`
(tokens, labels, and fitting examples to maxSeqLength).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

IGNORE = -100
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad training data, reported as `file:line: what` (exit code 2, no stack trace)."""

    def __init__(self, file: str, line: Optional[int], what: str):
        self.file, self.line, self.what = file, line, what
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {what}")


@dataclass
class Example:
    ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.ids)


# --- reading --------------------------------------------------------------------------------------


def _check_chat(obj) -> Optional[str]:
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(msgs, list) or not msgs:
        return "expected an object with a non-empty 'messages' list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m:
            return f"messages[{i}]: missing role"
        if m["role"] not in ROLES:
            return f"messages[{i}]: unknown role {m['role']!r} (expected system, user or assistant)"
        if not isinstance(m.get("content"), str):
            return f"messages[{i}]: content must be a string"
        if m["role"] == "assistant" and not m["content"].strip():
            return f"messages[{i}]: empty assistant turn"
    if not any(m["role"] == "assistant" for m in msgs):
        return "no assistant turn to learn from"
    return None


def _check_completion(obj) -> Optional[str]:
    if not isinstance(obj, dict):
        return "expected an object with 'prompt' and 'completion'"
    for key in ("prompt", "completion"):
        if not isinstance(obj.get(key), str):
            return f"missing or non-string {key!r}"
    if not obj["completion"].strip():
        return "empty completion"
    return None


def read_jsonl(path: Path, fmt: str, on_invalid: str = "fail",
               name: Optional[str] = None) -> tuple[list[dict], int]:
    """Parse and validate a JSONL file. Returns (records, skipped line count); see read_jsonl_lines."""
    records, _, skipped = read_jsonl_lines(path, fmt, on_invalid, name)
    return records, skipped


def read_jsonl_lines(path: Path, fmt: str, on_invalid: str = "fail",
                     name: Optional[str] = None) -> tuple[list[dict], list[int], int]:
    """Parse and validate a JSONL file. Returns (records, their 1-based line numbers, skipped count).

    With on_invalid="fail" the first bad line raises DataError naming `name` (the URI) and the
    line number; with "skip" bad lines are counted. Blank lines are ignored.
    """
    name = name or str(path)
    check = _check_chat if fmt == "chat" else _check_completion
    records, lines, skipped = [], [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            problem = None
            try:
                obj = json.loads(raw.decode("utf-8"))
                problem = check(obj)
            except UnicodeDecodeError as exc:
                problem = f"not valid UTF-8 (byte {exc.start})"
            except json.JSONDecodeError as exc:
                problem = f"malformed JSON: {exc.msg} (column {exc.colno})"
            except RecursionError:
                problem = "JSON nested too deeply"
            if problem is None:
                records.append(obj)
                lines.append(lineno)
            elif on_invalid == "skip":
                skipped += 1
            else:
                raise DataError(name, lineno, problem)
    if not records:
        raise DataError(name, None, "no valid examples")
    return records, lines, skipped


def split_records(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic held-out split: same records, fraction and seed -> same split."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(records) - 1, max(1, round(fraction * len(records))))
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [records[i] for i in sorted(held)]


# --- tokenizing (see encoding.py; these keep the simple call sites short) -----------------------


def encode_chat(tokenizer, messages, train_on_prompt: bool = False, template_kwargs=None) -> list[Example]:
    """The examples of one conversation: one, or one per assistant turn (see rendering.py)."""
    from .encoding import encode_chat as _encode

    return _encode(tokenizer, messages, train_on_prompt, template_kwargs)


def encode_all(tokenizer, records: Iterable[dict], fmt: str, train_on_prompt: bool,
               template_kwargs=None) -> list[Example]:
    """Every example of `records`; a record the template refuses raises DataError."""
    from .encoding import encode_records

    return encode_records(tokenizer, list(records), fmt, train_on_prompt, template_kwargs=template_kwargs).examples

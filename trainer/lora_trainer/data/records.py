"""Reading, validating and tokenizing JSONL training data.

Invariants of an encoded `Example`:
  * `labels[t]` is `ids[t]` where the loss applies and IGNORE (-100) elsewhere; by default only the
    tokens rendered for assistant turns (including the template's end-of-turn tokens) are trained.
  * `labels[0]` is always IGNORE. A causal LM never predicts its first token, and clearing it makes a
    packed row (where example B follows example A) give exactly the loss of the unpacked examples.
Assistant spans are found in characters by rendering prefixes of the conversation with the
tokenizer's own chat template, then mapped to tokens through the tokenizer's offsets; this works for
any template whose renders of prefixes are prefixes of the full render (checked, with a clear error).
"""

from __future__ import annotations

import json
import math
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
    """Parse and validate a JSONL file. Returns (records, skipped line count).

    With on_invalid="fail" the first bad line raises DataError naming `name` (the URI) and the
    line number; with "skip" bad lines are counted. Blank lines are ignored.
    """
    name = name or str(path)
    check = _check_chat if fmt == "chat" else _check_completion
    records, skipped = [], 0
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
            if problem is None:
                records.append(obj)
            elif on_invalid == "skip":
                skipped += 1
            else:
                raise DataError(name, lineno, problem)
    if not records:
        raise DataError(name, None, "no valid examples")
    return records, skipped


def split_records(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic held-out split: same records, fraction and seed -> same split."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(records) - 1, max(1, round(fraction * len(records))))
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [records[i] for i in sorted(held)]


# --- tokenizing -----------------------------------------------------------------------------------


def _render(tokenizer, messages, gen_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)


def assistant_char_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the base model's tokenizer has no chat template; use format: completion "
                         "or a base with a chat template")
    text = _render(tokenizer, messages)
    spans = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], gen_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template does not render prefixes of a conversation as "
                             "prefixes; cannot locate assistant turns")
        spans.append((len(before), len(through)))
    return text, spans


def encode_chat(tokenizer, messages, train_on_prompt: bool = False) -> Example:
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on_prompt:
        labels = list(ids)
    else:
        labels = [tok if any(s <= start < e for s, e in spans) else IGNORE
                  for tok, (start, _) in zip(ids, enc["offset_mapping"])]
    labels[0] = IGNORE
    return Example(ids, labels)


def encode_completion(tokenizer, prompt: str, completion: str, train_on_prompt=False) -> Example:
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p = head + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    labels = (list(p) if train_on_prompt else [IGNORE] * len(p)) + list(c)
    labels[0] = IGNORE
    return Example(p + c, labels)


def encode_all(tokenizer, records: Iterable[dict], fmt: str, train_on_prompt: bool) -> list[Example]:
    if fmt == "chat":
        return [encode_chat(tokenizer, r["messages"], train_on_prompt) for r in records]
    return [encode_completion(tokenizer, r["prompt"], r["completion"], train_on_prompt)
            for r in records]


def p95_length(examples: list[Example]) -> int:
    """95th percentile (nearest rank) of the example lengths."""
    lengths = sorted(len(e) for e in examples)
    return lengths[max(0, math.ceil(0.95 * len(lengths)) - 1)]


def truncate(examples: list[Example], max_len: int) -> tuple[list[Example], int]:
    """Cut examples to `max_len` tokens; returns (examples, how many were cut)."""
    out, cut = [], 0
    for ex in examples:
        if len(ex) > max_len:
            ex, cut = Example(ex.ids[:max_len], ex.labels[:max_len]), cut + 1
        out.append(ex)
    return out, cut

"""From validated records to the examples that train: render, mask, and fit to maxSeqLength.

Every example remembers the 1-based line of its record and, when a conversation was expanded per
assistant turn (see `rendering`), the turn; `ends` are the token positions where its trained
assistant turns end, the only places an example may be cut.

Fitting (`fit`) never teaches the wrong thing:
  * an example without a trained token is dropped (it would only dilute the loss);
  * an example longer than maxSeqLength is dropped (onOverlong: drop), or cut after the last
    assistant turn that ends within maxSeqLength (onOverlong: truncate), so what trains always
    ends with the turn's end-of-turn tokens; with no such turn it is dropped.
Dropped examples are reported with their line and reason (progress.json, metadata, `inspect`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

from .records import IGNORE, DataError, Example
from .rendering import Rendered, TemplateRefused, render_chat, span_labels, token_starts, whole_text


@dataclass
class Sourced(Example):
    """An example and where it came from."""

    line: Optional[int] = None  # 1-based line of the record in its file
    turn: Optional[int] = None  # assistant turn index when expanded per turn
    ends: tuple[int, ...] = ()  # token index after each trained assistant turn

    @property
    def trained(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


@dataclass
class Drop:
    line: Optional[int]
    turn: Optional[int]
    reason: str
    tokens: int = 0


@dataclass
class Encoding:
    examples: list[Sourced]
    refused: list[Drop] = field(default_factory=list)  # records the template refused (skip mode)


def _span_ends(starts: list[int], spans) -> tuple[int, ...]:
    """Per span, the number of tokens that start before its end (where that turn's tokens end)."""
    return tuple(sum(1 for s in starts if s < end) for _, end in spans) if starts else ()


def _token_ends(tokenizer, rendered: Rendered, n_tokens: int) -> tuple[int, ...]:
    return _span_ends(token_starts(tokenizer, rendered.text)[1], rendered.spans) if n_tokens else ()


def _from_rendered(tokenizer, rendered: Rendered, line, train_on_prompt: bool) -> Sourced:
    ids, starts = token_starts(tokenizer, rendered.text)  # one tokenization for labels and ends
    labels = [IGNORE] + ids[1:] if train_on_prompt else span_labels(ids, starts, rendered.spans, IGNORE)
    return Sourced(ids, labels, line=line, turn=rendered.turn, ends=_span_ends(starts, rendered.spans))


def encode_chat(tokenizer, messages, train_on_prompt: bool = False, template_kwargs=None,
                line: Optional[int] = None) -> list[Sourced]:
    """The examples of one conversation (one, or one per assistant turn; see `rendering`)."""
    rendered = render_chat(tokenizer, messages, template_kwargs)
    if train_on_prompt and len(rendered) == 1:
        whole = whole_text(tokenizer, messages, template_kwargs)
        ex = _from_rendered(tokenizer, whole, line, True)
        ex.ends = _token_ends(tokenizer, rendered[0], len(ex.ids))
        return [ex]
    return [_from_rendered(tokenizer, r, line, train_on_prompt) for r in rendered]


def encode_completion(tokenizer, prompt: str, completion: str, train_on_prompt: bool = False,
                      line: Optional[int] = None) -> Sourced:
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    p = head + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        c = c + [tokenizer.eos_token_id]
    labels = (list(p) if train_on_prompt else [IGNORE] * len(p)) + list(c)
    labels[0] = IGNORE
    return Sourced(p + c, labels, line=line, ends=(len(p) + len(c),))


def encode_records(tokenizer, records: Sequence[dict], fmt: str, train_on_prompt: bool = False, *,
                   template_kwargs=None, lines: Optional[Sequence[int]] = None, on_invalid: str = "fail",
                   name: str = "data") -> Encoding:
    """Encode every record; a record the template refuses is a DataError naming `name`:line, or
    (on_invalid="skip") reported in `refused`."""
    out = Encoding([])
    for k, record in enumerate(records):
        line = lines[k] if lines is not None else None
        if fmt != "chat":
            out.examples.append(encode_completion(tokenizer, record["prompt"], record["completion"],
                                                  train_on_prompt, line))
            continue
        try:
            out.examples += encode_chat(tokenizer, record["messages"], train_on_prompt, template_kwargs, line)
        except TemplateRefused as exc:
            if on_invalid != "skip":
                raise DataError(name, line, str(exc)) from None
            out.refused.append(Drop(line, None, str(exc)))
    return out


def p95_length(examples: Sequence[Example]) -> int:
    """95th percentile (nearest rank) of the example lengths."""
    lengths = sorted(len(e) for e in examples)
    return lengths[max(0, math.ceil(0.95 * len(lengths)) - 1)] if lengths else 0


@dataclass
class Fitted:
    kept: list[Sourced]
    dropped: list[Drop]
    truncated: int  # kept examples that were cut after their last whole turn


def _cut(ex: Sourced, max_len: int) -> Optional[Sourced]:
    ends = [e for e in ex.ends if e <= max_len]
    if not ends:
        return None
    at = max(ends)
    return Sourced(ex.ids[:at], ex.labels[:at], line=ex.line, turn=ex.turn, ends=tuple(ends))


def fit(examples: Sequence[Sourced], max_len: int, on_overlong: str = "drop") -> Fitted:
    """Apply maxSeqLength (see module docstring)."""
    out = Fitted([], [], 0)
    for ex in examples:
        if len(ex) > max_len:
            cut = _cut(ex, max_len) if on_overlong == "truncate" else None
            if cut is None or not cut.trained:
                why = "no whole assistant turn within" if on_overlong == "truncate" else "longer than"
                out.dropped.append(Drop(ex.line, ex.turn, f"{why} maxSeqLength {max_len} ({len(ex)} tokens)",
                                        len(ex)))
                continue
            ex, out.truncated = cut, out.truncated + 1
        if not ex.trained:
            out.dropped.append(Drop(ex.line, ex.turn, "no trained tokens", len(ex)))
            continue
        out.kept.append(ex)
    return out

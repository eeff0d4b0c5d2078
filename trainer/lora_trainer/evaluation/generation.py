"""Generation checks: greedy replies to held-out prompts, scored by the spec's checks.

A sample is one held-out example cut at its last assistant turn: the prompt is the conversation
before that turn rendered as a serving stack renders it (the tokenizer's chat template, the
generation prompt and spec.dataset.chatTemplateKwargs, e.g. enable_thinking); the reference is that
turn's content. (Completion data: prompt and completion as given.)

Every check sees the reply a user reads: special tokens removed, then the template's own reasoning
block removed (`rendering.strip_reasoning`: a leading `<think>...</think>`, or everything up to
`</think>` when the prompt opened the block; an unclosed block leaves an empty reply), then
surrounding whitespace stripped:
exactMatch compares it with the stripped reference, validJson parses it, jsonSchema parses and
validates it (local `$ref`s only, nothing is fetched), mustMatch / mustNotMatch search it with a
bounded engine (evaluation/patterns.py: RE2, or a time limit per output). A search that runs out of time
fails the check for that output and is counted in `Score.timeouts`. An unknown check type is a
CheckConfigError, never a default.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

from lora_operator.api import GenerationCheck

from .patterns import BoundedPattern, PatternError, offline_validator, schema_valid

# End-of-turn markers of common chat templates; generation stops at the first of them or at EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass(frozen=True)
class Sample:
    prompt: str
    reference: str


CheckFn = Callable[[str, str], Optional[bool]]  # (reply, reference) -> passed (None: timed out)


class CheckConfigError(ValueError):
    """A check that can never be evaluated (bad regex, invalid JSON Schema)."""


def _parse_json(reply: str):
    try:
        return True, json.loads(reply)
    except ValueError:
        return False, None


def _exact_match(check: GenerationCheck) -> CheckFn:
    return lambda reply, ref: reply.strip() == ref.strip()


def _valid_json(check: GenerationCheck) -> CheckFn:
    return lambda reply, ref: _parse_json(reply.strip())[0]


def _json_schema(check: GenerationCheck) -> CheckFn:
    try:
        validator = offline_validator(check.json_schema)  # local $refs only: nothing is fetched
    except PatternError as exc:
        raise CheckConfigError(f"checks.{check.name}: {exc}") from None

    def schema_ok(reply: str, ref: str) -> bool:
        ok, value = _parse_json(reply.strip())
        return ok and schema_valid(validator, value)

    return schema_ok


def _regex(check: GenerationCheck) -> BoundedPattern:
    try:
        return BoundedPattern(check.pattern or "")
    except PatternError as exc:
        raise CheckConfigError(f"checks.{check.name}: {exc}") from None


def _must_match(check: GenerationCheck) -> CheckFn:
    regex = _regex(check)
    return lambda reply, ref: regex.search(reply.strip())  # None: ran out of time


def _must_not_match(check: GenerationCheck) -> CheckFn:
    regex = _regex(check)

    def absent(reply: str, ref: str) -> Optional[bool]:
        found = regex.search(reply.strip())
        return None if found is None else not found

    return absent


# Check type (spec.evaluation.gate.checks[].type) -> compile function. A new type is one entry here,
# one value of the API's CheckType, and its test; tests check that the two lists agree.
CHECK_TYPES: dict[str, Callable[[GenerationCheck], CheckFn]] = {
    "exactMatch": _exact_match,
    "validJson": _valid_json,
    "jsonSchema": _json_schema,
    "mustMatch": _must_match,
    "mustNotMatch": _must_not_match,
}


def compile_check(check: GenerationCheck) -> CheckFn:
    """``(reply, reference) -> passed`` for one check (None: a pattern search ran out of time,
    which counts as failed); raises CheckConfigError early on a bad check or an unknown type
    (never treated as some other type).

    The CLI can call this for every check before training, so a typo fails in seconds, not hours.
    """
    compile_fn = CHECK_TYPES.get(check.type)
    if compile_fn is None:
        raise CheckConfigError(f"checks.{check.name}: unknown check type {check.type!r} "
                               f"(known: {', '.join(CHECK_TYPES)})")
    return compile_fn(check)


@dataclass(frozen=True)
class Score:
    rate: Optional[float]  # fraction of outputs passing; None without samples
    timeouts: int = 0  # outputs whose pattern search ran out of time (counted as failing)


def score(check: GenerationCheck, replies: Sequence[str], samples: Sequence[Sample]) -> Score:
    if not samples:
        return Score(None)
    fn = compile_check(check)
    results = [fn(r, s.reference) for r, s in zip(replies, samples, strict=True)]
    return Score(sum(r is True for r in results) / len(samples), sum(r is None for r in results))


def pass_rate(check: GenerationCheck, replies: Sequence[str], samples: Sequence[Sample]) -> Optional[float]:
    """Fraction of replies passing ``check``; None without samples."""
    return score(check, replies, samples).rate


def build_samples(examples: Sequence[dict], tokenizer, max_samples: int,
                  template_kwargs: Optional[dict] = None) -> list[Sample]:
    """The first ``max_samples`` usable records as (prompt, reference); records without an
    assistant turn (chat) or completion, or that the template refuses, are skipped."""
    from ..data.rendering import TemplateRefused, turn_prompt

    out: list[Sample] = []
    for ex in examples:
        if len(out) >= max_samples:
            break
        if "messages" in ex:
            msgs = ex["messages"]
            last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
            if last is None:
                continue
            try:
                prompt = turn_prompt(tokenizer, msgs, last, template_kwargs)
            except TemplateRefused:
                continue
            out.append(Sample(prompt, msgs[last]["content"]))
        elif "prompt" in ex and "completion" in ex:
            # data.records.encode_completion puts BOS before the prompt; generate from the same tokens.
            out.append(Sample((tokenizer.bos_token or "") + ex["prompt"], ex["completion"]))
    return out


def stop_token_ids(tokenizer) -> list[int]:
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in vocab and vocab[t] not in ids]
    return ids

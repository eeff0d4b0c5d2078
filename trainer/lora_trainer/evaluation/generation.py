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
validates it, mustMatch / mustNotMatch use ``re.search`` on it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import jsonschema

from lora_operator.api import GenerationCheck

# End-of-turn markers of common chat templates; generation stops at the first of them or at EOS.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass(frozen=True)
class Sample:
    prompt: str
    reference: str


CheckFn = Callable[[str, str], bool]  # (reply, reference) -> passed


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
        cls = jsonschema.validators.validator_for(check.json_schema)
        cls.check_schema(check.json_schema)
    except jsonschema.SchemaError as exc:
        raise CheckConfigError(f"checks.{check.name}: invalid JSON Schema: {exc.message}") from None
    validator = cls(check.json_schema)

    def schema_ok(reply: str, ref: str) -> bool:
        ok, value = _parse_json(reply.strip())
        return ok and validator.is_valid(value)

    return schema_ok


def _regex(check: GenerationCheck) -> re.Pattern:
    try:
        return re.compile(check.pattern or "")
    except re.error as exc:
        raise CheckConfigError(f"checks.{check.name}: invalid pattern: {exc}") from None


def _must_match(check: GenerationCheck) -> CheckFn:
    regex = _regex(check)
    return lambda reply, ref: regex.search(reply.strip()) is not None


def _must_not_match(check: GenerationCheck) -> CheckFn:
    regex = _regex(check)
    return lambda reply, ref: regex.search(reply.strip()) is None


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
    """``(reply, reference) -> passed`` for one check; raises CheckConfigError early on a bad check
    or an unknown type (never treated as some other type).

    The CLI can call this for every check before training, so a typo fails in seconds, not hours.
    """
    compile_fn = CHECK_TYPES.get(check.type)
    if compile_fn is None:
        raise CheckConfigError(f"checks.{check.name}: unknown check type {check.type!r} "
                               f"(known: {', '.join(CHECK_TYPES)})")
    return compile_fn(check)


def pass_rate(check: GenerationCheck, replies: Sequence[str], samples: Sequence[Sample]) -> Optional[float]:
    """Fraction of replies passing ``check``; None without samples."""
    if not samples:
        return None
    fn = compile_check(check)
    return sum(fn(r, s.reference) for r, s in zip(replies, samples, strict=True)) / len(samples)


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

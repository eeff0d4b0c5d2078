"""Rendering a conversation with the base model's own chat template, and finding what to train.

What trains is what the model would have to generate at inference: for assistant turn i, the text
the template renders after the *prompt* of that turn (the history rendered with the generation
prompt, as a serving stack renders it) up to the end of the turn, end-of-turn tokens included.

Two ways to get there, chosen per conversation:
  * Prefix method (one example): when every turn's prompt and every rendered prefix are prefixes
    of the whole rendered conversation, the whole conversation is one example and each assistant
    turn contributes one trained span. Llama-3, Qwen2.5, Gemma, Mistral without a system message.
  * Expansion (one example per assistant turn): templates that rewrite history (Qwen3 drops
    earlier thinking blocks, Phi-3.5 ends a render with EOS, Mistral v0.3 moves the system message
    to the last user turn) cannot be masked on one render. Then turn i becomes its own example,
    rendered exactly as at inference: the prompt of turn i plus what the template renders for
    that turn, and only that turn trains.
The prompt of turn i is `render(history, add_generation_prompt=True)`; where the template refuses
that (an empty history: "assistant-first" conversations), it is the render of the history plus
the turn up to where the turn's content begins. So an assistant-first conversation never trains
the template's system header or default system prompt.

A template that raises on a conversation (Gemma without system role, non-alternating roles)
refuses that record: `TemplateRefused`, which data preparation reports as a data error with the
record's file:line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# Stands in for an assistant turn's content to find where content starts in a render.
SENTINEL = "LoRaTrainerTurnSentinel7f3a"


class TemplateRefused(ValueError):
    """The chat template raised on this conversation (or cannot be masked); a data error."""


@dataclass(frozen=True)
class Rendered:
    """One training example as text: trained [start, end) character spans of `text`."""

    text: str
    spans: tuple[tuple[int, int], ...]
    turn: Optional[int] = None  # assistant turn index when expanded per turn; None = whole conversation


def render(tokenizer, messages, gen_prompt: bool = False, template_kwargs: Optional[dict] = None) -> str:
    """The template's text for `messages`; any template failure is `TemplateRefused`."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt,
                                             **(template_kwargs or {}))
    except RecursionError:
        raise TemplateRefused("the chat template recursed too deeply on this record") from None
    except Exception as exc:  # jinja TemplateError, raise_exception(), empty conversation, ...
        raise TemplateRefused(f"the chat template refused this conversation: {exc}") from None


def _content_start(tokenizer, messages, i: int, kw) -> tuple[str, int]:
    """Render of messages[:i] + a sentinel turn i, and where the sentinel (the content) starts."""
    probe = [*messages[:i], {**messages[i], "content": SENTINEL}]
    text = render(tokenizer, probe, template_kwargs=kw)
    at = text.find(SENTINEL)
    if at < 0:
        raise TemplateRefused(f"the chat template does not render the content of message {i}")
    return text, at


def turn_prompt(tokenizer, messages, i: int, kw=None) -> str:
    """What a serving stack sends before assistant turn i (see module docstring)."""
    if i:
        try:
            return render(tokenizer, messages[:i], gen_prompt=True, template_kwargs=kw)
        except TemplateRefused:
            pass
    text, at = _content_start(tokenizer, messages, i, kw)
    return text[:at]


def _align(prompt: str, text: str, limit: int) -> int:
    """End of the last place in text[:limit] that matches the longest possible suffix of `prompt`.

    Where a template renders the history differently with and without the turn (Mistral v0.3
    moves the system message), this is where the prompt's end (e.g. "[/INST]") sits in the render
    of the turn, so the turn's own text (" answer</s>") starts there.
    """
    lo, hi, end = 0, min(len(prompt), limit), limit
    while lo < hi:  # a suffix of length L occurs => every shorter one does: binary search on L
        mid = (lo + hi + 1) // 2
        at = text.rfind(prompt[-mid:], 0, limit)
        if at >= 0:
            lo, end = mid, at + mid
        else:
            hi = mid - 1
    return end if lo else limit


def _expanded(tokenizer, messages, i: int, prompt: str, through: str, n: int, kw) -> Rendered:
    if through.startswith(prompt):
        return Rendered(through, ((len(prompt), len(through)),), n)
    probe, at = _content_start(tokenizer, messages, i, kw)
    if probe[:at] != through[:at]:
        raise TemplateRefused(f"cannot locate assistant message {i} in the template's render")
    tail = through[_align(prompt, through, at):]
    return Rendered(prompt + tail, ((len(prompt), len(prompt) + len(tail)),), n)


def render_chat(tokenizer, messages, template_kwargs: Optional[dict] = None) -> list[Rendered]:
    """The examples one conversation trains on (see module docstring)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the base model's tokenizer has no chat template; use format: completion "
                         "or a base with a chat template")
    kw = template_kwargs or {}
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    text = render(tokenizer, messages, template_kwargs=kw)
    prompts = [turn_prompt(tokenizer, messages, i, kw) for i in turns]
    throughs = [render(tokenizer, messages[: i + 1], template_kwargs=kw) for i in turns]
    if all(text.startswith(p) and text.startswith(t) and len(p) < len(t) for p, t in zip(prompts, throughs)):
        return [Rendered(text, tuple((len(p), len(t)) for p, t in zip(prompts, throughs)))]
    return [_expanded(tokenizer, messages, i, p, t, n, kw)
            for n, (i, p, t) in enumerate(zip(turns, prompts, throughs))]


def whole_text(tokenizer, messages, template_kwargs: Optional[dict] = None) -> Rendered:
    """The whole conversation trained (trainOnPrompt): one example, one span."""
    text = render(tokenizer, messages, template_kwargs=template_kwargs)
    return Rendered(text, ((0, len(text)),))


def token_labels(tokenizer, rendered: Rendered, ignore: int = -100) -> tuple[list[int], list[int]]:
    """Token ids of `rendered.text` and labels: the id where the token starts inside a trained
    span, `ignore` elsewhere. The first label is always `ignore` (nothing predicts token 0)."""
    ids, starts = token_starts(tokenizer, rendered.text)
    return ids, span_labels(ids, starts, rendered.spans, ignore)


def token_starts(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of `text` and the character offset where each token starts."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [s for s, _ in enc["offset_mapping"]]


def span_labels(ids: list[int], starts: list[int], spans, ignore: int = -100) -> list[int]:
    """The id of each token that starts inside one of `spans` (sorted [start, end) character
    ranges), `ignore` for the others and for token 0. One walk over tokens and spans together."""
    labels, k, spans, last = [], 0, sorted(spans), 0
    for tok, start in zip(ids, starts):
        if start < last:  # offsets went back (never for the tokenizers here): walk from the top
            k = 0
        last = start
        while k < len(spans) and spans[k][1] <= start:
            k += 1
        labels.append(tok if k < len(spans) and spans[k][0] <= start else ignore)
    if labels:
        labels[0] = ignore
    return labels


# Reasoning blocks that chat templates render around a model's thinking, (open, close).
REASONING_TAGS = (("<think>", "</think>"),)


def reasoning_tags(tokenizer) -> tuple[str, str] | None:
    """The template's own reasoning block markers, when its chat template renders one."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    return next(((o, c) for o, c in REASONING_TAGS if o in template and c in template), None)


def strip_reasoning(reply: str, tags: tuple[str, str] | None) -> str:
    """The answer a user reads: `reply` without a leading reasoning block.

    A reply that opens with the block loses everything up to the end of the block; a reply with a
    close marker but no open marker (the prompt opened the block) loses everything up to it; an
    unclosed block (generation stopped while thinking) leaves no answer at all.
    """
    if tags is None:
        return reply
    open_, close = tags
    text = reply.lstrip()
    if text.startswith(open_) or (close in text and open_ not in text.split(close, 1)[0]):
        head, sep, tail = text.partition(close)
        return tail.lstrip() if sep else ""
    return reply

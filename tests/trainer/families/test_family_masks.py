"""Per family and conversation shape: exactly the assistant turns (plus end-of-turn tokens) train."""

from __future__ import annotations

import families as F
import pytest

from lora_trainer.data.rendering import TemplateRefused, render, render_chat, token_labels

IGNORE = -100
CASES = [(f, s) for f in F.FAMILIES for s in F.SHAPES]


@pytest.fixture(scope="module")
def tokenizers():
    return {name: F.build_tokenizer(fam) for name, fam in F.FAMILIES.items()}


def _trained_spans(tok, ids, labels) -> list[str]:
    """Decoded runs of consecutive trained tokens (special tokens kept)."""
    runs, run = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            run.append(i)
        elif run:
            runs, run = runs + [run], []
    runs += [run] if run else []
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("family,shape", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_only_assistant_turns_and_their_end_of_turn_tokens_train(tokenizers, family, shape):
    fam, tok = F.FAMILIES[family], tokenizers[family]
    messages = F.conversation(shape)
    if F.refuses(fam, shape):
        with pytest.raises(TemplateRefused, match="refused"):
            render_chat(tok, messages)
        return
    examples = render_chat(tok, messages)
    got = []
    for ex in examples:
        ids, labels = token_labels(tok, ex)
        assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))
        got += _trained_spans(tok, ids, labels)
    want = F.trained_turns(fam, messages)
    # SentencePiece decoding drops the leading space of a run; the span boundaries are what count.
    assert [g.lstrip(" ") for g in got] == [w.lstrip(" ") for w in want]
    n_turns = sum(m["role"] == "assistant" for m in messages)
    assert len(examples) in (1, n_turns)


@pytest.mark.parametrize("family", list(F.FAMILIES))
def test_each_expanded_turn_is_rendered_as_a_server_would_prompt_it(tokenizers, family):
    tok, messages = tokenizers[family], F.conversation("multi-system" if F.FAMILIES[family].system else "multi")
    examples = render_chat(tok, messages)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if len(examples) == 1:  # prefix method: each turn's prompt is a prefix of the one example
        assert not F.FAMILIES[family].rewrites_history or family == "mistral"
        for i, (start, _) in zip(turns, examples[0].spans):
            assert examples[0].text[:start] == render(tok, messages[:i], gen_prompt=True)
        return
    assert F.FAMILIES[family].rewrites_history or family == "mistral"
    for i, ex in zip(turns, examples):
        prompt = render(tok, messages[:i], gen_prompt=True)
        assert ex.text.startswith(prompt) and ex.spans == ((len(prompt), len(ex.text)),)


def test_assistant_first_never_trains_the_llama_system_header_or_qwen_default_prompt(tokenizers):
    for family in ("llama31", "qwen25"):
        tok = tokenizers[family]
        [ex] = render_chat(tok, F.conversation("assistant-first"))
        head = ex.text[:ex.spans[0][0]]
        assert ("Cutting Knowledge Date" in head) or ("You are Qwen" in head)
        for s, e in ex.spans:
            assert "Cutting Knowledge" not in ex.text[s:e] and "You are Qwen" not in ex.text[s:e]


def test_qwen3_thinking_off_trains_the_answer_without_the_empty_thinking_block(tokenizers):
    tok = tokenizers["qwen3"]
    examples = render_chat(tok, F.conversation("multi"), {"enable_thinking": False})
    trained = [ex.text[s:e] for ex in examples for s, e in ex.spans]
    assert all("<think>" not in t and t.endswith("<|im_end|>\n") for t in trained)
    assert all(ex.text[:ex.spans[0][0]].endswith("<think>\n\n</think>\n\n") for ex in examples)

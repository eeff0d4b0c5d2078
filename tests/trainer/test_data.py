"""Data: masks token by token, bad lines named by file:line, p95 length, deterministic split."""

from __future__ import annotations

import json

import pytest
import tiny

from lora_trainer.data.encoding import encode_completion
from lora_trainer.data.records import IGNORE, DataError, encode_chat, read_jsonl, read_jsonl_lines, split_records

CONVO = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Reset my badge 7?"},
    {"role": "assistant", "content": "Sure, badge 7 reset."},
    {"role": "user", "content": "And the printer?"},
    {"role": "assistant", "content": "Printer restarted. Done."},
]


def test_chat_mask_covers_exactly_the_assistant_turns_token_by_token(tiny_tokenizer):
    tok = tiny_tokenizer
    [ex] = encode_chat(tok, CONVO)
    pieces = [tok.decode([i]) for i in ex.ids]
    trained = "".join(p for p, lab in zip(pieces, ex.labels) if lab != IGNORE)
    assert trained == "Sure, badge 7 reset.<|im_end|>\nPrinter restarted. Done.<|im_end|>\n"
    for t, (tid, lab) in enumerate(zip(ex.ids, ex.labels)):
        assert lab in (IGNORE, tid), f"token {t}: label must be the token or ignored"
    # Every token of "assistant\n" headers and user/system turns is masked.
    start = ex.ids.index(tok.convert_tokens_to_ids("<|im_start|>"))
    assert ex.labels[start] == IGNORE and ex.labels[0] == IGNORE


def test_train_on_prompt_trains_everything_but_the_first_token(tiny_tokenizer):
    [ex] = encode_chat(tiny_tokenizer, CONVO, train_on_prompt=True)
    assert ex.labels[0] == IGNORE and ex.labels[1:] == ex.ids[1:]


def test_completion_mask_starts_at_the_completion_and_ends_with_eos(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = encode_completion(tok, "Q: reset badge?\n", "A: done.")
    trained = [i for i, lab in zip(ex.ids, ex.labels) if lab != IGNORE]
    assert tok.decode(trained) == "A: done.<|eos|>"
    assert ex.ids[0] == tok.bos_token_id and ex.labels[0] == IGNORE


def test_chat_without_template_fails_clearly(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        encode_chat(tok, CONVO)


BAD = [
    ('{"messages": [', "malformed JSON"),
    ('{"messages": [{"content": "hi"}]}', "missing role"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
     "empty assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
]


@pytest.mark.parametrize("line,what", BAD, ids=[w for _, w in BAD])
def test_bad_chat_line_is_reported_with_file_and_line(tmp_path, line, what):
    path = tiny.make_chat_jsonl(tmp_path / "d.jsonl", 3)
    path.write_text(path.read_text() + line + "\n")
    with pytest.raises(DataError) as err:
        read_jsonl(path, "chat", name="s3://b/d.jsonl")
    assert str(err.value).startswith("s3://b/d.jsonl:4: ") and what in str(err.value)


def test_non_utf8_and_missing_completion_are_reported(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2: not valid UTF-8"):
        read_jsonl(path, "completion")
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:3: missing or non-string 'completion'"):
        read_jsonl(path, "completion")


def test_skip_counts_bad_lines(tmp_path):
    path = tiny.make_chat_jsonl(tmp_path / "d.jsonl", 5)
    path.write_text(path.read_text() + "".join(line + "\n" for line, _ in BAD))
    records, skipped = read_jsonl(path, "chat", on_invalid="skip")
    assert (len(records), skipped) == (5, len(BAD))


def test_skip_keeps_the_line_numbers_of_good_records_and_survives_deep_nesting(tmp_path):
    path = tiny.make_chat_jsonl(tmp_path / "d.jsonl", 3)
    lines = path.read_text().splitlines()
    deep = "[" * 100_000 + "]" * 100_000
    path.write_text("\n".join([lines[0], deep, "", lines[1], lines[2]]) + "\n")
    records, numbers, skipped = read_jsonl_lines(path, "chat", on_invalid="skip")
    assert (numbers, skipped) == ([1, 4, 5], 1)
    with pytest.raises(DataError, match=r"d.jsonl:2: JSON nested too deeply"):
        read_jsonl(path, "chat")


def test_split_is_deterministic_and_disjoint():
    records = [{"i": i} for i in range(50)]
    a = split_records(records, 0.1, seed=3)
    assert a == split_records(records, 0.1, seed=3)
    assert a != split_records(records, 0.1, seed=4)
    train, held = a
    assert len(held) == 5 and len(train) == 45
    assert {json.dumps(r) for r in train}.isdisjoint(json.dumps(r) for r in held)


def test_span_labels_equal_the_membership_definition():
    """The one-walk labelling equals "token starts inside some span", also for overlapping spans
    and offsets that go back."""
    import random

    from lora_trainer.data.rendering import span_labels

    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 30)
        starts = sorted(rng.randint(0, 60) for _ in range(n))
        if n > 3 and rng.random() < 0.3:
            starts[n // 2] = 0  # offsets that go back
        ids = [rng.randint(5, 99) for _ in range(n)]
        spans = []
        for _ in range(rng.randint(0, 4)):
            a = rng.randint(0, 60)
            spans.append((a, a + rng.randint(1, 20)))
        want = [t if any(s <= st < e for s, e in spans) else -100 for t, st in zip(ids, starts)]
        if want:
            want[0] = -100
        assert span_labels(ids, starts, spans) == want, (starts, spans)

"""Packing: no attention across examples (logits equal unpacked), little padding, exact schedule."""

from __future__ import annotations

import pytest
import tiny
import torch

from lora_trainer.data.packing import Schedule, collate_packed, collate_padded, make_rows, pack_bfd, padding_fraction
from lora_trainer.data.records import Example, encode_all


def test_packed_logits_equal_unpacked_on_the_tiny_model(tiny_base, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    exs = encode_all(tiny_tokenizer, tiny.chat_examples(3, seed=5), "chat", False)
    row_len = sum(len(e) for e in exs) + 5  # a padding tail too
    packed = collate_packed([exs], row_len, tiny_tokenizer.pad_token_id)
    assert packed.attention_mask is None
    with torch.no_grad():
        logits = model(**packed.model_inputs()).logits[0]
        at = 0
        for ex in exs:
            alone = model(input_ids=torch.tensor([ex.ids])).logits[0]
            torch.testing.assert_close(logits[at:at + len(ex)], alone, atol=1e-5, rtol=1e-5)
            at += len(ex)
        # Control: the same row with positions that do not restart attends across examples.
        leaky = model(input_ids=packed.input_ids, position_ids=torch.arange(row_len)[None],
                      attention_mask=torch.ones(1, row_len, dtype=torch.long)).logits[0]
    second = slice(len(exs[0]), len(exs[0]) + len(exs[1]))
    assert not torch.allclose(leaky[second], logits[second], atol=1e-3)


def test_best_fit_decreasing_fills_rows_and_keeps_every_example():
    lengths = [7, 3, 5, 2, 8, 1, 4, 6, 2, 2]
    exs = [Example(list(range(n)), list(range(n))) for n in lengths]
    rows = pack_bfd(exs, 10)
    assert sorted(len(e) for r in rows for e in r) == sorted(lengths)
    assert all(sum(len(e) for e in r) <= 10 for r in rows)
    assert len(rows) == 4  # 40 tokens -> 4 full rows of 10
    assert padding_fraction(rows, 10) == 0.0


def test_padding_fraction_is_small_on_chat_data(tiny_tokenizer):
    exs = encode_all(tiny_tokenizer, tiny.chat_examples(200, seed=2), "chat", False)
    from lora_trainer.data.encoding import fit, p95_length

    max_len = p95_length(exs)
    rows, row_len = make_rows(fit(exs, max_len).kept, max_len, packing=True)
    assert row_len == max_len  # a packed row holds up to maxSeqLength tokens
    frac = padding_fraction(rows, row_len)
    print(f"padding fraction {frac:.2%} ({len(rows)} rows of {row_len})")
    assert frac < 0.05


def test_unpacked_batches_pad_per_batch_with_a_mask():
    b = collate_padded([[Example([5, 6, 7], [-100, 6, 7])], [Example([5], [-100])]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7], [5, 0, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b.n_tokens == 4 and b.n_targets == 2


@pytest.mark.parametrize("world", [1, 2])
def test_schedule_covers_each_row_once_per_epoch_and_is_replayable(world):
    s = Schedule(n_rows=11, batch_size=2, accum=2, world=world, seed=3)
    seen = []
    for step in range(s.steps_per_epoch):
        for rank in range(world):
            for micro in s.micro_batches(0, step, rank):
                assert len(micro) == 2
                seen += micro
    assert set(seen) == set(range(11))
    assert s.micro_batches(1, 0, 0) == s.micro_batches(1, 0, 0) != s.micro_batches(0, 0, 0)


def test_rows_hold_max_seq_length_tokens_so_steps_per_epoch_count_examples_as_users_expect():
    # 360 examples of the longest allowed length at batchSize 4: 90 steps an epoch, as TRL/Axolotl give.
    exs = [Example(list(range(100)), list(range(100))) for _ in range(360)]
    rows, row_len = make_rows(exs, 100, packing=True)
    assert row_len == 100 and len(rows) == 360
    assert Schedule(len(rows), batch_size=4, accum=1).steps_per_epoch == 90

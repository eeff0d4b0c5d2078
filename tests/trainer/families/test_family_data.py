"""Records a template refuses, and fitting to maxSeqLength, on real family templates."""

from __future__ import annotations

import families as F
import pytest

from lora_trainer.data.encoding import encode_records, fit, p95_length
from lora_trainer.data.records import IGNORE, DataError


@pytest.fixture(scope="module")
def gemma2():
    return F.build_tokenizer(F.FAMILIES["gemma2"])


@pytest.fixture(scope="module")
def qwen3():
    return F.build_tokenizer(F.FAMILIES["qwen3"])


def _records():
    return [{"messages": F.conversation("single", 0)}, {"messages": F.conversation("system", 1)},
            {"messages": F.conversation("multi", 2)}]


def test_a_record_the_template_refuses_is_a_data_error_with_its_line(gemma2):
    with pytest.raises(DataError, match=r"^s3://d/train.jsonl:12: the chat template refused this conversation: "
                                        r"System role not supported"):
        encode_records(gemma2, _records(), "chat", lines=[10, 12, 13], name="s3://d/train.jsonl")


def test_skip_mode_reports_refused_records_and_keeps_the_rest(gemma2):
    enc = encode_records(gemma2, _records(), "chat", lines=[10, 12, 13], on_invalid="skip")
    assert [(d.line, "System role" in d.reason) for d in enc.refused] == [(12, True)]
    assert [e.line for e in enc.examples] == [10, 13]


def test_expanded_turns_keep_their_line_and_turn(qwen3):
    enc = encode_records(qwen3, _records(), "chat", lines=[1, 2, 3])
    assert [(e.line, e.turn) for e in enc.examples] == [(1, None), (2, None), (3, 0), (3, 1)]


def _last_trained_token(tok, ex):
    return tok.convert_ids_to_tokens(max(i for i, lab in zip(ex.ids, ex.labels) if lab != IGNORE))


def test_overlong_examples_are_dropped_by_default_and_cut_after_a_whole_turn_on_request():
    tok = F.build_tokenizer(F.FAMILIES["llama31"])
    [ex] = encode_records(tok, [{"messages": F.conversation("multi", 3)}], "chat", lines=[7]).examples
    first_end, last_end = ex.ends
    assert last_end == len(ex)
    dropped = fit([ex], len(ex) - 1)
    assert not dropped.kept and dropped.dropped[0].line == 7
    assert dropped.dropped[0].reason == f"longer than maxSeqLength {len(ex) - 1} ({len(ex)} tokens)"
    cut = fit([ex], len(ex) - 1, "truncate")
    assert cut.truncated == 1 and len(cut.kept[0]) == first_end
    assert cut.kept[0].ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")  # it still learns to stop
    none = fit([ex], first_end - 1, "truncate")
    assert not none.kept and none.dropped[0].reason.startswith("no whole assistant turn within")


def test_examples_without_trained_tokens_never_train():
    from lora_trainer.data.encoding import Sourced

    ex = Sourced([1, 2, 3], [IGNORE] * 3, line=4)
    assert fit([ex], 10).dropped[0].reason == "no trained tokens"


def test_p95_is_the_nearest_rank_of_training_lengths():
    from lora_trainer.data.encoding import Sourced

    exs = [Sourced([1] * n, [1] * n) for n in range(1, 101)]
    assert p95_length(exs) == 95
    assert len(fit(exs, 95).dropped) == 5

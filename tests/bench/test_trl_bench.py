"""The TRL comparison must run end to end on tiny settings and compare like with like."""

import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_trl_comparison_trains_the_same_tokens_on_both_sides_and_reports_every_figure(tmp_path):
    pytest.importorskip("trl")
    sys.path.insert(0, str(ROOT / "bench"))
    import trl_bench

    result = trl_bench.run(tmp_path, n_train=12, rounds=1, n_eval=3)
    ours, trl = result["raw"]["ours"][0], result["raw"]["trl"][0]
    # same examples, same template, same completion-only mask: exactly the same tokens train
    assert ours["tokens"] == trl["tokens"] > 0
    assert ours["trained_tokens"] == trl["trained_tokens"] > 0
    for side in (ours, trl):
        assert 0 < side["loop_s"] < side["whole_s"] and side["rss_mb"] > 0
        assert math.isfinite(side["heldout_loss"])
    assert abs(ours["heldout_loss"] / trl["heldout_loss"] - 1) < 0.1  # same task, same LoRA: close
    assert result["pairs"][0]["whole"] == trl["whole_s"] / ours["whole_s"]
    names = [f["figure"] for f in result["figures"]]
    assert len(names) == 5 and all("TRL" in n for n in names)


def test_prompt_completion_records_hold_the_same_conversation(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import json

    import trainer_bench
    import trl_bench

    chat = trainer_bench.write_data(tmp_path / "chat.jsonl", 3, seed=1)
    pc = trl_bench.write_prompt_completion(chat, tmp_path / "pc.jsonl")
    for a, b in zip(chat.read_text().splitlines(), pc.read_text().splitlines()):
        record = json.loads(b)
        assert record["prompt"] + record["completion"] == json.loads(a)["messages"]
        assert [m["role"] for m in record["completion"]] == ["assistant"]

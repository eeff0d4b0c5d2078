"""Generation checks see what a user sees, and `lora-trainer inspect` shows what trains."""

from __future__ import annotations

import json

import families as F
import pytest
import yaml

from lora_operator.api import GenerationCheck
from lora_trainer.__main__ import main, run_job
from lora_trainer.config import RuntimeConfig, load_job
from lora_trainer.data.rendering import reasoning_tags, strip_reasoning
from lora_trainer.evaluation.generation import build_samples, compile_check


@pytest.fixture(scope="module")
def qwen3():
    return F.build_tokenizer(F.FAMILIES["qwen3"])


def test_a_perfect_qwen3_reply_passes_once_its_thinking_block_is_removed(qwen3):
    messages = F.conversation("system")
    [sample] = build_samples([{"messages": messages}], qwen3, 4)
    assert sample.prompt.endswith("<|im_start|>assistant\n")
    # What training taught after that prompt (the template renders the empty block), decoded.
    reply = "<think>\n\n</think>\n\n" + sample.reference
    exact = compile_check(GenerationCheck(name="exact", type="exactMatch"))
    starts = compile_check(GenerationCheck(name="starts", type="mustMatch", pattern="^A2:"))
    assert not exact(reply, sample.reference) and not starts(reply, sample.reference)  # the old behaviour
    seen = strip_reasoning(reply, reasoning_tags(qwen3))
    assert exact(seen, sample.reference) and starts(seen, sample.reference)


def test_thinking_off_prompts_render_the_empty_block_as_the_server_does(qwen3):
    [sample] = build_samples([{"messages": F.conversation("multi")}], qwen3, 4, {"enable_thinking": False})
    assert sample.prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("reply,seen", [("<think>plan</think>\n\nAnswer", "Answer"), ("plan</think>Answer", "Answer"),
                                        ("<think>still thinking", ""), ("Answer <b>", "Answer <b>")])
def test_reasoning_block_rule(qwen3, reply, seen):
    assert strip_reasoning(reply, reasoning_tags(qwen3)) == seen


def test_templates_without_a_reasoning_block_keep_the_reply():
    tok = F.build_tokenizer(F.FAMILIES["llama31"])
    assert reasoning_tags(tok) is None and strip_reasoning("<think>x</think>y", None) == "<think>x</think>y"


def _gemma_job(tmp_path, base, on_invalid="skip", max_len=0):
    from lora_trainer.io.storage import fingerprint_dir

    store = tmp_path / "store"
    rows = F.conversations(8, seed=5, shapes=("single", "multi"))
    rows.insert(1, {"messages": F.conversation("system", 9)})  # line 2: Gemma-2 refuses system turns
    (store / "data").mkdir(parents=True)
    (store / "out").mkdir()  # the output bucket exists (preflight refuses a missing one)
    (store / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"baseModel": {"uri": f"file://{base}", "revision": fingerprint_dir(base)},
            "dataset": {"train": "s3://data/train.jsonl", "onInvalidLine": on_invalid, "maxSeqLength": max_len,
                        "evalFraction": 0.2},
            "quantization": "none", "computeDtype": "float32", "output": {"uri": "s3://out/job"}}
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    return cfg, store


def test_inspect_prints_each_training_example_with_its_line_and_the_refused_one(family_base, tmp_path, capsys):
    cfg, store = _gemma_job(tmp_path, family_base("gemma2"), max_len=40)
    code = main(["inspect", str(cfg), "--storage-dir", str(store), "--work-dir", str(tmp_path / "w"), "--json"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 0
    *items, summary = out
    assert [i["line"] for i in items] == sorted(i["line"] for i in items)
    refused = [i for i in items if i["line"] == 2]
    assert refused and refused[0]["dropped"].startswith("the chat template refused this conversation")
    kept = [i for i in items if i["dropped"] is None]
    for item in kept:
        assert item["trained"] and all(t.endswith("<end_of_turn>\n") for t in item["trained"])
        assert not any("<start_of_turn>" in t for t in item["trained"]) and item["tokens"] <= 40
    too_long = [i for i in items if i["dropped"] and "maxSeqLength 40" in i["dropped"]]
    assert too_long and all(i["tokens"] > 40 for i in too_long)
    assert summary["summary"] == {"examples": len(kept), "dropped": len(items) - len(kept), "truncated": 0,
                                  "maxSeqLength": 40, "p95": summary["summary"]["p95"]}


def test_a_refused_record_fails_inspect_and_training_with_exit_2_naming_its_line(family_base, tmp_path, capsys):
    cfg, store = _gemma_job(tmp_path, family_base("gemma2"), on_invalid="fail")
    code = main(["inspect", str(cfg), "--storage-dir", str(store), "--work-dir", str(tmp_path / "w")])
    assert code == 2 and "s3://data/train.jsonl:2: the chat template refused" in capsys.readouterr().err
    rt = RuntimeConfig(work_dir=tmp_path / "w2", storage_dir=store, progress_interval_s=0,
                       termination_log=tmp_path / "termination-log", progress_bar=False)
    assert run_job({"train"}, load_job(cfg), rt) == 2
    progress = json.loads((store / "out" / "job" / "progress.json").read_text())
    assert progress["state"] == "Failed" and "train.jsonl:2: the chat template refused" in progress["error"]


def test_inspect_text_marks_trained_spans_and_limits_the_examples_shown(qwen3):
    import io

    from lora_trainer.data.encoding import encode_records
    from lora_trainer.data.inspection import write_report

    examples = encode_records(qwen3, [{"messages": F.conversation("multi")}], "chat", lines=[3]).examples
    out = io.StringIO()
    write_report(qwen3, [(ex, None) for ex in examples], {"examples": 2}, as_json=False, limit=1, out=out,
                 colour=False)
    text = out.getvalue()
    assert text.startswith("--- line 3 turn 0: ") and "--- line 3 turn 1" not in text
    assert "⟦<think>\n\n</think>\n\nA1:" in text and "<|im_end|>\n⟧" in text and text.endswith("summary: examples 2\n")

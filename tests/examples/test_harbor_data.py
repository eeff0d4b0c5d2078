"""The Harbor Support demo's data generator and job manifest (examples/harbor-support)."""

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

from lora_operator.api import parse_manifest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "harbor-support"


def _load_make_data():
    spec = importlib.util.spec_from_file_location("harbor_make_data", EXAMPLE / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_data = _load_make_data()


@pytest.fixture(scope="module")
def datasets():
    return make_data.build(n=800, seed=7, eval_fraction=0.12)


@pytest.fixture(scope="module")
def job():
    return yaml.safe_load((EXAMPLE / "job.yaml").read_text())


def _reply(example):
    return example["messages"][-1]["content"]


def _support(examples):
    return [ex for ex in examples if ex["messages"][0]["content"] == make_data.SUPPORT_SYSTEM]


def test_should_write_identical_files_for_the_same_seed(tmp_path):
    for run in ("a", "b"):
        make_data.main(["--out", str(tmp_path / run), "--n", "400", "--seed", "7"])
    for name in ("train", "eval", "generic", "regression"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()


def test_should_draw_different_tickets_for_a_different_seed():
    assert make_data.build(200, 7, 0.12)["train"] != make_data.build(200, 8, 0.12)["train"]


def test_should_hold_out_between_10_and_15_percent_with_the_default_arguments(tmp_path):
    make_data.main(["--out", str(tmp_path)])
    lines = {name: len((tmp_path / f"{name}.jsonl").read_text().splitlines()) for name in ("train", "eval")}
    assert lines["train"] + lines["eval"] == 3000
    assert 0.10 <= lines["eval"] / 3000 <= 0.15


def test_should_keep_held_out_tickets_out_of_train_and_of_the_base_data(datasets):
    held_out = {ex["messages"][1]["content"] for ex in datasets["eval"]}
    seen = {ex["messages"][1]["content"] for name in ("train", "generic") for ex in datasets[name]}
    assert held_out and not held_out & seen


def test_should_keep_regression_questions_out_of_the_base_data(datasets):
    regression = {ex["messages"][1]["content"] for ex in datasets["regression"]}
    assert regression and not regression & {ex["messages"][1]["content"] for ex in datasets["generic"]}


def test_should_write_chat_records_with_system_user_and_assistant_turns(datasets):
    for rows in datasets.values():
        for ex in rows:
            assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"]
            assert all(m["content"].strip() for m in ex["messages"])


def test_should_pass_every_tone_check_with_every_house_reply(datasets):
    for ex in datasets["train"] + datasets["eval"]:
        assert all(make_data.tone_checks(_reply(ex)).values()), _reply(ex)


def test_should_use_the_one_escalation_sentence_exactly_once_when_a_house_reply_escalates(datasets):
    replies = [_reply(ex) for ex in datasets["train"]]
    escalated = [r for r in replies if "escalat" in r]
    assert len(escalated) > len(replies) // 5
    assert all(r.count(make_data.ESCALATION) == 1 for r in escalated)


def test_should_fail_at_least_one_tone_check_with_every_generic_reply(datasets):
    for ex in datasets["generic"]:
        assert not all(make_data.tone_checks(_reply(ex)).values()), _reply(ex)


def test_should_show_tables_and_off_brand_escalations_in_some_generic_replies(datasets):
    results = [make_data.tone_checks(_reply(ex)) for ex in _support(datasets["generic"])]
    for check in ("no-markdown-table", "house-escalation"):
        share_failing = sum(not r[check] for r in results) / len(results)
        assert 0.2 < share_failing < 0.5, check


def test_should_parse_the_demo_job_manifest(job):
    spec = parse_manifest(job)
    assert spec.dataset.format == "chat" and spec.dataset.packing
    assert spec.resources.gpus == 0 and spec.output.format == "both"
    assert spec.evaluation.regression_dataset is not None


def test_should_train_with_the_guides_qlora_recipe(job):
    spec = parse_manifest(job)
    assert spec.quantization == "nf4" and spec.double_quant
    assert (spec.lora.rank, spec.lora.effective_alpha) == (16, 32)
    assert set(spec.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert spec.training.epochs == 2 and spec.training.max_steps == 0


def test_should_checkpoint_at_every_held_out_evaluation(job):
    # bitsandbytes 0.50 on AVX512-BF16 CPUs repacks NF4 weights for inference at an eval-mode forward;
    # only saving the adapter (state_dict) unpacks them, and training on packed weights gets wrong
    # gradients. Checkpointing at every evaluation keeps the demo's CPU QLoRA correct.
    t = parse_manifest(job).training
    assert t.eval_every_steps % t.checkpoint_every_steps == 0


def test_should_check_the_tone_with_the_patterns_the_data_is_built_from(job):
    checks = {c.name: c for c in parse_manifest(job).evaluation.gate.checks}
    assert checks["empathy-opener"].type == "mustMatch"
    assert checks["empathy-opener"].pattern == make_data.EMPATHY_RE
    assert checks["no-markdown-table"].type == "mustNotMatch"
    assert checks["no-markdown-table"].pattern == make_data.TABLE_RE
    assert checks["house-escalation"].type == "mustNotMatch"
    assert checks["house-escalation"].pattern == make_data.OFF_BRAND_ESCALATION_RE


def test_should_set_pass_rates_that_house_replies_clear_and_generic_replies_do_not(job, datasets):
    checks = parse_manifest(job).evaluation.gate.checks
    house = [_reply(ex) for ex in datasets["eval"]]
    generic = [_reply(ex) for ex in _support(datasets["generic"])]
    def rate(check, replies):
        hits = sum(re.search(check.pattern, r.strip()) is not None for r in replies) / len(replies)
        return hits if check.type == "mustMatch" else 1 - hits

    for check in checks:
        assert rate(check, house) >= check.min_pass_rate > rate(check, generic), check.name

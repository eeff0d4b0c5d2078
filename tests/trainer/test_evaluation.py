"""Evaluation: generation checks (pure tables) and base-vs-adapter on a tiny model (CPU)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import test_evaluation_support as world

from lora_operator.api import EvaluationStatus, GenerationCheck
from lora_trainer.evaluation.generation import CHECK_TYPES, CheckConfigError, build_samples, compile_check

REF = '{"status": "ok"}'
SCHEMA = {"type": "object", "required": ["status"], "properties": {"status": {"enum": ["ok"]}}}

CHECK_CASES = [
    ("exactMatch should ignore surrounding whitespace", {"type": "exactMatch"}, f"  {REF}\n", True),
    ("exactMatch should fail a different reply", {"type": "exactMatch"}, '{"status":"ok"}', False),
    ("validJson should pass a JSON object", {"type": "validJson"}, '{"a": [1, 2]}', True),
    ("validJson should fail prose", {"type": "validJson"}, "sure, here: {}", False),
    ("jsonSchema should pass a conforming object", {"type": "jsonSchema", "schema": SCHEMA}, REF, True),
    ("jsonSchema should fail a non-conforming object",
     {"type": "jsonSchema", "schema": SCHEMA}, '{"status": "bad"}', False),
    ("jsonSchema should fail invalid JSON", {"type": "jsonSchema", "schema": SCHEMA}, "{status: ok}", False),
    ("mustMatch should find the pattern anywhere with re.search",
     {"type": "mustMatch", "pattern": "ticket \\d+"}, "I opened ticket 42 for you", True),
    ("mustMatch should anchor ^ at the stripped reply",
     {"type": "mustMatch", "pattern": "^Thanks"}, "\n Thanks!", True),
    ("mustMatch should fail when the pattern is absent", {"type": "mustMatch", "pattern": "^Thanks"}, "No.", False),
    ("mustNotMatch should pass when the pattern is absent",
     {"type": "mustNotMatch", "pattern": "(?i)as an ai"}, "Done.", True),
    ("mustNotMatch should fail when the pattern is found",
     {"type": "mustNotMatch", "pattern": "(?i)as an ai"}, "As an AI, I cannot.", False),
]


@pytest.mark.parametrize("name,check,reply,passed", CHECK_CASES, ids=[c[0] for c in CHECK_CASES])
def test_generation_check(name, check, reply, passed):
    fn = compile_check(GenerationCheck.model_validate({"name": "c", **check}))
    assert fn(reply, REF) is passed


@pytest.mark.parametrize("check,match", [
    ({"type": "mustMatch", "pattern": "(unclosed"}, "invalid pattern"),
    ({"type": "jsonSchema", "schema": {"type": "no-such-type"}}, "invalid JSON Schema"),
], ids=["should refuse a broken regex early", "should refuse an invalid JSON Schema early"])
def test_broken_check_is_refused_before_generating(check, match):
    with pytest.raises(CheckConfigError, match=match):
        compile_check(GenerationCheck.model_validate({"name": "broken", **check}))


def test_every_api_check_type_has_exactly_one_entry_in_the_check_table():
    import typing

    from lora_operator.api.spec import CheckType

    assert sorted(CHECK_TYPES) == sorted(typing.get_args(CheckType))


def test_unknown_check_type_is_an_error_not_a_must_not_match():
    # A spec from a newer API version (or a typo past validation) must never pass silently.
    check = GenerationCheck.model_construct(name="future", type="semanticMatch", pattern="x",
                                            json_schema=None, min_pass_rate=1.0)
    with pytest.raises(CheckConfigError, match="unknown check type 'semanticMatch'"):
        compile_check(check)


def test_samples_cut_the_conversation_at_the_last_assistant_turn(tokenizer):
    record = {"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "first"},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "second"}]}
    (sample,) = build_samples([record, {"messages": [{"role": "user", "content": "x"}]}], tokenizer, 5)
    assert sample.reference == "second"
    assert sample.prompt == tokenizer.apply_chat_template(record["messages"][:3], tokenize=False,
                                                          add_generation_prompt=True)
    assert sample.prompt.endswith("<|im_start|>assistant\n")


def test_samples_stop_at_max_samples(tokenizer):
    assert len(build_samples(world.support_records(10, 0), tokenizer, 3)) == 3


# --- on the tiny model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return world.build_world(tmp_path_factory.mktemp("support"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tiny import make_tiny_base
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(make_tiny_base(tmp_path_factory.mktemp("tok"))))


@pytest.fixture(scope="module")
def report(w):
    from lora_trainer.evaluation.scoring import evaluate

    spec = world.make_spec(w["root"])
    return evaluate(spec, w["base"], w["adapter"], w["records"], w["tokenizer"], checkpoint_step=40,
                    regression_records=world.chat_examples(4, seed=3))


@pytest.mark.slow
def test_adapter_that_learned_the_greeting_passes_the_gate(report):
    (check,) = report.checks
    print(f"\ngreeting pass rate: base {check['base']:.2f}, adapter {check['adapter']:.2f}; "
          f"loss base {report.base.loss:.3f}, adapter {report.adapter.loss:.3f}")
    assert check["base"] == 0.0 and check["adapter"] >= 0.75
    assert report.adapter.loss < report.base.loss
    assert report.gate.passed and report.gate.reasons == []
    assert report.num_samples == {"loss": 8, "generation": 8}
    assert report.generations[0]["adapter"].startswith(world.GREETING)


@pytest.mark.slow
def test_base_and_adapter_are_scored_on_the_same_assistant_tokens(report, w):
    from lora_trainer.data.records import IGNORE, encode_chat

    assistant_tokens = sum(sum(1 for x in ex.labels if x != IGNORE)
                           for r in w["records"] for ex in encode_chat(w["tokenizer"], r["messages"]))
    assert report.base.tokens == report.adapter.tokens == assistant_tokens
    assert report.adapter.perplexity == pytest.approx(math.exp(report.adapter.loss))


@pytest.mark.slow
def test_regression_data_is_scored_for_base_and_adapter(report):
    reg = report.regression
    assert reg["samples"] == 4
    assert reg["increase"] == pytest.approx((reg["adapter"]["loss"] - reg["base"]["loss"]) / reg["base"]["loss"])


@pytest.mark.slow
def test_eval_json_and_progress_eval_carry_numbers_and_verdict(report, tmp_path):
    import json

    from lora_trainer.evaluation.scoring import progress_eval, write_eval_json
    from lora_trainer.io.storage import LocalStore

    key = write_eval_json(LocalStore(tmp_path), "out", report)
    doc = json.loads((tmp_path / key).read_text())
    assert doc["checks"][0]["adapter"] == report.checks[0]["adapter"]
    assert doc["base"]["loss"] == report.base.loss and doc["seed"] == 7
    assert doc["numSamples"]["generation"] == 8 and doc["gate"]["verdict"] == "Passed"
    status = EvaluationStatus.model_validate(progress_eval(report))  # operator copies it verbatim
    assert status.verdict == "Passed"
    assert {r.name for r in status.results} >= {"evalLoss", "lossImprovement", "checks.greeting"}
    from lora_operator.status.progress import evaluation_block  # what the operator does with it

    assert evaluation_block(progress_eval(report)) == status.to_wire()


@pytest.mark.slow
def test_impossible_threshold_fails_with_one_reason_per_threshold(w):
    from lora_trainer.evaluation.scoring import evaluate

    gate = {"maxEvalLoss": 1e-4, "checks": [
        {"name": "json", "type": "validJson", "minPassRate": 0.5},
        {"name": "greeting", "type": "mustMatch", "pattern": "^Thanks", "minPassRate": 0.5}]}
    spec = world.make_spec(w["root"], gate=gate)
    report = evaluate(spec, w["base"], w["adapter"], w["records"], w["tokenizer"])
    assert not report.gate.passed
    assert len(report.gate.reasons) == 2
    assert report.gate.reasons[0].startswith("evalLoss: ") and report.gate.reasons[0].endswith(" vs <= 0.0001")
    assert report.gate.reasons[1] == "checks.json: 0.0000 vs >= 0.5000"


# --- the champion: the adapter a channel serves, scored as a third column ---------------------------

CHAMPION_GATE = {"champion": {"channel": "production"}}


@pytest.fixture(scope="module")
def weak(w):
    return world.train_adapter(w["base"], w["root"] / "weak" / "adapter", steps=3)


@pytest.mark.slow
def test_should_score_the_champion_on_the_same_tokens_and_pass_a_better_adapter(w, weak):
    from lora_trainer.evaluation.scoring import evaluate

    gate = {**CHAMPION_GATE, "checks": [{"name": "greeting", "type": "mustMatch", "pattern": f"^{world.GREETING}"}]}
    gate["champion"]["maxPassRateDrop"] = 1.0  # this test is about losses; the check is the third column
    report = evaluate(world.make_spec(w["root"], gate=gate), w["base"], w["adapter"], w["records"], w["tokenizer"],
                      champion_dir=weak, champion={"channel": "production", "runId": "run-weak"})
    champ = report.champion
    print(f"\nheld-out loss: base {report.base.loss:.3f}, champion {champ['loss']['loss']:.3f}, "
          f"adapter {report.adapter.loss:.3f}")
    assert champ["runId"] == "run-weak" and champ["loss"]["tokens"] == report.adapter.tokens
    assert report.adapter.loss < champ["loss"]["loss"] and report.gate.passed, report.gate.reasons
    rows = {r["name"]: r for r in report.gate.results}
    assert rows["evalLoss"]["champion"] == champ["loss"]["loss"] and "champion" in rows["checks.greeting"]
    assert rows["championLoss"]["passed"] and report.generations[0]["champion"] is not None
    assert report.to_dict()["champion"]["checks"] == {"greeting": rows["checks.greeting"]["champion"]}


@pytest.mark.slow
def test_should_refuse_an_adapter_worse_than_the_champion(w, weak):
    from lora_trainer.evaluation.scoring import evaluate

    report = evaluate(world.make_spec(w["root"], gate=dict(CHAMPION_GATE)), w["base"], weak, w["records"],
                      w["tokenizer"], champion_dir=w["adapter"], champion={"channel": "production"})
    assert not report.gate.passed
    (reason,) = report.gate.reasons
    assert reason.startswith("championLoss: ")


@pytest.mark.slow
def test_should_score_the_champion_exactly_like_the_adapter_when_they_are_the_same(w):
    from lora_trainer.evaluation.scoring import evaluate

    report = evaluate(world.make_spec(w["root"], gate=dict(CHAMPION_GATE)), w["base"], w["adapter"], w["records"],
                      w["tokenizer"], champion_dir=w["adapter"], champion={"channel": "production"})
    assert report.champion["loss"]["loss"] == report.adapter.loss and report.gate.passed


@pytest.mark.slow
def test_should_report_no_champion_when_the_channel_serves_nothing(w):
    from lora_trainer.evaluation.scoring import evaluate

    missing = {"channel": "production", "missing": "channel production serves no adapter yet"}
    report = evaluate(world.make_spec(w["root"], gate=dict(CHAMPION_GATE)), w["base"], w["adapter"], w["records"],
                      w["tokenizer"], champion=missing)
    assert report.gate.passed and report.champion == missing
    row = next(r for r in report.gate.results if r["name"] == "champion")
    assert row["threshold"] == missing["missing"] and row["passed"] is True

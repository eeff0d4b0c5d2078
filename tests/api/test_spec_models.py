"""The spec models: defaults, field-naming errors, and the cross-field rules."""

import pytest
from overrides import with_overrides

from lora_operator.api import ALL_LINEAR, LoRATrainingJobSpec, SpecError, parse_manifest, parse_spec
from lora_operator.api.base import ApiModel

BASE = {
    "baseModel": {"uri": "s3://models/tiny-llama", "revision": "sha256:" + "a" * 64},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://artifacts/run-1"},
}


def minimal_spec(**overrides):
    return with_overrides(BASE, **overrides)


def test_should_fill_documented_defaults_when_only_required_fields_are_given():
    spec = parse_spec(minimal_spec())
    assert spec.quantization == "nf4" and spec.double_quant and spec.compute_dtype == "bfloat16"
    assert spec.lora.rank == 16 and spec.lora.effective_alpha == 32.0 and spec.lora.dropout == 0.05
    assert spec.lora.target_modules == ["all-linear"] and spec.attn_implementation == "auto"
    assert spec.dataset.on_overlong == "drop" and spec.training.gradient_checkpointing is None
    assert spec.output.vllm_max_lora_rank == 16 and spec.dataset.chat_template_kwargs == {}
    assert spec.dataset.eval_fraction == 0.1 and spec.dataset.packing and not spec.dataset.train_on_prompt
    assert spec.training.learning_rate == 2e-4 and spec.resources.gpus == 1 and spec.resources.nodes == 1
    assert spec.output.format == "adapter" and spec.suspend is False


def test_should_round_trip_through_the_wire_format_unchanged():
    spec = parse_spec(minimal_spec(**{"lora.alpha": 8, "resources.gpus": 0}))
    assert parse_spec(spec.to_wire()) == spec


INVALID = [
    ("an unknown scheme in baseModel.uri", {"baseModel.uri": "ftp://x/y"}, "spec.baseModel.uri"),
    ("an empty revision", {"baseModel.revision": ""}, "spec.baseModel.revision"),
    ("evalFraction above 0.5", {"dataset.evalFraction": 0.7}, "spec.dataset.evalFraction"),
    ("evalFraction of zero", {"dataset.evalFraction": 0}, "spec.dataset.evalFraction"),
    ("a non-positive alpha", {"lora.alpha": 0}, "spec.lora.alpha"),
    ("a rank of zero", {"lora.rank": 0}, "spec.lora.rank"),
    ("all-linear mixed with names", {"lora.targetModules": [ALL_LINEAR, "q_proj"]}, "spec.lora.targetModules"),
    ("an unknown quantization", {"quantization": "fp4"}, "spec.quantization"),
    ("zero nodes", {"resources.nodes": 0}, "spec.resources.nodes"),
    ("neither epochs nor maxSteps", {"training.epochs": 0, "training.maxSteps": 0}, "spec.training.epochs"),
    ("a regex check without a pattern", {"evaluation.gate.checks": [{"name": "tone", "type": "mustMatch"}]},
     "spec.evaluation.gate.checks[0].pattern"),
    ("a schema check without a schema", {"evaluation.gate.checks": [{"name": "js", "type": "jsonSchema"}]},
     "spec.evaluation.gate.checks[0].schema"),
    ("an unknown field", {"lora.rnak": 8}, "spec.lora.rnak"),
    ("an output on hf://", {"output.uri": "hf://org/name"}, "spec.output.uri"),
]


@pytest.mark.parametrize("case, overrides, field", INVALID, ids=[c[0] for c in INVALID])
def test_should_refuse_invalid_specs_naming_the_field(case, overrides, field):
    with pytest.raises(SpecError) as err:
        parse_spec(minimal_spec(**overrides))
    assert err.value.field == field
    assert field in str(err.value)


def test_should_name_a_missing_required_section():
    spec = minimal_spec()
    del spec["output"]
    with pytest.raises(SpecError, match="spec.output"):
        parse_spec(spec)


def test_should_refuse_a_manifest_of_another_kind():
    with pytest.raises(SpecError, match="kind"):
        parse_manifest({"apiVersion": "v1", "kind": "Pod", "spec": minimal_spec()})


def _all_models(model, seen):
    seen.add(model)
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            tp = stack.pop()
            stack.extend(getattr(tp, "__args__", ()) or ())
            if isinstance(tp, type) and issubclass(tp, ApiModel) and tp not in seen:
                _all_models(tp, seen)
    return seen


def test_every_spec_field_has_a_description():
    missing = [
        f"{model.__name__}.{name}"
        for model in _all_models(LoRATrainingJobSpec, set())
        for name, field in model.model_fields.items()
        if not field.description
    ]
    assert missing == []


@pytest.mark.parametrize("kwargs", [{"enable_thinking": {"nested": True}}, {f"k{i}": 1 for i in range(17)}])
def test_should_refuse_chat_template_variables_that_are_not_a_few_scalars(kwargs):
    with pytest.raises(SpecError, match="chatTemplateKwargs|chat_template_kwargs|chat template"):
        parse_spec(minimal_spec(**{"dataset.chatTemplateKwargs": kwargs}))


def test_should_accept_scalar_chat_template_variables():
    spec = parse_spec(minimal_spec(**{"dataset.chatTemplateKwargs": {"enable_thinking": False}}))
    assert spec.dataset.chat_template_kwargs == {"enable_thinking": False}

"""The demo's QLoRA vs unquantized LoRA comparison (hack/demo_compare.py): variants, slice, table."""

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from lora_operator.api import parse_manifest
from lora_trainer.evaluation import generation

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "harbor-support"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


compare = _load("demo_compare", REPO / "hack" / "demo_compare.py")
make_data = _load("harbor_make_data", EXAMPLE / "make_data.py")


@pytest.fixture(scope="module")
def manifest():
    return yaml.safe_load((EXAMPLE / "job.yaml").read_text())


@pytest.fixture(scope="module")
def datasets():
    return make_data.build(n=400, seed=7, eval_fraction=0.12)


def test_should_apply_the_checked_in_qlora_job_and_an_unquantized_twin(manifest):
    (qlora, first), (plain, second) = compare.variants(manifest)
    assert first is manifest and parse_manifest(first).quantization == "nf4"
    spec = parse_manifest(second)
    assert spec.quantization == "none"
    assert plain.name == second["metadata"]["name"] != qlora.name
    assert spec.output.uri != parse_manifest(first).output.uri  # never overwrite the other's artifacts
    assert "NF4" in qlora.label and "unquantized" in plain.label


def test_should_change_nothing_but_name_output_and_quantization_in_the_twin(manifest):
    (_, first), (_, second) = compare.variants(manifest)
    a, b = parse_manifest(first).model_dump(), parse_manifest(second).model_dump()
    for key in ("quantization", "output"):
        a.pop(key), b.pop(key)
    assert a == b
    assert manifest["spec"]["quantization"] == "nf4"  # the checked-in manifest is left alone


def test_should_slice_exactly_the_tickets_whose_house_reply_escalates(datasets):
    held_out = datasets["eval"]
    escalating = [ex for ex in held_out if make_data.ESCALATION in ex["messages"][-1]["content"]]
    assert compare.ESCALATION_MARKER in make_data.ESCALATION
    assert compare.hardest_slice(held_out, 1000) == escalating
    assert 0.25 < len(escalating) / len(held_out) < 0.5  # 3 of 8 ticket kinds
    assert compare.hardest_slice(held_out, 5) == escalating[:5]


def test_should_count_tone_adherence_only_when_every_check_passes(manifest):
    checks = {c.name: generation.compile_check(c) for c in parse_manifest(manifest).evaluation.gate.checks}
    house = "I'm sorry for the trouble, Ana. " + make_data.ESCALATION
    no_opener = "We have logged it. " + make_data.ESCALATION
    table = "I'm sorry for the trouble, Ana.\n\n| Charged | Your rate |\n| --- | --- |\n| $90 | $70 |"
    rates = compare.pass_rates(checks, [house, no_opener, table, house], [""] * 4)
    assert rates == {"empathy-opener": 0.75, "no-markdown-table": 0.75, "house-escalation": 1.0, "tone": 0.5}
    assert compare.pass_rates(checks, [], []) == {}


def _facts(obj_name: str, phase: str = "Succeeded") -> dict:
    obj = {"metadata": {"name": obj_name}, "status": {"phase": phase, "evaluation": {
        "verdict": "Passed", "results": [{"name": "evalLoss", "base": 5.5, "adapter": 0.9123}]}}}
    return {"obj": obj, "wall_s": 125.4, "progress": {"peakMemoryBytes": 1536 * 2**20, "trainableParams": 163840},
            "adapter_bytes": 650 * 2**10,
            "slice": {"samples": 48, "base": {"empathy-opener": 0.0, "tone": 0.0},
                      "adapter": {"empathy-opener": 1.0, "tone": 0.9583}}}


def test_should_print_one_row_per_metric_and_one_column_per_variant(manifest):
    (qlora, _), (plain, _) = compare.variants(manifest)
    text = compare.table([(qlora, _facts("a")), (plain, _facts("b"))])
    lines = text.splitlines()
    assert qlora.label in lines[0] and plain.label in lines[0]
    def row(metric):
        (line,) = [line for line in lines[1:] if line.startswith(metric + " ")]
        return line

    assert row("wall time (start -> end)").count("2m 05s") == 2
    assert "1,536 MiB" in row("peak memory (trainer RSS)")
    assert "163,840" in row("trainable parameters")
    assert "5.500 -> 0.912" in row("held-out loss, base -> adapter")
    assert "0% -> 96%" in row("escalation tickets (n=48): tone adherence")
    assert "0% -> 100%" in row("  empathy-opener")
    assert "650 KiB" in row("adapter size (adapter_model.safetensors)")


def test_should_show_dashes_for_a_job_that_published_nothing(manifest):
    (qlora, _), (plain, _) = compare.variants(manifest)
    failed = {"obj": {"metadata": {"name": "b"}, "status": {"phase": "Failed"}}}
    text = compare.table([(qlora, _facts("a")), (plain, failed)])
    assert "Failed (-)" in text
    assert text.splitlines()[3].rstrip().endswith("-")  # trainable parameters of the failed job

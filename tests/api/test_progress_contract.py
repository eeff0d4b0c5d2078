"""The progress.json contract (api.progress): strict for the writer, lenient per field for the reader."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from lora_operator.api import (
    EXIT_INVALID_INPUT,
    EXIT_PREEMPTED,
    TRAINER_STATES,
    ProgressReport,
    SpecError,
    check_name,
    parse_spec,
    read_report,
)

GOOD = {"jobUid": "u-1", "attempt": 1, "state": "Training", "step": 3, "totalSteps": 10, "loss": 1.25,
        "datasetHashes": {"s3://d/train.jsonl": "sha256:ab"},
        "eval": {"verdict": "Passed", "reasons": [], "results": [{"name": "evalLoss", "base": 2.0, "adapter": 1.2}]},
        "artifacts": {"adapter": "s3://b/out/adapter"}}

POISONED = [
    ("should drop a NaN loss", '{"loss": NaN}', "loss"),
    ("should drop an infinite ETA", '{"etaSeconds": Infinity}', "etaSeconds"),
    ("should drop a step that is not a number", '{"step": "3a"}', "step"),
    ("should drop a list of dataset hashes", '{"datasetHashes": ["sha256:x"]}', "datasetHashes"),
    ("should drop an unknown state", '{"state": "Hacked"}', "state"),
    ("should drop a huge integer", '{"step": 100000000000000000000}', "step"),
    ("should drop a NaN inside one eval result only", '{"eval": {"results": [{"name": "x", "base": NaN}]}}',
     "eval.results[0].base"),
    ("should drop a string too long for status", json.dumps({"error": "x" * 5000}), "error"),
]


@pytest.mark.parametrize("name,text,field", POISONED, ids=[c[0] for c in POISONED])
def test_should_keep_the_valid_fields_and_name_the_dropped_one(name, text, field):
    raw = {**GOOD, **json.loads(text)}
    if field.startswith("eval."):
        raw["eval"] = {**GOOD["eval"], **json.loads(text)["eval"]}
    report, problems = read_report(raw)
    assert len(problems) == 1 and problems[0].startswith(f"{field}:"), problems
    wire = report.to_wire()
    assert wire["jobUid"] == "u-1" and wire["totalSteps"] == 10
    json.dumps(wire, allow_nan=False)  # never NaN/Infinity towards the apiserver
    if field.startswith("eval."):
        assert wire["eval"]["results"] == [{"name": "x"}]
    else:
        assert field not in wire or wire[field] in ({}, None)


def test_should_read_a_good_report_unchanged():
    report, problems = read_report(GOOD)
    assert problems == [] and report.to_wire() == GOOD


def test_should_refuse_non_finite_numbers_and_loose_types_when_writing():
    with pytest.raises(ValidationError):
        ProgressReport(loss=float("nan"))
    with pytest.raises(ValidationError):
        ProgressReport.model_validate({"step": "3"})
    assert ProgressReport.model_validate({"unknownFromANewerTrainer": 1}).to_wire() == {"datasetHashes": {}}


def test_should_say_what_is_wrong_with_a_report_that_is_not_an_object():
    report, problems = read_report(["state", "Succeeded"])
    assert report.state is None and problems == ["progress.json: not a JSON object"]


def test_exit_codes_and_states_are_the_documented_ones():
    assert (EXIT_INVALID_INPUT, EXIT_PREEMPTED) == (2, 143)
    assert {"Preparing", "Training", "Succeeded", "Rejected", "Preempted"} <= set(TRAINER_STATES)


@pytest.mark.parametrize("name", ["team.a-run", "1run"])
def test_should_refuse_names_a_multi_node_job_cannot_use(name):
    spec = parse_spec({"baseModel": {"uri": "s3://models/x", "revision": "r"}, "dataset": {"train": "s3://data/t.jsonl"},
                       "output": {"uri": "s3://out/x"}, "resources": {"nodes": 2, "gpus": 1}})
    with pytest.raises(SpecError) as err:
        check_name(name, spec)
    assert err.value.field == "metadata.name"
    check_name("team-a-run", spec)
    check_name(name, spec.model_copy(update={"resources": spec.resources.model_copy(update={"nodes": 1})}))

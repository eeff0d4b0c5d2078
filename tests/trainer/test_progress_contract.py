"""The trainer writes progress.json through the api contract: strict JSON the operator reads whole."""

from __future__ import annotations

import json

from lora_operator.api import read_report
from lora_operator.status.progress import accept_report
from lora_trainer.io.progress import ProgressWriter
from lora_trainer.io.storage import LocalStore


def test_should_write_strict_json_naming_the_job_even_when_the_loss_is_nan(tmp_path):
    store = LocalStore(tmp_path)
    p = ProgressWriter(store, "o/progress.json", interval_s=0, attempt=2, job_uid="uid-7")
    p.update(state="Training", step=3, totalSteps=10, loss=float("nan"), etaSeconds=12,
             eval={"verdict": "Passed", "reasons": [], "results": [{"name": "evalLoss", "base": float("inf"),
                                                                     "adapter": 1.5, "threshold": "<= 2", "passed": True}]})
    text = store.get_bytes("o/progress.json").decode()
    data = json.loads(text, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))  # no NaN/Infinity
    assert data["loss"] is None and data["jobUid"] == "uid-7" and data["attempt"] == 2
    report, problems = read_report(data)
    assert problems == [] and report.eval.results[0].base is None
    wire, problems = accept_report(data, "uid-7")
    assert problems == () and wire["step"] == 3 and wire["etaSeconds"] == 12


def test_should_log_and_null_a_field_the_contract_refuses_instead_of_breaking_the_reader(tmp_path, caplog):
    store = LocalStore(tmp_path)
    p = ProgressWriter(store, "o/progress.json", interval_s=0, job_uid="u")
    p.update(state="Failed", step=2, totalSteps=-1, error="x" * 10_000)
    data = json.loads(store.get_bytes("o/progress.json"))
    assert data["totalSteps"] is None and data["step"] == 2 and len(data["error"]) == 4000
    assert "totalSteps" in caplog.text

"""Table tests of the publishing gate (pure: no torch, no models)."""

from __future__ import annotations

import math

import pytest

from lora_operator.api import EvaluationSpec
from lora_trainer.evaluation.gate import NO_THRESHOLDS, CheckRates, EvalMetrics, apply_gate


def _evaluation(**gate) -> EvaluationSpec:
    regression = gate.pop("regression", None)
    wire = {"gate": gate}
    if regression is not None:
        wire["regressionDataset"] = {"uri": "file:///data/general.jsonl", "maxLossRegression": regression}
    return EvaluationSpec.model_validate(wire)


def _metrics(base=2.0, adapter=1.5, checks=None, regression=None) -> EvalMetrics:
    rates = {k: CheckRates(*v) for k, v in (checks or {}).items()}
    return EvalMetrics(base_loss=base, adapter_loss=adapter, checks=rates, regression=regression)


GREETING = {"name": "greeting", "type": "mustMatch", "pattern": "^Thanks", "minPassRate": 0.8}

CASES = [
    ("should pass and say so when no thresholds are configured",
     {}, _metrics(), True, []),
    ("should not count a check with minPassRate 0 as a threshold",
     {"checks": [{**GREETING, "minPassRate": 0}]}, _metrics(checks={"greeting": (0.0, 0.0)}), True, []),
    ("should pass when the adapter loss is under maxEvalLoss",
     {"maxEvalLoss": 1.6}, _metrics(adapter=1.5), True, []),
    ("should pass when the adapter loss equals maxEvalLoss",
     {"maxEvalLoss": 1.5}, _metrics(adapter=1.5), True, []),
    ("should fail with the measured loss when it is above maxEvalLoss",
     {"maxEvalLoss": 1.0}, _metrics(adapter=1.5), False, ["evalLoss: 1.5000 vs <= 1.0000"]),
    ("should fail a NaN adapter loss",
     {"maxEvalLoss": 10.0}, _metrics(adapter=math.nan), False, ["evalLoss: nan vs <= 10.0000"]),
    ("should pass when the relative improvement reaches minLossImprovement",
     {"minLossImprovement": 0.25}, _metrics(base=2.0, adapter=1.5), True, []),
    ("should fail when the adapter improves too little",
     {"minLossImprovement": 0.5}, _metrics(base=2.0, adapter=1.5), False,
     ["lossImprovement: 0.2500 vs >= 0.5000"]),
    ("should fail minLossImprovement 0 when the adapter is worse than the base",
     {"minLossImprovement": 0}, _metrics(base=2.0, adapter=2.2), False,
     ["lossImprovement: -0.1000 vs >= 0.0000"]),
    ("should fail the improvement when the base loss is zero",
     {"minLossImprovement": 0.1}, _metrics(base=0.0, adapter=0.0), False,
     ["lossImprovement: nan vs >= 0.1000"]),
    ("should pass a check whose adapter pass rate reaches minPassRate",
     {"checks": [GREETING]}, _metrics(checks={"greeting": (0.0, 0.8)}), True, []),
    ("should fail a check under minPassRate with its pass rate",
     {"checks": [GREETING]}, _metrics(checks={"greeting": (0.0, 0.5)}), False,
     ["checks.greeting: 0.5000 vs >= 0.8000"]),
    ("should fail a check that has no samples",
     {"checks": [GREETING]}, _metrics(checks={"greeting": (None, None)}), False,
     ["checks.greeting: n/a vs >= 0.8000"]),
    ("should fail a check that was never measured",
     {"checks": [GREETING]}, _metrics(), False, ["checks.greeting: n/a vs >= 0.8000"]),
    ("should pass a regression within maxLossRegression",
     {"regression": 0.05}, _metrics(regression=(2.0, 2.08)), True, []),
    ("should fail a regression beyond maxLossRegression",
     {"regression": 0.05}, _metrics(regression=(2.0, 2.2)), False,
     ["regressionLossIncrease: 0.1000 vs <= 0.0500"]),
    ("should fail the regression limit when regression was not measured",
     {"regression": 0.05}, _metrics(), False, ["regressionLossIncrease: n/a vs <= 0.0500"]),
    ("should give one reason per failed threshold",
     {"maxEvalLoss": 1.0, "minLossImprovement": 0.5, "checks": [GREETING, {**GREETING, "name": "json",
      "type": "validJson", "pattern": None, "minPassRate": 0.1}], "regression": 0.0},
     _metrics(checks={"greeting": (0.0, 0.9), "json": (0.0, 0.0)}, regression=(2.0, 2.2)), False,
     ["evalLoss: 1.5000 vs <= 1.0000", "lossImprovement: 0.2500 vs >= 0.5000",
      "checks.json: 0.0000 vs >= 0.1000", "regressionLossIncrease: 0.1000 vs <= 0.0000"]),
]


@pytest.mark.parametrize("name,gate,metrics,passed,reasons", CASES, ids=[c[0] for c in CASES])
def test_gate(name, gate, metrics, passed, reasons):
    verdict = apply_gate(_evaluation(**gate), metrics)
    assert verdict.passed is passed
    assert verdict.reasons == reasons
    assert verdict.verdict == ("Passed" if passed else "Failed")


def test_gate_without_thresholds_says_so():
    verdict = apply_gate(_evaluation(), _metrics())
    assert verdict.note == NO_THRESHOLDS
    assert apply_gate(_evaluation(maxEvalLoss=5.0), _metrics()).note is None


def test_gate_results_have_the_status_check_result_shape():
    from lora_operator.api import EvaluationStatus

    verdict = apply_gate(_evaluation(maxEvalLoss=1.0, checks=[GREETING], regression=0.05),
                         _metrics(checks={"greeting": (0.0, 0.9)}, regression=(2.0, 2.02)))
    status = EvaluationStatus.model_validate(
        {"verdict": verdict.verdict, "reasons": verdict.reasons, "results": verdict.results})
    by_name = {r.name: r for r in status.results}
    assert by_name["evalLoss"].base == 2.0 and by_name["evalLoss"].adapter == 1.5
    assert by_name["evalLoss"].passed is False and by_name["evalLoss"].threshold == "<= 1"
    assert by_name["checks.greeting"].passed is True
    assert by_name["regressionLoss"].base == 2.0 and by_name["regressionLoss"].adapter == 2.02

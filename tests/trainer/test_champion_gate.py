"""Table tests of the champion thresholds (pure: no torch, no models)."""

from __future__ import annotations

import math

import pytest

from lora_operator.api import EvaluationSpec
from lora_trainer.evaluation.champion import ChampionMetrics, champion_thresholds, with_champion_column

GREETING = {"name": "greeting", "type": "mustMatch", "pattern": "^Thanks", "minPassRate": 0.5}


def _gate(**champion):
    return EvaluationSpec.model_validate({"gate": {"checks": [GREETING],
                                                    "champion": {"channel": "production", **champion}}}).gate


def _run(gate, champion, adapter=1.2, checks=0.9, regression=None):
    return champion_thresholds(gate, base_loss=2.0, adapter_loss=adapter, adapter_checks={"greeting": checks},
                               regression=regression, champion=champion)


CHAMP = ChampionMetrics(loss=1.2, regression_loss=3.0, check_rates={"greeting": 0.9}, run_id="run-1")

CASES = [
    ("should pass an adapter exactly as good as the champion", {}, CHAMP, {}, []),
    ("should refuse an adapter worse than the champion on held-out loss", {}, CHAMP, {"adapter": 1.3},
     ["championLoss: 1.3000 vs <= 1.2000"]),
    ("should allow the configured relative loss increase", {"maxLossIncrease": 0.1}, CHAMP, {"adapter": 1.3}, []),
    ("should refuse a check pass rate below the champion's", {}, CHAMP, {"checks": 0.8},
     ["checks.greeting.vsChampion: 0.8000 vs >= 0.9000"]),
    ("should allow the configured pass-rate drop", {"maxPassRateDrop": 0.1}, CHAMP, {"checks": 0.8}, []),
    ("should refuse more forgetting than the champion on the regression data", {}, CHAMP,
     {"regression": (2.5, 3.3)}, ["championRegressionLoss: 3.3000 vs <= 3.0000"]),
    ("should fail a champion that could not be measured", {}, ChampionMetrics(loss=math.nan), {},
     ["championLoss: 1.2000 vs <= n/a", "checks.greeting.vsChampion: 0.9000 vs >= n/a"]),
]


@pytest.mark.parametrize("case, champion_spec, champion, measured, reasons", CASES, ids=[c[0] for c in CASES])
def test_champion_thresholds(case, champion_spec, champion, measured, reasons):
    rows, got, configured = _run(_gate(**champion_spec), champion, **measured)
    assert got == reasons, case
    assert configured == len(rows) and all("champion" in r for r in rows)


def test_should_report_no_champion_without_failing_the_first_promotion():
    rows, reasons, configured = champion_thresholds(
        _gate(), base_loss=2.0, adapter_loss=1.2, adapter_checks={}, regression=None, champion=None,
        missing="channel production serves no adapter yet")
    assert reasons == [] and configured == 0
    assert rows == [{"name": "champion", "base": None, "adapter": None,
                     "threshold": "channel production serves no adapter yet", "passed": True}]


def test_should_add_nothing_when_the_gate_names_no_channel():
    gate = EvaluationSpec.model_validate({"gate": {}}).gate
    assert champion_thresholds(gate, base_loss=2.0, adapter_loss=1.0, adapter_checks={}, regression=None,
                               champion=CHAMP) == ([], [], 0)


def test_should_put_the_champion_value_in_the_third_column_of_the_gate_rows():
    rows = [{"name": "evalLoss", "base": 2.0, "adapter": 1.2}, {"name": "checks.greeting", "base": 0.1, "adapter": 0.9},
            {"name": "lossImprovement", "base": None, "adapter": 0.4}]
    out = with_champion_column(rows, CHAMP)
    assert [r.get("champion") for r in out] == [1.2, 0.9, None]
    assert with_champion_column(rows, None) == rows

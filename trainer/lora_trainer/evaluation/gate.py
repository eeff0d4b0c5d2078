"""The publishing gate: a pure function from (spec.evaluation, measured metrics) to a verdict.

Invariants:
- Every threshold set in the spec must hold; each one that does not adds exactly one reason of the
  form ``"<metric>: <value> vs <threshold>"`` (e.g. ``"evalLoss: 2.4100 vs <= 2.0000"``).
- A metric that could not be measured or is not finite (NaN loss, no samples) fails its threshold:
  a gate never passes on missing evidence.
- A gate without thresholds passes and says so in ``note`` ("no thresholds configured"). A check
  with ``minPassRate: 0`` is reported but is not a threshold.
- ``results`` has the shape of the status' ``CheckResult`` (name, base, adapter, threshold, passed),
  so the operator copies it verbatim into ``status.evaluation.results``.

No torch here: the operator and table tests import this module cheaply.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from lora_operator.api import EvaluationSpec

from .champion import ChampionMetrics, champion_thresholds, with_champion_column

NO_THRESHOLDS = "no thresholds configured"


@dataclass(frozen=True)
class CheckRates:
    """Pass rates of one generation check (None: no samples)."""

    base: Optional[float]
    adapter: Optional[float]


@dataclass(frozen=True)
class EvalMetrics:
    """What evaluation measured; the only input of the gate besides the spec."""

    base_loss: float
    adapter_loss: float
    checks: dict[str, CheckRates] = field(default_factory=dict)
    # (base, adapter) loss on spec.evaluation.regressionDataset; None when not measured.
    regression: Optional[tuple[float, float]] = None

    @property
    def loss_improvement(self) -> float:
        """(base - adapter) / base; NaN when the base loss is not a positive finite number."""
        if not (math.isfinite(self.base_loss) and self.base_loss > 0):
            return math.nan
        return (self.base_loss - self.adapter_loss) / self.base_loss

    @property
    def regression_increase(self) -> Optional[float]:
        """Relative loss increase of adapter over base on the regression data."""
        if self.regression is None:
            return None
        base, adapter = self.regression
        if not (math.isfinite(base) and base > 0):
            return math.nan
        return (adapter - base) / base


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reasons: list[str]
    results: list[dict[str, Any]]
    note: Optional[str] = None

    @property
    def verdict(self) -> str:
        return "Passed" if self.passed else "Failed"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["verdict"] = self.verdict
        return out


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _holds(value: Optional[float], op: str, limit: float) -> bool:
    if value is None or not math.isfinite(value):
        return False
    return value <= limit if op == "<=" else value >= limit


def _result(name: str, base: Optional[float], adapter: Optional[float], threshold: Optional[str],
            passed: Optional[bool]) -> dict[str, Any]:
    return {"name": name, "base": base, "adapter": adapter, "threshold": threshold, "passed": passed}


def _threshold(name, value, op, limit, base=None, adapter=None):
    """One threshold: its CheckResult row and, when it fails, its reason."""
    ok = _holds(value, op, limit)
    row = _result(name, base, adapter if adapter is not None else value, f"{op} {limit:g}", ok)
    reason = None if ok else f"{name}: {_fmt(value)} vs {op} {_fmt(limit)}"
    return row, reason


def apply_gate(evaluation: EvaluationSpec, metrics: EvalMetrics, champion: Optional[ChampionMetrics] = None,
               missing_champion: Optional[str] = None) -> GateVerdict:
    """Check every threshold of ``evaluation.gate`` (and the regression limit) against ``metrics``,
    and, when the gate names a channel, the new adapter against its ``champion`` (champion.py)."""
    gate = evaluation.gate
    rows: list[dict[str, Any]] = []
    reasons: list[str] = []
    configured = 0

    def add(row, reason):
        rows.append(row)
        if reason:
            reasons.append(reason)

    if gate.max_eval_loss is not None:
        configured += 1
        add(*_threshold("evalLoss", metrics.adapter_loss, "<=", gate.max_eval_loss,
                        base=metrics.base_loss))
    else:
        rows.append(_result("evalLoss", metrics.base_loss, metrics.adapter_loss, None, None))

    if gate.min_loss_improvement is not None:
        configured += 1
        add(*_threshold("lossImprovement", metrics.loss_improvement, ">=", gate.min_loss_improvement))

    for check in gate.checks:
        rates = metrics.checks.get(check.name, CheckRates(None, None))
        name = f"checks.{check.name}"
        if check.min_pass_rate > 0:
            configured += 1
            add(*_threshold(name, rates.adapter, ">=", check.min_pass_rate, base=rates.base))
        else:
            rows.append(_result(name, rates.base, rates.adapter, None, None))

    regression = evaluation.regression_dataset
    if regression is not None:
        configured += 1
        row, reason = _threshold("regressionLossIncrease", metrics.regression_increase, "<=",
                                 regression.max_loss_regression)
        if metrics.regression is not None:
            row["base"], row["adapter"] = metrics.regression
            row["name"] = "regressionLoss"
            row["threshold"] = f"increase <= {regression.max_loss_regression:g}"
        add(row, reason)

    champion_rows, champion_reasons, champion_configured = champion_thresholds(
        gate, base_loss=metrics.base_loss, adapter_loss=metrics.adapter_loss,
        adapter_checks={name: r.adapter for name, r in metrics.checks.items()}, regression=metrics.regression,
        champion=champion, missing=missing_champion)
    rows = with_champion_column(rows, champion) + champion_rows
    reasons += champion_reasons
    configured += champion_configured

    note = NO_THRESHOLDS if configured == 0 else None
    if note:
        rows.append(_result("gate", None, None, note, True))
    return GateVerdict(passed=not reasons, reasons=reasons, results=rows, note=note)

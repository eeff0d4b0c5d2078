"""The champion part of the gate (pure, no torch): the new adapter against the one a channel serves.

The operator resolves `spec.evaluation.gate.champion.channel` to the channel's live adapter when the
job starts and writes it into the trainer's config as `champion:` ({channel, runId, jobName,
adapter, metadata}, or {channel, missing} when there is nothing comparable). Evaluation scores the
champion on the same held-out and regression data as base and adapter (same tokenization, same
samples), and these thresholds compare the two:

- held-out loss:   adapter <= champion x (1 + maxLossIncrease)
- regression loss: adapter <= champion x (1 + maxRegressionLossIncrease)   (when regressionDataset is set)
- each check:      adapter pass rate >= champion pass rate - maxPassRateDrop

A missing champion is reported as a row that is not a threshold (the first promotion of a channel
has nothing to beat); a champion that was resolved but could not be measured fails, like any
metric that could not be measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class ChampionMetrics:
    """What evaluation measured for the champion (None: not measured)."""

    loss: Optional[float]
    regression_loss: Optional[float] = None
    check_rates: dict[str, Optional[float]] = field(default_factory=dict)
    run_id: Optional[str] = None
    channel: Optional[str] = None


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _finite(*values: Optional[float]) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def _loss_row(name: str, base, adapter, champion, increase: float) -> tuple[dict[str, Any], Optional[str]]:
    limit = champion * (1 + increase) if _finite(champion) else None
    ok = _finite(adapter, limit) and adapter <= limit
    row = {"name": name, "base": base, "champion": champion, "adapter": adapter,
           "threshold": f"<= champion x {1 + increase:g}", "passed": ok}
    return row, None if ok else f"{name}: {_fmt(adapter)} vs <= {_fmt(limit)}"


def champion_thresholds(gate, *, base_loss: float, adapter_loss: float, adapter_checks: dict[str, Optional[float]],
                        regression: Optional[tuple[float, float]], champion: Optional[ChampionMetrics],
                        missing: Optional[str] = None) -> tuple[list[dict[str, Any]], list[str], int]:
    """(rows, reasons, thresholds configured) for `gate.champion`; nothing when it is not set."""
    spec = gate.champion
    if spec is None:
        return [], [], 0
    if champion is None:
        note = missing or f"no champion in channel {spec.channel}"
        return [{"name": "champion", "base": None, "adapter": None, "threshold": note, "passed": True}], [], 0
    rows, reasons = [], []

    def add(row, reason):
        rows.append(row)
        if reason:
            reasons.append(reason)

    add(*_loss_row("championLoss", base_loss, adapter_loss, champion.loss, spec.max_loss_increase))
    if regression is not None:
        add(*_loss_row("championRegressionLoss", regression[0], regression[1], champion.regression_loss,
                       spec.max_regression_loss_increase))
    for check in gate.checks:
        theirs, ours = champion.check_rates.get(check.name), adapter_checks.get(check.name)
        limit = theirs - spec.max_pass_rate_drop if _finite(theirs) else None
        ok = _finite(ours, limit) and ours >= limit
        name = f"checks.{check.name}.vsChampion"
        rows.append({"name": name, "base": None, "champion": theirs, "adapter": ours,
                     "threshold": f">= champion - {spec.max_pass_rate_drop:g}", "passed": ok})
        if not ok:
            reasons.append(f"{name}: {_fmt(ours)} vs >= {_fmt(limit)}")
    return rows, reasons, len(rows)


def with_champion_column(rows: list[dict[str, Any]], champion: Optional[ChampionMetrics]) -> list[dict[str, Any]]:
    """The champion's value next to base and adapter in the gate's own rows (the third column)."""
    if champion is None:
        return rows
    values = {"evalLoss": champion.loss, "regressionLoss": champion.regression_loss,
              **{f"checks.{name}": rate for name, rate in champion.check_rates.items()}}
    return [{**row, "champion": values[row["name"]]} if row["name"] in values and "champion" not in row else row
            for row in rows]

"""progress.json -> status fields. Pure.

`accept_report` turns the parsed JSON into the report this job may use (api.read_report drops
invalid fields; a report of another job is not used at all), `carried_fields` maps a validated
report onto the status blocks. Only one shape is accepted: the one `api.ProgressReport` defines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..api import Artifacts, Checkpoints, EvaluationStatus, Progress, read_report

CARRIED = ("progress", "checkpoints", "evaluation", "artifacts", "datasetHashes", "skippedLines")


def accept_report(raw: Any, job_uid: str) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
    """(the report's wire dict, or None when unusable; problems, one line each, for one Event)."""
    if raw is None:
        return None, ()
    report, problems = read_report(raw)
    if report.job_uid != job_uid:
        why = f"jobUid is {report.job_uid!r}" if report.job_uid else "it has no jobUid"
        return None, (f"progress.json not used: {why}, this LoRATrainingJob's uid is {job_uid}",)
    return report.to_wire(), tuple(problems)


def _clean(model: type, data: Mapping[str, Any]) -> dict[str, Any] | None:
    wire = model.model_validate({k: v for k, v in data.items() if v is not None}).to_wire()
    return wire or None


def progress_block(p: Mapping[str, Any]) -> dict[str, Any] | None:
    step, total = p.get("step") or 0, p.get("totalSteps") or 0
    return _clean(Progress, {
        "step": step,
        "totalSteps": total,
        "percent": min(100, step * 100 // total) if total else 0,
        "summary": f"{step}/{total}" if total else f"{step}",
        **{k: p.get(k) for k in ("epoch", "loss", "evalLoss", "learningRate", "tokensPerSecond", "etaSeconds",
                                 "updatedAt")},
    })


def evaluation_block(evaluation: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A report's `eval` is already in the shape of status.evaluation."""
    return _clean(EvaluationStatus, evaluation) if evaluation else None


def carried_fields(previous: Mapping[str, Any], p: Mapping[str, Any] | None) -> dict[str, Any]:
    """Status fields mirrored from a validated report; the previous values when none was read."""
    if p is None:
        return {k: previous.get(k) for k in CARRIED if previous.get(k) is not None}
    artifacts = {k: v for k, v in (p.get("artifacts") or {}).items() if k in Artifacts.model_fields}
    out: dict[str, Any] = {
        "progress": progress_block(p),
        "checkpoints": _clean(Checkpoints, {"latest": p.get("lastCheckpoint"), "best": p.get("bestCheckpoint"),
                                            "bestEvalLoss": p.get("bestEvalLoss")}),
        "evaluation": evaluation_block(p.get("eval")),
        "artifacts": _clean(Artifacts, artifacts) if artifacts else None,
        "datasetHashes": dict(p.get("datasetHashes") or {}) or None,
        "skippedLines": p.get("skippedLines"),
    }
    return {k: v if v is not None else previous.get(k) for k, v in out.items() if v is not None or previous.get(k) is not None}

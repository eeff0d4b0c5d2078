"""Map the trainer's progress.json onto status fields (validated by the shared status models)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from ..api import Artifacts, Checkpoints, EvaluationStatus, Progress

CARRIED = ("progress", "checkpoints", "evaluation", "artifacts", "datasetHashes", "skippedLines")


def _clean(model: type, data: Mapping[str, Any]) -> dict[str, Any] | None:
    known = {field.alias or name for name, field in model.model_fields.items()}
    try:
        wire = model.model_validate({k: v for k, v in data.items() if v is not None and k in known}).to_wire()
    except ValidationError:
        return None
    return wire or None


def progress_block(p: Mapping[str, Any]) -> dict[str, Any] | None:
    step, total = int(p.get("step") or 0), int(p.get("totalSteps") or 0)
    eta = p.get("etaSeconds")
    return _clean(Progress, {
        "step": step,
        "totalSteps": total,
        "percent": min(100, step * 100 // total) if total else 0,
        "summary": f"{step}/{total}" if total else f"{step}",
        "epoch": p.get("epoch"),
        "loss": p.get("loss"),
        "evalLoss": p.get("evalLoss"),
        "learningRate": p.get("learningRate"),
        "tokensPerSecond": p.get("tokensPerSecond"),
        "etaSeconds": int(eta) if isinstance(eta, (int, float)) else None,
        "updatedAt": p.get("updatedAt"),
    })


def _results(evaluation: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Accept a list of {name, base, adapter, ...} or a mapping name -> {base, adapter, ...}."""
    out = []
    for key in ("results", "checks", "metrics"):
        value = evaluation.get(key)
        items = value.items() if isinstance(value, Mapping) else ((None, v) for v in value or ())
        for name, item in items:
            if isinstance(item, Mapping):
                threshold = item.get("threshold")
                row = {"name": str(item.get("name") or name), "base": item.get("base"),
                       "adapter": item.get("adapter"), "passed": item.get("passed"),
                       "threshold": None if threshold is None else str(threshold)}
                if isinstance(item.get("champion"), (int, float)):  # the third column, when compared
                    row["champion"] = item["champion"]
                out.append(row)
    for name, item in evaluation.items():  # top-level {evalLoss: {base, adapter}} style
        if isinstance(item, Mapping) and ("base" in item or "adapter" in item):
            out.append({"name": name, "base": item.get("base"), "adapter": item.get("adapter"),
                        "passed": item.get("passed"),
                        "threshold": None if item.get("threshold") is None else str(item["threshold"])})
    return [r for r in out if isinstance(r["base"], (int, float, type(None)))
            and isinstance(r["adapter"], (int, float, type(None)))]


def evaluation_block(evaluation: Mapping[str, Any]) -> dict[str, Any] | None:
    verdict, passed = evaluation.get("verdict"), evaluation.get("passed")
    if verdict not in ("Passed", "Failed"):
        verdict = None if passed is None else ("Passed" if passed else "Failed")
    return _clean(EvaluationStatus, {
        "verdict": verdict,
        "reasons": [str(r) for r in evaluation.get("reasons") or ()],
        "results": _results(evaluation),
    })


def carried_fields(previous: Mapping[str, Any], p: Mapping[str, Any] | None) -> dict[str, Any]:
    """Status fields mirrored from progress.json; the previous values when it was not read."""
    if p is None:
        return {k: previous.get(k) for k in CARRIED if previous.get(k) is not None}
    out: dict[str, Any] = {
        "progress": progress_block(p),
        "checkpoints": _clean(Checkpoints, {"latest": p.get("lastCheckpoint"), "best": p.get("bestCheckpoint"),
                                            "bestEvalLoss": p.get("bestEvalLoss")}),
        "evaluation": evaluation_block(p["eval"]) if isinstance(p.get("eval"), Mapping) else None,
        "artifacts": _clean(Artifacts, dict(p["artifacts"])) if isinstance(p.get("artifacts"), Mapping) else None,
        "datasetHashes": {str(k): str(v) for k, v in (p.get("datasetHashes") or {}).items()} or None,
        "skippedLines": p.get("skippedLines") if isinstance(p.get("skippedLines"), int) else None,
    }
    return {k: v if v is not None else previous.get(k) for k, v in out.items() if v is not None or previous.get(k) is not None}

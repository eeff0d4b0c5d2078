"""Condition types, reasons and the one helper that keeps `lastTransitionTime` honest.

Invariant: `lastTransitionTime` changes only when a condition's `status` flips; a new reason or
message alone keeps the old time (metav1.Condition semantics, as in apimachinery's SetStatusCondition).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Types
ADMITTED = "Admitted"
SUSPENDED = "Suspended"
RUNNING = "Running"
EVALUATED = "Evaluated"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
READY = "Ready"  # kstatus
RECONCILING = "Reconciling"  # kstatus
STALLED = "Stalled"  # kstatus
TYPES = (ADMITTED, SUSPENDED, RUNNING, EVALUATED, SUCCEEDED, FAILED, READY, RECONCILING, STALLED)

# Reasons
INVALID_SPEC = "InvalidSpec"
POLICY_VIOLATION = "PolicyViolation"
QUOTA_EXCEEDED = "QuotaExceeded"
MAX_RUNNING_JOBS = "MaxRunningJobs"
KUEUE_NOT_INSTALLED = "KueueNotInstalled"
QUEUED = "Queued"
KUEUE_ADMITTED = "AdmittedByKueue"
JOB_CREATED = "JobCreated"
POD_STARTING = "PodStarting"
PREPARING = "Preparing"
TRAINING = "Training"
EVALUATING = "Evaluating"
EXPORTING = "Exporting"
SUSPENDED_BY_USER = "SuspendedByUser"
NOT_SUSPENDED = "NotSuspended"
RETRYING = "Retrying"
PREEMPTED = "Preempted"
GATE_PASSED = "GatePassed"
GATE_FAILED = "GateFailed"
PENDING_EVALUATION = "PendingEvaluation"
COMPLETED = "Completed"
NOTHING_PUBLISHED = "NothingPublished"  # exit 0 without a gate verdict or without published artifacts
BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
INVALID_INPUT = "InvalidInput"  # the trainer refused its data, spec or base model (exit 2)
IN_PROGRESS = "InProgress"
NOT_STARTED = "NotStarted"

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"

# Reasons worth a Warning event when their condition becomes True (or Admitted becomes False).
WARNING_REASONS = frozenset({
    INVALID_SPEC, POLICY_VIOLATION, QUOTA_EXCEEDED, KUEUE_NOT_INSTALLED, MAX_RUNNING_JOBS,
    BACKOFF_LIMIT_EXCEEDED, INVALID_INPUT, GATE_FAILED, NOTHING_PUBLISHED, RETRYING, PREEMPTED,
})


def condition(type_: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def merge_conditions(
    old: Iterable[dict[str, Any]], new: Iterable[dict[str, Any]], *, now: str, generation: int | None
) -> list[dict[str, Any]]:
    """New conditions in TYPES order, keeping each old lastTransitionTime whose status did not flip."""
    previous = {c.get("type"): c for c in old or ()}
    merged = []
    for cond in sorted(new, key=lambda c: TYPES.index(c["type"]) if c["type"] in TYPES else len(TYPES)):
        before = previous.get(cond["type"])
        flipped = before is None or before.get("status") != cond["status"]
        when = now if flipped or not before.get("lastTransitionTime") else before["lastTransitionTime"]
        merged.append({**cond, "lastTransitionTime": when, "observedGeneration": generation})
    return merged


def find(conditions: Iterable[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or () if c.get("type") == type_), None)


def is_true(conditions: Iterable[dict[str, Any]], type_: str) -> bool:
    cond = find(conditions, type_)
    return bool(cond and cond.get("status") == TRUE)

"""Kueue's Workload for a trainer Job: what Kueue decided, in its own words. Pure.

Kueue (v0.17, kueue.x-k8s.io/v1beta2) keeps one Workload per Job (label kueue.x-k8s.io/job-uid).
The conditions read here, as Kueue sets them:
  QuotaReserved=False  waiting; the message is Kueue's reason ("couldn't assign flavors to pod set
                       main: insufficient unused quota for nvidia.com/gpu in flavor ..., 1 more needed")
  Admitted=True        admitted; Kueue unsuspends the Job
  Evicted=True         evicted (reason Preempted, Deactivated, ...); Kueue suspends the Job, the
                       trainer checkpoints and exits 143. Evicted stays True until quota is
                       reserved again ("Previously: ..." then), so it marks the whole wait.
  Preempted=True       details of a preemption (reason InClusterQueue, InCohortReclamation, ...)
  Finished=True        the Job ended
spec.active=false deactivates the Workload: Kueue evicts it (reason Deactivated) and releases its
quota; the operator does that for `spec.suspend: true` and marks the Workload with DEACTIVATED_BY,
so it reactivates only Workloads it deactivated itself.

Preemption accounting (status.attempts[].preemptions / stepsRedone): a preemption is counted once
per Evicted lastTransitionTime; its redone steps are the trainer's step minus the step of the
latest complete checkpoint, both from the latest progress.json of that attempt read while the
Workload is evicted (after SIGTERM the trainer checkpoints at its current step, so this is 0
unless it was killed before its checkpoint completed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import conditions as c

DEACTIVATED_BY = "training.lora.dev/deactivated-by"
EVICTED_BY_PREEMPTION = "Preempted"


@dataclass(frozen=True)
class WorkloadView:
    name: str
    active: bool = True
    deactivated_by_us: bool = False
    admitted: bool = False
    finished: bool = False
    pending_reason: str | None = None  # QuotaReserved=False
    pending_message: str | None = None
    evicted_reason: str | None = None  # Evicted=True
    evicted_message: str | None = None
    evicted_at: str | None = None
    preempted_reason: str | None = None  # Preempted=True


def _true(conds: list[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((x for x in conds if x.get("type") == type_ and x.get("status") == "True"), None)


def workload_view(workload: Mapping[str, Any]) -> WorkloadView:
    meta, spec = workload.get("metadata", {}), workload.get("spec", {})
    conds = list((workload.get("status") or {}).get("conditions") or ())
    reserved = next((x for x in conds if x.get("type") == "QuotaReserved"), None)
    evicted, preempted = _true(conds, "Evicted"), _true(conds, "Preempted")
    waiting = reserved is None or reserved.get("status") != "True"
    return WorkloadView(
        name=meta.get("name", ""),
        active=spec.get("active", True) is not False,
        deactivated_by_us=(meta.get("annotations") or {}).get(DEACTIVATED_BY) == "lora-operator",
        admitted=_true(conds, "Admitted") is not None,
        finished=_true(conds, "Finished") is not None,
        pending_reason=(reserved or {}).get("reason") if waiting else None,
        pending_message=(reserved or {}).get("message") if waiting else None,
        evicted_reason=(evicted or {}).get("reason"),
        evicted_message=(evicted or {}).get("message"),
        evicted_at=(evicted or {}).get("lastTransitionTime"),
        preempted_reason=(preempted or {}).get("reason"),
    )


def workload_active_change(workload: WorkloadView | None, suspend: bool) -> bool | None:
    """spec.active to patch on the Workload (None: leave it): false for `spec.suspend: true`;
    true again on resume, only for a Workload this operator deactivated."""
    if workload is None or workload.finished:
        return None
    if suspend and workload.active:
        return False
    if not suspend and not workload.active and workload.deactivated_by_us:
        return True
    return None


def kueue_held(queue: str | None, job_name: str, workload: WorkloadView | None) -> tuple[dict, dict, dict]:
    """(Admitted, Suspended, Running) for a Kueue-managed Job that Kueue keeps suspended."""
    if workload is None:
        msg = f"waiting for Kueue to create the Workload of Job {job_name} in queue {queue}"
        return _queued(msg)
    if workload.evicted_reason == EVICTED_BY_PREEMPTION:
        msg = f"preempted by Kueue ({workload.preempted_reason or 'Preempted'}): {workload.evicted_message}"
        if workload.pending_message and workload.pending_message != workload.evicted_message:
            msg += f"; now: {workload.pending_message}"
        return (c.condition(c.ADMITTED, c.FALSE, c.PREEMPTED, msg), c.condition(c.SUSPENDED, c.TRUE, c.PREEMPTED, msg),
                c.condition(c.RUNNING, c.FALSE, c.PREEMPTED, msg))
    if workload.evicted_reason:
        return _queued(f"evicted by Kueue ({workload.evicted_reason}): {workload.evicted_message}")
    if workload.pending_message:
        return _queued(f"Kueue: {workload.pending_message}")
    return _queued(f"waiting for Kueue to admit Workload {workload.name} in queue {queue}")


def _queued(msg: str) -> tuple[dict, dict, dict]:
    return (c.condition(c.ADMITTED, c.FALSE, c.QUEUED, msg), c.condition(c.SUSPENDED, c.TRUE, c.QUEUED, msg),
            c.condition(c.RUNNING, c.FALSE, c.QUEUED, msg))


def _step_of(uri: Any) -> int | None:
    match = re.search(r"step-(\d+)/?$", str(uri or ""))
    return int(match.group(1)) if match else None


def record_preemption(attempts: list[dict[str, Any]], attempt: int | None, workload: WorkloadView | None,
                      progress: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """attempts with the current attempt's preemption count and steps redone brought up to date."""
    if attempt is None or workload is None or workload.evicted_reason != EVICTED_BY_PREEMPTION:
        return attempts
    out = [dict(a) for a in attempts]
    record = next((a for a in out if a.get("index") == attempt), None)
    if record is None:
        return attempts
    if record.get("lastPreemptedAt") != workload.evicted_at:
        record.update(preemptions=int(record.get("preemptions") or 0) + 1, lastPreemptedAt=workload.evicted_at,
                      stepsRedone=int(record.get("stepsRedone") or 0))
        record.pop("preemptedAtStep", None)
        record.pop("resumeFromStep", None)
    fresh = progress and progress.get("attempt") in (None, attempt)
    step, ckpt = (int(progress.get("step") or 0), _step_of(progress.get("lastCheckpoint"))) if fresh else (None, None)
    if step is not None and ckpt is not None and step >= ckpt:
        before = int(record.get("preemptedAtStep", 0)) - int(record.get("resumeFromStep", 0))
        record.update(preemptedAtStep=step, resumeFromStep=ckpt,
                      stepsRedone=int(record.get("stepsRedone") or 0) - before + step - ckpt)
    return out

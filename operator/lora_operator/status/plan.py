"""What to change in the world this pass (pure): start an attempt, suspend or resume the Job.

Attempts: every failed attempt (non-zero exit, OOMKilled, evicted, preempted pod, deadline) counts
against spec.maxRetries; a Job suspended by the user or by Kueue is not a failure (the Job
controller deletes its pods, the trainer exits 143 after a checkpoint, the same Job resumes).
For a Kueue-managed Job, `spec.suspend: true` deactivates its Workload (spec.active=false) instead
of suspending the Job: Kueue would unsuspend a Job whose Workload is still admitted. Kueue then
evicts the Workload, suspends the Job and releases the quota; resuming reactivates the Workload and
Kueue queues it again. Only while no Workload exists yet is the Job itself suspended.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .attempts import final_failure_reason, merge_attempts
from .observed import JobView
from .workload import WorkloadView, workload_active_change


@dataclass(frozen=True)
class Plan:
    start_attempt: int | None = None  # create the Job of this attempt (after admission checks)
    suspend_job: bool | None = None  # patch the live Job's spec.suspend to this
    workload_active: bool | None = None  # patch the live Job's Kueue Workload spec.active to this


def plan(
    jobs: Iterable[JobView],
    previous_attempts: Iterable[Mapping[str, Any]],
    *,
    suspend: bool,
    max_retries: int,
    kueue_managed: bool,
    workload: WorkloadView | None = None,
) -> Plan:
    jobs = tuple(jobs)
    current = max(jobs, key=lambda j: j.attempt) if jobs else None
    if current is None:
        return Plan(start_attempt=None if suspend else 1)
    if current.outcome is None:
        if kueue_managed and workload is not None:
            return Plan(workload_active=workload_active_change(workload, suspend))
        return Plan(suspend_job=_suspend_change(current, suspend, kueue_managed))
    if current.outcome == "Failed" and not suspend:
        attempts = merge_attempts(previous_attempts, jobs)
        if final_failure_reason(attempts, max_retries) is None:
            return Plan(start_attempt=current.attempt + 1)
    return Plan()


def _suspend_change(current: JobView, suspend: bool, kueue_managed: bool) -> bool | None:
    if suspend and not current.suspended:
        return True
    # Kueue unsuspends the Jobs it admits; the operator only resumes Jobs it manages alone.
    if not suspend and current.suspended and not kueue_managed:
        return False
    return None


def running_elsewhere(jobs: Iterable[Mapping[str, Any]], owner_label: str, label_key: str) -> int:
    """Unfinished, unsuspended trainer Jobs of other LoRATrainingJobs (namespace limit)."""
    count = 0
    for job in jobs:
        labels = job.get("metadata", {}).get("labels") or {}
        status = job.get("status", {})
        finished = any(cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True"
                       for cond in status.get("conditions") or ())
        if labels.get(label_key) != owner_label and not finished and not job.get("spec", {}).get("suspend"):
            count += 1
    return count

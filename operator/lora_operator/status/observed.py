"""What one reconcile pass saw, as plain frozen values (inputs of the pure functions)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .workload import WorkloadView


@dataclass(frozen=True)
class Failure:
    """Why an attempt's pod ended: OOMKilled, Evicted, Preempted, Error, DeadlineExceeded, PodLost."""

    reason: str
    exit_code: int | None = None
    message: str | None = None
    node_rank: int | None = None  # multi-node: the failed pod's completion index
    pod: str | None = None  # multi-node: the failed pod's name


@dataclass(frozen=True)
class JobView:
    """One child batch/v1 Job (one attempt)."""

    name: str
    attempt: int
    created_at: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    suspended: bool = False
    active: int = 0
    ready: int = 0
    parallelism: int = 1  # pods the attempt runs at once (spec.resources.nodes)
    finished_pods: int = 0  # succeeded + failed pods; >0 with active == 0: the Job is concluding
    terminating: int = 0  # pods being deleted (status.terminating); a new attempt waits for 0
    waiting: tuple[str, str] | None = None  # (reason, message) of a pod the kubelet cannot start
    outcome: str | None = None  # "Succeeded" | "Failed" | None while running
    failure: Failure | None = None  # set when the operator looked at the failed pod
    summary: Mapping[str, Any] | None = None  # trainer's one-line JSON termination message


@dataclass(frozen=True)
class Blocked:
    """Why no new attempt could start right now (it is retried on the next pass)."""

    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    generation: int | None
    now: str
    previous: Mapping[str, Any] = field(default_factory=dict)  # the status as last written
    invalid: tuple[str, str] | None = None  # (InvalidSpec | PolicyViolation, message)
    suspend: bool = False
    max_retries: int = 3
    queue_name: str | None = None
    jobs: tuple[JobView, ...] = ()
    blocked: Blocked | None = None
    progress: Mapping[str, Any] | None = None  # progress.json, None when not read this pass
    workload: WorkloadView | None = None  # Kueue's Workload of the live Job (Kueue-managed only)

    @property
    def current(self) -> JobView | None:
        return max(self.jobs, key=lambda j: j.attempt) if self.jobs else None

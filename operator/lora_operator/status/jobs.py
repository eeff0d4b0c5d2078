"""Read child Jobs and their Pods (plain dicts from the API) into JobViews. Pure."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from ..api import EXIT_DIVERGED, EXIT_INVALID_INPUT, EXIT_PREEMPTED
from ..builders import LABEL_ATTEMPT
from . import conditions as c
from .observed import Failure, JobView

KILLED_EXIT = 137  # SIGKILL from outside: a lost node, a kill, the OOM killer
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"


def _true_condition(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for cond in job.get("status", {}).get("conditions") or ():
        if cond.get("type") == type_ and cond.get("status") == "True":
            return cond
    return None


def job_outcome(job: Mapping[str, Any]) -> str | None:
    if _true_condition(job, "Complete"):
        return "Succeeded"
    if _true_condition(job, "Failed"):
        return "Failed"
    return None


def parse_summary(message: str | None) -> dict[str, Any] | None:
    """The trainer's one-line JSON summary, if the termination message is one."""
    for line in reversed((message or "").strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        return value if isinstance(value, dict) else None
    return None


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for status in pod.get("status", {}).get("containerStatuses") or ():
        state = status.get("state", {}).get("terminated") or status.get("lastState", {}).get("terminated")
        if state:
            return state
    return None


def pod_failure(pod: Mapping[str, Any]) -> Failure:
    status = pod.get("status", {})
    term = _terminated(pod) or {}
    code, message = term.get("exitCode"), (term.get("message") or "").strip() or None
    for cond in status.get("conditions") or ():
        if cond.get("type") == "DisruptionTarget" and cond.get("status") == "True":
            return Failure(cond.get("reason") or c.PREEMPTED, code, message or cond.get("message"))
    if status.get("reason") == c.EVICTED:
        return Failure(c.EVICTED, code, status.get("message") or message)
    if term.get("reason") == c.OOM_KILLED:
        return Failure(c.OOM_KILLED, code, message)
    if code == EXIT_PREEMPTED:
        return Failure(c.PREEMPTED, code, message)
    if code == EXIT_INVALID_INPUT:
        return Failure(c.INVALID_INPUT, code, message)
    if code == EXIT_DIVERGED:
        return Failure(c.DIVERGED, code, message)
    return Failure(term.get("reason") or status.get("reason") or c.ERROR, code, message)


def live_pods(pods: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Pods that may still run code: not finished, or finished but not yet deleted after a delete."""
    return [p for p in pods if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")]


def config_error(pods: Iterable[Mapping[str, Any]]) -> tuple[str, str] | None:
    """(reason, message) when the kubelet cannot create a container (a missing Secret, ConfigMap or key)."""
    for pod in pods:
        for status in pod.get("status", {}).get("containerStatuses") or ():
            waiting = (status.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") == c.CONTAINER_CONFIG_ERROR:
                message = waiting.get("message") or ""
                reason = c.SECRET_NOT_FOUND if message.startswith("secret") else c.CONTAINER_CONFIG_ERROR
                return reason, f"pod {pod['metadata']['name']}: {message}"[:1024]
    return None


def job_failure(job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]]) -> Failure:
    """Why a failed Job failed: the pod that failed first, else the Job's own Failed condition."""
    failed = [p for p in pods if p.get("status", {}).get("phase") == "Failed"]
    if failed:
        first = min(failed, key=_failure_order)
        failure = pod_failure(first)
        index = (first["metadata"].get("annotations") or {}).get(INDEX_ANNOTATION)
        if (job.get("spec") or {}).get("completionMode") == "Indexed" and index is not None:
            return replace(failure, node_rank=int(index), pod=first["metadata"]["name"])
        return failure
    cond = _true_condition(job, "Failed") or {}
    if cond.get("reason") == c.DEADLINE_EXCEEDED:
        return Failure(c.DEADLINE_EXCEEDED, None, cond.get("message"))
    return Failure(c.POD_LOST, None, cond.get("message") or "the pod disappeared before it finished")


def _failure_order(pod: Mapping[str, Any]) -> tuple:
    """Earliest first: in a multi-node attempt the other ranks fail because of the first one (a
    lost peer, the Job controller stopping them). Within one second (the resolution of
    finishedAt), a pod killed from outside goes first: its peers only noticed."""
    term = _terminated(pod) or {}
    external = term.get("exitCode") == KILLED_EXIT or term.get("reason") == "OOMKilled" \
        or pod.get("status", {}).get("reason") == "Evicted"
    return term.get("finishedAt") or "~", not external, pod["metadata"]["name"]


def job_view(job: Mapping[str, Any], pods: Iterable[Mapping[str, Any]] | None = None) -> JobView:
    """`pods` is None when the operator did not look at them (attempt already recorded)."""
    meta, spec, status = job.get("metadata", {}), job.get("spec", {}), job.get("status", {})
    outcome = job_outcome(job)
    pods = list(pods) if pods is not None else None
    failure = job_failure(job, pods) if outcome == "Failed" and pods is not None else None
    summary = None
    if pods:
        term = next((t for t in (_terminated(p) for p in pods) if t), None)
        summary = parse_summary((term or {}).get("message"))
    return JobView(
        name=meta["name"],
        attempt=int((meta.get("labels") or {}).get(LABEL_ATTEMPT, "0") or 0),
        created_at=meta.get("creationTimestamp"),
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime") or (
            (_true_condition(job, "Failed") or {}).get("lastTransitionTime") if outcome == "Failed" else None),
        suspended=bool(spec.get("suspend")),
        active=int(status.get("active") or 0),
        ready=int(status.get("ready") or 0),
        parallelism=int(spec.get("parallelism") or 1),
        finished_pods=int(status.get("succeeded") or 0) + int(status.get("failed") or 0),
        terminating=int(status.get("terminating") or 0),
        waiting=config_error(pods) if pods and outcome is None else None,
        outcome=outcome,
        failure=failure,
        summary=summary,
    )

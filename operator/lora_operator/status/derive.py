"""derive_status(observed) -> status: the whole status from one observation, as a pure function.

The decision order matters and is the contract the table tests pin down:
invalid spec > finished attempt (succeeded / failed beyond maxRetries) > suspended by the user >
blocked from starting (quota, Kueue missing, namespace limit) > queued in Kueue > running.
Succeeded is never inferred: an attempt that exited 0 is Succeeded only with a Passed gate verdict
and published artifacts (adapter or merged, plus lora-metadata.json) in progress.json; without them
it is Failed with reason NothingPublished (fail closed: a crashed or stubbed evaluator must not pass).
A gate rejection ends with phase Rejected: Succeeded=False and Failed=True (reason GateFailed), so
both `kubectl wait --for=condition=Failed` and kstatus (Stalled=True) see a terminal state, while
the phase and reason still tell it apart from a broken run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..api import FINISHED_STATES, RUNNING_STATES
from . import conditions as c
from .attempts import describe_failure, final_failure_reason, merge_attempts
from .observed import Observed
from .progress import carried_fields
from .workload import kueue_held, record_preemption

# The trainer's running states (api.RUNNING_STATES) are also the Running condition's reasons.
REASON_OF_STATE = dict(zip(RUNNING_STATES, (c.PREPARING, c.TRAINING, c.EVALUATING, c.EXPORTING)))
PHASE_OF_RUNNING = {c.PREPARING: "Training", c.TRAINING: "Training", c.EVALUATING: "Evaluating",
                    c.EXPORTING: "Exporting"}
WAITING_REASONS = {c.QUEUED, c.QUOTA_EXCEEDED, c.MAX_RUNNING_JOBS, c.KUEUE_NOT_INSTALLED}
TERMINAL_PHASES = frozenset({"Succeeded", "Failed", "Rejected"})
OWNED_FIELDS = ("observedGeneration", "phase", "conditions", "progress", "checkpoints", "evaluation",
                "artifacts", "attempts", "jobName", "workers", "skippedLines", "datasetHashes", "startTime",
                "completionTime")


def derive_status(obs: Observed) -> dict[str, Any]:
    prev = dict(obs.previous or {})
    carried = carried_fields(prev, obs.progress)
    attempts = merge_attempts(prev.get("attempts") or (), obs.jobs)
    attempts = record_preemption(attempts, obs.current.attempt if obs.current else None, obs.workload, obs.progress)
    core = _core_conditions(obs, attempts, carried)
    conditions = c.merge_conditions(prev.get("conditions"), _with_kstatus(core),
                                    now=obs.now, generation=obs.generation)
    phase = phase_of(conditions)
    current = obs.current
    status = {
        "observedGeneration": obs.generation,
        "phase": phase,
        "conditions": conditions,
        "attempts": attempts,
        "jobName": current.name if current else prev.get("jobName"),
        "workers": _workers(current) if current else prev.get("workers"),
        "startTime": prev.get("startTime") or _first_start(obs),
        "completionTime": prev.get("completionTime") or (
            ((current and current.completion_time) or obs.now) if phase in TERMINAL_PHASES else None),
        **carried,
    }
    return {k: status.get(k) for k in OWNED_FIELDS}


def _workers(job) -> dict[str, Any]:
    """Ready/total pods of the current attempt (kubectl get -o wide): a multi-node attempt whose
    pods are not all ready is waiting for one (unschedulable, pulling, rendezvous)."""
    ready = 0 if job.outcome else job.ready
    return {"ready": ready, "total": job.parallelism, "summary": f"{ready}/{job.parallelism}"}


def _first_start(obs: Observed) -> str | None:
    starts = [j.start_time for j in obs.jobs if j.start_time]
    return min(starts) if starts else None


def _final_state(obs: Observed, carried: Mapping[str, Any]) -> str:
    """Succeeded or Rejected for an attempt that exited 0: progress.json, else the summary line."""
    for source in (obs.progress, obs.current.summary if obs.current else None):
        state = (source or {}).get("state")
        if state in FINISHED_STATES:
            return state
    verdict = (carried.get("evaluation") or {}).get("verdict")
    return "Rejected" if verdict == "Failed" else "Succeeded"


def _core_conditions(obs: Observed, attempts: list[dict[str, Any]], carried: Mapping[str, Any]) -> list[dict]:
    evaluated = _evaluated(carried)
    if obs.invalid:
        reason, message = obs.invalid
        return _terminal_failure(reason, message, admitted=c.condition(c.ADMITTED, c.FALSE, reason, message))
    current = obs.current
    if current and current.outcome == "Succeeded":
        return _finished(obs, carried, evaluated)
    final = final_failure_reason(attempts, obs.max_retries) if current and current.outcome == "Failed" else None
    if final:
        why = {c.INVALID_INPUT: "not retried: the same input fails again",
               c.DIVERGED: "not retried: the same spec diverges again (try a lower learning rate)"}.get(
            final, f"no retries left (maxRetries={obs.max_retries})")
        message = f"{describe_failure(attempts[-1])}; {why}"
        return _terminal_failure(final, message, admitted=_admitted(obs), evaluated=evaluated)
    return _in_progress(obs, attempts, evaluated)


def _finished(obs: Observed, carried: Mapping[str, Any], evaluated: dict) -> list[dict]:
    done = c.condition(c.RUNNING, c.FALSE, c.COMPLETED, "the trainer finished")
    admitted = _admitted(obs)
    if _final_state(obs, carried) == "Rejected":
        reasons = "; ".join((carried.get("evaluation") or {}).get("reasons") or ()) or "the gate refused the adapter"
        message = f"evaluation gate failed: {reasons}; artifacts were not published"
        return [admitted, c.condition(c.SUSPENDED, c.FALSE, c.NOT_SUSPENDED), done,
                c.condition(c.EVALUATED, c.TRUE, c.GATE_FAILED, message),
                c.condition(c.SUCCEEDED, c.FALSE, c.GATE_FAILED, message),
                c.condition(c.FAILED, c.TRUE, c.GATE_FAILED, message)]
    missing = _unproven(carried, evaluated)
    if missing:
        message = f"the trainer exited 0 but {missing}; a job succeeds only with a verdict and artifacts"
        return _terminal_failure(c.NOTHING_PUBLISHED, message, admitted=admitted, evaluated=evaluated)
    message = "adapter passed the evaluation gate and was published"
    return [admitted, c.condition(c.SUSPENDED, c.FALSE, c.NOT_SUSPENDED), done, evaluated,
            c.condition(c.SUCCEEDED, c.TRUE, c.GATE_PASSED, message),
            c.condition(c.FAILED, c.FALSE, c.COMPLETED)]


def _unproven(carried: Mapping[str, Any], evaluated: dict) -> str | None:
    """What is missing for Succeeded (fail closed): a Passed verdict and the published artifacts."""
    if evaluated["status"] != c.TRUE:
        return "reported no gate verdict"
    artifacts = carried.get("artifacts") or {}
    if not (artifacts.get("metadata") and (artifacts.get("adapter") or artifacts.get("merged"))):
        return "reported no published artifacts (adapter or merged, and lora-metadata.json)"
    return None


def _terminal_failure(reason: str, message: str, *, admitted: dict | None = None,
                      evaluated: dict | None = None) -> list[dict]:
    return [admitted or c.condition(c.ADMITTED, c.TRUE, c.JOB_CREATED),
            c.condition(c.SUSPENDED, c.FALSE, c.NOT_SUSPENDED),
            c.condition(c.RUNNING, c.FALSE, reason, message),
            evaluated or c.condition(c.EVALUATED, c.FALSE, c.PENDING_EVALUATION),
            c.condition(c.SUCCEEDED, c.FALSE, reason, message),
            c.condition(c.FAILED, c.TRUE, reason, message)]


def _in_progress(obs: Observed, attempts: list[dict[str, Any]], evaluated: dict) -> list[dict]:
    admitted, suspended, running = _admission(obs, attempts)
    not_yet = [c.condition(c.SUCCEEDED, c.FALSE, c.IN_PROGRESS), c.condition(c.FAILED, c.FALSE, c.IN_PROGRESS)]
    return [admitted, suspended, running, evaluated, *not_yet]


def _admission(obs: Observed, attempts: list[dict[str, Any]]) -> tuple[dict, dict, dict]:
    current = obs.current
    live = current if current and not current.outcome else None
    not_suspended = c.condition(c.SUSPENDED, c.FALSE, c.NOT_SUSPENDED)
    if obs.suspend:
        msg = "spec.suspend is true; the trainer checkpointed and stopped" if live else "spec.suspend is true"
        if obs.workload and not obs.workload.active:
            msg += f"; Kueue Workload {obs.workload.name} deactivated, its quota released"
        return (c.condition(c.ADMITTED, c.TRUE if live else c.FALSE, c.JOB_CREATED if live else c.NOT_STARTED),
                c.condition(c.SUSPENDED, c.TRUE, c.SUSPENDED_BY_USER, msg),
                c.condition(c.RUNNING, c.FALSE, c.SUSPENDED_BY_USER, msg))
    if live is None:
        waiting = _waiting_running(obs, attempts)
        if obs.blocked:
            return (c.condition(c.ADMITTED, c.FALSE, obs.blocked.reason, obs.blocked.message), not_suspended, waiting)
        return c.condition(c.ADMITTED, c.UNKNOWN, c.NOT_STARTED), not_suspended, waiting
    if live.suspended:
        return kueue_held(obs.queue_name, live.name, obs.workload)
    return _admitted(obs), not_suspended, _running(obs, live)


def _admitted(obs: Observed) -> dict:
    current = obs.current
    message = f"Job {current.name} (attempt {current.attempt})" if current else ""
    return c.condition(c.ADMITTED, c.TRUE, c.KUEUE_ADMITTED if obs.queue_name else c.JOB_CREATED, message)


def _waiting_running(obs: Observed, attempts: list[dict[str, Any]]) -> dict:
    if attempts and attempts[-1].get("outcome") == "Failed":
        return c.condition(c.RUNNING, c.FALSE, c.RETRYING, f"{describe_failure(attempts[-1])}; retrying")
    return c.condition(c.RUNNING, c.FALSE, c.NOT_STARTED, "no trainer Job yet")


def _running(obs: Observed, live) -> dict:
    previous = c.find((obs.previous or {}).get("conditions"), c.RUNNING) or {}
    if live.active == 0 and live.finished_pods and previous.get("status") == c.TRUE:
        return {k: previous[k] for k in ("type", "status", "reason", "message")}  # pods done, Job concluding
    if live.waiting:  # e.g. the storage Secret is missing: the kubelet retries until it exists
        reason, message = live.waiting
        return c.condition(c.RUNNING, c.FALSE, reason, f"{message}; the trainer starts once this is fixed")
    if live.active == 0:
        return c.condition(c.RUNNING, c.FALSE, c.POD_STARTING, f"waiting for the pods of Job {live.name}")
    state = (obs.progress or {}).get("state")
    if state in REASON_OF_STATE and (obs.progress or {}).get("attempt") in (None, live.attempt):
        reason = REASON_OF_STATE[state]
    else:
        reason = previous.get("reason") if previous.get("reason") in PHASE_OF_RUNNING else c.PREPARING
    message = f"attempt {live.attempt}: {reason.lower()}"
    if live.parallelism > 1 and live.ready < live.parallelism:
        message += f"; {live.ready}/{live.parallelism} pods ready"
    return c.condition(c.RUNNING, c.TRUE, reason, message)


def _evaluated(carried: Mapping[str, Any]) -> dict:
    evaluation = carried.get("evaluation") or {}
    verdict = evaluation.get("verdict")
    if verdict == "Passed":
        return c.condition(c.EVALUATED, c.TRUE, c.GATE_PASSED, "the adapter passed the evaluation gate")
    if verdict == "Failed":
        return c.condition(c.EVALUATED, c.TRUE, c.GATE_FAILED, "; ".join(evaluation.get("reasons") or ()))
    return c.condition(c.EVALUATED, c.FALSE, c.PENDING_EVALUATION)


def _with_kstatus(core: list[dict]) -> list[dict]:
    succeeded = c.is_true(core, c.SUCCEEDED)
    failed = c.find(core, c.FAILED)
    terminal = succeeded or (failed and failed["status"] == c.TRUE)
    phase = phase_of(core)
    ready = (c.condition(c.READY, c.TRUE, c.SUCCEEDED, "training succeeded") if succeeded
             else c.condition(c.READY, c.FALSE, phase, ""))
    reconciling = (c.condition(c.RECONCILING, c.FALSE, phase) if terminal
                   else c.condition(c.RECONCILING, c.TRUE, phase, f"phase {phase}"))
    stalled = (c.condition(c.STALLED, c.TRUE, failed["reason"], failed["message"])
               if failed and failed["status"] == c.TRUE else c.condition(c.STALLED, c.FALSE, phase))
    return [*core, ready, reconciling, stalled]


def phase_of(conditions) -> str:
    """The phase shown by `kubectl get`, computed from the conditions only."""
    failed = c.find(conditions, c.FAILED)
    if failed and failed["status"] == c.TRUE:
        return "Rejected" if failed["reason"] == c.GATE_FAILED else "Failed"
    if c.is_true(conditions, c.SUCCEEDED):
        return "Succeeded"
    suspended = c.find(conditions, c.SUSPENDED) or {}
    if suspended.get("status") == c.TRUE and suspended.get("reason") in (c.SUSPENDED_BY_USER, c.PREEMPTED):
        return "Suspended"
    running = c.find(conditions, c.RUNNING) or {}
    if running.get("status") == c.TRUE:
        return PHASE_OF_RUNNING.get(running.get("reason"), "Training")
    admitted = c.find(conditions, c.ADMITTED) or {}
    if admitted.get("status") == c.FALSE and admitted.get("reason") in WAITING_REASONS:
        return "Queued"
    return "Pending"


def is_terminal(status: Mapping[str, Any]) -> bool:
    return status.get("phase") in TERMINAL_PHASES

"""Table-driven tests of derive_status: one observation in, phase + conditions out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from lora_operator.status import Blocked, Failure, JobView, Observed, derive_status
from lora_operator.status import conditions as c

NOW = "2025-01-01T00:10:00Z"


def job(attempt=1, **kw) -> JobView:
    base = {"name": f"demo-a{attempt}", "attempt": attempt, "created_at": "2025-01-01T00:00:00Z",
            "start_time": "2025-01-01T00:00:01Z", "active": 1}
    base.update(kw)
    return JobView(**base)


def failed(attempt=1, reason="OOMKilled", code=137, message=None) -> JobView:
    return job(attempt, active=0, outcome="Failed", completion_time="2025-01-01T00:05:00Z",
               failure=Failure(reason, code, message))


def succeeded(attempt=1, summary=None) -> JobView:
    return job(attempt, active=0, outcome="Succeeded", completion_time="2025-01-01T00:09:00Z", summary=summary)


PASSED_EVAL = {"verdict": "Passed", "reasons": [], "results": [
    {"name": "evalLoss", "base": 2.0, "adapter": 1.2, "threshold": "<= 1.5", "passed": True}]}
FAILED_EVAL = {"verdict": "Failed", "reasons": ["evalLoss 1.9 > 1.5"], "results": [
    {"name": "evalLoss", "base": 2.0, "adapter": 1.9, "threshold": "<= 1.5", "passed": False}]}


def progress(state="Training", **kw) -> dict[str, Any]:
    return {"state": state, "step": 12, "totalSteps": 300, "loss": 1.5, "evalLoss": 1.7,
            "tokensPerSecond": 1000.0, "etaSeconds": 600, "lastCheckpoint": "s3://a/checkpoints/step-10",
            "updatedAt": "2025-01-01T00:09:59Z", **kw}


@dataclass
class Case:
    name: str
    observed: Observed
    phase: str
    conds: dict[str, tuple[str, str]]  # type -> (status, reason); only the ones that matter
    check: Any | None = field(default=None)


def obs(**kw) -> Observed:
    kw.setdefault("generation", 1)
    kw.setdefault("now", NOW)
    return Observed(**kw)


CASES = [
    Case("should fail with InvalidSpec and name the field when the spec does not parse",
         obs(invalid=(c.INVALID_SPEC, "spec.training.epochs: set epochs or maxSteps above 0")),
         "Failed", {c.FAILED: ("True", c.INVALID_SPEC), c.STALLED: ("True", c.INVALID_SPEC),
                    c.READY: ("False", "Failed"), c.RECONCILING: ("False", "Failed")},
         lambda s: "spec.training.epochs" in s["conditions"][-4]["message"]),
    Case("should fail with PolicyViolation when the policy refuses the spec",
         obs(invalid=(c.POLICY_VIOLATION, "spec.image: x is not an allowed trainer image")),
         "Failed", {c.FAILED: ("True", c.POLICY_VIOLATION), c.ADMITTED: ("False", c.POLICY_VIOLATION)}),
    Case("should be queued with QuotaExceeded when the quota cannot fit the GPUs",
         obs(blocked=Blocked(c.QUOTA_EXCEEDED, "ResourceQuota gpu: 0 of 1 free")),
         "Queued", {c.ADMITTED: ("False", c.QUOTA_EXCEEDED), c.RECONCILING: ("True", "Queued"),
                    c.STALLED: ("False", "Queued")}),
    Case("should say Kueue is not installed instead of waiting silently",
         obs(queue_name="q", blocked=Blocked(c.KUEUE_NOT_INSTALLED, "no kueue")),
         "Queued", {c.ADMITTED: ("False", c.KUEUE_NOT_INSTALLED)}),
    Case("should be queued while Kueue keeps the Job suspended",
         obs(queue_name="q", jobs=(job(suspended=True, active=0),)),
         "Queued", {c.ADMITTED: ("False", c.QUEUED), c.SUSPENDED: ("True", c.QUEUED)}),
    Case("should be admitted by Kueue once the Job is unsuspended",
         obs(queue_name="q", jobs=(job(),), progress=progress()),
         "Training", {c.ADMITTED: ("True", c.KUEUE_ADMITTED), c.RUNNING: ("True", c.TRAINING)}),
    Case("should be pending while the Job's pod has not started",
         obs(jobs=(job(active=0, start_time=None),)),
         "Pending", {c.ADMITTED: ("True", c.JOB_CREATED), c.RUNNING: ("False", c.POD_STARTING)}),
    Case("should be training with progress from progress.json",
         obs(jobs=(job(),), progress=progress()),
         "Training", {c.RUNNING: ("True", c.TRAINING), c.SUCCEEDED: ("False", c.IN_PROGRESS),
                      c.RECONCILING: ("True", "Training")},
         lambda s: s["progress"]["summary"] == "12/300" and s["progress"]["percent"] == 4
         and s["progress"]["etaSeconds"] == 600 and s["checkpoints"]["latest"].endswith("step-10")),
    Case("should be evaluating when the trainer says so",
         obs(jobs=(job(),), progress=progress("Evaluating")),
         "Evaluating", {c.RUNNING: ("True", c.EVALUATING)}),
    Case("should be exporting after a passed gate",
         obs(jobs=(job(),), progress=progress("Exporting", eval=PASSED_EVAL)),
         "Exporting", {c.RUNNING: ("True", c.EXPORTING), c.EVALUATED: ("True", c.GATE_PASSED)}),
    Case("should keep the previous progress when progress.json was not read this pass",
         obs(jobs=(job(),), previous={"progress": {"step": 5, "totalSteps": 10, "summary": "5/10"},
                                      "conditions": [c.condition(c.RUNNING, "True", c.EVALUATING)]}),
         "Evaluating", {c.RUNNING: ("True", c.EVALUATING)}, lambda s: s["progress"]["summary"] == "5/10"),
    Case("should succeed with evaluation and artifacts when the trainer finished and the gate passed",
         obs(jobs=(succeeded(),), progress=progress("Succeeded", eval=PASSED_EVAL,
                                                     artifacts={"adapter": "s3://a/adapter", "extra": "x",
                                                                "metadata": "s3://a/lora-metadata.json"})),
         "Succeeded", {c.SUCCEEDED: ("True", c.GATE_PASSED), c.READY: ("True", c.SUCCEEDED),
                       c.RECONCILING: ("False", "Succeeded"), c.STALLED: ("False", "Succeeded"),
                       c.FAILED: ("False", c.COMPLETED), c.EVALUATED: ("True", c.GATE_PASSED)},
         lambda s: s["artifacts"] == {"adapter": "s3://a/adapter", "metadata": "s3://a/lora-metadata.json"}
         and s["completionTime"] == "2025-01-01T00:09:00Z"
         and s["evaluation"]["results"][0]["adapter"] == 1.2 and s["attempts"][0]["exitCode"] == 0),
    Case("should end Rejected, Failed=True and Stalled when the gate refused the adapter",
         obs(jobs=(succeeded(),), progress=progress("Rejected", eval=FAILED_EVAL)),
         "Rejected", {c.SUCCEEDED: ("False", c.GATE_FAILED), c.FAILED: ("True", c.GATE_FAILED),
                      c.STALLED: ("True", c.GATE_FAILED), c.READY: ("False", "Rejected")},
         lambda s: "evalLoss 1.9 > 1.5" in s["conditions"][5]["message"]),
    Case("should fail with NothingPublished, not succeed, when the trainer exited 0 without a gate verdict",
         obs(jobs=(succeeded(),), progress=progress("Succeeded", artifacts={"adapter": "s3://a/adapter",
                                                                          "metadata": "s3://a/m.json"})),
         "Failed", {c.SUCCEEDED: ("False", c.NOTHING_PUBLISHED), c.FAILED: ("True", c.NOTHING_PUBLISHED),
                    c.EVALUATED: ("False", c.PENDING_EVALUATION), c.READY: ("False", "Failed"),
                    c.STALLED: ("True", c.NOTHING_PUBLISHED)},
         lambda s: "no gate verdict" in s["conditions"][5]["message"]),
    Case("should fail with NothingPublished when the gate passed but no artifacts were reported",
         obs(jobs=(succeeded(),), progress=progress("Succeeded", eval=PASSED_EVAL)),
         "Failed", {c.FAILED: ("True", c.NOTHING_PUBLISHED), c.EVALUATED: ("True", c.GATE_PASSED)},
         lambda s: "no published artifacts" in s["conditions"][5]["message"]),
    Case("should fail when only the termination summary claims success",
         obs(jobs=(succeeded(summary={"state": "Succeeded"}),)),
         "Failed", {c.FAILED: ("True", c.NOTHING_PUBLISHED)}),
    Case("should use the termination summary when progress.json cannot be read",
         obs(jobs=(succeeded(summary={"state": "Rejected"}),)),
         "Rejected", {c.FAILED: ("True", c.GATE_FAILED)}),
    Case("should show Retrying while a failed attempt waits to be replaced",
         obs(jobs=(failed(),), blocked=Blocked(c.QUOTA_EXCEEDED, "no room")),
         "Queued", {c.RUNNING: ("False", c.RETRYING), c.ADMITTED: ("False", c.QUOTA_EXCEEDED)},
         lambda s: s["attempts"][0]["reason"] == "OOMKilled" and s["attempts"][0]["exitCode"] == 137),
    Case("should record every attempt and keep training after a retry",
         obs(jobs=(failed(1, "Evicted", None, "node pressure"), job(2)), progress=progress(attempt=2)),
         "Training", {c.RUNNING: ("True", c.TRAINING)},
         lambda s: [a["index"] for a in s["attempts"]] == [1, 2] and s["attempts"][0]["message"] == "node pressure"
         and s["jobName"] == "demo-a2"),
    Case("should fail with BackoffLimitExceeded after maxRetries failed attempts",
         obs(max_retries=1, jobs=(failed(1), failed(2, "Error", 1, "boom"))),
         "Failed", {c.FAILED: ("True", c.BACKOFF_LIMIT_EXCEEDED), c.STALLED: ("True", c.BACKOFF_LIMIT_EXCEEDED)},
         lambda s: "exit code 1: boom" in s["conditions"][5]["message"]),
    Case("should fail at once with InvalidInput when the trainer refused its input",
         obs(max_retries=3, jobs=(failed(1, c.INVALID_INPUT, 2, "s3://data/train.jsonl:7: empty assistant turn"),)),
         "Failed", {c.FAILED: ("True", c.INVALID_INPUT), c.STALLED: ("True", c.INVALID_INPUT)},
         lambda s: "train.jsonl:7" in s["conditions"][5]["message"] and len(s["attempts"]) == 1),
    Case("should keep a failure reason recorded earlier after the pod is gone",
         obs(jobs=(job(1, active=0, outcome="Failed"), job(2)),
             previous={"attempts": [{"index": 1, "jobName": "demo-a1", "outcome": "Failed", "reason": "OOMKilled"}]}),
         "Training", {c.RUNNING: ("True", c.PREPARING)},
         lambda s: s["attempts"][0]["reason"] == "OOMKilled"),
    Case("should stay Running while a finished pod waits for its Job to conclude",
         obs(jobs=(job(active=0, finished_pods=1),),
             previous={"conditions": [c.condition(c.RUNNING, "True", c.EXPORTING, "attempt 1: exporting")]}),
         "Exporting", {c.RUNNING: ("True", c.EXPORTING)}),
    Case("should be Suspended by the user, the trainer having checkpointed",
         obs(suspend=True, jobs=(job(suspended=True, active=0),)),
         "Suspended", {c.SUSPENDED: ("True", c.SUSPENDED_BY_USER), c.RUNNING: ("False", c.SUSPENDED_BY_USER),
                       c.RECONCILING: ("True", "Suspended")}),
    Case("should not treat a stale progress.json of an earlier attempt as the current state",
         obs(jobs=(failed(1), job(2)), progress=progress("Preempted", attempt=1)),
         "Training", {c.RUNNING: ("True", c.PREPARING)}),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_derive_status(case: Case):
    status = derive_status(case.observed)
    assert status["phase"] == case.phase
    got = {cond["type"]: (cond["status"], cond["reason"]) for cond in status["conditions"]}
    for type_, expected in case.conds.items():
        assert got[type_] == expected, type_
    assert set(got) == set(c.TYPES), "every condition type should always be present"
    assert all(cond["observedGeneration"] == 1 for cond in status["conditions"])
    if case.check:
        assert case.check(status)


def test_should_keep_last_transition_time_unless_the_status_flips():
    first = derive_status(obs(jobs=(job(),), progress=progress(), now="2025-01-01T00:00:00Z"))
    later = derive_status(obs(jobs=(job(),), progress=progress("Evaluating"), previous=first,
                              now="2025-01-01T01:00:00Z"))
    running = {cond["type"]: cond for cond in later["conditions"]}[c.RUNNING]
    assert running["reason"] == c.EVALUATING
    assert running["lastTransitionTime"] == "2025-01-01T00:00:00Z"
    done = derive_status(obs(jobs=(succeeded(),), progress=progress("Succeeded"), previous=later,
                             now="2025-01-01T02:00:00Z"))
    running = {cond["type"]: cond for cond in done["conditions"]}[c.RUNNING]
    assert running["lastTransitionTime"] == "2025-01-01T02:00:00Z"


def test_should_derive_the_same_status_twice_so_nothing_is_patched():
    first = derive_status(obs(jobs=(job(),), progress=progress()))
    again = derive_status(obs(jobs=(job(),), progress=progress(), previous=first, now="2030-01-01T00:00:00Z"))
    assert again == first


def test_should_never_carry_unknown_progress_keys_into_status():
    status = derive_status(obs(jobs=(job(),), progress=progress(secretKey="x", peakMemoryBytes=1)))
    assert "secretKey" not in str(status) and "peakMemoryBytes" not in str(status)


def test_should_show_ready_over_total_pods_of_the_current_attempt_and_wait_for_the_missing_one():
    status = derive_status(Observed(1, NOW, jobs=(job(active=1, ready=1, parallelism=2),),
                                    progress=progress(state="Preparing", attempt=1)))
    assert status["workers"] == {"ready": 1, "total": 2, "summary": "1/2"}
    running = next(x for x in status["conditions"] if x["type"] == c.RUNNING)
    assert running["message"].endswith("1/2 pods ready")


def test_should_name_the_failed_rank_in_an_event_once():
    from lora_operator.status import attempt_events

    first = Observed(1, NOW, jobs=(job(active=2, ready=2, parallelism=2),), progress=progress())
    before = derive_status(first)
    lost = job(active=0, outcome="Failed", parallelism=2, completion_time="2025-01-01T00:05:00Z",
               failure=Failure("Error", 137, None, node_rank=1, pod="demo-a1-1-x"))
    after = derive_status(Observed(1, NOW, previous=before, jobs=(lost,), max_retries=2))
    assert after["attempts"][0]["failedRank"] == 1 and after["workers"]["summary"] == "0/2"
    events = attempt_events(before["attempts"], after["attempts"])
    assert [(e.type, e.reason) for e in events] == [("Warning", "AttemptFailed")]
    assert "node rank 1 (pod demo-a1-1-x) first, Error, exit code 137" in events[0].message
    assert attempt_events(after["attempts"], after["attempts"]) == [], "once, not on every pass"

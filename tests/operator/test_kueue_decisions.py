"""Kueue's Workload in the operator's pure logic: what a user sees while Kueue holds, preempts or
releases a job, and when the operator (de)activates the Workload. The real Kueue runs in
tests/operator/test_kueue_cluster.py."""

from __future__ import annotations

import pytest

from lora_operator.status import JobView, Observed, derive_status, plan, workload_view
from lora_operator.status import conditions as c
from lora_operator.status.workload import WorkloadView, record_preemption, workload_active_change

NOW = "2025-01-01T00:10:00Z"
INSUFFICIENT = ("couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu in "
                "flavor gpu-flavor, 1 more needed")
PREEMPTED_MSG = "Preempted to accommodate a workload (UID: 123, JobUID: 456) due to prioritization in the ClusterQueue"


def cond(type_, status, reason, message="", at="2025-01-01T00:05:00Z"):
    return {"type": type_, "status": status, "reason": reason, "message": message, "lastTransitionTime": at}


def wl(*conds, active=True, annotations=None):
    return {"metadata": {"name": "job-demo-a1-abcde", "annotations": annotations or {}},
            "spec": {"active": active, "queueName": "gpu"}, "status": {"conditions": list(conds)}}


PENDING = wl(cond("QuotaReserved", "False", "Pending", INSUFFICIENT))
ADMITTED = wl(cond("QuotaReserved", "True", "QuotaReserved"), cond("Admitted", "True", "Admitted"))
PREEMPTED = wl(cond("QuotaReserved", "False", "Pending", PREEMPTED_MSG), cond("Evicted", "True", "Preempted", PREEMPTED_MSG),
               cond("Preempted", "True", "InClusterQueue", PREEMPTED_MSG), cond("Requeued", "True", "Preempted"))


def job(**kw) -> JobView:
    return JobView(**{"name": "demo-a1", "attempt": 1, "created_at": "2025-01-01T00:00:00Z", **kw})


def derive(workload, suspended=True, active=0, **kw):
    view = workload_view(workload) if workload else None
    observed = Observed(generation=1, now=NOW, queue_name="gpu", jobs=(job(suspended=suspended, active=active),),
                        workload=view, **kw)
    return derive_status(observed)


def conds_of(status):
    return {x["type"]: (x["status"], x["reason"], x["message"]) for x in status["conditions"]}


def test_should_show_queued_with_kueues_own_reason_while_quota_is_short():
    status = derive(PENDING)
    assert status["phase"] == "Queued"
    assert conds_of(status)["Admitted"] == ("False", c.QUEUED, f"Kueue: {INSUFFICIENT}")


def test_should_show_queued_before_kueue_created_the_workload():
    status = derive(None)
    assert status["phase"] == "Queued" and "waiting for Kueue to create the Workload" in conds_of(status)["Admitted"][2]


def test_should_show_suspended_preempted_with_kueues_reason_and_count_no_failure():
    status = derive(PREEMPTED, progress={"state": "Preempted", "step": 7, "attempt": 1,
                                         "lastCheckpoint": "s3://b/demo/checkpoints/step-7"})
    assert status["phase"] == "Suspended"
    suspended = conds_of(status)["Suspended"]
    assert suspended[:2] == ("True", c.PREEMPTED) and PREEMPTED_MSG in suspended[2] and "InClusterQueue" in suspended[2]
    assert conds_of(status)["Failed"][0] == "False"
    [attempt] = status["attempts"]
    assert "outcome" not in attempt and attempt["preemptions"] == 1
    assert (attempt["preemptedAtStep"], attempt["resumeFromStep"], attempt["stepsRedone"]) == (7, 7, 0)


def test_should_run_again_once_re_admitted():
    status = derive(ADMITTED, suspended=False, active=1)
    assert status["phase"] == "Training"
    assert conds_of(status)["Admitted"][:2] == ("True", c.KUEUE_ADMITTED)


def test_should_count_each_preemption_once_and_the_steps_since_the_last_checkpoint():
    view = workload_view(PREEMPTED)
    attempts = [{"index": 1, "jobName": "demo-a1"}]
    # SIGTERM seen late: the last progress still says step 9 with the periodic checkpoint at 5 ...
    attempts = record_preemption(attempts, 1, view, {"step": 9, "attempt": 1, "lastCheckpoint": "s3://b/c/step-5"})
    assert (attempts[0]["preemptions"], attempts[0]["stepsRedone"]) == (1, 4)
    # ... then the trainer's own checkpoint at step 9 lands: nothing is redone; a pass without progress keeps it
    attempts = record_preemption(attempts, 1, view, {"step": 9, "attempt": 1, "lastCheckpoint": "s3://b/c/step-9/"})
    attempts = record_preemption(attempts, 1, view, None)
    assert (attempts[0]["preemptions"], attempts[0]["stepsRedone"]) == (1, 0)
    # a second preemption (a new Evicted time) adds up; progress of another attempt is ignored
    again = WorkloadView(**{**view.__dict__, "evicted_at": "2025-01-01T00:30:00Z"})
    attempts = record_preemption(attempts, 1, again, {"step": 20, "attempt": 1, "lastCheckpoint": "s3://b/c/step-18"})
    attempts = record_preemption(attempts, 1, again, {"step": 50, "attempt": 2, "lastCheckpoint": "s3://b/c/step-1"})
    assert (attempts[0]["preemptions"], attempts[0]["stepsRedone"], attempts[0]["preemptedAtStep"]) == (2, 2, 20)


def test_should_not_touch_attempts_when_the_workload_was_not_preempted():
    attempts = [{"index": 1, "jobName": "demo-a1"}]
    for workload in (PENDING, ADMITTED, wl(cond("Evicted", "True", "Deactivated", "deactivated"))):
        assert record_preemption(attempts, 1, workload_view(workload), {"step": 3, "lastCheckpoint": "x/step-1"}) == attempts


@pytest.mark.parametrize("name, workload, suspend, expected", [
    ("should deactivate an active Workload when the user suspends", ADMITTED, True, False),
    ("should reactivate on resume a Workload the operator deactivated",
     wl(active=False, annotations={"training.lora.dev/deactivated-by": "lora-operator"}), False, True),
    ("should leave alone a Workload that Kueue itself deactivated", wl(active=False), False, None),
    ("should leave an already inactive Workload inactive while suspended", wl(active=False), True, None),
    ("should leave a finished Workload alone", wl(cond("Finished", "True", "JobFinished")), True, None),
])
def test_workload_active(name, workload, suspend, expected):
    assert workload_active_change(workload_view(workload), suspend) is expected


def test_should_deactivate_the_workload_instead_of_suspending_a_kueue_managed_job():
    running = job(suspended=False, active=1)
    decision = plan([running], (), suspend=True, max_retries=3, kueue_managed=True, workload=workload_view(ADMITTED))
    assert decision.workload_active is False and decision.suspend_job is None
    # no Workload yet: the Job itself is suspended
    assert plan([running], (), suspend=True, max_retries=3, kueue_managed=True).suspend_job is True


def test_should_say_the_quota_is_released_while_suspended_by_the_user():
    status = derive(wl(cond("Evicted", "True", "Deactivated", "The workload is deactivated"), active=False), suspend=True)
    assert status["phase"] == "Suspended" and conds_of(status)["Suspended"][1] == c.SUSPENDED_BY_USER

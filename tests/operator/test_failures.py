"""Reading child Jobs and Pods: outcome and the failure reason recorded in status.attempts."""

import pytest

from lora_operator.status import job_view


def pod(phase="Failed", reason=None, terminated=None, conditions=(), status_reason=None, message=None):
    status = {"phase": phase, "conditions": list(conditions)}
    if status_reason:
        status.update(reason=status_reason, message=message)
    if terminated is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    return {"metadata": {"name": "demo-a1-xyz"}, "status": status}


def failed_job(reason="BackoffLimitExceeded", message="Job has reached the specified backoff limit"):
    return {"metadata": {"name": "demo-a1", "labels": {"training.lora.dev/attempt": "1"}},
            "spec": {}, "status": {"failed": 1, "conditions": [
                {"type": "Failed", "status": "True", "reason": reason, "message": message,
                 "lastTransitionTime": "2025-01-01T00:05:00Z"}]}}


CASES = [
    ("should report OOMKilled from the container state",
     [pod(terminated={"exitCode": 137, "reason": "OOMKilled"})], failed_job(), ("OOMKilled", 137, None)),
    ("should report Evicted with the kubelet's message",
     [pod(status_reason="Evicted", message="The node was low on memory.")], failed_job(),
     ("Evicted", None, "The node was low on memory.")),
    ("should report a preemption from the DisruptionTarget condition",
     [pod(terminated={"exitCode": 143, "reason": "Error"},
          conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}])],
     failed_job(), ("PreemptionByScheduler", 143, None)),
    ("should call exit 143 without a disruption a preemption",
     [pod(terminated={"exitCode": 143, "reason": "Error", "message": '{"state": "Preempted"}'})], failed_job(),
     ("Preempted", 143, '{"state": "Preempted"}')),
    ("should keep the exit code and termination message of a crash",
     [pod(terminated={"exitCode": 3, "reason": "Error", "message": '{"state": "Failed", "error": "bad line 7"}'})],
     failed_job(), ("Error", 3, '{"state": "Failed", "error": "bad line 7"}')),
    ("should report DeadlineExceeded from the Job when no pod is left",
     [], failed_job("DeadlineExceeded", "Job was active longer than specified deadline"),
     ("DeadlineExceeded", None, "Job was active longer than specified deadline")),
    ("should report PodLost when the pod vanished",
     [], failed_job(), ("PodLost", None, "Job has reached the specified backoff limit")),
]


@pytest.mark.parametrize("name,pods,job,expected", CASES, ids=[c[0] for c in CASES])
def test_failure_reason(name, pods, job, expected):
    view = job_view(job, pods)
    assert view.outcome == "Failed" and view.attempt == 1
    assert (view.failure.reason, view.failure.exit_code, view.failure.message) == expected
    assert view.completion_time == "2025-01-01T00:05:00Z"


def test_should_not_look_for_a_failure_when_the_pods_were_not_read():
    assert job_view(failed_job()).failure is None


def test_should_parse_the_trainers_summary_line_from_a_succeeded_pod():
    job = {"metadata": {"name": "demo-a1", "labels": {"training.lora.dev/attempt": "1"}}, "spec": {},
           "status": {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}
    view = job_view(job, [pod("Succeeded", terminated={"exitCode": 0, "message": 'log\n{"state": "Rejected"}'})])
    assert view.outcome == "Succeeded" and view.summary == {"state": "Rejected"}


def test_should_keep_event_names_within_253_characters_for_long_job_names():
    from lora_operator.clients.kube import event_name

    for owner in ("a" * 253, "b" * 239 + "-" + "c" * 13, "demo"):
        name = event_name(owner)
        assert len(name) <= 253 and not name.split(".")[0].endswith(("-", ".")), name
    assert event_name("demo").startswith("demo.")
def _rank_pod(index: int, code: int, finished: str, message: str = "") -> dict:
    return {"metadata": {"name": f"demo-a1-{index}-x", "annotations": {"batch.kubernetes.io/job-completion-index": str(index)}},
            "status": {"phase": "Failed", "containerStatuses": [{"name": "trainer", "state": {"terminated": {
                "exitCode": code, "reason": "Error", "finishedAt": finished, "message": message}}}]}}


def _indexed(job: dict) -> dict:
    return {**job, "spec": {"completionMode": "Indexed", "parallelism": 2, "completions": 2}}


@pytest.mark.parametrize("rank0_finished", ["2025-01-01T00:04:10Z", "2025-01-01T00:04:11Z"],
                         ids=["in the same second", "a second later"])
def test_should_name_the_rank_that_was_killed_not_the_peer_that_lost_it(rank0_finished):
    pods = [_rank_pod(0, 1, rank0_finished, "Connection closed by peer"),
            _rank_pod(1, 137, "2025-01-01T00:04:10Z")]
    view = job_view(_indexed(failed_job()), pods)
    assert (view.failure.node_rank, view.failure.pod, view.failure.exit_code) == (1, "demo-a1-1-x", 137)
    assert view.parallelism == 2


def test_should_name_the_rank_that_failed_first():
    pods = [_rank_pod(0, 1, "2025-01-01T00:04:10Z", "DataError"), _rank_pod(1, 143, "2025-01-01T00:04:12Z")]
    view = job_view(_indexed(failed_job()), pods)
    assert (view.failure.node_rank, view.failure.exit_code) == (0, 1)


def test_should_not_name_a_rank_for_a_single_pod_job():
    view = job_view(failed_job(), [_rank_pod(0, 1, "2025-01-01T00:04:10Z")])
    assert view.failure.node_rank is None and view.failure.pod is None


def test_should_keep_pods_per_attempt_and_ranks_through_the_job_informers_slim_copy():
    from lora_operator.clients.informer import slim

    job = _indexed(failed_job())
    view = job_view(slim(job), [_rank_pod(1, 137, "2025-01-01T00:04:10Z")])
    assert view.parallelism == 2 and view.failure.node_rank == 1

"""Pure decisions: policy, GPU quota, namespace limit, Kueue presence, the plan, events, config."""

from __future__ import annotations

import pytest

from lora_operator.config import OperatorConfig, Policy
from lora_operator.status import (
    JobView,
    attempt_started,
    check_kueue,
    check_policy,
    check_quota,
    check_running_limit,
    plan,
    running_elsewhere,
    transition_events,
)
from lora_operator.status import conditions as c

PLATFORM_S3 = "http://s3.platform:8333"
OTHER_S3 = "https://s3.other.example"
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def config(**policy) -> OperatorConfig:
    return OperatorConfig(s3_endpoint=PLATFORM_S3, policy=Policy(**policy))


POLICY_CASES = [
    ("should refuse a base model outside the allowed prefixes", {"allowed_base_model_prefixes": ("s3://approved/",)},
     {}, "spec.baseModel.uri"),
    ("should accept a base model under an allowed prefix", {"allowed_base_model_prefixes": ("s3://models/",)},
     {}, None),
    ("should refuse more GPUs than the per-job maximum", {"max_gpus_per_job": 4},
     {"resources.gpus": 4, "resources.nodes": 2}, "spec.resources.gpus"),
    ("should refuse an image that is not allowed", {"allowed_images": ("ghcr.io/ok/trainer:",)},
     {"image": "docker.io/evil:latest"}, "spec.image"),
    ("should accept an image matching an allowed prefix", {"allowed_images": ("ghcr.io/ok/trainer:",)},
     {"image": "ghcr.io/ok/trainer:1.2"}, None),
    ("should check the default image when spec.image is empty", {"allowed_images": ("ghcr.io/ok/trainer:1",)},
     {}, "spec.image"),
    ("should refuse a storage endpoint that is not the platform's", {},
     {"storage.endpoint": "http://127.0.0.1:9999"}, "spec.storage.endpoint"),
    ("should accept the platform's endpoint spelled differently", {},
     {"storage.endpoint": "http://S3.Platform:8333/"}, None),
    ("should accept an endpoint on the allowlist", {"allowed_endpoints": (OTHER_S3,)},
     {"storage.endpoint": OTHER_S3}, None),
    ("should refuse an allowed s3:// base-model prefix served from another endpoint",
     {"allowed_base_model_prefixes": ("s3://models/",), "allowed_endpoints": (OTHER_S3,)},
     {"storage.endpoint": OTHER_S3}, "spec.baseModel.uri"),
    ("should accept a base-model prefix qualified with its endpoint",
     {"allowed_base_model_prefixes": (f"{OTHER_S3}/models/",), "allowed_endpoints": (OTHER_S3,)},
     {"storage.endpoint": OTHER_S3}, None),
    ("should refuse a dataset outside the allowed prefixes", {"allowed_dataset_prefixes": ("s3://datasets/team-a/",)},
     {}, "spec.dataset.train"),
    ("should check the held-out dataset too", {"allowed_dataset_prefixes": ("s3://datasets/support/",)},
     {"dataset.eval": "s3://datasets/team-b/eval.jsonl"}, "spec.dataset.eval"),
    ("should refuse any toleration when none is allowed", {},
     {"resources.tolerations": [GPU_TAINT]}, "spec.resources.tolerations[0]"),
    ("should accept an allowed toleration", {"allowed_tolerations": (GPU_TAINT,)},
     {"resources.tolerations": [GPU_TAINT]}, None),
    ("should accept a narrower toleration than the allowed Exists", {"allowed_tolerations": (GPU_TAINT,)},
     {"resources.tolerations": [{"key": "nvidia.com/gpu", "value": "a100", "effect": "NoSchedule"}]}, None),
    ("should refuse a tolerate-everything Exists", {"allowed_tolerations": (GPU_TAINT,)},
     {"resources.tolerations": [{"operator": "Exists"}]}, "spec.resources.tolerations[0]"),
    ("should refuse a toleration of every effect when one effect is allowed", {"allowed_tolerations": (GPU_TAINT,)},
     {"resources.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]}, "spec.resources.tolerations[0]"),
    ("should refuse a priority class that is not allowed", {"allowed_priority_classes": ("team-batch",)},
     {"resources.priorityClassName": "system-node-critical"}, "spec.resources.priorityClassName"),
    ("should accept an allowed priority class", {"allowed_priority_classes": ("team-batch",)},
     {"resources.priorityClassName": "team-batch"}, None),
    ("should refuse a nodeSelector key that is not allowed", {"allowed_node_selector_keys": ("gpu.product",)},
     {"resources.nodeSelector": {"kubernetes.io/hostname": "control-plane"}}, "spec.resources.nodeSelector"),
    ("should accept allowed nodeSelector keys", {"allowed_node_selector_keys": ("gpu.product",)},
     {"resources.nodeSelector": {"gpu.product": "H100"}}, None),
    ("should refuse a file:// output, which would vanish with the pod", {},
     {"output.uri": "file:///tmp/out"}, "spec.output.uri"),
    ("should refuse a file:// dataset and name the field", {}, {"dataset.train": "file:///data/t.jsonl"},
     "spec.dataset.train"),
]


@pytest.mark.parametrize("name,policy,overrides,field", POLICY_CASES, ids=[c[0] for c in POLICY_CASES])
def test_policy(name, policy, overrides, field, make_spec):
    verdict = check_policy(make_spec(**overrides), config(**policy))
    if field is None:
        assert verdict is None
    else:
        assert verdict[0] == c.POLICY_VIOLATION and verdict[1].startswith(field)


def quota(hard, used=None, key="requests.nvidia.com/gpu"):
    return {"metadata": {"name": "gpu"}, "status": {"hard": {key: hard}, "used": {key: used or "0"}}}


QUOTA_CASES = [
    ("should wait when the quota has no room for the GPUs", [quota("2", "2")], {"resources.gpus": 1}, True),
    ("should start when the quota has room", [quota("4", "2")], {"resources.gpus": 2}, False),
    ("should count gpus x nodes", [quota("4", "0")], {"resources.gpus": 4, "resources.nodes": 2}, True),
    ("should ignore quotas on other resources", [quota("0", key="requests.cpu")], {"resources.gpus": 1}, False),
    ("should ignore the quota for CPU-only jobs", [quota("0")], {"resources.gpus": 0}, False),
    ("should use the spec's gpuResourceName", [quota("0", key="requests.amd.com/gpu")],
     {"resources.gpuResourceName": "amd.com/gpu"}, True),
    ("should start when there is no quota at all", [], {"resources.gpus": 8}, False),
]


@pytest.mark.parametrize("name,quotas,overrides,blocked", QUOTA_CASES, ids=[c[0] for c in QUOTA_CASES])
def test_quota(name, quotas, overrides, blocked, make_spec):
    verdict = check_quota(quotas, make_spec(**overrides))
    assert (verdict is not None) == blocked
    if blocked:
        assert verdict.reason == c.QUOTA_EXCEEDED and "ResourceQuota gpu" in verdict.message


def test_should_wait_when_the_namespace_runs_its_maximum_of_jobs():
    jobs = [{"metadata": {"labels": {"j": name}}, "spec": {}, "status": {}} for name in ("a", "b", "mine")]
    jobs.append({"metadata": {"labels": {"j": "done"}}, "spec": {}, "status": {
        "conditions": [{"type": "Complete", "status": "True"}]}})
    assert running_elsewhere(jobs, "mine", "j") == 2
    assert check_running_limit(2, config(max_running_jobs_per_namespace=2)).reason == c.MAX_RUNNING_JOBS
    assert check_running_limit(1, config(max_running_jobs_per_namespace=2)) is None
    assert check_running_limit(9, config()) is None


def test_should_say_when_kueue_is_missing():
    assert check_kueue("q", kueue_installed=False).reason == c.KUEUE_NOT_INSTALLED
    assert check_kueue("q", kueue_installed=True) is None
    assert check_kueue(None, kueue_installed=False) is None


def view(attempt, outcome=None, suspended=False):
    return JobView(name=f"d-a{attempt}", attempt=attempt, outcome=outcome, suspended=suspended)


PLAN_CASES = [
    ("should start attempt 1 when there is no Job", [], {}, (1, None)),
    ("should not start anything while suspended", [], {"suspend": True}, (None, None)),
    ("should do nothing while the Job runs", [view(1)], {}, (None, None)),
    ("should start the next attempt after a failure", [view(1, "Failed")], {}, (2, None)),
    ("should stop retrying after maxRetries", [view(1, "Failed"), view(2, "Failed")], {"max_retries": 1},
     (None, None)),
    ("should not retry a succeeded Job", [view(1, "Succeeded")], {}, (None, None)),
    ("should suspend the running Job", [view(1)], {"suspend": True}, (None, True)),
    ("should resume the suspended Job", [view(1, suspended=True)], {}, (None, False)),
    ("should leave resuming to Kueue for queued Jobs", [view(1, suspended=True)], {"kueue_managed": True},
     (None, None)),
]


@pytest.mark.parametrize("name,jobs,kw,expected", PLAN_CASES, ids=[c[0] for c in PLAN_CASES])
def test_plan(name, jobs, kw, expected):
    args = {"suspend": False, "max_retries": 3, "kueue_managed": False, **kw}
    decision = plan(jobs, (), **args)
    assert (decision.start_attempt, decision.suspend_job) == expected


def test_should_not_retry_an_attempt_that_failed_on_invalid_input():
    previous = [{"index": 1, "outcome": "Failed", "reason": c.INVALID_INPUT, "exitCode": 2}]
    assert plan([view(1, "Failed")], previous, suspend=False, max_retries=3, kueue_managed=False).start_attempt is None


def test_should_classify_trainer_exit_2_as_invalid_input():
    from lora_operator.status.jobs import pod_failure

    pod = {"status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {
        "exitCode": 2, "reason": "Error", "message": "s3://data/train.jsonl:7: empty assistant turn"}}}]}}
    failure = pod_failure(pod)
    assert (failure.reason, failure.exit_code) == (c.INVALID_INPUT, 2)
    assert "train.jsonl:7" in failure.message


def test_should_not_retry_a_trainer_that_diverged():
    from lora_operator.status.attempts import final_failure_reason
    from lora_operator.status.jobs import pod_failure

    pod = {"status": {"phase": "Failed", "containerStatuses": [{"state": {"terminated": {
        "exitCode": 4, "reason": "Error", "message": "loss is nan at step 12"}}}]}}
    failure = pod_failure(pod)
    assert (failure.reason, failure.exit_code) == (c.DIVERGED, 4)
    attempts = [{"index": 1, "outcome": "Failed", "reason": failure.reason, "exitCode": 4}]
    assert final_failure_reason(attempts, max_retries=3) == c.DIVERGED


def test_should_count_failures_recorded_in_status_for_jobs_no_longer_there():
    previous = [{"index": 1, "outcome": "Failed"}]
    assert plan([view(2, "Failed")], previous, suspend=False, max_retries=1, kueue_managed=False).start_attempt is None


def test_should_emit_events_only_for_transitions():
    old = [c.condition(c.RUNNING, "True", c.TRAINING), c.condition(c.READY, "False", "Training")]
    new = [c.condition(c.RUNNING, "True", c.TRAINING), c.condition(c.SUCCEEDED, "True", c.GATE_PASSED, "ok"),
           c.condition(c.READY, "True", c.SUCCEEDED)]
    events = transition_events(old, new)
    assert [(e.type, e.reason) for e in events] == [("Normal", c.GATE_PASSED)]
    warn = transition_events([], [c.condition(c.ADMITTED, "False", c.QUOTA_EXCEEDED, "full")])
    assert [(e.type, e.reason) for e in warn] == [("Warning", c.QUOTA_EXCEEDED)]


def test_should_tell_each_attempt_recorded_for_the_first_time_once_and_not_repeat_it_as_job_created():
    admitted = transition_events([], [c.condition(c.ADMITTED, "True", c.JOB_CREATED)])
    first = attempt_started([], [{"index": 1, "jobName": "demo-a1"}], admitted)
    assert [(e.reason, e.message) for e in first] == [("AttemptStarted", "Job demo-a1 (attempt 1)")]
    retried = attempt_started([{"index": 1, "outcome": "Failed"}],
                              [{"index": 1, "outcome": "Failed"}, {"index": 2, "jobName": "demo-a2"}], [])
    assert [e.message for e in retried] == ["Job demo-a2 (attempt 2)"]
    assert attempt_started([{"index": 1}], [{"index": 1}], admitted) == admitted, "nothing started: unchanged"


def test_should_read_the_config_from_env_and_refuse_bad_values():
    cfg = OperatorConfig.from_env({
        "LORA_ALLOWED_BASE_MODEL_PREFIXES": "s3://a/, hf://org/", "LORA_MAX_GPUS_PER_JOB": "8",
        "LORA_TRAINER_COMMAND": "python /x/fake.py run", "LORA_S3_SECRET_ACCESS_KEY": "hunter2"})
    assert cfg.policy.allowed_base_model_prefixes == ("s3://a/", "hf://org/")
    assert cfg.policy.max_gpus_per_job == 8 and cfg.trainer_command == ("python", "/x/fake.py", "run")
    assert "hunter2" not in repr(cfg)
    named = OperatorConfig.from_env({"LORA_NAMESPACES": "a,b", "LORA_DEFAULT_IMAGE": "img:1",
                                     "LORA_PROGRESS_INTERVAL": "5", "LORA_READ_JOB_SECRETS": "false",
                                     "AWS_ACCESS_KEY_ID": "ak"})
    assert named.namespaces == ("a", "b") and named.default_image == "img:1"
    assert named.progress_interval == 5 and not named.read_job_secrets and named.s3_access_key == "ak"
    unreleased = OperatorConfig.from_env({"LORA_WATCH_NAMESPACES": "a", "LORA_DEFAULT_TRAINER_IMAGE": "img:1",
                                          "LORA_PROGRESS_INTERVAL_S": "5"})
    assert (unreleased.namespaces, unreleased.progress_interval) == ((), 30.0), "aliases of never-released names"
    assert unreleased.default_image != "img:1"
    tolerations = OperatorConfig.from_env({"LORA_ALLOWED_TOLERATIONS": '[{"key": "gpu", "operator": "Exists"}]',
                                           "LORA_ALLOWED_ENDPOINTS": "https://s3.b.example"}).policy
    assert tolerations.allowed_tolerations == ({"key": "gpu", "operator": "Exists"},)
    assert tolerations.allowed_endpoints == ("https://s3.b.example",)
    with pytest.raises(ValueError, match="LORA_ALLOWED_TOLERATIONS"):
        OperatorConfig.from_env({"LORA_ALLOWED_TOLERATIONS": '{"key": "gpu"}'})
    with pytest.raises(ValueError, match="LORA_MAX_GPUS_PER_JOB"):
        OperatorConfig.from_env({"LORA_MAX_GPUS_PER_JOB": "many"})


def test_should_open_only_the_object_store_port_and_443_for_hub_models(make_spec):
    from lora_operator.status import egress_ports

    assert egress_ports(make_spec(), config()) == (8333,)
    hub = make_spec(**{"baseModel.uri": "hf://org/model", "storage.endpoint": "https://s3.other.example"})
    assert egress_ports(hub, OperatorConfig(s3_endpoint=PLATFORM_S3, network_policy_egress_ports=(8080,))) == (443, 8080)

"""The operator against the real local control plane + S3, with a fake trainer (fake_trainer.py).

Each test runs its own operator process (`python -m lora_operator --namespace NS`) with short
intervals, so a test can restart it or give it its own policy.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.request

import pytest
from ltj_cluster import (
    GROUP,
    PLURAL,
    VERSION,
    _free_port,
    _running_pod,
    _wait_step,
    apply,
    conditions,
    get,
    jobs,
    wait_for,
    wait_phase,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


def test_should_train_to_succeeded_with_status_from_progress_json(cluster, namespace, api, storage, operator_factory):
    op = operator_factory(LORA_METRICS_PORT=str(_free_port()), LORA_LOG_FORMAT="json")
    apply(api, namespace, storage, annotations={"fake-trainer/steps": "4"})
    job = wait_for(lambda: next(iter(api["batch"].list_namespaced_job(namespace).items), None), 30, "a Job")
    assert job.metadata.name == "demo-a1"
    assert job.metadata.owner_references[0].kind == "LoRATrainingJob"
    assert job.spec.backoff_limit == 0
    container = job.spec.template.spec.containers[0]
    assert container.command[-1] == "/etc/lora/job.yaml"
    assert container.resources.limits == {"nvidia.com/gpu": "1"}
    status = wait_phase(api, namespace, "Succeeded")
    assert status["progress"]["summary"] == "4/4" and status["progress"]["percent"] == 100
    assert status["evaluation"]["verdict"] == "Passed"
    assert status["artifacts"]["adapter"] == f"s3://{storage.bucket}/demo/adapter"
    assert status["checkpoints"]["latest"].endswith("checkpoints/step-4")
    assert status["attempts"] == [{**status["attempts"][0], "index": 1, "jobName": "demo-a1",
                                   "outcome": "Succeeded", "exitCode": 0}]
    assert conditions(status)["Ready"] == ("True", "Succeeded")
    assert status["observedGeneration"] == 1 and status["startTime"] and status["completionTime"]
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Succeeded", "--timeout=5s", "ltj/demo")
    reasons = {e.reason for e in api["core"].list_namespaced_event(namespace).items}
    assert {"AttemptStarted", "GatePassed"} <= reasons
    assert cluster.s3_secret_key not in str(status) + str(api["core"].list_namespaced_event(namespace).items)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{op.env['LORA_METRICS_PORT']}/metrics").read().decode()
    assert 'lora_operator_jobs{phase="Succeeded"} 1.0' in metrics
    assert "lora_operator_apply_to_job_created_seconds_count 1.0" in metrics
    assert 'lora_operator_training_duration_seconds_count{phase="Succeeded"} 1.0' in metrics
    log = op.log_path.read_text()
    assert cluster.s3_secret_key not in log
    assert any(line.startswith("{") and json.loads(line).get("message") for line in log.splitlines())


def test_should_end_rejected_when_the_gate_refuses_the_adapter(cluster, namespace, api, storage, operator_factory):
    operator_factory()
    apply(api, namespace, storage, annotations={"fake-trainer/outcome": "reject", "fake-trainer/steps": "2"})
    status = wait_phase(api, namespace, "Rejected")
    got = conditions(status)
    assert got["Succeeded"] == ("False", "GateFailed") and got["Stalled"] == ("True", "GateFailed")
    assert status["evaluation"]["reasons"] == ["evalLoss 1.90 > maxEvalLoss 1.50"]
    assert "artifacts" not in status or not status["artifacts"]
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Stalled", "--timeout=5s", "ltj/demo")


def test_should_fail_not_succeed_when_the_trainer_finished_without_a_verdict(namespace, api, storage,
                                                                            operator_factory):
    operator_factory()
    apply(api, namespace, storage, annotations={"fake-trainer/outcome": "no-verdict", "fake-trainer/steps": "2"})
    status = wait_phase(api, namespace, "Failed")
    got = conditions(status)
    assert got["Succeeded"] == ("False", "NothingPublished") and got["Failed"] == ("True", "NothingPublished")
    assert got["Ready"][0] == "False" and got["Evaluated"] == ("False", "PendingEvaluation")
    assert len(status["attempts"]) == 1, "a trainer that exited 0 is not retried"


def test_should_start_a_new_attempt_when_the_trainer_fails(namespace, api, storage, operator_factory):
    operator_factory()
    apply(api, namespace, storage, annotations={"fake-trainer/outcome": "fail-first-attempt",
                                                "fake-trainer/steps": "4"})
    status = wait_phase(api, namespace, "Succeeded")
    first, second = status["attempts"]
    assert (first["outcome"], first["reason"], first["exitCode"]) == ("Failed", "Error", 3)
    assert "injected failure" in first["message"]
    assert (second["jobName"], second["outcome"]) == ("demo-a2", "Succeeded")
    assert jobs(api, namespace) == ["demo-a1", "demo-a2"]


def test_should_fail_after_max_retries(namespace, api, storage, operator_factory):
    operator_factory()
    apply(api, namespace, storage, annotations={"fake-trainer/outcome": "crash"}, maxRetries=1)
    status = wait_phase(api, namespace, "Failed")
    assert conditions(status)["Failed"] == ("True", "BackoffLimitExceeded")
    assert [a["exitCode"] for a in status["attempts"]] == [1, 1]


def test_should_resume_in_a_new_attempt_when_the_pod_is_lost(namespace, api, storage, operator_factory):
    operator_factory()
    apply(api, namespace, storage, annotations={"fake-trainer/steps": "12", "fake-trainer/step-seconds": "0.4"})
    pod = _running_pod(api, namespace, "demo-a1")
    _wait_step(api, namespace, 2)
    api["core"].delete_namespaced_pod(pod.metadata.name, namespace)
    status = wait_phase(api, namespace, "Succeeded", timeout=90)
    assert [a["jobName"] for a in status["attempts"]] == ["demo-a1", "demo-a2"]
    assert status["attempts"][0]["outcome"] == "Failed"


def test_should_not_duplicate_the_job_when_the_operator_restarts(namespace, api, storage, operator_factory):
    op = operator_factory()
    apply(api, namespace, storage, annotations={"fake-trainer/steps": "10", "fake-trainer/step-seconds": "0.4"})
    _running_pod(api, namespace, "demo-a1")
    op.stop(signal.SIGKILL)
    operator_factory()
    status = wait_phase(api, namespace, "Succeeded", timeout=90)
    assert jobs(api, namespace) == ["demo-a1"]
    assert len(status["attempts"]) == 1


def test_should_wait_for_gpu_quota_and_start_when_it_is_raised(namespace, api, storage, operator_factory):
    api["core"].create_namespaced_resource_quota(namespace, {
        "metadata": {"name": "gpu"}, "spec": {"hard": {"requests.nvidia.com/gpu": "1"}}})
    wait_for(lambda: (api["core"].read_namespaced_resource_quota("gpu", namespace).status.hard or {}), 30, "quota")
    operator_factory()
    apply(api, namespace, storage, annotations={"fake-trainer/steps": "2"}, **{"resources.gpus": 2})
    status = wait_phase(api, namespace, "Queued")
    assert conditions(status)["Admitted"] == ("False", "QuotaExceeded")
    assert jobs(api, namespace) == []
    assert any(e.reason == "QuotaExceeded" and e.type == "Warning"
               for e in api["core"].list_namespaced_event(namespace).items)
    api["core"].patch_namespaced_resource_quota("gpu", namespace, {"spec": {"hard": {"requests.nvidia.com/gpu": "4"}}})
    wait_phase(api, namespace, "Succeeded", timeout=60)


def test_should_fail_a_policy_violation_without_creating_anything(namespace, api, storage, operator_factory):
    operator_factory(LORA_ALLOWED_BASE_MODEL_PREFIXES="s3://approved-models/")
    apply(api, namespace, storage)
    status = wait_phase(api, namespace, "Failed", timeout=30)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PolicyViolation" and failed["message"].startswith("spec.baseModel.uri")
    time.sleep(1)
    assert jobs(api, namespace) == []
    assert api["core"].list_namespaced_config_map(namespace, label_selector="app.kubernetes.io/managed-by=lora-operator").items == []


def test_should_say_kueue_is_not_installed(namespace, api, storage, operator_factory):
    operator_factory()
    apply(api, namespace, storage, queueName="team-gpus")
    status = wait_phase(api, namespace, "Queued", timeout=30)
    assert conditions(status)["Admitted"] == ("False", "KueueNotInstalled")
    assert jobs(api, namespace) == []


def test_should_suspend_and_resume_the_same_job(namespace, api, storage, operator_factory):
    operator_factory()
    apply(api, namespace, storage, annotations={"fake-trainer/steps": "10", "fake-trainer/step-seconds": "0.4"})
    _running_pod(api, namespace, "demo-a1")
    _wait_step(api, namespace, 2)
    api["custom"].patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "demo", {"spec": {"suspend": True}})
    status = wait_phase(api, namespace, "Suspended", timeout=30)
    assert conditions(status)["Suspended"] == ("True", "SuspendedByUser")
    wait_for(lambda: not api["core"].list_namespaced_pod(namespace).items, 30, "pods gone")
    assert api["batch"].read_namespaced_job("demo-a1", namespace).spec.suspend is True
    api["custom"].patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "demo", {"spec": {"suspend": False}})
    status = wait_phase(api, namespace, "Succeeded", timeout=60)
    assert jobs(api, namespace) == ["demo-a1"] and len(status["attempts"]) == 1


def test_should_leave_children_to_the_garbage_collector_on_delete(namespace, api, storage, operator_factory):
    operator_factory()
    apply(api, namespace, storage, annotations={"fake-trainer/steps": "20", "fake-trainer/step-seconds": "0.5"})
    _running_pod(api, namespace, "demo-a1")
    ltj = get(api, namespace)
    assert not ltj["metadata"].get("finalizers"), "the operator promises no finalizer"
    api["custom"].delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "demo")
    wait_for(lambda: jobs(api, namespace) == [] and not api["core"].list_namespaced_config_map(
        namespace, label_selector="app.kubernetes.io/managed-by=lora-operator").items, 60, "children gone")
    wait_for(lambda: not api["core"].list_namespaced_pod(namespace).items, 60, "pods gone")


def _trainer_cli_ready() -> bool:
    import importlib.util
    return importlib.util.find_spec("lora_trainer.__main__") is not None


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not _trainer_cli_ready(), reason="lora-trainer CLI (lora_trainer.__main__) not there yet")
def test_should_train_a_tiny_model_end_to_end_with_the_real_trainer(namespace, api, storage, operator_factory,
                                                                    tmp_path):
    import tiny

    from lora_trainer.io.storage import fingerprint_dir

    base = tiny.make_tiny_base(tmp_path / "base")
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        storage.client.fput_object(storage.bucket, f"models/tiny/{path.relative_to(base).as_posix()}", str(path))
    train = tiny.make_chat_jsonl(tmp_path / "train.jsonl", n=32)
    storage.client.fput_object(storage.bucket, "data/train.jsonl", str(train))
    operator_factory(LORA_TRAINER_COMMAND="lora-trainer run")
    apply(api, namespace, storage, **{
        "baseModel.uri": f"s3://{storage.bucket}/models/tiny", "baseModel.revision": fingerprint_dir(base),
        "dataset.train": f"s3://{storage.bucket}/data/train.jsonl", "quantization": "none",
        "computeDtype": "float32", "resources.gpus": 0, "training.maxSteps": 4,
        "training.checkpointEverySteps": 2, "training.evalEverySteps": 2, "evaluation.maxSamples": 4,
        "evaluation.maxNewTokens": 8})
    seen = set()

    def finished():
        status = get(api, namespace).get("status") or {}
        seen.add(status.get("phase"))
        return status if status.get("phase") in ("Succeeded", "Rejected", "Failed") else None
    status = wait_for(finished, 240, "the real trainer to finish")
    assert status["phase"] == "Succeeded", status
    assert "Training" in seen
    assert status["evaluation"]["verdict"] == "Passed"
    adapter = status["artifacts"]["adapter"].removeprefix(f"s3://{storage.bucket}/")
    assert list(storage.client.list_objects(storage.bucket, prefix=adapter, recursive=True))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_should_fail_at_once_naming_the_line_when_the_real_trainer_meets_bad_data(namespace, api, storage,
                                                                                   operator_factory, tmp_path):
    import tiny

    from lora_trainer.io.storage import fingerprint_dir

    base = tiny.make_tiny_base(tmp_path / "base")
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        storage.client.fput_object(storage.bucket, f"models/tiny/{path.relative_to(base).as_posix()}", str(path))
    train = tiny.make_chat_jsonl(tmp_path / "train.jsonl", n=8)
    lines = train.read_text().splitlines()
    lines.insert(4, '{"messages": [{"role": "user", "content": "hi"}')  # line 5: truncated JSON
    train.write_text("\n".join(lines) + "\n")
    storage.client.fput_object(storage.bucket, "data/train.jsonl", str(train))
    operator_factory(LORA_TRAINER_COMMAND="lora-trainer run")
    apply(api, namespace, storage, maxRetries=3, **{
        "baseModel.uri": f"s3://{storage.bucket}/models/tiny", "baseModel.revision": fingerprint_dir(base),
        "dataset.train": f"s3://{storage.bucket}/data/train.jsonl", "quantization": "none",
        "computeDtype": "float32", "resources.gpus": 0, "training.maxSteps": 2})
    status = wait_phase(api, namespace, "Failed", timeout=150)
    assert conditions(status)["Failed"] == ("True", "InvalidInput")
    assert [a["exitCode"] for a in status["attempts"]] == [2], "invalid input must not be retried"
    assert "train.jsonl:5" in status["attempts"][0]["message"], status["attempts"][0]


def test_should_work_with_only_the_documented_rbac(namespace, api, storage, operator_factory,
                                                   least_privilege_kubeconfig):
    op = operator_factory(KUBECONFIG=least_privilege_kubeconfig)
    apply(api, namespace, storage, annotations={"fake-trainer/outcome": "fail-first-attempt",
                                                "fake-trainer/steps": "3"})
    status = wait_phase(api, namespace, "Succeeded")
    assert len(status["attempts"]) == 2 and status["progress"]["summary"] == "3/3"
    log = op.log_path.read_text()
    assert "403" not in log and "forbidden" not in log.lower(), log[-3000:]

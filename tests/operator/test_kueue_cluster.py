"""The operator with real Kueue (v0.17, built from the Go proxy): quota, queueing, preemption, suspend.

These tests run on a stack of their own (``.local/kueue-stack``, ``localcluster.py up --kueue``;
the ``kueue_cluster`` fixture), so the session cluster stays without Kueue for the tests that need it absent. Each test
gets its own ClusterQueue (GPU quota as the test needs) and a LocalQueue ``gpu`` in its namespace;
the WorkloadPriorityClasses training-low / training-high come from examples/kueue/queues.yaml.
"""

from __future__ import annotations

import json
import sys
import time
import uuid

import pytest
from ltj_cluster import GROUP, PLURAL, VERSION, apply, conditions, get, wait_for, wait_phase
from ltj_cluster import ROOT as REPO

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]
SLOW_TRAINER = REPO / "tests" / "operator" / "slow_trainer.py"
INSUFFICIENT = "insufficient unused quota for nvidia.com/gpu"


@pytest.fixture(scope="module")
def cluster(kueue_cluster):
    """Overrides the session cluster for this module (and the fixtures it feeds): the Kueue stack."""
    return kueue_cluster


@pytest.fixture
def queue(cluster, namespace):
    """set_quota(gpus): a ClusterQueue of its own with that many GPUs, LocalQueue `gpu` in the namespace."""
    name = f"cq-{uuid.uuid4().hex[:8]}"

    def set_quota(gpus: int) -> None:
        cq = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "ClusterQueue", "metadata": {"name": name},
              "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                       "preemption": {"withinClusterQueue": "LowerPriority"},
                       "resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu", "ephemeral-storage"], "flavors": [
                           {"name": "gpu-flavor", "resources": [{"name": "cpu", "nominalQuota": 64},
                                                                {"name": "memory", "nominalQuota": "256Gi"},
                                                                {"name": "nvidia.com/gpu", "nominalQuota": gpus},
                                                                {"name": "ephemeral-storage", "nominalQuota": "8Ti"}]}]}]}}
        lq = {"apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "LocalQueue",
              "metadata": {"name": "gpu", "namespace": namespace}, "spec": {"clusterQueue": name}}
        items = {"apiVersion": "v1", "kind": "List", "items": [cq, lq]}
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=json.dumps(items))

    yield set_quota
    cluster.kubectl("delete", "clusterqueue", name, "--wait=false", check=False)


def workload(cluster, namespace, job_name):
    items = json.loads(cluster.kubectl("get", "workloads.kueue.x-k8s.io", "-n", namespace, "-o", "json").stdout)["items"]
    return next((w for w in items if any(r.get("name") == job_name for r in w["metadata"].get("ownerReferences", []))),
                None)


def message(status, type_):
    return next(c["message"] for c in status["conditions"] if c["type"] == type_)


def patch_spec(api, namespace, name, **spec):
    api["custom"].patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": spec})


def steps(n, seconds=0.4, **more):
    return {"fake-trainer/steps": str(n), "fake-trainer/step-seconds": str(seconds), **more}


def test_should_run_two_jobs_one_after_the_other_on_a_quota_of_one_gpu(cluster, namespace, api, storage, queue,
                                                                       operator_factory):
    queue(1)
    operator_factory()
    apply(api, namespace, storage, name="first", queueName="gpu", annotations=steps(8))
    wait_phase(api, namespace, "Training", name="first", timeout=60)
    apply(api, namespace, storage, name="second", queueName="gpu", annotations=steps(2))
    second = wait_for(lambda: (s := get(api, namespace, "second").get("status") or {}).get("phase") == "Queued"
                      and INSUFFICIENT in message(s, "Admitted") and s, 60, "second Queued with Kueue's reason")
    assert conditions(second)["Admitted"] == ("False", "Queued")
    shown = cluster.kubectl("get", "ltj", "-n", namespace).stdout
    print(shown)
    assert "Queued" in shown and INSUFFICIENT in shown, shown  # the Admission column
    first = wait_phase(api, namespace, "Succeeded", name="first", timeout=90)
    second = wait_phase(api, namespace, "Succeeded", name="second", timeout=90)
    assert second["startTime"] >= first["completionTime"], (first, second)
    assert conditions(second)["Admitted"] == ("True", "AdmittedByKueue")


def test_should_checkpoint_when_preempted_by_a_higher_priority_job_and_resume_to_the_same_loss(
        cluster, namespace, api, storage, queue, operator_factory):
    queue(1)
    operator_factory(LORA_ALLOWED_PRIORITY_CLASSES="training-low,training-high")  # policy: none by default
    apply(api, namespace, storage, name="low", queueName="gpu", annotations=steps(12),
          **{"resources.priorityClassName": "training-low"})
    wait_for(lambda: ((get(api, namespace, "low").get("status") or {}).get("progress") or {}).get("step", 0) >= 3,
             60, "low at step 3")
    apply(api, namespace, storage, name="high", queueName="gpu", annotations=steps(3),
          **{"resources.priorityClassName": "training-high"})
    low = wait_phase(api, namespace, "Suspended", name="low", timeout=60)
    assert conditions(low)["Suspended"] == ("True", "Preempted")
    assert "Preempted to accommodate a workload" in message(low, "Suspended"), message(low, "Suspended")
    wait_phase(api, namespace, "Succeeded", name="high", timeout=90)
    low = wait_phase(api, namespace, "Succeeded", name="low", timeout=120)
    [attempt] = low["attempts"]  # one Job: a preemption is no failed attempt
    assert attempt["outcome"] == "Succeeded" and attempt["preemptions"] == 1, attempt
    assert attempt["stepsRedone"] == 0 and attempt["preemptedAtStep"] == attempt["resumeFromStep"] >= 3, attempt
    assert low["progress"]["loss"] == round(2.0 / 12, 4), "the fake trainer's uninterrupted final loss"
    job = api["batch"].read_namespaced_job("low-a1", namespace)
    assert job.metadata.labels["kueue.x-k8s.io/priority-class"] == "training-low"


def test_should_release_the_quota_while_suspended_and_queue_again_on_resume(cluster, namespace, api, storage, queue,
                                                                         operator_factory):
    queue(1)
    operator_factory()
    apply(api, namespace, storage, name="paused", queueName="gpu", annotations=steps(10))
    wait_phase(api, namespace, "Training", name="paused", timeout=60)
    patch_spec(api, namespace, "paused", suspend=True)
    paused = wait_phase(api, namespace, "Suspended", name="paused", timeout=60)
    assert conditions(paused)["Suspended"] == ("True", "SuspendedByUser")
    wl = wait_for(lambda: (w := workload(cluster, namespace, "paused-a1")) and w["spec"].get("active") is False and w,
                  30, "the Workload deactivated")
    assert wl["metadata"]["annotations"]["training.lora.dev/deactivated-by"] == "lora-operator"
    apply(api, namespace, storage, name="other", queueName="gpu", annotations=steps(2))
    wait_phase(api, namespace, "Succeeded", name="other", timeout=90)  # it got the released GPU
    patch_spec(api, namespace, "paused", suspend=False)
    paused = wait_phase(api, namespace, "Succeeded", name="paused", timeout=120)
    assert len(paused["attempts"]) == 1
    assert workload(cluster, namespace, "paused-a1")["spec"]["active"] is True


def test_should_admit_a_two_node_job_as_a_whole_or_not_at_all(cluster, namespace, api, storage, queue,
                                                             operator_factory):
    queue(1)
    operator_factory()
    apply(api, namespace, storage, name="gang", queueName="gpu", annotations=steps(2),
          **{"resources.nodes": 2, "resources.gpus": 1})
    wl = wait_for(lambda: workload(cluster, namespace, "gang-a1"), 30, "the Workload")
    assert [p["count"] for p in wl["spec"]["podSets"]] == [2]  # one unit of admission: both pods
    status = wait_for(lambda: (s := get(api, namespace, "gang").get("status") or {}).get("phase") == "Queued"
                      and "nvidia.com/gpu" in message(s, "Admitted") and s, 60, "Kueue's reason")
    assert "maximum capacity (1)" in message(status, "Admitted"), message(status, "Admitted")
    time.sleep(3)  # one GPU would fit one of the two pods: neither may start
    assert api["core"].list_namespaced_pod(namespace).items == []
    assert api["batch"].read_namespaced_job("gang-a1", namespace).spec.suspend is True
    queue(2)
    # Both pods at once (the multi-node command, accelerate launch, cannot rendezvous on the pod runner,
    # so this test stops at admission).
    wait_for(lambda: len(api["core"].list_namespaced_pod(
        namespace, label_selector="batch.kubernetes.io/job-name=gang-a1").items) == 2, 60, "both pods")
    assert conditions(get(api, namespace, "gang")["status"])["Admitted"] == ("True", "AdmittedByKueue")


def _trainer_cli_ready() -> bool:
    import importlib.util
    return importlib.util.find_spec("lora_trainer.__main__") is not None


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not _trainer_cli_ready(), reason="lora-trainer CLI not installed")
def test_should_resume_the_real_trainer_after_preemption_to_the_uninterrupted_losses(
        cluster, namespace, api, storage, queue, operator_factory, tmp_path):
    """The low-priority job trains the golden configuration of tests/trainer (test_training.GOLDEN_JOB: 22 steps); a
    high-priority job preempts it mid-way; it resumes from its SIGTERM checkpoint and ends with the
    golden (uninterrupted) final loss and eval loss, within the trainer resume test's tolerance."""
    import tiny

    from lora_trainer.io.storage import fingerprint_dir

    golden = json.loads((REPO / "tests" / "trainer" / "golden" / "tiny_chat_losses.json").read_text())
    base = tiny.make_tiny_base(tmp_path / "base")
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        storage.client.fput_object(storage.bucket, f"models/tiny/{path.relative_to(base).as_posix()}", str(path))
    train = tiny.make_chat_jsonl(tmp_path / "train.jsonl", 48, seed=1)
    storage.client.fput_object(storage.bucket, "data/train.jsonl", str(train))
    common = {"baseModel.uri": f"s3://{storage.bucket}/models/tiny", "baseModel.revision": fingerprint_dir(base),
              "dataset.train": f"s3://{storage.bucket}/data/train.jsonl", "quantization": "none",
              "computeDtype": "float32", "lora": {"rank": 4, "dropout": 0.1, "targetModules": ["all-linear"]},
              "evaluation.maxSamples": 2, "evaluation.maxNewTokens": 4}
    golden_training = {"epochs": 2, "batchSize": 4, "learningRate": 0.005, "seed": 7, "checkpointEverySteps": 4,
                       "evalEverySteps": 4, "keepCheckpoints": 2}
    queue(1)
    # The real trainer, each step paused 0.5 s (tests/operator/slow_trainer.py): 22 tiny steps would
    # otherwise be over before a preemption lands.
    operator_factory(LORA_TRAINER_COMMAND=f"{sys.executable} {SLOW_TRAINER} run",
                     LORA_ALLOWED_PRIORITY_CLASSES="training-low,training-high")
    apply(api, namespace, storage, name="low", queueName="gpu", training=golden_training,
          **{**common, "resources.priorityClassName": "training-low"})
    wait_for(lambda: ((get(api, namespace, "low").get("status") or {}).get("progress") or {}).get("step", 0) >= 2,
             300, "low at step 2")
    apply(api, namespace, storage, name="high", queueName="gpu", training={"maxSteps": 2},
          **{**common, "resources.priorityClassName": "training-high"})
    low = wait_phase(api, namespace, "Suspended", name="low", timeout=120)
    assert conditions(low)["Suspended"] == ("True", "Preempted")
    wait_phase(api, namespace, "Succeeded", name="high", timeout=300)
    low = wait_phase(api, namespace, "Succeeded", name="low", timeout=400)
    [attempt] = low["attempts"]
    assert attempt["preemptions"] == 1 and attempt["stepsRedone"] == 0, attempt
    assert 2 <= attempt["resumeFromStep"] < golden["totalSteps"], attempt
    assert low["progress"]["step"] == golden["totalSteps"]
    assert low["progress"]["loss"] == pytest.approx(golden["losses"][-1], abs=1e-4)
    assert low["progress"]["evalLoss"] == pytest.approx(golden["evalLoss"], abs=1e-4)

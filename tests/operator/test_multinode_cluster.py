"""Multi-node through the operator: the real Job controller, the pod runner's pod DNS, torchrun and the real
trainer. Two CPU pods (gloo, one process each) train one adapter; it must equal a one-process run with the same
global batch and seed. Killing one pod ends the attempt without a hang and the next attempt resumes both ranks
from the last checkpoint; a pod that never starts ends the attempt at the rendezvous timeout, saying why.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from ltj_cluster import apply, get, wait_for, wait_phase

HACK = Path(__file__).resolve().parents[2] / "hack"
sys.path.insert(0, str(HACK))
from podrunner_dns import isolation_available  # noqa: E402
from podrunner_pod import kill_marked  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(420),
              pytest.mark.skipif(not isolation_available(), reason="pod DNS needs unshare (root or user namespaces)")]

TRAINING = {"quantization": "none", "computeDtype": "float32", "lora.dropout": 0.0, "lora.rank": 4,
            "training.maxSteps": 12, "training.checkpointEverySteps": 4, "training.evalEverySteps": 4,
            "training.learningRate": 0.005, "training.seed": 7, "evaluation.maxSamples": 4,
            "evaluation.maxNewTokens": 8}
TOL = 1e-4  # as the 2-process gloo test (tests/trainer/test_training.py)
N_TRAIN = 24


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    import tiny

    root = tmp_path_factory.mktemp("multinode")
    return tiny.make_tiny_base(root / "base"), tiny.make_chat_jsonl(root / "train.jsonl", n=N_TRAIN, seed=1)


@pytest.fixture(scope="module")
def reference(tiny_files, tmp_path_factory):
    """One process, batch 2, on a local store: the published adapter and the per-step losses."""
    import shutil

    import yaml
    from overrides import with_overrides

    from lora_trainer.__main__ import run_job
    from lora_trainer.config import RuntimeConfig, load_job
    from lora_trainer.io.storage import fingerprint_dir

    base, train = tiny_files
    root = tmp_path_factory.mktemp("reference")
    shutil.copytree(base, root / "store" / "ref" / "models" / "tiny")
    (root / "store" / "ref" / "data").mkdir(parents=True)
    shutil.copy(train, root / "store" / "ref" / "data" / "train.jsonl")
    spec = with_overrides({"baseModel": {"uri": "s3://ref/models/tiny", "revision": fingerprint_dir(base)},
                           "dataset": {"train": "s3://ref/data/train.jsonl"}, "output": {"uri": "s3://ref/out"}},
                          **TRAINING, **{"training.batchSize": 2})
    (root / "job.yaml").write_text(yaml.safe_dump({"apiVersion": "training.lora.dev/v1alpha1",
                                                   "kind": "LoRATrainingJob", "metadata": {"name": "ref"},
                                                   "spec": spec}))
    rt = RuntimeConfig(work_dir=root / "work", storage_dir=root / "store", progress_interval_s=0,
                       termination_log=root / "termination-log", progress_bar=False)
    assert run_job({"train", "evaluate", "export"}, load_job(root / "job.yaml"), rt) == 0
    out = root / "store" / "ref" / "out"
    adapter = json.loads((out / "lora-metadata.json").read_text())["artifacts"]["adapter"]
    return {"adapter": (out / adapter.removeprefix("s3://ref/out/") / "adapter_model.safetensors").read_bytes(),
            "metrics": [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]}


@pytest.fixture
def uploaded(storage, tiny_files):
    from lora_trainer.io.storage import fingerprint_dir

    base, train = tiny_files
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        storage.client.fput_object(storage.bucket, f"models/tiny/{path.relative_to(base).as_posix()}", str(path))
    storage.client.fput_object(storage.bucket, "data/train.jsonl", str(train))
    return {"baseModel.uri": f"s3://{storage.bucket}/models/tiny", "baseModel.revision": fingerprint_dir(base),
            "dataset.train": f"s3://{storage.bucket}/data/train.jsonl"}


def _two_nodes(api, namespace, storage, uploaded, **over):
    apply(api, namespace, storage, **uploaded, **TRAINING, **{
        "resources.gpus": 0, "resources.nodes": 2, "training.batchSize": 1, **over})


def _object(storage, key: str) -> bytes:
    response = storage.client.get_object(storage.bucket, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def _assert_equals_reference(storage, reference) -> None:
    from safetensors.torch import load

    adapter = json.loads(_object(storage, "demo/lora-metadata.json"))["artifacts"]["adapter"]
    key = adapter.removeprefix(f"s3://{storage.bucket}/")
    got, want = load(_object(storage, f"{key}/adapter_model.safetensors")), load(reference["adapter"])
    assert got.keys() == want.keys()
    for name in want:
        assert (got[name] - want[name]).abs().max().item() <= TOL, name
    metrics = [json.loads(line) for line in _object(storage, "demo/metrics.jsonl").decode().splitlines()]
    assert [m["step"] for m in metrics] == [m["step"] for m in reference["metrics"]]
    assert metrics[-1]["loss"] == pytest.approx(reference["metrics"][-1]["loss"], abs=TOL)
    assert [m["loss"] for m in metrics] == pytest.approx([m["loss"] for m in reference["metrics"]], abs=TOL)


def _operator(operator_factory, **env):
    return operator_factory(**{"LORA_TRAINER_COMMAND": "lora-trainer run", "LORA_RENDEZVOUS_TIMEOUT_SECONDS": "60",
                               "LORA_COLLECTIVE_TIMEOUT_SECONDS": "60", **env})


def _pods(api, namespace, job_name):
    pods = api["core"].list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}")
    return {int(p.metadata.annotations["batch.kubernetes.io/job-completion-index"]): p for p in pods.items}


def test_should_train_two_cpu_nodes_to_the_adapter_of_one_process(namespace, api, storage, uploaded, reference,
                                                                  operator_factory, cluster):
    _operator(operator_factory)
    _two_nodes(api, namespace, storage, uploaded)
    wide = []

    def finished():
        status = get(api, namespace).get("status") or {}
        if (status.get("workers") or {}).get("ready") == 2 and len(wide) < 3:
            wide.append(cluster.kubectl("get", "ltj", "demo", "-n", namespace, "-o", "wide").stdout)
        return status if status.get("phase") in ("Succeeded", "Rejected", "Failed") else None
    status = wait_for(finished, 360, "the two-node job to finish")
    assert status["phase"] == "Succeeded", status
    assert [a["outcome"] for a in status["attempts"]] == ["Succeeded"]
    assert status["workers"] == {"ready": 0, "total": 2, "summary": "0/2"}
    assert any("WORKERS" in out and " 2/2 " in out for out in wide), wide
    assert status["artifacts"]["adapter"].startswith(f"s3://{storage.bucket}/demo/published/")
    progress = json.loads(_object(storage, "demo/progress.json"))
    assert (progress["rank"], progress["worldSize"], progress["state"]) == (0, 2, "Succeeded")
    metadata = json.loads(_object(storage, "demo/lora-metadata.json"))
    assert metadata["distributed"] == {"rank": 0, "worldSize": 2, "nodes": 2}
    _assert_equals_reference(storage, reference)


def _wait_object(storage, key: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if any(True for _ in storage.client.list_objects(storage.bucket, prefix=key)):
            return
        assert time.monotonic() < deadline, f"{key} never appeared"
        time.sleep(0.1)


def test_should_end_the_attempt_when_one_pod_is_killed_and_resume_both_ranks(namespace, api, storage, uploaded,
                                                                              reference, operator_factory):
    _operator(operator_factory)
    _two_nodes(api, namespace, storage, uploaded)
    _wait_object(storage, "demo/checkpoints/step-4/COMPLETE", 300)
    victim = _pods(api, namespace, "demo-a1")[1]
    kill_marked(victim.metadata.uid)  # the node is gone: SIGKILL to the agent and its worker, no checkpoint
    killed = time.monotonic()
    wait_for(lambda: (get(api, namespace).get("status") or {}).get("attempts", [{}])[0].get("outcome"), 120,
             "attempt 1 to end")
    assert time.monotonic() - killed < 60, "rank 0 should not wait for the lost rank"
    status = wait_phase(api, namespace, "Succeeded", timeout=300)
    first, second = status["attempts"]
    assert first["outcome"] == "Failed" and first["failedRank"] == 1, first
    assert first["failedPod"] == victim.metadata.name and first["exitCode"] == 137, first
    assert second["outcome"] == "Succeeded"
    events = [e.message for e in api["core"].list_namespaced_event(namespace).items if e.reason == "AttemptFailed"]
    assert any(f"node rank 1 (pod {victim.metadata.name})" in m for m in events), events
    progress = json.loads(_object(storage, "demo/progress.json"))
    assert progress["attempt"] == 2 and progress["worldSize"] == 2
    _assert_equals_reference(storage, reference)  # both ranks resumed exactly where the checkpoint left them


def test_should_end_the_attempt_at_the_rendezvous_timeout_when_a_pod_never_starts(namespace, api, storage, uploaded,
                                                                                   operator_factory):
    api["core"].create_namespaced_resource_quota(namespace, {"metadata": {"name": "one-pod"},
                                                             "spec": {"hard": {"pods": "1"}}})
    wait_for(lambda: (api["core"].read_namespaced_resource_quota("one-pod", namespace).status.hard or {}), 30, "quota")
    _operator(operator_factory, LORA_RENDEZVOUS_TIMEOUT_SECONDS="5")
    _two_nodes(api, namespace, storage, uploaded, maxRetries=0)
    waiting = wait_for(lambda: ((get(api, namespace).get("status") or {}).get("workers") or {}).get("ready") == 1
                       and get(api, namespace)["status"], 120, "one of two pods ready")
    assert waiting["workers"]["summary"] == "1/2"
    status = wait_phase(api, namespace, "Failed", timeout=120)
    attempt = status["attempts"][0]
    assert attempt["failedRank"] == 0 and attempt["exitCode"] == 1, attempt
    assert "rendezvous of node rank 0 of 2" in attempt["message"] and "1/2 clients joined" in attempt["message"]

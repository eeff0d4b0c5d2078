"""Promotion and rollback through LoRAAdapterChannel on the real control plane + S3.

The operator runs as a subprocess (as in test_operator_cluster.py) under exactly config.RBAC_RULES,
with the fake trainer (fake_trainer.py), a platform bucket as channel root, and a vLLM pool whose
LoRA syncer ConfigMap the channel keeps in step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from ltj_cluster import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
FAKE_TRAINER = Path(__file__).with_name("fake_trainer.py")
GROUP, VERSION = "training.lora.dev", "v1alpha1"
JOBS, CHANNELS = "loratrainingjobs", "loraadapterchannels"
REV = "sha256:" + "0" * 64  # the revision of tests/operator/conftest.py's BASE_SPEC
POOL = "vllm-support-adapters"


@pytest.fixture(scope="module")
def crds(cluster):
    for name in ("loratrainingjobs", "loraadapterchannels"):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f",
                        str(ROOT / "crds" / f"training.lora.dev_{name}.yaml"))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}.{GROUP}")


@pytest.fixture
def kube(cluster):
    from kubernetes import client

    api_client = cluster.api_client()
    return client.CustomObjectsApi(api_client), client.CoreV1Api(api_client)


@pytest.fixture
def platform(cluster, namespace, s3, kube, crds, tmp_path, least_privilege_kubeconfig, make_spec_dict):
    """The tenant's bucket + Secret, the platform's channel-root bucket, and a running operator."""
    s3.client.make_bucket(s3.bucket)
    root_bucket = f"channels-{uuid.uuid4().hex[:10]}"
    s3.client.make_bucket(root_bucket)
    kube[1].create_namespaced_secret(namespace, {
        "metadata": {"name": "s3-credentials"},
        "stringData": {"AWS_ACCESS_KEY_ID": cluster.s3_access_key, "AWS_SECRET_ACCESS_KEY": cluster.s3_secret_key}})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "KUBECONFIG": least_privilege_kubeconfig, "LORA_S3_ENDPOINT": cluster.s3_endpoint,
           "LORA_S3_ACCESS_KEY_ID": cluster.s3_access_key, "LORA_S3_SECRET_ACCESS_KEY": cluster.s3_secret_key,
           "LORA_CHANNEL_ROOT": f"s3://{root_bucket}/channels",
           "LORA_TRAINER_COMMAND": f"{sys.executable} {FAKE_TRAINER} run", "LORA_RESYNC_INTERVAL": "1",
           "LORA_PROGRESS_INTERVAL": "1", "LORA_METRICS_PORT": "0", "LORA_WATCH_TIMEOUT": "30",
           "LORA_LIVENESS_ENDPOINT": f"http://127.0.0.1:{port}/healthz"}
    log_path = tmp_path / "operator.log"
    with open(log_path, "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "lora_operator", "--namespace", namespace], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    yield Platform(namespace, s3, root_bucket, kube, log_path, make_spec_dict)
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log_text = log_path.read_text()
    print(log_text[-5000:])
    assert " 403" not in log_text and "forbidden" not in log_text.lower(), "the documented RBAC is not enough"
    for obj in s3.client.list_objects(root_bucket, recursive=True):
        s3.client.remove_object(root_bucket, obj.object_name)
    s3.client.remove_bucket(root_bucket)


class Platform:
    def __init__(self, namespace, s3, root_bucket, kube, log_path, spec_dict):
        self.namespace, self.s3, self.root_bucket, self.log_path = namespace, s3, root_bucket, log_path
        self.spec_dict = spec_dict
        self.custom, self.core = kube

    def train(self, name, revision=REV, champion=None, **annotations):
        overrides = {"output.uri": f"s3://{self.s3.bucket}/{name}", "baseModel.revision": revision,
                     "resources.gpus": 1}
        if champion:
            overrides["evaluation.gate.champion"] = {"channel": champion}
        spec = self.spec_dict(**overrides)
        notes = {"fake-trainer/steps": "1", "fake-trainer/step-seconds": "0.05",
                 **{f"fake-trainer/{k.replace('_', '-')}": v for k, v in annotations.items()}}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, JOBS, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRATrainingJob",
            "metadata": {"name": name, "annotations": notes}, "spec": spec})

    def job_phase(self, name):
        body = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, JOBS, name)
        return (body.get("status") or {}).get("phase")

    def wait_job(self, name, phase):
        return wait_for(lambda: self.job_phase(name) == phase, 90, f"{name} {phase}")

    def channel(self, job_name, name="production"):
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, CHANNELS, {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRAAdapterChannel", "metadata": {"name": name},
            "spec": {"jobName": job_name, "baseModel": {"uri": "s3://models/tiny-base", "revision": REV},
                     "historyLimit": 3,
                     "vllm": {"configMapName": POOL, "baseModelName": "tiny-base", "adapterName": "support"}}})

    def point_to(self, job_name, name="production"):
        """The GitOps change: one line of the channel's spec."""
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.namespace, CHANNELS, name,
                                                   {"spec": {"jobName": job_name}})

    def status(self, name="production"):
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, CHANNELS, name).get(
            "status") or {}

    def wait_channel(self, check, what, name="production"):
        try:
            return wait_for(lambda: (lambda s: s if check(s) else None)(self.status(name)), 90, what)
        except AssertionError:
            raise AssertionError(f"{what}; status: {self.status(name)}") from None

    def pointer(self, name="production"):
        from minio.error import S3Error

        try:
            response = self.s3.client.get_object(self.root_bucket, f"channels/{self.namespace}/{name}/current.json")
        except S3Error:
            return None
        return json.loads(response.read())

    def syncer(self):
        cm = self.core.read_namespaced_config_map(POOL, self.namespace)
        config = yaml.safe_load(cm.data["configmap.yaml"])["vLLMLoRAConfig"]
        return ([m["id"] for m in config["ensureExist"]["models"]],
                [m["id"] for m in config["ensureNotExist"]["models"]])

    def events(self, reason):
        return [e.message for e in self.core.list_namespaced_event(self.namespace).items if e.reason == reason]


def _live(job):
    return lambda s: s.get("phase") == "Live" and (s.get("live") or {}).get("jobName") == job


def test_should_promote_then_roll_back_by_one_spec_change_with_history_and_syncer_following(platform, cluster):
    platform.train("v1", adapter_loss="1.2")
    platform.train("v2", adapter_loss="1.0")
    platform.wait_job("v1", "Succeeded")
    platform.channel("v1")
    status = platform.wait_channel(_live("v1"), "v1 live")
    assert status["live"]["adapter"] == f"s3://{platform.s3.bucket}/v1/adapter" and not status.get("previous")
    pointer = platform.pointer()
    assert pointer["live"]["jobName"] == "v1" and pointer["live"]["baseModel"]["revision"] == REV
    assert pointer["live"]["runId"] == status["live"]["runId"] and pointer["history"] == []
    assert platform.syncer() == (["support-v1"], [])

    platform.wait_job("v2", "Succeeded")
    platform.point_to("v2")
    status = platform.wait_channel(_live("v2"), "v2 live")
    assert status["previous"]["jobName"] == "v1"
    assert [r["jobName"] for r in platform.pointer()["history"]] == ["v1"]
    assert platform.syncer() == (["support-v2"], ["support-v1"])
    assert any("replaced run" in m and "of v1" in m for m in platform.events("Promoted"))

    # Argo CD prunes the old LoRATrainingJob once a new name is committed: roll back from history.
    platform.custom.delete_namespaced_custom_object(GROUP, VERSION, platform.namespace, JOBS, "v1")
    platform.point_to("v1")  # the rollback: `git revert` of the line above
    status = platform.wait_channel(_live("v1"), "rolled back to v1")
    assert status["previous"]["jobName"] == "v2"
    assert [r["jobName"] for r in platform.pointer()["history"]] == ["v2", "v1"]
    assert platform.syncer() == (["support-v1"], ["support-v2"])
    table = cluster.kubectl("get", "lac", "-n", platform.namespace).stdout
    assert "production" in table and "Live" in table and "v2" in table.splitlines()[1], table


def test_should_never_promote_a_rejected_job_and_keep_serving_the_old_one(platform):
    platform.train("good")
    platform.train("bad", outcome="reject")
    platform.wait_job("good", "Succeeded")
    platform.channel("good")
    platform.wait_channel(_live("good"), "good live")
    before = platform.pointer()
    platform.wait_job("bad", "Rejected")
    platform.point_to("bad")
    status = platform.wait_channel(lambda s: s.get("phase") == "Refused", "bad refused")
    promoted = next(c for c in status["conditions"] if c["type"] == "Promoted")
    assert promoted["reason"] == "GateNotPassed" and "evalLoss 1.90" in promoted["message"]
    assert status["live"]["jobName"] == "good"
    time.sleep(3)  # several resync passes: still refused, nothing rewritten
    assert platform.pointer() == before and platform.syncer() == (["support-good"], [])
    assert platform.status()["phase"] == "Refused"
    assert platform.events("GateNotPassed"), "a Warning event says why"


def test_should_refuse_a_run_on_another_base_revision(platform):
    platform.train("other-base", revision="sha256:" + "f" * 64)
    platform.wait_job("other-base", "Succeeded")
    platform.channel("other-base")
    status = platform.wait_channel(lambda s: s.get("phase") == "Refused", "refused")
    promoted = next(c for c in status["conditions"] if c["type"] == "Promoted")
    assert promoted["reason"] == "BaseRevisionMismatch" and "not portable" in promoted["message"]
    assert platform.pointer() is None and not status.get("live")


def test_should_reject_a_passing_job_that_is_worse_than_the_champion(platform):
    platform.train("champ", adapter_loss="1.2")
    platform.wait_job("champ", "Succeeded")
    platform.channel("champ")
    platform.wait_channel(_live("champ"), "champ live")
    platform.train("worse", champion="production", adapter_loss="1.3")  # beats the base (2.1), not the champion
    platform.train("better", champion="production", adapter_loss="1.1")
    platform.wait_job("worse", "Rejected")
    worse = platform.custom.get_namespaced_custom_object(GROUP, VERSION, platform.namespace, JOBS, "worse")
    assert worse["status"]["evaluation"]["reasons"] == ["championLoss: 1.3000 vs <= 1.2000"]
    row = worse["status"]["evaluation"]["results"][0]
    assert (row["base"], row["champion"], row["adapter"]) == (2.1, 1.2, 1.3), "three columns"
    platform.wait_job("better", "Succeeded")
    platform.point_to("worse")
    platform.wait_channel(lambda s: s.get("phase") == "Refused", "worse refused")
    platform.point_to("better")
    status = platform.wait_channel(_live("better"), "better live")
    assert "(champion 1.2000)" in status["live"]["evalSummary"]
    assert platform.syncer() == (["support-better"], ["support-champ"])

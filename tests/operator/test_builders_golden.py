"""Golden tests of the pure builders: the manifests are compared to checked-in YAML.

Regenerate after an intended change: UPDATE_GOLDEN=1 pytest tests/operator/test_builders_golden.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from lora_operator.builders import JobParams, build_configmap, build_job, build_network_policy, build_service

GOLDEN = Path(__file__).parent / "golden"
IMAGE = "ghcr.io/lora-operator/trainer:0.1.0"
ENDPOINT = "http://s3.storage.svc:8333"

CASES = {
    "single-node": {"resources.gpus": 1, "resources.cpu": "8", "resources.memory": "64Gi"},
    "multi-node-indexed": {"resources.gpus": 4, "resources.nodes": 2},
    "cpu-only": {"resources.gpus": 0},
    "kueue-queue": {"queueName": "team-a-gpus", "resources.priorityClassName": "training-high"},
    "tolerations-node-selector": {
        "resources.nodeSelector": {"nvidia.com/gpu.product": "H100"},
        "resources.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "resources.priorityClassName": "training-low",
        "activeDeadlineSeconds": 7200,
    },
}


def _render(owner, spec) -> str:
    params = JobParams(attempt=1, image=IMAGE, endpoint=ENDPOINT, queue_name=spec.queue_name)
    configmap = build_configmap(owner, spec, image=IMAGE, endpoint=ENDPOINT)
    # Golden files show the trainer config parsed, so a diff reads well; the test below checks it is YAML.
    configmap["data"] = {k: yaml.safe_load(v) for k, v in configmap["data"].items()}
    docs = [configmap, build_job(owner, spec, params)]
    if spec.resources.nodes > 1:
        docs += [build_service(owner), build_network_policy(owner, (8333,))]
    return yaml.safe_dump_all(docs, sort_keys=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_should_build_the_checked_in_manifests(case, owner, make_spec):
    rendered = _render(owner, make_spec(**CASES[case]))
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("UPDATE_GOLDEN") or not path.exists():
        path.write_text(rendered)
    assert rendered == path.read_text(), f"{path.name} differs; UPDATE_GOLDEN=1 if intended"


def _job(owner, spec, **params):
    return build_job(owner, spec, JobParams(attempt=params.pop("attempt", 1), image=IMAGE, **params))


def test_should_request_and_limit_gpus_only_when_gpus_above_zero(owner, make_spec):
    gpu = _job(owner, make_spec(**{"resources.gpus": 2}))["spec"]["template"]["spec"]["containers"][0]
    cpu = _job(owner, make_spec(**{"resources.gpus": 0}))["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"] == {"requests": {"nvidia.com/gpu": "2", "ephemeral-storage": "100Gi"},
                                "limits": {"nvidia.com/gpu": "2"}}
    assert "nvidia.com/gpu" not in str(cpu["resources"])


def test_should_add_the_queue_name_label_and_create_suspended_when_queue_name_is_set(owner, make_spec):
    job = _job(owner, make_spec(queueName="q"), queue_name="q")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"
    assert job["spec"]["suspend"] is True
    plain = _job(owner, make_spec())
    assert "kueue.x-k8s.io/queue-name" not in plain["metadata"]["labels"] and plain["spec"]["suspend"] is False


def test_should_name_jobs_deterministically_per_attempt(owner, make_spec):
    spec = make_spec()
    assert _job(owner, spec, attempt=3)["metadata"]["name"] == "demo-a3"
    assert _job(owner, spec, attempt=3) == _job(owner, spec, attempt=3)


def test_should_keep_long_names_within_63_characters(make_spec):
    from lora_operator.builders import Owner, job_name
    long = Owner(name="x" * 200, namespace="ns", uid="u")
    name = job_name(long.name, 12)
    assert len(name) <= 63 and name.endswith("-a12")
    assert name != job_name("x" * 199, 12)


def test_should_use_the_completion_index_as_rank_for_multi_node(owner, make_spec):
    job = _job(owner, make_spec(**{"resources.gpus": 4, "resources.nodes": 3}))
    pod = job["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 3
    assert command[command.index("--node_rank") + 1] == "$(JOB_COMPLETION_INDEX)"
    assert command[command.index("--master_addr") + 1] == "demo-a1-0.demo-workers"
    assert command[command.index("--nproc_per_node") + 1] == "4"
    assert command[command.index("--rdzv_conf") + 1] == "timeout=600"
    assert pod["subdomain"] == "demo-workers"


def test_should_run_one_gloo_process_per_pod_for_a_cpu_multi_node_job(owner, make_spec):
    job = _job(owner, make_spec(**{"resources.gpus": 0, "resources.nodes": 2}))
    container = job["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[command.index("--nproc_per_node") + 1] == "1"
    assert command[command.index("--nnodes") + 1] == "2"
    assert "resources" not in container or "nvidia.com/gpu" not in str(container["resources"])
    assert {"name": "LORA_COLLECTIVE_TIMEOUT_S", "value": "1800"} in container["env"]


def test_should_never_put_secret_values_in_the_configmap(owner, make_spec):
    data = build_configmap(owner, make_spec(), image=IMAGE, endpoint=ENDPOINT)["data"]["job.yaml"]
    manifest = yaml.safe_load(data)
    assert manifest["spec"]["storage"] == {"endpoint": ENDPOINT, "secretName": "s3-credentials"}
    assert manifest["spec"]["lora"]["rank"] == 16, "defaults should be resolved"
    assert manifest["spec"]["image"] == IMAGE
    assert "kubectl.kubernetes.io/last-applied-configuration" not in data


def test_should_lock_down_the_pod(owner, make_spec):
    pod = _job(owner, make_spec())["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp", "/etc/lora", "/var/lib/lora"}
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    secret_env = [e for e in container["env"] if "valueFrom" in e]
    assert {e["name"] for e in secret_env} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_should_size_the_work_volume_and_request_disk_from_the_spec_or_the_default(owner, make_spec):
    pod = _job(owner, make_spec(**{"resources.ephemeralStorage": "300Gi"}))["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["work"]["emptyDir"] == {"sizeLimit": "300Gi"} and volumes["tmp"]["emptyDir"]["sizeLimit"]
    assert pod["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "300Gi"
    default = _job(owner, make_spec(), ephemeral_storage="40Gi")["spec"]["template"]["spec"]
    assert default["containers"][0]["resources"]["requests"]["ephemeral-storage"] == "40Gi"


def test_should_fence_a_jobs_pods_to_each_other_dns_and_the_store(owner):
    policy = build_network_policy(owner, (443, 8333))["spec"]
    same_job = {"matchLabels": {"app.kubernetes.io/managed-by": "lora-operator", "training.lora.dev/job": "demo"}}
    assert policy["podSelector"] == same_job and policy["ingress"] == [{"from": [{"podSelector": same_job}]}]
    assert {"to": [{"podSelector": same_job}]} in policy["egress"]
    ports = [p for rule in policy["egress"] for p in rule.get("ports", [])]
    assert {(p["protocol"], p["port"]) for p in ports} == {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 8333)}
    assert all("to" not in r or r["to"] == [{"podSelector": same_job}] for r in policy["egress"])


def test_should_mount_pvc_claims_read_write_for_the_output_and_read_only_for_inputs(owner, make_spec):
    spec = make_spec(**{"output.uri": "pvc://results/run-1", "dataset.train": "pvc://datasets/t.jsonl",
                        "dataset.eval": "pvc://results/heldout.jsonl"})
    pod = _job(owner, spec)["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: (v["name"], v["persistentVolumeClaim"]["readOnly"])
              for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"datasets": ("pvc-0", True), "results": ("pvc-1", False)}
    container = pod["containers"][0]
    mounts = {m["mountPath"]: (m["name"], m["readOnly"]) for m in container["volumeMounts"] if m["name"].startswith("pvc-")}
    assert mounts == {"/mnt/pvc/datasets": ("pvc-0", True), "/mnt/pvc/results": ("pvc-1", False)}
    assert {"name": "LORA_PVC_ROOT", "value": "/mnt/pvc"} in container["env"]


def test_should_mount_no_claim_for_s3_only_specs(owner, make_spec):
    pod = _job(owner, make_spec())["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert "LORA_PVC_ROOT" not in str(pod["containers"][0]["env"])

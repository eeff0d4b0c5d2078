"""A shared cluster, tried as a hostile tenant: each attack of issue 13 against the real apiserver,
the real S3 server and the operator process, with the fake trainer (fake_trainer.py).
"""

from __future__ import annotations

import http.server
import threading
import time

import pytest
from ltj_cluster import GROUP, VERSION, apply, get, jobs, wait_for, wait_phase

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]


class Listener:
    """A local HTTP server that records every request's Authorization header and answers 403."""

    def __init__(self):
        self.auth: list[str] = []
        seen = self.auth

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append(self.headers.get("Authorization") or "")
                self.send_response(403)
                self.end_headers()

            do_PUT = do_HEAD = do_POST = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def listeners():
    made = []
    yield lambda: made.append(Listener()) or made[-1]
    for listener in made:
        listener.close()


def _condition(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def _events(api, namespace, name, reason):
    return [e for e in api["core"].list_namespaced_event(namespace).items
            if e.reason == reason and e.involved_object.name == name]


def test_should_never_sign_a_request_with_the_operators_key_for_a_tenants_endpoint(
        cluster, namespace, api, storage, operator_factory, listeners):
    refused, allowed = listeners(), listeners()
    api["core"].create_namespaced_secret(namespace, {"metadata": {"name": "tenant-s3"}, "stringData": {
        "AWS_ACCESS_KEY_ID": "tenant-key-id", "AWS_SECRET_ACCESS_KEY": "tenant-secret"}})
    operator_factory(LORA_S3_ACCESS_KEY_ID=cluster.s3_access_key, LORA_S3_SECRET_ACCESS_KEY=cluster.s3_secret_key,
                     LORA_ALLOWED_ENDPOINTS=allowed.url)
    apply(api, namespace, storage, name="evil", **{"storage.endpoint": refused.url})
    apply(api, namespace, storage, name="other", maxRetries=0,
          **{"storage.endpoint": allowed.url, "storage.secretName": "tenant-s3"})
    status = wait_phase(api, namespace, "Failed", name="evil", timeout=30)
    failed = _condition(status, "Failed")
    assert failed["reason"] == "PolicyViolation" and failed["message"].startswith("spec.storage.endpoint")
    assert not [j for j in jobs(api, namespace) if j.startswith("evil")]
    wait_phase(api, namespace, "Failed", name="other", timeout=60)
    wait_for(lambda: allowed.auth, 30, "a progress read from the allowed endpoint")
    time.sleep(2)  # a few more resyncs
    assert refused.auth == [], "nothing may be sent to an endpoint the policy refuses"
    assert all("Credential=tenant-key-id/" in a for a in allowed.auth), allowed.auth
    assert not any(cluster.s3_access_key in a for a in refused.auth + allowed.auth)


def test_should_not_reuse_the_orphaned_job_of_an_earlier_job_with_the_same_name(
        cluster, namespace, api, storage, operator_factory):
    operator_factory()
    apply(api, namespace, storage, annotations={"fake-trainer/steps": "2"})
    wait_phase(api, namespace, "Succeeded")
    old = api["batch"].read_namespaced_job("demo-a1", namespace)
    cluster.kubectl("delete", "ltj", "demo", "-n", namespace, "--cascade=orphan", "--wait=true")
    wait_for(lambda: not api["batch"].read_namespaced_job("demo-a1", namespace).metadata.owner_references,
             60, "the garbage collector to orphan the old Job")
    apply(api, namespace, storage, annotations={"fake-trainer/steps": "2"},
          **{"dataset.train": "s3://datasets/support/new.jsonl"})

    def conflicted():
        status = get(api, namespace).get("status") or {}
        return status if status.get("conditions") and _condition(status, "Admitted")["reason"] == "NameConflict" else None
    status = wait_for(conflicted, 30, "Admitted=False NameConflict")
    admitted = _condition(status, "Admitted")
    assert admitted["status"] == "False" and f"{namespace}/demo-config" in admitted["message"]
    assert status["phase"] not in ("Succeeded", "Failed") and not status.get("attempts")
    time.sleep(2)
    again = api["batch"].read_namespaced_job("demo-a1", namespace)
    assert again.metadata.uid == old.metadata.uid and not again.metadata.owner_references, "left untouched"
    config = api["core"].read_namespaced_config_map("demo-config", namespace).data["job.yaml"]
    assert "new.jsonl" not in config, "the old ConfigMap must not be overwritten"
    for kind in ("job", "configmap", "networkpolicy"):
        cluster.kubectl("delete", kind, "-l", "training.lora.dev/job=demo", "-n", namespace, "--wait=true")
    status = wait_phase(api, namespace, "Succeeded", timeout=90)
    new = api["batch"].read_namespaced_job("demo-a1", namespace)
    assert new.metadata.uid != old.metadata.uid
    assert new.metadata.owner_references[0].uid == get(api, namespace)["metadata"]["uid"]
    assert "new.jsonl" in api["core"].read_namespaced_config_map("demo-config", namespace).data["job.yaml"]


POISON = {
    "p-nan": ('"loss": NaN', "loss"),
    "p-inf": ('"etaSeconds": Infinity', "etaSeconds"),
    "p-step": ('"step": "3a"', "step"),
    "p-hashes": ('"datasetHashes": ["sha256:x"]', "datasetHashes"),
}


def test_should_finish_jobs_whose_progress_json_is_poisoned_and_say_what_was_dropped(
        namespace, api, storage, operator_factory):
    operator_factory()
    for name, (poison, _) in POISON.items():
        apply(api, namespace, storage, name=name,
              annotations={"fake-trainer/steps": "3", "fake-trainer/poison": poison})
    for name, (_, field) in POISON.items():
        status = wait_phase(api, namespace, "Succeeded", name=name, timeout=90)
        assert status["progress"]["totalSteps"] == 3
        warnings = _events(api, namespace, name, "InvalidProgress")
        assert warnings and all(e.type == "Warning" for e in warnings)
        assert any(e.message.startswith(f"{field}:") or f"; {field}:" in e.message for e in warnings), \
            [e.message for e in warnings]
        assert len({e.message for e in warnings}) == len(warnings), "each set of problems is told once"
    assert "loss" not in get(api, namespace, "p-nan")["status"]["progress"]
    assert get(api, namespace, "p-step")["status"]["progress"]["step"] == 0


def test_should_refuse_placement_and_sources_outside_the_policy_naming_the_field(
        namespace, api, storage, operator_factory):
    operator_factory(LORA_ALLOWED_BASE_MODEL_PREFIXES="s3://models/", LORA_ALLOWED_ENDPOINTS="http://other.example:9000",
                     LORA_ALLOWED_TOLERATIONS='[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]')
    cases = {
        "from-elsewhere": ({"storage.endpoint": "http://other.example:9000"}, "spec.baseModel.uri"),
        "tolerate-all": ({"resources.tolerations": [{"operator": "Exists"}]}, "spec.resources.tolerations[0]"),
        "preempt-others": ({"resources.priorityClassName": "system-cluster-critical"},
                           "spec.resources.priorityClassName"),
        "pick-a-node": ({"resources.nodeSelector": {"kubernetes.io/hostname": "gpu-7"}}, "spec.resources.nodeSelector"),
    }
    for name, (overrides, _) in cases.items():
        apply(api, namespace, storage, name=name, **overrides)
    apply(api, namespace, storage, name="allowed", annotations={"fake-trainer/steps": "1"},
          **{"resources.tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]})
    for name, (_, field) in cases.items():
        failed = _condition(wait_phase(api, namespace, "Failed", name=name, timeout=30), "Failed")
        assert failed["reason"] == "PolicyViolation" and failed["message"].startswith(field), failed
    wait_phase(api, namespace, "Succeeded", name="allowed", timeout=60)
    assert jobs(api, namespace) == ["allowed-a1"]


def test_should_refuse_names_children_cannot_use_and_keep_event_names_valid(
        cluster, namespace, api, storage, operator_factory):
    import yaml

    def manifest(name, nodes):
        return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRATrainingJob", "metadata": {"name": name},
                "spec": storage.spec_dict(**{"output.uri": f"s3://{storage.bucket}/x", "resources.nodes": nodes,
                                             "resources.gpus": 1})}
    for name in ("team.a-run", "1run"):
        proc = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest(name, 2)), check=False)
        assert proc.returncode != 0 and "metadata.name" in proc.stderr, proc.stderr
    operator_factory()
    long_name = "x" * 240 + "-run"
    apply(api, namespace, storage, name=long_name, annotations={"fake-trainer/steps": "1"})
    wait_phase(api, namespace, "Succeeded", name=long_name, timeout=60)
    events = [e for e in api["core"].list_namespaced_event(namespace).items if e.involved_object.name == long_name]
    assert {"AttemptStarted", "GatePassed"} <= {e.reason for e in events}
    assert all(len(e.metadata.name) <= 253 for e in events)


def test_should_start_the_next_attempt_only_after_the_last_ones_pod_is_gone(
        namespace, api, storage, operator_factory):
    operator_factory(LORA_TERMINATION_GRACE_SECONDS="20")
    apply(api, namespace, storage, annotations={"fake-trainer/steps": "12", "fake-trainer/step-seconds": "0.3",
                                                "fake-trainer/sigterm-seconds": "5"})
    selector = "batch.kubernetes.io/job-name=demo-a1"
    pod = wait_for(lambda: next((p for p in api["core"].list_namespaced_pod(namespace, label_selector=selector).items
                                 if p.status.phase == "Running"), None), 30, "a running pod")
    wait_for(lambda: ((get(api, namespace).get("status") or {}).get("progress") or {}).get("step", 0) >= 2, 30, "step 2")
    deleted = time.monotonic()
    api["core"].delete_namespaced_pod(pod.metadata.name, namespace)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        second = "demo-a2" in jobs(api, namespace)
        alive = [p for p in api["core"].list_namespaced_pod(namespace, label_selector=selector).items
                 if p.status.phase not in ("Succeeded", "Failed")]
        assert not (second and alive), "attempt 2 was created while attempt 1's pod still ran"
        if second:
            break
        time.sleep(0.1)
    assert second and time.monotonic() - deleted >= 4, "the old pod lingers 5 s after SIGTERM"
    status = wait_phase(api, namespace, "Succeeded", timeout=90)
    assert [a["jobName"] for a in status["attempts"]] == ["demo-a1", "demo-a2"]


def test_should_name_a_missing_secret_and_start_when_it_appears(cluster, namespace, api, storage, operator_factory):
    operator_factory()
    apply(api, namespace, storage, annotations={"fake-trainer/steps": "1"}, **{"storage.secretName": "team-s3"})

    def waiting():
        status = get(api, namespace).get("status") or {}
        return status if status.get("conditions") and _condition(status, "Admitted")["reason"] == "SecretNotFound" else None
    admitted = _condition(wait_for(waiting, 30, "SecretNotFound"), "Admitted")
    assert admitted["message"].startswith("spec.storage.secretName: Secret team-s3")
    assert jobs(api, namespace) == []
    api["core"].create_namespaced_secret(namespace, {"metadata": {"name": "team-s3"}, "stringData": {
        "AWS_ACCESS_KEY_ID": cluster.s3_access_key, "AWS_SECRET_ACCESS_KEY": cluster.s3_secret_key}})
    wait_phase(api, namespace, "Succeeded", timeout=60)


def test_should_name_a_missing_secret_from_the_pod_without_secret_access(cluster, namespace, api, storage,
                                                                         operator_factory):
    # The chart's default: the operator's own read-only keys, no `get secrets`.
    operator_factory(LORA_READ_JOB_SECRETS="false", LORA_S3_ACCESS_KEY_ID=cluster.s3_access_key,
                     LORA_S3_SECRET_ACCESS_KEY=cluster.s3_secret_key)
    apply(api, namespace, storage, annotations={"fake-trainer/steps": "1"}, **{"storage.secretName": "team-s3"})

    def waiting():
        status = get(api, namespace).get("status") or {}
        return status if status.get("conditions") and _condition(status, "Running")["reason"] == "SecretNotFound" else None
    running = _condition(wait_for(waiting, 45, "Running=False SecretNotFound"), "Running")
    assert "team-s3" in running["message"] and running["status"] == "False"
    assert any(e.reason == "SecretNotFound" for e in api["core"].list_namespaced_event(namespace).items)
    api["core"].create_namespaced_secret(namespace, {"metadata": {"name": "team-s3"}, "stringData": {
        "AWS_ACCESS_KEY_ID": cluster.s3_access_key, "AWS_SECRET_ACCESS_KEY": cluster.s3_secret_key}})
    wait_phase(api, namespace, "Succeeded", timeout=60)


def test_should_fence_each_job_with_its_own_network_policy(namespace, api, storage, operator_factory):
    from kubernetes import client

    operator_factory()
    apply(api, namespace, storage, annotations={"fake-trainer/steps": "1"})
    wait_phase(api, namespace, "Succeeded", timeout=60)
    policy = client.NetworkingV1Api(api["core"].api_client).read_namespaced_network_policy("demo-network", namespace)
    assert policy.metadata.owner_references[0].kind == "LoRATrainingJob"
    assert policy.spec.pod_selector.match_labels["training.lora.dev/job"] == "demo"
    assert [p.pod_selector.match_labels for p in policy.spec.ingress[0]._from] == [policy.spec.pod_selector.match_labels]
    job = api["batch"].read_namespaced_job("demo-a1", namespace)
    assert job.spec.template.spec.containers[0].resources.requests["ephemeral-storage"] == "100Gi"
    assert {v.name: v.empty_dir.size_limit for v in job.spec.template.spec.volumes if v.empty_dir}["work"] == "100Gi"

"""The reconcile pass against an in-memory API (no cluster): idempotence and what it writes."""

from __future__ import annotations

import copy
import threading

import pytest

from lora_operator.config import OperatorConfig, Policy
from lora_operator.handlers.reconcile import Reconciler
from lora_operator.observability.metrics import Metrics


class FakeKube:
    def __init__(self, ltj):
        self.ltj, self.objects, self.status_patches, self.events, self.quotas = ltj, {}, [], [], []
        self.secret_reads, self.secrets, self.pods, self.gets = 0, {"s3-credentials"}, {}, 0
        self.quota_lists = 0

    def get_ltj(self, namespace, name):
        self.gets += 1
        return copy.deepcopy(self.ltj)

    def list_jobs(self, namespace, labels):
        return [copy.deepcopy(o) for (kind, _), o in sorted(self.objects.items()) if kind == "Job"]

    def list_job_pods(self, namespace, job_name):
        return copy.deepcopy(self.pods.get(job_name, []))

    def create(self, manifest):
        key = (manifest["kind"], manifest["metadata"]["name"])
        if key not in self.objects:
            obj = copy.deepcopy(manifest)
            obj.setdefault("status", {})
            self.objects[key] = obj
        return copy.deepcopy(self.objects[key])

    def patch_job_suspend(self, namespace, name, suspend):
        self.objects[("Job", name)]["spec"]["suspend"] = suspend
        return copy.deepcopy(self.objects[("Job", name)])

    def list_quotas(self, namespace):
        self.quota_lists += 1
        return self.quotas

    def has_api_group(self, group):
        return False

    def secret_exists(self, namespace, name):
        return name in self.secrets

    def read_secret_keys(self, namespace, name, keys):
        self.secret_reads += 1
        return {"AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "very-secret"}

    def emit_event(self, owner, type_, reason, message):
        self.events.append((type_, reason, message))

    def patch_status(self, namespace, name, status):
        self.status_patches.append(status)
        self.ltj["status"] = {k: v for k, v in status.items() if v is not None}
        meta = self.ltj["metadata"]
        meta["resourceVersion"] = str(int(meta.get("resourceVersion") or 0) + 1)
        return copy.deepcopy(self.ltj)


class FakeStorage:
    def __init__(self):
        self.progress, self.reads = None, []

    def read_progress(self, endpoint, output_uri, access, secret):
        self.reads.append((endpoint, output_uri, access))
        return self.progress


@pytest.fixture
def world(make_spec_dict):
    ltj = {"apiVersion": "training.lora.dev/v1alpha1", "kind": "LoRATrainingJob",
           "metadata": {"name": "demo", "namespace": "ns", "uid": "u-1", "generation": 1,
                        "creationTimestamp": "2025-01-01T00:00:00Z"},
           "spec": make_spec_dict()}
    kube, storage = FakeKube(ltj), FakeStorage()

    def reconciler(**config):
        cfg = OperatorConfig(**{"s3_endpoint": "http://s3:8333", "progress_interval": 0, **config})
        return Reconciler(cfg, kube, storage, Metrics(), clock=lambda: "2025-01-01T00:00:05Z")
    return kube, storage, reconciler


def test_should_create_the_children_once_and_not_patch_an_unchanged_status(world):
    kube, _, make = world
    reconciler = make()
    reconciler.reconcile("ns", "demo")
    assert sorted(kube.objects) == [("ConfigMap", "demo-config"), ("Job", "demo-a1"), ("NetworkPolicy", "demo-network")]
    patches = len(kube.status_patches)
    make().reconcile("ns", "demo")  # a restarted operator
    reconciler.reconcile("ns", "demo")
    assert sorted(kube.objects) == [("ConfigMap", "demo-config"), ("Job", "demo-a1"), ("NetworkPolicy", "demo-network")]
    assert len(kube.status_patches) == patches, "nothing changed, so nothing should be patched"
    assert kube.ltj["status"]["phase"] == "Pending"


def test_should_create_config_and_network_policy_side_by_side_before_the_job_and_tell_the_start_once(world):
    kube, _, make = world
    both_in_flight = threading.Barrier(2, timeout=5)  # broken (the pass fails) if made one after the other
    order, create = [], kube.create

    def create_when_both_are_in_flight(manifest):
        if manifest["kind"] != "Job":
            both_in_flight.wait()
        order.append(manifest["kind"])
        return create(manifest)
    kube.create = create_when_both_are_in_flight
    make().reconcile("ns", "demo")
    assert sorted(order[:2]) == ["ConfigMap", "NetworkPolicy"] and order[2:] == ["Job"]
    told = [(reason, message) for _, reason, message in kube.events if reason in ("AttemptStarted", "JobCreated")]
    assert told == [("AttemptStarted", "Job demo-a1 (attempt 1)")], "one Event for the start, naming the Job"


def test_should_leave_a_starts_status_write_to_a_later_pass_with_the_same_body_when_asked(world):
    kube, _, make = world
    later = []
    reconciler = make()
    reconciler.later = lambda namespace, name, body: later.append((namespace, name, body))
    body = copy.deepcopy(kube.ltj)
    reconciler.reconcile("ns", "demo", body)
    assert ("Job", "demo-a1") in kube.objects and kube.status_patches == [] and kube.events == []
    assert [(ns, name) for ns, name, _ in later] == [("ns", "demo")]
    reconciler.reconcile("ns", "demo", later[0][2])  # the queued pass
    assert kube.gets == 0, "the start wrote nothing, so its body is current"
    assert len(kube.status_patches) == 1 and kube.ltj["status"]["attempts"][0]["jobName"] == "demo-a1"
    assert [r for _, r, _ in kube.events if r in ("AttemptStarted", "JobCreated")] == ["AttemptStarted"]
    assert len(later) == 1, "the queued pass starts nothing and queues nothing"


def test_should_create_no_job_when_its_network_policy_cannot_be_made(world):
    kube, _, make = world
    create = kube.create

    def refuse_network_policies(manifest):
        if manifest["kind"] == "NetworkPolicy":
            raise RuntimeError("admission webhook denied the request")
        return create(manifest)
    kube.create = refuse_network_policies
    with pytest.raises(RuntimeError, match="webhook"):
        make().reconcile("ns", "demo")
    assert ("Job", "demo-a1") not in kube.objects, "its pods would run unfenced"


def test_should_read_progress_with_the_jobs_secret_and_keep_it_out_of_status_and_events(world):
    kube, storage, make = world
    storage.progress = {"jobUid": "u-1", "state": "Training", "step": 3, "totalSteps": 10}
    kube.objects = {}
    reconciler = make()
    reconciler.reconcile("ns", "demo")
    kube.objects[("Job", "demo-a1")]["status"] = {"active": 1, "startTime": "2025-01-01T00:00:02Z"}
    reconciler.reconcile("ns", "demo")
    assert kube.ltj["status"]["phase"] == "Training" and kube.ltj["status"]["progress"]["summary"] == "3/10"
    assert storage.reads[-1] == ("http://s3:8333", "s3://artifacts/demo", "ak")
    assert "very-secret" not in str(kube.ltj) + str(kube.events) + str(kube.objects)


def test_should_use_the_operators_own_credentials_when_configured(world):
    kube, storage, make = world
    reconciler = make(s3_access_key="own", s3_secret_key="own-secret")
    reconciler.reconcile("ns", "demo")
    assert storage.reads == [], "the pass that creates the Job has nothing to read yet"
    reconciler.reconcile("ns", "demo")
    assert kube.secret_reads == 0 and storage.reads[-1][2] == "own"


def test_should_create_nothing_for_a_policy_violation(world):
    kube, _, make = world
    make(policy=Policy(max_gpus_per_job=0, allowed_images=("ghcr.io/ok/",))).reconcile("ns", "demo")
    assert kube.objects == {}
    assert kube.ltj["status"]["phase"] == "Failed"
    assert ("Warning", "PolicyViolation") in [(t, r) for t, r, _ in kube.events]


def test_should_suspend_and_resume_the_live_job(world):
    kube, _, make = world
    reconciler = make()
    reconciler.reconcile("ns", "demo")
    kube.ltj["spec"]["suspend"], kube.ltj["metadata"]["generation"] = True, 2
    reconciler.reconcile("ns", "demo")
    assert kube.objects[("Job", "demo-a1")]["spec"]["suspend"] is True
    assert kube.ltj["status"]["phase"] == "Suspended" and kube.ltj["status"]["observedGeneration"] == 2
    kube.ltj["spec"]["suspend"], kube.ltj["metadata"]["generation"] = False, 3
    reconciler.reconcile("ns", "demo")
    assert kube.objects[("Job", "demo-a1")]["spec"]["suspend"] is False


def test_should_wait_on_a_full_quota_without_creating_a_job(world):
    kube, _, make = world
    kube.quotas = [{"metadata": {"name": "gpu"}, "status": {"hard": {"requests.nvidia.com/gpu": "0"}}}]
    make().reconcile("ns", "demo")
    assert kube.objects == {}
    assert kube.ltj["status"]["phase"] == "Queued"


def _run(kube, reconciler, active=1):
    reconciler.reconcile("ns", "demo")
    kube.objects[("Job", "demo-a1")]["status"] = {"active": active, "ready": active,
                                                  "startTime": "2025-01-01T00:00:02Z"}
    reconciler.reconcile("ns", "demo")


def test_should_read_progress_on_every_resync_even_when_the_pass_comes_a_little_early(world, monkeypatch):
    """A resync pass (every interval) that the queue delivers a few seconds early still reads; a
    pass well inside the interval (a Job event) does not."""
    from lora_operator.handlers import reconcile as rec

    kube, storage, make = world
    storage.progress = {"jobUid": "u-1", "state": "Training", "step": 3, "totalSteps": 10}
    now = [1000.0]
    monkeypatch.setattr(rec.time, "monotonic", lambda: now[0])
    reconciler = make(progress_interval=30)
    reconciler.reconcile("ns", "demo")  # the start: no read for one interval
    kube.objects[("Job", "demo-a1")]["status"] = {"active": 1, "startTime": "2025-01-01T00:00:02Z"}
    reads = []
    for at in (1028.0, 1040.0, 1055.0, 1083.0):  # resyncs 2 s early / a Job event / 2 s early again
        now[0] = at
        reconciler.reconcile("ns", "demo")
        reads.append(len(storage.reads))
    assert reads == [1, 1, 2, 3], "one read per resync, none for the pass 12 s after a read"


def test_should_drop_invalid_progress_fields_report_them_once_and_still_write_status(world):
    kube, storage, make = world
    storage.progress = {"jobUid": "u-1", "state": "Training", "step": "3a", "totalSteps": 10,
                        "loss": float("nan"), "etaSeconds": float("inf"), "datasetHashes": ["x"]}
    reconciler = make()
    _run(kube, reconciler)
    reconciler.reconcile("ns", "demo")
    status = kube.ltj["status"]
    assert status["phase"] == "Training" and status["progress"]["summary"] == "0/10"
    assert "loss" not in status["progress"] and "etaSeconds" not in status["progress"]
    warnings = [m for t, r, m in kube.events if r == "InvalidProgress"]
    assert len(warnings) == 1, "the same problems are told once"
    assert all(f in warnings[0] for f in ("step", "loss", "etaSeconds", "datasetHashes"))


def test_should_not_use_a_progress_json_written_for_another_job(world):
    kube, storage, make = world
    storage.progress = {"jobUid": "someone-else", "state": "Succeeded", "step": 9, "totalSteps": 9}
    _run(kube, make())
    assert kube.ltj["status"]["phase"] == "Training" and "progress" not in kube.ltj["status"]
    assert any(r == "InvalidProgress" and "someone-else" in m for _, r, m in kube.events)


def test_should_send_its_own_keys_only_to_its_own_endpoint(world):
    kube, storage, make = world
    kube.ltj["spec"]["storage"]["endpoint"] = "https://other.example"
    _run(kube, make(s3_access_key="own", s3_secret_key="own-secret", policy=Policy(
        allowed_endpoints=("https://other.example/",))))
    assert storage.reads and {r[0] for r in storage.reads} == {"https://other.example"}
    assert {r[2] for r in storage.reads} == {"ak"}, "the job's own Secret, never the operator's key"
    kube.ltj["spec"]["storage"]["secretName"] = None
    make(s3_access_key="own", s3_secret_key="own-secret", policy=Policy(
        allowed_endpoints=("https://other.example",))).reconcile("ns", "demo")
    assert storage.reads[-1][2] is None


def test_should_refuse_an_endpoint_that_is_not_allowed_without_reading_anything(world):
    kube, storage, make = world
    kube.ltj["spec"]["storage"]["endpoint"] = "http://attacker.example:9000"
    make(s3_access_key="own", s3_secret_key="own-secret").reconcile("ns", "demo")
    failed = next(c for c in kube.ltj["status"]["conditions"] if c["type"] == "Failed")
    assert (failed["reason"], failed["message"].split(":")[0]) == ("PolicyViolation", "spec.storage.endpoint")
    assert storage.reads == [] and kube.objects == {}


def test_should_never_use_a_child_that_another_owner_holds(world):
    kube, _, make = world
    kube.objects[("ConfigMap", "demo-config")] = {"kind": "ConfigMap", "metadata": {
        "name": "demo-config", "namespace": "ns", "ownerReferences": [
            {"kind": "LoRATrainingJob", "name": "demo", "uid": "old-uid"}]}, "data": {"job.yaml": "old"}}
    make().reconcile("ns", "demo")
    assert ("Job", "demo-a1") not in kube.objects
    assert kube.objects[("ConfigMap", "demo-config")]["data"] == {"job.yaml": "old"}, "nothing is overwritten"
    admitted = next(c for c in kube.ltj["status"]["conditions"] if c["type"] == "Admitted")
    assert (admitted["status"], admitted["reason"]) == ("False", "NameConflict")
    assert "ConfigMap ns/demo-config" in admitted["message"] and "old-uid" in admitted["message"]
    del kube.objects[("ConfigMap", "demo-config")]
    make().reconcile("ns", "demo")
    assert ("Job", "demo-a1") in kube.objects, "starts once the name is free"


def test_should_start_the_next_attempt_only_when_the_last_ones_pods_are_gone(world):
    kube, _, make = world
    reconciler = make()
    reconciler.reconcile("ns", "demo")
    kube.objects[("Job", "demo-a1")]["status"] = {"terminating": 1, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    kube.pods["demo-a1"] = [{"metadata": {"name": "demo-a1-x", "deletionTimestamp": "t"},
                             "status": {"phase": "Running"}}]
    reconciler.reconcile("ns", "demo")
    assert ("Job", "demo-a2") not in kube.objects
    admitted = next(c for c in kube.ltj["status"]["conditions"] if c["type"] == "Admitted")
    assert admitted["reason"] == "PodsTerminating" and "attempt 2 starts when" in admitted["message"]
    kube.objects[("Job", "demo-a1")]["status"]["terminating"] = 0
    kube.pods["demo-a1"] = []
    reconciler.reconcile("ns", "demo")
    assert ("Job", "demo-a2") in kube.objects


def test_should_name_a_missing_secret_and_start_when_it_appears(world):
    kube, _, make = world
    kube.secrets = set()
    make().reconcile("ns", "demo")
    admitted = next(c for c in kube.ltj["status"]["conditions"] if c["type"] == "Admitted")
    assert (admitted["reason"], admitted["message"].split(":")[0]) == ("SecretNotFound", "spec.storage.secretName")
    assert kube.objects == {}
    kube.secrets = {"s3-credentials"}
    make().reconcile("ns", "demo")
    assert ("Job", "demo-a1") in kube.objects


def test_should_name_a_missing_secret_from_the_pod_when_it_may_not_read_secrets(world):
    kube, _, make = world
    reconciler = make(read_job_secrets=False)
    reconciler.reconcile("ns", "demo")
    kube.objects[("Job", "demo-a1")]["status"] = {"active": 1, "ready": 0}
    kube.pods["demo-a1"] = [{"metadata": {"name": "demo-a1-x"}, "status": {"phase": "Pending", "containerStatuses": [
        {"state": {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "s3-credentials" not found'}}}]}}]
    reconciler.reconcile("ns", "demo")
    running = next(c for c in kube.ltj["status"]["conditions"] if c["type"] == "Running")
    assert running["reason"] == "SecretNotFound" and "s3-credentials" in running["message"]


def test_should_forget_the_memory_of_deleted_jobs(world):
    kube, storage, make = world
    storage.progress = {"jobUid": "u-1", "state": "Training"}
    reconciler = make()
    _run(kube, reconciler)
    assert reconciler._progress and reconciler._locks
    kube.ltj = None
    reconciler.reconcile("ns", "demo")
    assert not reconciler._progress and not reconciler._locks


def test_should_pass_on_a_held_body_unless_it_is_older_than_its_last_status_write(world):
    """The resync's LIST body saves the GET; one listed before our last write is stale: GET."""
    kube, _, make = world
    reconciler = make()
    kube.ltj["metadata"]["resourceVersion"] = "10"
    listed = copy.deepcopy(kube.ltj)
    reconciler.reconcile("ns", "demo", listed)  # creates the Job and writes status (rv 11)
    assert kube.gets == 0 and kube.ltj["metadata"]["resourceVersion"] == "11"
    reconciler.reconcile("ns", "demo", listed)  # rv 10: written before our status, so not used
    assert kube.gets == 1
    reconciler.reconcile("ns", "demo", copy.deepcopy(kube.ltj))  # as new as our write: used
    assert kube.gets == 1
    assert sorted(kube.objects) == [("ConfigMap", "demo-config"), ("Job", "demo-a1"), ("NetworkPolicy", "demo-network")]


def test_should_not_list_quotas_for_a_job_without_gpus(world, make_spec_dict):
    kube, _, make = world
    kube.ltj["spec"] = make_spec_dict(**{"resources.gpus": 0})
    make().reconcile("ns", "demo")
    assert kube.quota_lists == 0 and ("Job", "demo-a1") in kube.objects

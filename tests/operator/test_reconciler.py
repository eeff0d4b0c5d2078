"""The reconcile pass against an in-memory API (no cluster): idempotence and what it writes."""

from __future__ import annotations

import copy

import pytest

from lora_operator.config import OperatorConfig, Policy
from lora_operator.handlers.reconcile import Reconciler
from lora_operator.observability.metrics import Metrics


class FakeKube:
    def __init__(self, ltj):
        self.ltj, self.objects, self.status_patches, self.events, self.quotas = ltj, {}, [], [], []
        self.secret_reads = 0

    def get_ltj(self, namespace, name):
        return copy.deepcopy(self.ltj)

    def list_jobs(self, namespace, labels):
        return [copy.deepcopy(o) for (kind, _), o in sorted(self.objects.items()) if kind == "Job"]

    def list_job_pods(self, namespace, job_name):
        return []

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
        return self.quotas

    def has_api_group(self, group):
        return False

    def read_secret_keys(self, namespace, name, keys):
        self.secret_reads += 1
        return {"AWS_ACCESS_KEY_ID": "ak", "AWS_SECRET_ACCESS_KEY": "very-secret"}

    def emit_event(self, owner, type_, reason, message):
        self.events.append((type_, reason, message))

    def patch_status(self, namespace, name, status):
        self.status_patches.append(status)
        self.ltj["status"] = {k: v for k, v in status.items() if v is not None}


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
        cfg = OperatorConfig(s3_endpoint="http://s3:8333", progress_interval=0, **config)
        return Reconciler(cfg, kube, storage, Metrics(), clock=lambda: "2025-01-01T00:00:05Z")
    return kube, storage, reconciler


def test_should_create_the_children_once_and_not_patch_an_unchanged_status(world):
    kube, _, make = world
    reconciler = make()
    reconciler.reconcile("ns", "demo")
    assert sorted(kube.objects) == [("ConfigMap", "demo-config"), ("Job", "demo-a1")]
    patches = len(kube.status_patches)
    make().reconcile("ns", "demo")  # a restarted operator
    reconciler.reconcile("ns", "demo")
    assert sorted(kube.objects) == [("ConfigMap", "demo-config"), ("Job", "demo-a1")]
    assert len(kube.status_patches) == patches, "nothing changed, so nothing should be patched"
    assert kube.ltj["status"]["phase"] == "Pending"


def test_should_read_progress_with_the_jobs_secret_and_keep_it_out_of_status_and_events(world):
    kube, storage, make = world
    storage.progress = {"state": "Training", "step": 3, "totalSteps": 10}
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

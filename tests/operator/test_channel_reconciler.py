"""The channel pass against in-memory fakes: what happens when storage or the ConfigMap say no."""

from __future__ import annotations

import copy

import pytest

from lora_operator.clients.storage import StorageError
from lora_operator.config import OperatorConfig
from lora_operator.handlers.channel import ChannelReconciler

REV = "sha256:" + "0" * 64
ROOT = "s3://platform/channels"
POINTER = f"{ROOT}/ns/prod/current.json"


def ltj(name):
    return {"metadata": {"name": name, "namespace": "ns", "uid": f"uid-{name}"},
            "spec": {"baseModel": {"uri": "s3://models/base", "revision": REV},
                     "dataset": {"train": "s3://data/train.jsonl"}, "output": {"uri": f"s3://team/{name}"},
                     "storage": {"secretName": "team-s3"}},
            "status": {"phase": "Succeeded", "evaluation": {"verdict": "Passed"}}}


def metadata(name):
    return {"schemaVersion": 1, "runId": f"run-{name}", "baseModel": {"uri": "s3://models/base", "revision": REV},
            "artifacts": {"adapter": f"s3://team/{name}/adapter"},
            "eval": {"base": {"loss": 2.0}, "adapter": {"loss": 1.0}, "gate": {"verdict": "Passed"}}}


class FakeKube:
    def __init__(self):
        self.channel = {"metadata": {"name": "prod", "namespace": "ns", "uid": "c-1", "generation": 1},
                        "spec": {"jobName": "v1", "baseModel": {"uri": "s3://models/base", "revision": REV},
                                 "vllm": {"configMapName": "pool"}}}
        self.jobs = {"v1": ltj("v1"), "v2": ltj("v2")}
        self.configmaps, self.patches, self.events, self.secret_reads = {}, [], [], []

    def get_channel(self, namespace, name):
        return copy.deepcopy(self.channel)

    def list_channels(self, namespaces):
        return [copy.deepcopy(self.channel)]

    def patch_channel_status(self, namespace, name, status):
        self.patches.append(status)
        self.channel["status"] = {k: v for k, v in status.items() if v is not None}

    def get_ltj(self, namespace, name):
        return copy.deepcopy(self.jobs.get(name))

    def read_secret_keys(self, namespace, name, keys):
        self.secret_reads.append(name)
        return {"AWS_ACCESS_KEY_ID": "tenant", "AWS_SECRET_ACCESS_KEY": "tenant-secret"}

    def get_configmap(self, namespace, name):
        return copy.deepcopy(self.configmaps.get(name))

    def create(self, manifest):
        self.configmaps[manifest["metadata"]["name"]] = {**copy.deepcopy(manifest), "metadata": {
            **manifest["metadata"], "resourceVersion": "1"}}
        return manifest

    def replace_configmap(self, manifest, resource_version):
        assert self.configmaps[manifest["metadata"]["name"]]["metadata"]["resourceVersion"] == resource_version
        self.create(manifest)
        return manifest

    def emit_event(self, owner, type_, reason, message):
        self.events.append((type_, reason, message))


class FakeStorage:
    def __init__(self):
        self.objects = {f"s3://team/{n}/lora-metadata.json": metadata(n) for n in ("v1", "v2")}
        self.fail_puts, self.reads = False, []

    def get_json(self, endpoint, uri, access, secret):
        self.reads.append((uri, access))
        value = self.objects.get(uri)
        if isinstance(value, Exception):
            raise value
        return copy.deepcopy(value)

    def put_json(self, endpoint, uri, document, access, secret):
        if self.fail_puts:
            raise StorageError(f"{uri}: AccessDenied")
        self.objects[uri] = copy.deepcopy(document)


@pytest.fixture
def world():
    kube, storage = FakeKube(), FakeStorage()
    config = OperatorConfig(s3_endpoint="http://s3:8333", s3_access_key="platform", s3_secret_key="p",
                            channel_root=ROOT)
    return kube, storage, ChannelReconciler(config, kube, storage, clock=lambda: "2026-01-01T00:00:00Z")


def test_should_promote_once_and_then_patch_nothing_on_an_unchanged_world(world):
    kube, storage, rec = world
    status = rec.reconcile("ns", "prod")
    assert status["phase"] == "Live" and storage.objects[POINTER]["live"]["jobName"] == "v1"
    assert [e[1] for e in kube.events] == ["Promoted", "SyncerUpdated"]
    rec.reconcile("ns", "prod")
    assert len(kube.patches) == 1 and len(kube.events) == 2, "level-based: nothing changed, nothing written"


def test_should_read_the_jobs_metadata_with_the_tenants_secret_and_write_the_pointer_with_its_own(world):
    kube, storage, rec = world
    rec.reconcile("ns", "prod")
    assert kube.secret_reads == ["team-s3"]
    assert ("s3://team/v1/lora-metadata.json", "tenant") in storage.reads
    assert (POINTER, "platform") in storage.reads


def test_should_leave_the_old_pointer_and_configmap_when_the_pointer_write_fails(world):
    kube, storage, rec = world
    rec.reconcile("ns", "prod")
    pointer, configmap = copy.deepcopy(storage.objects[POINTER]), copy.deepcopy(kube.configmaps["pool"])
    storage.fail_puts = True
    kube.channel["spec"]["jobName"] = "v2"
    status = rec.reconcile("ns", "prod")
    assert status["phase"] == "Failed" and status["live"]["jobName"] == "v1"
    assert next(c for c in status["conditions"] if c["type"] == "Promoted")["reason"] == "StorageError"
    assert storage.objects[POINTER] == pointer and kube.configmaps["pool"] == configmap
    assert [e[1] for e in kube.events].count("Promoted") == 1
    storage.fail_puts = False
    assert rec.reconcile("ns", "prod")["live"]["jobName"] == "v2", "retried on the next pass"


def test_should_not_overwrite_a_pointer_it_cannot_read_or_parse(world):
    kube, storage, rec = world
    storage.objects[POINTER] = StorageError(f"{POINTER}: not JSON")
    assert rec.reconcile("ns", "prod")["phase"] == "Failed"
    storage.objects[POINTER] = {"schemaVersion": 1, "something": "else"}
    status = rec.reconcile("ns", "prod")
    promoted = next(c for c in status["conditions"] if c["type"] == "Promoted")
    assert status["phase"] == "Failed" and "not overwritten" in promoted["message"]
    assert storage.objects[POINTER] == {"schemaVersion": 1, "something": "else"} and not kube.configmaps


def test_should_not_take_over_a_configmap_someone_else_made(world):
    kube, storage, rec = world
    kube.configmaps["pool"] = {"metadata": {"name": "pool", "labels": {"app": "vllm"}, "resourceVersion": "7"},
                               "data": {"configmap.yaml": "mine"}}
    status = rec.reconcile("ns", "prod")
    assert status["phase"] == "Failed" and status["live"]["jobName"] == "v1"
    assert next(c for c in status["conditions"] if c["type"] == "SyncerUpdated")["reason"] == "ConfigMapNotManaged"
    assert kube.configmaps["pool"]["data"] == {"configmap.yaml": "mine"}


def test_should_report_a_missing_channel_root_instead_of_writing_anywhere(world):
    kube, storage, _ = world
    rec = ChannelReconciler(OperatorConfig(s3_endpoint="http://s3:8333"), kube, storage, clock=lambda: "t")
    assert rec.reconcile("ns", "prod")["phase"] == "Failed"
    assert POINTER not in storage.objects and not kube.configmaps

"""Small fixture factories for the operator tests (no big YAML fixtures)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ltj_cluster import ROOT, Operator
from overrides import with_overrides

from lora_operator.api import parse_spec
from lora_operator.builders import Owner

BASE_SPEC: dict[str, Any] = {
    "baseModel": {"uri": "s3://models/tiny-base", "revision": "sha256:" + "0" * 64},
    "dataset": {"train": "s3://datasets/support/train.jsonl"},
    "output": {"uri": "s3://artifacts/demo"},
    "storage": {"secretName": "s3-credentials"},
}


def spec_dict(**overrides: Any) -> dict[str, Any]:
    """BASE_SPEC with dotted-path overrides: spec_dict(**{"resources.gpus": 0})."""
    return with_overrides(BASE_SPEC, **overrides)


@pytest.fixture
def make_spec_dict():
    return spec_dict


@pytest.fixture
def make_spec():
    return lambda **overrides: parse_spec(spec_dict(**overrides))


@pytest.fixture
def owner():
    return Owner(name="demo", namespace="team-a", uid="11111111-2222-3333-4444-555555555555",
                 labels={"team": "support"},
                 annotations={"kubectl.kubernetes.io/last-applied-configuration": "{...}", "note": "kept"})


# ---- the operator against a real control plane (helpers: tests/ltj_cluster.py)

@pytest.fixture(scope="module")
def crd(cluster):
    path = ROOT / "crds" / "training.lora.dev_loratrainingjobs.yaml"
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/loratrainingjobs.training.lora.dev")


@pytest.fixture
def api(cluster):
    from kubernetes import client

    api_client = cluster.api_client()
    return {"custom": client.CustomObjectsApi(api_client), "batch": client.BatchV1Api(api_client),
            "core": client.CoreV1Api(api_client)}


@pytest.fixture
def operator_factory(cluster, namespace, crd, tmp_path):
    started = []

    def start(**env):
        op = Operator(cluster, namespace, tmp_path / "operator.log", **env).start()
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()
    log = tmp_path / "operator.log"
    if log.exists():
        print(log.read_text()[-5000:])


@pytest.fixture
def storage(cluster, namespace, s3, api, make_spec_dict):
    """The job's bucket and the Secret the trainer (and the operator) read credentials from."""
    s3.client.make_bucket(s3.bucket)
    api["core"].create_namespaced_secret(namespace, {
        "metadata": {"name": "s3-credentials"},
        "stringData": {"AWS_ACCESS_KEY_ID": cluster.s3_access_key, "AWS_SECRET_ACCESS_KEY": cluster.s3_secret_key}})
    return SimpleNamespace(client=s3.client, bucket=s3.bucket, spec_dict=make_spec_dict)


@pytest.fixture
def least_privilege_kubeconfig(cluster, namespace, api, tmp_path):
    """A kubeconfig for a ServiceAccount bound to exactly config.RBAC_RULES."""
    import yaml

    from lora_operator.config import RBAC_RULES

    name = f"lora-operator-{namespace}"[:63]
    api["core"].create_namespaced_service_account(namespace, {"metadata": {"name": "lora-operator"}})
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": name},
         "rules": [dict(rule) for rule in RBAC_RULES]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": name},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
         "subjects": [{"kind": "ServiceAccount", "name": "lora-operator", "namespace": namespace}]}]))
    token = cluster.kubectl("create", "token", "lora-operator", "-n", namespace, "--duration=1h").stdout.strip()
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    path = tmp_path / "operator.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    yield str(path)
    cluster.kubectl("delete", "clusterrolebinding,clusterrole", name, check=False)

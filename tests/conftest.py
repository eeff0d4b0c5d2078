"""Shared fixtures.

``cluster`` starts the local control plane (hack/localcluster.py: etcd, kube-apiserver,
kube-controller-manager, SeaweedFS S3, and a pod runner that plays kubelet for one GPU node).
The first run builds the binaries (minutes); later sessions start in seconds. A cluster that the
tests started is stopped when the last concurrent pytest session using it ends, unless
``LORA_KEEP_CLUSTER=1``; a cluster that was already running is left running.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LOCAL = Path(os.environ.get("LORA_LOCAL_DIR", REPO / ".local"))
LOCALCLUSTER = REPO / "hack" / "localcluster.py"


def _read_env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@dataclass(frozen=True)
class LocalCluster:
    kubeconfig: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    kubectl_bin: str

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses (operator, trainer, kubectl) talking to this cluster."""
        return {**os.environ, "KUBECONFIG": self.kubeconfig, "S3_ENDPOINT": self.s3_endpoint,
                "AWS_ACCESS_KEY_ID": self.s3_access_key, "AWS_SECRET_ACCESS_KEY": self.s3_secret_key}

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run([self.kubectl_bin, *args], input=input, capture_output=True, text=True,
                              env=self.env, check=False, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}{proc.stderr}")
        return proc

    def api_client(self):
        from kubernetes import config

        return config.new_client_from_config(config_file=self.kubeconfig)


def _kubectl_path() -> str:
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    for candidate in ([Path(assets) / "kubectl"] if assets else []) + [venv_kubectl]:
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("kubectl")
    if not found:
        pytest.skip("kubectl not found (pip install -e '.[dev]')")
    return found


def local_cluster(local: Path, *up_args: str):
    """Start (or join) the stack in ``local``; stop it when the last pytest session using it ends,
    if a session started it. A generator for fixtures: yields a LocalCluster."""
    env = {**os.environ, "LORA_LOCAL_DIR": str(local)}
    cmd = [sys.executable, str(LOCALCLUSTER)]
    was_up = subprocess.run([*cmd, "status"], capture_output=True, check=False, env=env).returncode == 0
    subprocess.run([*cmd, "up", *up_args], check=True, env=env)
    sessions = local / "sessions"  # concurrent pytest sessions share one cluster
    sessions.mkdir(exist_ok=True)
    me = sessions / str(os.getpid())
    me.touch()
    if not was_up:
        (sessions / "owned").touch()  # started by tests: the last session out stops it
    s3 = _read_env_file(local / "s3.env")
    yield LocalCluster(kubeconfig=str(local / "kubeconfig"), s3_endpoint=s3["S3_ENDPOINT"],
                       s3_access_key=s3["AWS_ACCESS_KEY_ID"], s3_secret_key=s3["AWS_SECRET_ACCESS_KEY"],
                       kubectl_bin=_kubectl_path())
    me.unlink(missing_ok=True)
    others = [p for p in sessions.iterdir() if p.name.isdigit() and Path(f"/proc/{p.name}").exists()]
    owned = sessions / "owned"
    if owned.exists() and not others and os.environ.get("LORA_KEEP_CLUSTER") != "1":
        owned.unlink(missing_ok=True)
        subprocess.run([*cmd, "down"], check=False, env=env)


@pytest.fixture(scope="session")
def cluster() -> LocalCluster:
    yield from local_cluster(LOCAL)


@pytest.fixture(scope="session")
def kueue_cluster() -> LocalCluster:
    """A second stack, with real Kueue (`up --kueue`), so `cluster` stays without it."""
    yield from local_cluster(LOCAL / "kueue-stack", "--kueue")


@pytest.fixture
def namespace(cluster: LocalCluster, request: pytest.FixtureRequest) -> str:
    """A fresh namespace (with its default ServiceAccount ready); deleted afterwards."""
    stem = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{stem}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", name)
    deadline = time.monotonic() + 30
    while cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode:
        assert time.monotonic() < deadline, f"default ServiceAccount never appeared in {name}"
        time.sleep(0.1)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@dataclass(frozen=True)
class S3:
    client: object  # minio.Minio
    bucket: str  # a fresh name; not created


@pytest.fixture
def s3(cluster: LocalCluster) -> S3:
    """A minio client for the cluster's S3 and a fresh bucket name; the bucket is removed after."""
    from minio import Minio

    endpoint = cluster.s3_endpoint.split("://", 1)[1]
    client = Minio(endpoint, access_key=cluster.s3_access_key, secret_key=cluster.s3_secret_key,
                   secure=False)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    yield S3(client=client, bucket=bucket)
    if client.bucket_exists(bucket):
        for obj in client.list_objects(bucket, recursive=True):
            client.remove_object(bucket, obj.object_name)
        client.remove_bucket(bucket)

"""The local control plane behaves like a real cluster where our operator depends on it."""

from __future__ import annotations

import io
import json
import re
import ssl
import urllib.error
import urllib.request
import uuid

import pytest

pytestmark = pytest.mark.cluster


def test_version_reports_the_built_kubernetes_release(cluster):
    server = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert re.fullmatch(r"v1\.\d+\.\d+", server["gitVersion"]), server
    assert server["major"] == "1" and int(server["minor"]) >= 30


def test_rbac_forbids_a_serviceaccount_without_rolebinding_to_list_secrets(cluster, namespace):
    sa = f"system:serviceaccount:{namespace}:default"
    proc = cluster.kubectl("auth", "can-i", "list", "secrets", "-n", namespace, f"--as={sa}", check=False)
    assert proc.stdout.strip() == "no"
    server = cluster.kubectl("config", "view", "-o", "jsonpath={.clusters[0].cluster.server}").stdout
    insecure = ssl._create_unverified_context()  # only the anonymous probe skips verification
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{server}/api/v1/namespaces/{namespace}/secrets", context=insecure)
    assert err.value.code in (401, 403)
    assert cluster.kubectl("auth", "can-i", "list", "secrets", "-n", namespace).stdout.strip() == "yes"


def test_job_controller_creates_a_pod_that_runs_to_completion(cluster, namespace):
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "hello"},
           "spec": {"backoffLimit": 0, "template": {"spec": {
               "restartPolicy": "Never",
               "containers": [{"name": "main", "image": "unused",
                               "command": ["sh", "-c", "echo hello"]}]}}}}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Complete", "job/hello", "--timeout=60s")
    pods = json.loads(cluster.kubectl("get", "pods", "-n", namespace, "-l", "job-name=hello",
                                      "-o", "json").stdout)["items"]
    assert [p["status"]["phase"] for p in pods] == ["Succeeded"]
    assert pods[0]["spec"]["nodeName"] == "local-gpu-node"


def test_deleting_a_namespace_removes_it_and_its_objects(cluster):
    ns = f"doomed-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("create", "configmap", "c", "-n", ns, "--from-literal=a=b")
    cluster.kubectl("delete", "namespace", ns, "--wait=false")
    cluster.kubectl("wait", "--for=delete", f"namespace/{ns}", "--timeout=60s")


def test_node_advertises_eight_gpus(cluster):
    node = json.loads(cluster.kubectl("get", "node", "local-gpu-node", "-o", "json").stdout)
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True"
    assert not node["spec"].get("taints")


def test_s3_refuses_anonymous_writes(cluster, s3):
    s3.client.make_bucket(s3.bucket)
    req = urllib.request.Request(f"{cluster.s3_endpoint}/{s3.bucket}/anon.txt", data=b"x", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 403


def test_s3_with_credentials_creates_buckets_and_round_trips_objects(s3):
    s3.client.make_bucket(s3.bucket)
    s3.client.put_object(s3.bucket, "dir/hello.txt", io.BytesIO(b"hello"), 5)
    assert s3.client.get_object(s3.bucket, "dir/hello.txt").read() == b"hello"

"""The local pod runner (hack/podrunner.py) runs pods the way a kubelet would, as local processes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster


def pod(name: str, command: list[str], **spec) -> dict:
    container = {"name": "main", "image": "unused", "command": command}
    container.update(spec.pop("container", {}))
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "containers": [container], **spec}}


def create(cluster, namespace: str, *objects: dict) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)}))


def get_pod(cluster, namespace: str, name: str) -> dict | None:
    proc = cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


def wait_terminal(cluster, namespace: str, name: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        p = get_pod(cluster, namespace, name)
        if p and p["status"].get("phase") in ("Succeeded", "Failed"):
            return p
        assert time.monotonic() < deadline, f"pod {name} not terminal: {p and p['status']}"
        time.sleep(0.2)


def wait_file(path: Path, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    return path.read_text()


def terminated(p: dict) -> dict:
    return p["status"]["containerStatuses"][0]["state"]["terminated"]


def test_env_from_secret_and_configmap_reaches_the_process(cluster, namespace):
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
              "stringData": {"token": "s3cr3t", "user": "alice"}}
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
              "data": {"mode": "fast"}}
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
           {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "mode"}}},
           {"name": "MISSING", "valueFrom": {"secretKeyRef": {"name": "nope", "key": "x", "optional": True}}},
           {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
           {"name": "GREETING", "value": "mode=$(MODE)"}]
    script = 'echo "$TOKEN|$MODE|$CFG_user|$NS|$GREETING|${MISSING-unset}" > /dev/termination-log'
    p = pod("env", ["sh", "-c", script], container={
        "env": env, "envFrom": [{"secretRef": {"name": "creds"}, "prefix": "CFG_"}]})
    create(cluster, namespace, secret, config, p)
    done = wait_terminal(cluster, namespace, "env")
    assert done["status"]["phase"] == "Succeeded"
    assert terminated(done)["message"] == f"s3cr3t|fast|alice|{namespace}|mode=fast|unset\n"


def test_configmap_volume_is_readable_through_the_rewritten_mount_path(cluster, namespace):
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "files"},
              "data": {"greeting.txt": "hello from a volume"}}
    p = pod("vol", ["sh", "-c", "cat /etc/lora/config/greeting.txt > /dev/termination-log"],
            container={"volumeMounts": [{"name": "cfg", "mountPath": "/etc/lora/config"}]},
            volumes=[{"name": "cfg", "configMap": {"name": "files"}}])
    create(cluster, namespace, config, p)
    done = wait_terminal(cluster, namespace, "vol")
    assert done["status"]["phase"] == "Succeeded"
    assert terminated(done)["message"] == "hello from a volume"


def test_host_files_under_a_mount_path_are_not_rewritten_but_new_paths_are(cluster, namespace):
    import tempfile

    host_dir = Path(tempfile.mkdtemp(prefix="podrunner-", dir="/tmp"))  # like a checkout under /tmp
    (host_dir / "script.sh").write_text('echo ran > "$OUT" && cat "$OUT"\n')
    out = f"/tmp/{host_dir.name}-out"  # a new path under the mount: it belongs to the volume
    p = pod("hostfile", ["sh", "-c", f"sh {host_dir}/script.sh > /dev/termination-log"],
            container={"env": [{"name": "OUT", "value": out}],
                       "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]},
            volumes=[{"name": "tmp", "emptyDir": {}}])
    create(cluster, namespace, p)
    done = wait_terminal(cluster, namespace, "hostfile")
    assert done["status"]["phase"] == "Succeeded", terminated(done)
    assert terminated(done)["message"].strip() == "ran"
    assert not Path(out).exists()


def test_failing_command_gives_failed_phase_exit_code_and_termination_message(cluster, namespace):
    create(cluster, namespace,
           pod("boom", ["sh", "-c", "echo 'disk on fire' > /dev/termination-log; exit 3"]),
           pod("fallback", ["sh", "-c", "echo last words in the log; exit 2"],
               container={"terminationMessagePolicy": "FallbackToLogsOnError"}))
    boom = wait_terminal(cluster, namespace, "boom")
    assert boom["status"]["phase"] == "Failed"
    assert terminated(boom)["exitCode"] == 3
    assert terminated(boom)["reason"] == "Error"
    assert terminated(boom)["message"] == "disk on fire\n"
    fallback = wait_terminal(cluster, namespace, "fallback")
    assert terminated(fallback)["exitCode"] == 2
    assert "last words in the log" in terminated(fallback)["message"]


def test_on_failure_restarts_the_container_in_place(cluster, namespace, tmp_path):
    script = f'n=$(cat {tmp_path}/n 2>/dev/null || echo 0); echo $((n+1)) > {tmp_path}/n; [ "$n" -ge 1 ]'
    create(cluster, namespace, pod("retry", ["sh", "-c", script], restartPolicy="OnFailure"))
    done = wait_terminal(cluster, namespace, "retry")
    assert done["status"]["phase"] == "Succeeded"
    assert done["status"]["containerStatuses"][0]["restartCount"] == 1


SIGNAL_SCRIPT = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def on_term(*_):
    (out / "sigterm").write_text("got SIGTERM")
    if sys.argv[2] == "exit":
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
(out / "started").write_text("started")
while True:
    time.sleep(0.05)
"""


def _wait_gone(cluster, namespace: str, name: str, timeout: float = 30) -> float:
    start = time.monotonic()
    cluster.kubectl("wait", "-n", namespace, "--for=delete", f"pod/{name}", f"--timeout={int(timeout)}s")
    return time.monotonic() - start


def test_deleting_a_running_pod_sends_sigterm_and_removes_it(cluster, namespace, tmp_path):
    create(cluster, namespace, pod("term", ["python", "-c", SIGNAL_SCRIPT, str(tmp_path), "exit"]))
    wait_file(tmp_path / "started")
    cluster.kubectl("delete", "pod", "term", "-n", namespace, "--wait=false")
    assert wait_file(tmp_path / "sigterm") == "got SIGTERM"
    assert _wait_gone(cluster, namespace, "term") < 10


def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period(cluster, namespace, tmp_path):
    create(cluster, namespace, pod("stubborn", ["python", "-c", SIGNAL_SCRIPT, str(tmp_path), "stay"],
                                   terminationGracePeriodSeconds=2))
    wait_file(tmp_path / "started")
    pid = int(get_pod(cluster, namespace, "stubborn")["status"]["containerStatuses"][0]
              ["containerID"].rsplit("/", 1)[1])
    started = time.monotonic()
    cluster.kubectl("delete", "pod", "stubborn", "-n", namespace, "--wait=false")
    wait_file(tmp_path / "sigterm")
    _wait_gone(cluster, namespace, "stubborn")
    assert 1.5 < time.monotonic() - started < 15
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _isolation_available() -> bool:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack"))
    from podrunner_dns import isolation_available

    return isolation_available()


requires_pod_dns = pytest.mark.skipif(not _isolation_available(),
                                      reason="pod DNS needs unshare (root or user namespaces)")

# Rank 0 listens on the port; rank 1 finds it by its pod DNS name, as torchrun's ranks do.
PEER_SCRIPT = """
import os, socket, sys, time
port, ns, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
me = socket.gethostname()
if os.environ["JOB_COMPLETION_INDEX"] == "0":
    s = socket.socket()
    s.bind(("0.0.0.0", port))
    s.listen()
    conn, _ = s.accept()
    conn.sendall(me.encode())
    conn.close()
    answer = "served"
else:
    deadline = time.monotonic() + 30
    while True:
        try:
            conn = socket.create_connection((f"peers-0.peers-svc.{ns}.svc.cluster.local", port), timeout=2)
            break
        except OSError:
            assert time.monotonic() < deadline, "rank 0 never answered"
            time.sleep(0.2)
    answer = conn.recv(100).decode() + " " + socket.gethostbyname("peers-0.peers-svc")
open(os.path.join(out, me), "w").write(answer)
"""


@requires_pod_dns
def test_indexed_job_pods_get_their_hostnames_and_resolve_each_other(cluster, namespace, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "peers-svc"},
               "spec": {"clusterIP": "None", "selector": {"app": "peers"}, "publishNotReadyAddresses": True,
                        "ports": [{"port": port}]}}
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "peers"},
           "spec": {"completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
                    "template": {"metadata": {"labels": {"app": "peers"}}, "spec": {
                        "subdomain": "peers-svc", "restartPolicy": "Never",
                        "containers": [{"name": "main", "image": "unused", "command": [
                            "python", "-c", PEER_SCRIPT, str(port), namespace, str(tmp_path)]}]}}}}
    create(cluster, namespace, service, job)
    cluster.kubectl("wait", "-n", namespace, "--for=condition=Complete", "job/peers", "--timeout=60s")
    assert (tmp_path / "peers-0").read_text() == "served"
    assert (tmp_path / "peers-1").read_text() == "peers-0 127.0.0.1"

"""The operator under test against a real control plane: helpers shared by the operator's cluster
tests (tests/operator/test_operator_cluster.py, tests/operator/test_kueue_cluster.py); their fixtures
are in tests/operator/conftest.py.

Each test runs its own operator process (`python -m lora_operator --namespace NS`) with short
intervals, so a test can restart it or give it its own policy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE_TRAINER = ROOT / "tests" / "operator" / "fake_trainer.py"
GROUP, VERSION, PLURAL = "training.lora.dev", "v1alpha1", "loratrainingjobs"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Operator:
    def __init__(self, cluster, namespace: str, log_path: Path, **env: str):
        self.port = _free_port()
        self.env = {**os.environ, "KUBECONFIG": cluster.kubeconfig, "LORA_S3_ENDPOINT": cluster.s3_endpoint,
                    "LORA_TRAINER_COMMAND": f"{sys.executable} {FAKE_TRAINER} run",
                    "LORA_RESYNC_INTERVAL": "2", "LORA_PROGRESS_INTERVAL": "1", "LORA_METRICS_PORT": "0",
                    "LORA_TERMINATION_GRACE_SECONDS": "10", "LORA_WATCH_TIMEOUT": "30",
                    "LORA_LIVENESS_ENDPOINT": f"http://127.0.0.1:{self.port}/healthz", **env}
        self.namespace, self.log_path, self.proc = namespace, log_path, None

    def start(self) -> Operator:
        with open(self.log_path, "a") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen([sys.executable, "-m", "lora_operator", "--namespace", self.namespace],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, f"operator exited:\n{self.log_path.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1)
                return self
            except OSError:
                assert time.monotonic() < deadline, "operator liveness endpoint never came up"
                time.sleep(0.2)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def apply(api, namespace, storage, name="demo", annotations=None, **overrides):
    overrides.setdefault("output.uri", f"s3://{storage.bucket}/{name}")
    overrides.setdefault("resources.gpus", 1)
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRATrainingJob",
            "metadata": {"name": name, "annotations": annotations or {}}, "spec": storage.spec_dict(**overrides)}
    return api["custom"].create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)


def get(api, namespace, name="demo"):
    return api["custom"].get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def wait_for(fn, timeout=60, what="condition"):
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


def wait_phase(api, namespace, phase, name="demo", timeout=60):
    def check():
        status = get(api, namespace, name).get("status") or {}
        return status if status.get("phase") == phase else None
    try:
        return wait_for(check, timeout, f"phase {phase}")
    except AssertionError:
        raise AssertionError(f"phase {phase} not reached; status: {get(api, namespace, name).get('status')}") from None


def conditions(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def jobs(api, namespace):
    return sorted(j.metadata.name for j in api["batch"].list_namespaced_job(namespace).items)


def _running_pod(api, namespace, job_name):
    def find():
        pods = api["core"].list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job_name}")
        return next((p for p in pods.items if p.status.phase == "Running"), None)
    return wait_for(find, 30, f"a running pod of {job_name}")


def _wait_step(api, namespace, step):
    return wait_for(lambda: ((get(api, namespace).get("status") or {}).get("progress") or {}).get("step", 0) >= step,
                    30, f"step {step}")

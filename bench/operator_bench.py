"""Operator latency and footprint on the local control plane.

Creates N LoRATrainingJobs as fast as the client can, watches batch Jobs, and records the time
from each create call returning to its Job appearing in the watch (client-side clocks, so the 1 s
resolution of creationTimestamp does not matter). The trainer command is `true` (pods run and exit
at once). Then it counts LoRATrainingJob status PATCHes at the API server (/metrics) over an idle
window: a level-based operator that patches only on change should make none.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KUBECONFIG = ROOT / ".local" / "kubeconfig"
PATCH_RE = re.compile(r'apiserver_request_total\{[^}]*resource="loratrainingjobs"[^}]*\} (\d+(?:\.\d+)?)')


def kubectl(*args: str, input: str | None = None) -> str:
    return subprocess.run(["kubectl", "--kubeconfig", str(KUBECONFIG), *args], input=input, text=True,
                          check=True, capture_output=True).stdout


def status_patches() -> float:
    """apiserver_request_total for PATCH on loratrainingjobs/status, summed over codes."""
    total = 0.0
    for line in kubectl("get", "--raw", "/metrics").splitlines():
        if 'verb="PATCH"' in line and 'subresource="status"' in line:
            m = PATCH_RE.search(line)
            total += float(m.group(1)) if m else 0.0
    return total


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _vm_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _job(name: str) -> dict:
    return {"apiVersion": "training.lora.dev/v1alpha1", "kind": "LoRATrainingJob", "metadata": {"name": name},
            "spec": {"baseModel": {"uri": "s3://models/tiny", "revision": "sha256:" + "0" * 64},
                     "dataset": {"train": "s3://data/train.jsonl"}, "output": {"uri": f"s3://bench/{name}"},
                     "storage": {"secretName": "s3-credentials"}, "resources": {"gpus": 0}}}


def _start_operator(namespace: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": str(KUBECONFIG), "LORA_TRAINER_COMMAND": "true", "LORA_METRICS_PORT": "0",
           "LORA_LIVENESS_ENDPOINT": "", "LORA_RESYNC_INTERVAL": "10", "LORA_PROGRESS_INTERVAL": "10"}
    return subprocess.Popen([sys.executable, "-m", "lora_operator", "--namespace", namespace], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _watch_jobs(batch, namespace: str, seen: dict, stop: threading.Event) -> None:
    from kubernetes import watch

    w = watch.Watch()
    while not stop.is_set():
        for event in w.stream(batch.list_namespaced_job, namespace, timeout_seconds=5):
            owner = (event["object"].metadata.labels or {}).get("training.lora.dev/job")
            name = owner or event["object"].metadata.name.rsplit("-a", 1)[0]
            seen.setdefault(name, time.monotonic())
            if stop.is_set():
                break


def _wait_jobs_finished(batch, namespace: str, n: int, timeout: float) -> None:
    """The idle window starts only when every Job has finished (the pods of N jobs take a while)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = batch.list_namespaced_job(namespace).items
        done = sum(1 for j in jobs if any(c.type in ("Complete", "Failed") and c.status == "True"
                                          for c in (j.status.conditions or [])))
        if done >= n:
            return
        time.sleep(1)


def run_one(n: int, work: Path, idle_s: float = 20.0) -> dict:
    from kubernetes import client, config

    config.load_kube_config(str(KUBECONFIG))
    core, batch, custom = client.CoreV1Api(), client.BatchV1Api(), client.CustomObjectsApi()
    namespace = f"bench-op-{n}-{int(time.time())}"
    core.create_namespace({"metadata": {"name": namespace}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "s3-credentials"},
                                              "stringData": {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}})
    operator = _start_operator(namespace, work / f"operator-{n}.log")
    seen: dict[str, float] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_jobs, args=(batch, namespace, seen, stop), daemon=True)
    watcher.start()
    try:
        time.sleep(3)  # operator start-up is not what we measure
        created = {}
        for i in range(n):
            name = f"bench-{i:04d}"
            custom.create_namespaced_custom_object("training.lora.dev", "v1alpha1", namespace, "loratrainingjobs",
                                                   _job(name))
            created[name] = time.monotonic()
        deadline = time.monotonic() + 60 + n * 0.5
        while len(set(created) & set(seen)) < n and time.monotonic() < deadline:
            time.sleep(0.1)
        latencies = [seen[k] - created[k] for k in created if k in seen]
        _wait_jobs_finished(batch, namespace, n, timeout=120 + n * 0.5)
        time.sleep(15)  # a resync and a progress interval: the last status patches land
        before = status_patches()
        time.sleep(idle_s)
        idle_patches = status_patches() - before
        rss = _vm_hwm_mb(operator.pid)
    finally:
        stop.set()
        os.killpg(operator.pid, signal.SIGTERM)
        operator.wait(30)
        core.delete_namespace(namespace)
    return {"n": n, "jobs_seen": len(latencies), "p50_s": _percentile(latencies, 0.5),
            "p95_s": _percentile(latencies, 0.95), "operator_peak_rss_mb": rss,
            "idle_status_patches": idle_patches, "idle_window_s": idle_s}


def run(work: Path, sizes=(1, 50)) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    results = [run_one(n, work) for n in sizes]
    targets = {50: 2.0, 500: 10.0}
    figures = []
    for r in results:
        target = targets.get(r["n"])
        figures.append({"figure": f"apply->Job p95 s (N={r['n']}, p50 {r['p50_s']:.2f})", "ours": r["p95_s"],
                        "baseline": None, "ratio": None, "target": f"< {target}" if target else "-",
                        "met": (r["p95_s"] < target) if target else None})
        figures.append({"figure": f"operator peak RSS MB (N={r['n']})", "ours": r["operator_peak_rss_mb"],
                        "baseline": None, "ratio": None, "target": "< 300", "met": r["operator_peak_rss_mb"] < 300})
        figures.append({"figure": f"idle status PATCHes in {r['idle_window_s']:.0f} s (N={r['n']})",
                        "ours": r["idle_status_patches"], "baseline": None, "ratio": None, "target": "0",
                        "met": r["idle_status_patches"] == 0})
    return {"raw": results, "figures": figures}

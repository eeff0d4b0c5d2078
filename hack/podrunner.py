#!/usr/bin/env python3
"""Local pod runner: kubelet + scheduler stand-in for hack/localcluster.py.

This is a dev/test tool, not part of the product; the product runs on real clusters.

It registers one Node (``local-gpu-node``, ``nvidia.com/gpu: 8``) and keeps it Ready (Lease +
status heartbeats), binds unscheduled pods to it (honouring schedulingGates and nodeSelector,
not resources) and runs each bound pod's containers as local processes (see podrunner_pod.py for
the contract: images are ignored, mount paths are rewritten to local directories). Pod status is
written through the status subresource like a kubelet would: Pending -> Running ->
Succeeded/Failed with container states, exit codes and termination messages. Deleting a pod sends
SIGTERM to its process group, SIGKILL after the grace period, then deletes it with grace 0.
Pods that were running under a previous runner process are marked Failed (the process is gone).

With ``--simulate`` no process runs: pods move through kwok-style stages on a schedule and trainer
pods write a stand-in trainer's progress.json to S3 (see podsim.py). With ``--selected-only`` the
runner binds only pods whose nodeSelector names its node, so a simulated node can sit next to the
real one (the operator benchmark runs ``--simulate --selected-only --node-name local-sim-node``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config
from kubernetes.watch.watch import iter_resp_lines

sys.path.insert(0, str(Path(__file__).resolve().parent))
from podrunner_dns import PodDNS, service_exists_via
from podrunner_pod import PodWorker, now

GPUS = "8"
DEFAULT_TIMEOUT = urllib3.Timeout(connect=5, read=30)


class ApiError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


class Api:
    """Minimal JSON-over-HTTPS client configured from a kubeconfig (dicts in, dicts out)."""

    def __init__(self, kubeconfig: str):
        cfg = k8s_client.Configuration()
        k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        self.host = cfg.host.rstrip("/")
        self.headers = {s["key"]: s["value"] for s in cfg.auth_settings().values() if s["in"] == "header"}
        self.http = urllib3.PoolManager(maxsize=32, ca_certs=cfg.ssl_ca_cert, cert_file=cfg.cert_file,
                                        key_file=cfg.key_file,
                                        cert_reqs="CERT_REQUIRED" if cfg.verify_ssl else "CERT_NONE")

    def request(self, method: str, path: str, body=None, content_type: str = "application/json",
                timeout: urllib3.Timeout = DEFAULT_TIMEOUT, stream: bool = False):
        headers = {"Accept": "application/json", **self.headers}
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        resp = self.http.request(method, self.host + path, body=data, headers=headers,
                                 timeout=timeout, preload_content=not stream, retries=False)
        if resp.status >= 400:
            raise ApiError(resp.status, resp.data.decode(errors="replace") if not stream else "")
        return resp if stream else (json.loads(resp.data) if resp.data else {})

    def get(self, path: str) -> dict | None:
        try:
            return self.request("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise


class Runner:
    def __init__(self, api: Api, node: str, work_dir: Path, simulate: bool = False,
                 selected_only: bool = False):
        self.api, self.node, self.work_dir = api, node, work_dir
        self.selected_only = selected_only
        self.sim = None
        self.worker_class = PodWorker
        if simulate:
            import podsim

            self.sim, self.worker_class = podsim.Simulation(api), podsim.SimPod
        self.bin_dir = str(Path(sys.executable).parent)  # the venv's bin dir, not resolved
        self.api_port = os.environ.get("LORA_CLUSTER_APISERVER_PORT", "")
        self.workers: dict[str, PodWorker] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.dns = PodDNS(service_exists_via(api), self.log)  # hostnames and peer names, see podrunner_dns.py

    @staticmethod
    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    # ------------------------------------------------------------------ node
    def register_node(self) -> None:
        labels = {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", "nvidia.com/gpu.present": "true"}
        try:
            self.api.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                                       "metadata": {"name": self.node, "labels": labels}})
        except ApiError as e:
            if e.status != 409:
                raise
        self.heartbeat()
        # The TaintNodesByCondition admission plugin adds a not-ready taint on create; the
        # node-lifecycle controller (not run here, see localcluster.py) would lift it.
        taints = (self.api.get(f"/api/v1/nodes/{self.node}") or {}).get("spec", {}).get("taints") or []
        kept = [t for t in taints if not t["key"].startswith(("node.kubernetes.io/not-ready",
                                                             "node.kubernetes.io/unreachable"))]
        if kept != taints:
            self.api.request("PATCH", f"/api/v1/nodes/{self.node}", {"spec": {"taints": kept or None}},
                             content_type="application/merge-patch+json")

    def node_status(self) -> dict:
        mem_kib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 1024
        res = {"cpu": str(os.cpu_count() or 1), "memory": f"{mem_kib}Ki", "pods": "250" if self.sim is None else "10000",
               "ephemeral-storage": "100Gi", "nvidia.com/gpu": GPUS}
        t = now()
        ready = {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "local pod runner is posting ready status",
                 "lastHeartbeatTime": t, "lastTransitionTime": self._ready_since}
        info = {k: "" for k in ("machineID", "systemUUID", "bootID", "kernelVersion", "osImage",
                                "containerRuntimeVersion", "kubeProxyVersion")}
        info.update(kubeletVersion="v1.34.0-localpodrunner", operatingSystem="linux",
                    architecture="amd64", containerRuntimeVersion="local://podrunner")
        return {"capacity": res, "allocatable": res, "conditions": [ready],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                              {"type": "Hostname", "address": self.node}],
                "nodeInfo": info}

    _ready_since = now()

    def heartbeat(self) -> None:
        node = self.api.request("PATCH", f"/api/v1/nodes/{self.node}/status", {"status": self.node_status()},
                                content_type="application/merge-patch+json")
        if self.sim is not None:
            with self.lock:
                workers = list(self.workers.values())
            self.sim.observe_node(node, workers)
        micro = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime())
        lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                 "metadata": {"name": self.node, "namespace": "kube-node-lease"},
                 "spec": {"holderIdentity": self.node, "leaseDurationSeconds": 40, "renewTime": micro}}
        path = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        try:
            self.api.request("PATCH", f"{path}/{self.node}", {"spec": lease["spec"]},
                             content_type="application/merge-patch+json")
        except ApiError as e:
            if e.status != 404:
                raise
            self.api.request("POST", path, lease)

    def heartbeat_loop(self) -> None:
        while not self.stopping.wait(10):
            try:
                self.heartbeat()
            except Exception as e:
                self.log(f"heartbeat failed: {e}")

    # ------------------------------------------------------------------ pods
    def patch_pod_status(self, ns: str, name: str, status: dict) -> None:
        for attempt in range(5):
            try:
                self.api.request("PATCH", f"/api/v1/namespaces/{ns}/pods/{name}/status",
                                 {"status": status}, content_type="application/merge-patch+json")
                return
            except ApiError as e:
                if e.status == 404:
                    return
                self.log(f"status of {ns}/{name}: {e}")
            except Exception as e:
                self.log(f"status of {ns}/{name}: {e!r}")
            time.sleep(0.5 * 2 ** attempt)

    def delete_pod_now(self, ns: str, name: str, uid: str) -> None:
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                "preconditions": {"uid": uid}}
        try:
            self.api.request("DELETE", f"/api/v1/namespaces/{ns}/pods/{name}", body)
        except ApiError as e:
            if e.status not in (404, 409):
                self.log(f"delete {ns}/{name}: {e}")

    def service_account_token(self, pod: dict, src: dict) -> str | None:
        meta = pod["metadata"]
        sa = pod["spec"].get("serviceAccountName") or "default"
        spec = {"expirationSeconds": src.get("expirationSeconds", 3607),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}}
        if src.get("audience"):
            spec["audiences"] = [src["audience"]]
        try:
            out = self.api.request("POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token",
                                   {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
            return out["status"]["token"]
        except ApiError as e:
            self.log(f"token for {meta['namespace']}/{meta['name']}: {e}")
            return None

    def schedulable(self, pod: dict) -> bool:
        spec = pod["spec"]
        if spec.get("schedulingGates") or spec.get("schedulerName", "default-scheduler") != "default-scheduler":
            return False
        labels = {"kubernetes.io/hostname": self.node, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", "nvidia.com/gpu.present": "true"}
        selector = spec.get("nodeSelector") or {}
        if self.selected_only and selector.get("kubernetes.io/hostname") != self.node:
            return False
        return all(labels.get(k) == v for k, v in selector.items())

    def bind(self, pod: dict) -> None:
        meta = pod["metadata"]
        body = {"apiVersion": "v1", "kind": "Binding",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node}}
        try:
            self.api.request("POST", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", body)
        except ApiError as e:
            if e.status not in (404, 409):
                self.log(f"bind {meta['namespace']}/{meta['name']}: {e}")

    def handle(self, pod: dict) -> None:
        meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
        uid, deleting = meta["uid"], meta.get("deletionTimestamp")
        if not spec.get("nodeName"):
            if not deleting and self.schedulable(pod):
                self.bind(pod)
            return
        if spec["nodeName"] != self.node:
            return
        with self.lock:
            worker = self.workers.get(uid)
        # After our grace-0 delete a pod may linger on finalizers (Job tracking); leave it be.
        needs_delete = deleting and meta.get("deletionGracePeriodSeconds") != 0
        if worker is not None:
            if needs_delete and not worker.is_alive():
                self.delete_pod_now(meta["namespace"], meta["name"], uid)
            elif needs_delete and not worker.stop_event.is_set():
                grace = meta.get("deletionGracePeriodSeconds", spec.get("terminationGracePeriodSeconds", 30))
                worker.request_stop(float(grace))
            return
        phase = status.get("phase", "Pending")
        if phase in ("Succeeded", "Failed") or (deleting and not status.get("containerStatuses")):
            if needs_delete:
                self.delete_pod_now(meta["namespace"], meta["name"], uid)
            return
        started = phase == "Running" or any(
            "running" in (cs.get("state") or {}) for cs in status.get("containerStatuses") or [])
        if started:
            self.mark_orphan_failed(pod)
            return
        worker = self.worker_class(self, pod)
        with self.lock:
            self.workers[uid] = worker
        if deleting:
            worker.request_stop(0.0)
        worker.start()

    def mark_orphan_failed(self, pod: dict) -> None:
        meta = pod["metadata"]
        statuses = []
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if "terminated" not in (cs.get("state") or {}):
                started = (cs.get("state") or {}).get("running", {}).get("startedAt", now())
                cs = dict(cs, ready=False, started=False, state={"terminated": {
                    "exitCode": 137, "reason": "Error", "startedAt": started, "finishedAt": now(),
                    "message": "the local pod runner restarted; the process is gone"}})
            statuses.append(cs)
        self.log(f"marking orphaned pod {meta['namespace']}/{meta['name']} Failed")
        self.patch_pod_status(meta["namespace"], meta["name"], {
            "phase": "Failed", "reason": "PodRunnerRestarted", "containerStatuses": statuses,
            "message": "the local pod runner restarted while this pod was running"})
        if meta.get("deletionTimestamp"):
            self.delete_pod_now(meta["namespace"], meta["name"], meta["uid"])

    def forget(self, pod: dict) -> None:
        with self.lock:
            worker = self.workers.pop(pod["metadata"]["uid"], None)
        self.dns.forget(pod["metadata"]["uid"])
        if worker is not None and worker.is_alive():
            worker.request_stop(0.0, delete=False)

    # ------------------------------------------------------------------ watch loop
    def watch_loop(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                listing = self.api.request("GET", "/api/v1/pods", timeout=urllib3.Timeout(connect=5, read=60))
                rv = listing["metadata"]["resourceVersion"]
                seen = set()
                for pod in listing["items"]:
                    seen.add(pod["metadata"]["uid"])
                    self.handle(pod)
                with self.lock:
                    gone = [uid for uid in self.workers if uid not in seen]
                for uid in gone:
                    self.forget({"metadata": {"uid": uid}})
                backoff = 0.5
                while not self.stopping.is_set():
                    rv = self.watch_once(rv)
            except Exception as e:
                if not isinstance(e, ApiError) or e.status != 410:
                    self.log(f"watch: {e!r}; re-listing in {backoff:.1f}s")
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 10.0)

    def watch_once(self, rv: str) -> str:
        path = f"/api/v1/pods?watch=1&allowWatchBookmarks=true&timeoutSeconds=60&resourceVersion={rv}"
        resp = self.api.request("GET", path, stream=True, timeout=urllib3.Timeout(connect=5, read=90))
        try:
            for line in iter_resp_lines(resp):
                event = json.loads(line)
                obj = event["object"]
                if event["type"] == "ERROR":
                    raise ApiError(obj.get("code", 500), obj.get("message", ""))
                rv = obj["metadata"].get("resourceVersion", rv)
                if event["type"] == "DELETED":
                    self.forget(obj)
                elif event["type"] in ("ADDED", "MODIFIED"):
                    self.handle(obj)
        finally:
            resp.release_conn()
        return rv

    def shutdown(self) -> None:
        self.stopping.set()
        with self.lock:
            workers = list(self.workers.values())
        for w in workers:
            w._kill_all(signal.SIGTERM)
        time.sleep(1.0)
        for w in workers:
            w._kill_all(signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description="local pod runner (dev/test tool)")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", default="local-gpu-node")
    parser.add_argument("--work-dir", required=True, type=Path)
    parser.add_argument("--simulate", action="store_true",
                        help="run no processes: scripted pod stages and a stand-in trainer (podsim.py)")
    parser.add_argument("--selected-only", action="store_true",
                        help="bind only pods whose nodeSelector names this node (kubernetes.io/hostname)")
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(Api(args.kubeconfig), args.node_name, args.work_dir, simulate=args.simulate,
                    selected_only=args.selected_only)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.is_set():
        try:
            runner.register_node()
            break
        except Exception:
            traceback.print_exc()
            done.wait(1.0)
    runner.log(f"node {args.node_name} registered; watching pods{' (simulated)' if args.simulate else ''}")
    threading.Thread(target=runner.heartbeat_loop, daemon=True, name="heartbeat").start()
    threading.Thread(target=runner.watch_loop, daemon=True, name="watch").start()
    done.wait()
    runner.log("stopping: killing pod processes")
    runner.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

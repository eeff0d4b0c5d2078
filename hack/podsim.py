"""Simulated pods for `hack/podrunner.py --simulate` (dev/benchmark tooling), in the spirit of kwok.

A simulated pod runs no process. Once bound it moves through stages on a schedule: Running at once
(one status write), then Succeeded or Failed with the chosen exit code and termination message
(one more), so a thousand pods cost the API server two status writes each and the machine a
sleeping thread each. What happens in between is a script (podsim_script.py):

* a **trainer pod** (a configMap volume holds a LoRATrainingJob, as the operator's Jobs mount it)
  plays a stand-in trainer: it writes `progress.json`, checkpoint markers and the adapter under
  `spec.output.uri` on the job's S3 endpoint (`S3_ENDPOINT` and the `AWS_*` keys of the pod's env,
  resolved like a kubelet would), so the operator sees it progress, checkpoint, pass the gate and
  finish; the job's annotations choose steps, pace and outcome;
* **any other pod** exits after `podsim.lora.dev/run-seconds` with `podsim.lora.dev/exit-code`.

Deleting a running pod plays SIGTERM: a trainer records `Preempted` and the container exits 143.
Fast-forward: annotating the runner's Node with `podsim.lora.dev/finish-before: <unix time>` makes
every trainer pod that started before then skip its remaining training steps and finish (seen
within one heartbeat, 10 s), so a benchmark can let thousands of jobs train as long as it needs.
The runner's real-process mode (podrunner_pod.py) is untouched by any of this.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Mapping
from urllib.parse import urlparse

import urllib3
import yaml
from podsim_script import Stage, Trainer, pod_script, preempted, resume_step, trainer_script

KIND = "LoRATrainingJob"
FAST_FORWARD = "podsim.lora.dev/finish-before"
IO_SLOTS = threading.BoundedSemaphore(16)  # S3 and API writes in flight across all simulated pods
_SECRET_TTL = 30.0
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's: a thousand configs arrive at once


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def pod_status(pod: Mapping, phase: str, states: Mapping[str, dict], started_at: str) -> dict:
    """A kubelet-shaped status: conditions, IPs, one containerStatus per container (pure)."""
    running = phase == "Running"
    finished = phase in ("Succeeded", "Failed")
    ready = "True" if running else "False"
    conds = [("PodScheduled", "True"), ("Initialized", "True"), ("ContainersReady", ready), ("Ready", ready)]
    containers = pod["spec"].get("containers", [])
    status = {
        "phase": phase, "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}], "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}], "startTime": started_at,
        "conditions": [{"type": t, "status": s, "lastTransitionTime": now(), "lastProbeTime": None,
                        **({"reason": "PodCompleted"} if finished and s == "False" else {})} for t, s in conds],
        "containerStatuses": [{
            "name": c["name"], "image": c.get("image", ""), "imageID": "", "restartCount": 0,
            "ready": running, "started": running, "containerID": f"sim://{pod['metadata']['uid'][:8]}",
            "state": states[c["name"]], "lastState": {}} for c in containers],
    }
    inits = pod["spec"].get("initContainers") or []
    if inits:  # init containers are simulated as having completed at once
        done = {"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": started_at, "finishedAt": started_at}}
        status["initContainerStatuses"] = [{"name": c["name"], "image": c.get("image", ""), "imageID": "",
                                            "restartCount": 0, "ready": False, "started": False, "state": done,
                                            "lastState": {}} for c in inits]
    return status


def terminated(code: int, message: str, started_at: str) -> dict:
    term = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "startedAt": started_at,
            "finishedAt": now()}
    if message:
        term["message"] = message[:4096]
    return {"terminated": term}


class Storage:
    """Tiny S3 writer shared by all simulated pods (minio clients keyed by endpoint and key)."""

    def __init__(self):
        self._http = urllib3.PoolManager(maxsize=16, timeout=urllib3.Timeout(connect=5, read=20),
                                         retries=urllib3.Retry(total=2, backoff_factor=0.2))
        self._clients: dict = {}
        self._lock = threading.Lock()

    def client(self, endpoint: str, access: str | None, secret: str | None):
        from minio import Minio

        with self._lock:
            key = (endpoint, access)
            if key not in self._clients:
                url = urlparse(endpoint)
                self._clients[key] = Minio(url.netloc, access_key=access, secret_key=secret,
                                           secure=url.scheme == "https", http_client=self._http)
            return self._clients[key]


class SimPod(threading.Thread):
    """One simulated pod. Same small interface as podrunner_pod.PodWorker for podrunner.Runner."""

    def __init__(self, runner, pod: dict):
        meta = pod["metadata"]
        super().__init__(name=f"sim-{meta['namespace']}/{meta['name']}", daemon=True)
        self.runner, self.pod, self.api = runner, pod, runner.api
        self.ns, self.pod_name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.stop_event = threading.Event()
        self.wake = threading.Event()  # stop requested, or the fast-forward time moved
        self.started_wall = time.time()
        self.delete_after_stop = True
        self.trainer: Trainer | None = None
        self.s3 = None  # (minio client, bucket, prefix) of a trainer pod
        self.last_progress: dict | None = None

    def request_stop(self, grace: float, delete: bool = True) -> None:
        self.delete_after_stop = delete
        self.stop_event.set()
        self.wake.set()

    def _kill_all(self, sig: int) -> None:  # nothing to kill
        pass

    def run(self) -> None:
        started = now()
        try:
            script = self._script()
        except Exception as exc:  # a bad annotation or config: the container "crashes"
            self.runner.log(f"{self.name}: {exc}")
            self._status("Failed", {c["name"]: terminated(128, str(exc), started) for c in self._containers()},
                         started)
            return
        try:
            self._play(script, started)
        except Exception as exc:
            self.runner.log(f"{self.name}: internal error: {exc!r}")
        finally:
            if self.stop_event.is_set() and self.delete_after_stop:
                self.runner.delete_pod_now(self.ns, self.pod_name, self.uid)

    def _play(self, script: list[Stage], started: str) -> None:
        if self.stop_event.is_set():
            return self._end(preempted(self.trainer, self.last_progress), started)
        self._status("Running", {c["name"]: {"running": {"startedAt": started}} for c in self._containers()}, started)
        t0 = time.monotonic()
        for stage in script:
            if not self._fast_forward():
                self._sleep_until(t0 + stage.at)
            if self.stop_event.is_set():
                return self._end(preempted(self.trainer, self.last_progress), started)
            if self._fast_forward() and _training(stage):
                continue  # the rest of the script runs now
            self._write(stage)
            if stage.exit is not None:
                return self._end(stage, started, written=True)

    def _sleep_until(self, due: float) -> None:
        """Until the stage is due, the pod is stopped, or a fast-forward concerns it."""
        while not self.stop_event.is_set() and not self._fast_forward():
            left = due - time.monotonic()
            if left <= 0 or not self.wake.wait(left):
                return
            self.wake.clear()

    def _fast_forward(self) -> bool:
        return self.started_wall < self.runner.sim.finish_before

    def _end(self, stage: Stage, started: str, written: bool = False) -> None:
        if not written:
            self._write(stage)
        code, message = stage.exit or (0, "")
        states = {c["name"]: terminated(code, message, started) for c in self._containers()}
        self._status("Succeeded" if code == 0 else "Failed", states, started)

    def _containers(self) -> list[dict]:
        return self.pod["spec"].get("containers", [])

    def _status(self, phase: str, states: dict, started: str) -> None:
        with IO_SLOTS:
            self.runner.patch_pod_status(self.ns, self.pod_name, pod_status(self.pod, phase, states, started))

    # ------------------------------------------------------------------ the stand-in trainer
    def _script(self) -> list[Stage]:
        job = self._trainer_config()
        if job is None:
            return pod_script(self.pod["metadata"].get("annotations") or {})
        env = self._env(self._containers()[0])
        output = job["spec"]["output"]["uri"]
        endpoint = env.get("S3_ENDPOINT") or (job["spec"].get("storage") or {}).get("endpoint")
        url = urlparse(output)
        if url.scheme == "s3" and endpoint:
            client = self.runner.sim.storage.client(endpoint, env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"))
            self.s3 = (client, url.netloc, url.path.strip("/"))
        self.trainer = Trainer(output_uri=output, annotations=job["metadata"].get("annotations") or {},
                               attempt=int(env.get("LORA_ATTEMPT") or 1), resume_step=resume_step(self._read_progress()),
                               job_uid=job["metadata"].get("uid") or "")
        return trainer_script(self.trainer)

    def _trainer_config(self) -> dict | None:
        for volume in self.pod["spec"].get("volumes") or []:
            ref = volume.get("configMap")
            if not ref:
                continue
            cm = self.runner.api.get(f"/api/v1/namespaces/{self.ns}/configmaps/{ref['name']}") or {}
            for text in (cm.get("data") or {}).values():
                try:
                    doc = yaml.load(text, Loader=_LOADER)
                except yaml.YAMLError:
                    continue
                if isinstance(doc, dict) and doc.get("kind") == KIND:
                    return doc
        return None

    def _env(self, container: dict) -> dict[str, str]:
        """Plain values and secretKeyRefs: all a trainer pod's env needs here."""
        env: dict[str, str] = {}
        for e in container.get("env") or []:
            if "value" in e:
                env[e["name"]] = e["value"]
            elif "secretKeyRef" in (e.get("valueFrom") or {}):
                ref = e["valueFrom"]["secretKeyRef"]
                value = self.runner.sim.secrets.get(self.ns, ref["name"]).get(ref["key"])
                if value is not None:
                    env[e["name"]] = value
        return env

    def _read_progress(self) -> dict | None:
        if self.s3 is None:
            return None
        client, bucket, prefix = self.s3
        try:
            with IO_SLOTS:
                resp = client.get_object(bucket, f"{prefix}/progress.json")
            try:
                return json.loads(resp.read())
            finally:
                resp.close()
                resp.release_conn()
        except Exception:
            return None

    def _write(self, stage: Stage) -> None:
        if self.s3 is None or (stage.progress is None and not stage.objects):
            return
        client, bucket, prefix = self.s3
        try:
            with IO_SLOTS:
                for key in stage.objects:
                    client.put_object(bucket, f"{prefix}/{key}", io.BytesIO(b""), 0)
                if stage.progress is not None:
                    self.last_progress = dict(stage.progress, updatedAt=now())
                    body = json.dumps(self.last_progress, sort_keys=True).encode()
                    client.put_object(bucket, f"{prefix}/progress.json", io.BytesIO(body), len(body),
                                      content_type="application/json")
        except Exception as exc:  # the real trainer logs and carries on, too
            self.runner.log(f"{self.name}: cannot write to s3://{bucket}/{prefix}: {exc}")


def _training(stage: Stage) -> bool:
    return stage.exit is None and (stage.progress or {}).get("state") == "Training"


class SecretCache:
    """Secrets by namespace/name for simulated pods' env (one GET per Secret per TTL, not per pod)."""

    def __init__(self, api):
        self.api, self._items, self._lock = api, {}, threading.Lock()

    def get(self, ns: str, name: str) -> dict[str, str]:
        key = (ns, name)
        with self._lock:
            hit = self._items.get(key)
        if hit and time.monotonic() - hit[0] < _SECRET_TTL:
            return hit[1]
        obj = self.api.get(f"/api/v1/namespaces/{ns}/secrets/{name}") or {}
        data = {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
        with self._lock:
            self._items[key] = (time.monotonic(), data)
        return data


class Simulation:
    """What all simulated pods of one runner share: the S3 writer and the Secret cache."""

    def __init__(self, api):
        self.storage = Storage()
        self.secrets = SecretCache(api)
        self.finish_before = 0.0  # unix time; see "Fast-forward" above

    def observe_node(self, node: dict, workers) -> None:
        """Heartbeat hook: pick up the fast-forward annotation and wake the pods it concerns."""
        raw = ((node.get("metadata") or {}).get("annotations") or {}).get(FAST_FORWARD, "0")
        try:
            value = float(raw)
        except ValueError:
            value = 0.0
        if value != self.finish_before:
            self.finish_before = value
            for worker in workers:
                worker.wake.set()

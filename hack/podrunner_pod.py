"""One pod's lifecycle for hack/podrunner.py: volumes, env, processes, status (dev tooling).

Contract for pod specs run locally (documented in hack/podrunner.py as well):

* The image is ignored; ``command`` + ``args`` run as a local process (no command: the pod fails).
* Every volumeMount ``mountPath`` (and the ``terminationMessagePath``) that occurs as a path
  prefix in command, args, env values or workingDir is rewritten to a local directory
  ``.local/pods/<ns>_<name>_<uid>/volumes/<volume>[/<subPath>]``, except a path that already
  exists on this machine (a checkout under /tmp while the pod mounts an emptyDir at /tmp). Code that hard-codes a mount
  path without receiving it through those fields will not find its files.
* A pod with ``spec.subdomain`` gets its hostname and resolves the names of its peers behind a
  headless Service (all on 127.0.0.1; see podrunner_dns.py).
* Only a few variables of the runner's environment pass through (PATH with the venv's bin dir
  first, HOME, locale, HF_*/CUDA_*/TORCH* ..., and names in ``LORA_PODRUNNER_PASSENV``).
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

PASSENV = ("HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "TZ", "LD_LIBRARY_PATH")
PASSENV_PREFIXES = ("HF_", "CUDA_", "NVIDIA_", "TORCH", "PYTORCH_", "TRANSFORMERS_", "TOKENIZERS_")
MAX_RESTARTS = int(os.environ.get("LORA_PODRUNNER_MAX_RESTARTS", "5"))
POD_MARK = "LORA_PODRUNNER_POD_UID"
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
_FIELD_MAP = re.compile(r"metadata\.(labels|annotations)\['(.+)'\]$")


class ConfigError(Exception):
    """A referenced Secret/ConfigMap/key is missing; the kubelet would retry (CreateContainerConfigError)."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def expand(value: str, env: dict) -> str:
    return _VAR.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def field_value(pod: dict, path: str) -> str:
    meta, spec = pod["metadata"], pod["spec"]
    m = _FIELD_MAP.match(path)
    if m:
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
              "metadata.uid": meta["uid"], "spec.nodeName": spec.get("nodeName", ""),
              "spec.serviceAccountName": spec.get("serviceAccountName", "")}
    if path in simple:
        return simple[path]
    if path.startswith("status.") and path.endswith(("IP", "IPs")):
        return "127.0.0.1"
    raise ConfigError(f"unsupported fieldRef {path!r}")


def base_env(bin_dir: str, pod: dict, api_port: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k in PASSENV or k.startswith(PASSENV_PREFIXES)}
    for k in filter(None, os.environ.get("LORA_PODRUNNER_PASSENV", "").split(",")):
        if k in os.environ:
            env[k] = os.environ[k]
    env["PATH"] = f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    env["HOSTNAME"] = (pod["spec"].get("hostname") or pod["metadata"]["name"])[:63]
    env[POD_MARK] = pod["metadata"]["uid"]  # inherited by every descendant: the pod's "cgroup"
    if api_port:
        env.update(KUBERNETES_SERVICE_HOST="127.0.0.1", KUBERNETES_SERVICE_PORT=api_port,
                   KUBERNETES_SERVICE_PORT_HTTPS=api_port)
    return env


class PodWorker(threading.Thread):
    """Runs one bound pod to completion; `request_stop` implements graceful deletion."""

    def __init__(self, runner, pod: dict):
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.runner, self.pod, self.api = runner, pod, runner.api
        self.ns, self.pod_name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.dir = Path(runner.work_dir) / f"{self.ns}_{self.pod_name}_{self.uid}"
        self.stop_event = threading.Event()
        self.grace: float = 30.0
        self.delete_after_stop = True
        self.procs: dict[str, subprocess.Popen] = {}
        self.statuses: dict[str, dict] = {}
        self.init_statuses: dict[str, dict] = {}
        self.conditions: dict[str, tuple[str, str]] = {}
        self.start_time = now()
        self.volumes: dict[str, Path] = {}

    # ------------------------------------------------------------------ lifecycle
    def request_stop(self, grace: float, delete: bool = True) -> None:
        self.grace, self.delete_after_stop = grace, delete
        self.stop_event.set()

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:
            self.runner.log(f"{self.name}: internal error: {e!r}")
            self._write_status("Failed", reason="PodRunnerError", message=repr(e)[:1000])
        finally:
            self._kill_all(signal.SIGKILL)
            if self.stop_event.is_set() and self.delete_after_stop:
                self.runner.delete_pod_now(self.ns, self.pod_name, self.uid)

    def _run(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        spec = self.pod["spec"]
        self._set_condition("PodScheduled", "True")
        for c in spec.get("initContainers") or []:
            self.init_statuses[c["name"]] = self._waiting(c, "PodInitializing")
        for c in spec.get("containers", []):
            self.statuses[c["name"]] = self._waiting(c, "ContainerCreating")
        self._set_condition("Initialized", "False")
        self._prepare_with_retry()
        if self.stop_event.is_set():
            return self._finish_stopped()
        for c in spec.get("initContainers") or []:
            if not self._run_containers([c], self.init_statuses):
                return
        self._set_condition("Initialized", "True")
        self._run_containers(spec.get("containers", []), self.statuses)

    def _prepare_with_retry(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.volumes = self._materialize_volumes()
                for c in (self.pod["spec"].get("initContainers") or []) + self.pod["spec"]["containers"]:
                    self._launch_spec(c)  # resolve env/refs early, as the kubelet does
                return
            except ConfigError as e:
                for c in self.pod["spec"]["containers"]:
                    self.statuses[c["name"]] = self._waiting(c, "CreateContainerConfigError", str(e))
                self._write_status("Pending")
                self.stop_event.wait(2.0)

    def _run_containers(self, containers: list[dict], statuses: dict) -> bool:
        """Run containers concurrently until all terminated; True when all succeeded."""
        policy = self.pod["spec"].get("restartPolicy", "Always")
        for c in containers:
            self._start(c, statuses)
        self._write_status("Running" if statuses is self.statuses else "Pending")
        pending = {c["name"]: c for c in containers}
        backoff: dict[str, float] = {}
        phase = "Running" if statuses is self.statuses else "Pending"
        while pending:
            if self.stop_event.wait(0.1):
                return self._finish_stopped()
            changed = False
            for name, c in list(pending.items()):
                if name in backoff:
                    if time.monotonic() >= backoff[name]:
                        del backoff[name]
                        self._start(c, statuses)
                        changed = True
                    continue
                code = self.procs[name].poll()
                if code is None:
                    continue
                changed = True
                self._terminated(c, statuses, code)
                restarts = statuses[name]["restartCount"]
                if (policy == "Always" or (policy == "OnFailure" and code != 0)) \
                        and restarts < MAX_RESTARTS:
                    statuses[name]["restartCount"] += 1
                    statuses[name]["lastState"] = statuses[name]["state"]
                    statuses[name]["state"] = {"waiting": {"reason": "CrashLoopBackOff"}}
                    backoff[name] = time.monotonic() + min(2 ** restarts, 10)
                else:
                    del pending[name]
            if changed and pending:
                self._write_status(phase)
        ok = all(s["state"].get("terminated", {}).get("exitCode") == 0 for s in statuses.values())
        if statuses is self.statuses or not ok:
            self._write_status("Succeeded" if ok else "Failed")
        return ok

    def _finish_stopped(self) -> bool:
        self._kill_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs.values()):
            time.sleep(0.05)
        self._kill_all(signal.SIGKILL)
        for group in (self.init_statuses, self.statuses):
            for c in self._containers():
                if c["name"] in group and c["name"] in self.procs and \
                        "terminated" not in group[c["name"]]["state"]:
                    self._terminated(c, group, self.procs[c["name"]].wait())
        ok = all(s["state"].get("terminated", {}).get("exitCode") == 0
                 for s in self.statuses.values())
        self._write_status("Succeeded" if ok else "Failed")
        return False

    def _kill_all(self, sig: int) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
        if sig == signal.SIGKILL:
            kill_marked(self.uid)

    def _containers(self) -> list[dict]:
        spec = self.pod["spec"]
        return (spec.get("initContainers") or []) + spec.get("containers", [])

    # ------------------------------------------------------------------ processes
    def _start(self, c: dict, statuses: dict) -> None:
        name = c["name"]
        argv, env, cwd = self._launch_spec(c)
        argv = self.runner.dns.wrap(self.pod, self.dir, argv)  # own hostname and /etc/hosts (subdomain)
        term = self.dir / f"{name}.termination-log"
        term.write_text("")
        with open(self.dir / f"{name}.log", "ab") as out:
            try:
                proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
            except OSError as e:
                out.write(f"podrunner: cannot start {argv!r}: {e}\n".encode())
                proc = subprocess.Popen(["sh", "-c", "exit 128"], start_new_session=True)
        self.procs[name] = proc
        (self.dir / f"{name}.pid").write_text(f"{proc.pid}\n")
        statuses[name].update(state={"running": {"startedAt": now()}}, started=True,
                              ready=True, containerID=f"local://{proc.pid}")

    def _terminated(self, c: dict, statuses: dict, code: int) -> None:
        name = c["name"]
        exit_code = 128 - code if code < 0 else code
        message = (self.dir / f"{name}.termination-log").read_bytes()[:4096].decode(errors="replace")
        if not message and exit_code and c.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = (self.dir / f"{name}.log").read_bytes().splitlines()[-80:]
            message = b"\n".join(lines)[-2048:].decode(errors="replace")
        started = statuses[name]["state"].get("running", {}).get("startedAt", now())
        term = {"exitCode": exit_code, "reason": "Completed" if exit_code == 0 else "Error",
                "startedAt": started, "finishedAt": now(), "containerID": f"local://{self.procs[name].pid}"}
        if message:
            term["message"] = message
        statuses[name].update(state={"terminated": term}, ready=False, started=False)

    def _launch_spec(self, c: dict) -> tuple[list[str], dict, str]:
        env = self._resolve_env(c)
        argv = [expand(a, env) for a in (c.get("command") or []) + (c.get("args") or [])]
        if not argv:
            raise ConfigError(f"container {c['name']!r} has no command; the local pod runner "
                              "ignores images, so it needs command/args")
        rewrite = self._rewriter(c)
        env = {k: rewrite(v) for k, v in env.items()}
        cwd = rewrite(c["workingDir"]) if c.get("workingDir") else str(self.dir / "workdir")
        Path(cwd).mkdir(parents=True, exist_ok=True)
        return [rewrite(a) for a in argv], env, cwd

    def _rewriter(self, c: dict):
        mapping = {c.get("terminationMessagePath") or "/dev/termination-log":
                   str(self.dir / f"{c['name']}.termination-log")}
        for m in c.get("volumeMounts") or []:
            local = self.volumes.get(m["name"])
            if local is not None:
                target = local / m["subPath"] if m.get("subPath") else local
                mapping[m["mountPath"].rstrip("/") or "/"] = str(target)
        keys = sorted(mapping, key=len, reverse=True)
        pattern = re.compile(r"(?<![\w.~/-])(" + "|".join(map(re.escape, keys)) + r")((?:/[^\s:;,'\"=]*)?)(?=$|[\s:;,'\"=])")

        def replace(m: re.Match) -> str:
            # A file that exists on this machine under a mount path (a checkout under /tmp, say,
            # with an emptyDir at /tmp) is the host's own file, not one inside the volume.
            if m.group(2) and os.path.exists(m.group(0)):
                return m.group(0)
            return mapping[m.group(1)] + m.group(2)

        return lambda s: pattern.sub(replace, s)

    # ------------------------------------------------------------------ env and volumes
    def _resolve_env(self, c: dict) -> dict:
        env = base_env(self.runner.bin_dir, self.pod, self.runner.api_port)
        for src in c.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "configMapRef" in src:
                ref = src["configMapRef"]
                data = self._configmap(ref["name"], ref.get("optional", False)) or {}
            else:
                ref = src["secretRef"]
                data = self._secret(ref["name"], ref.get("optional", False)) or {}
            env.update({prefix + k: v.decode(errors="replace") if isinstance(v, bytes) else v
                        for k, v in data.items()})
        for e in c.get("env") or []:
            if "valueFrom" not in e:
                env[e["name"]] = expand(e.get("value", ""), env)
                continue
            value = self._value_from(e["valueFrom"], c)
            if value is not None:
                env[e["name"]] = value
        return env

    def _value_from(self, vf: dict, c: dict) -> str | None:
        if "fieldRef" in vf:
            return field_value(self.pod, vf["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in vf:
            res, kind = vf["resourceFieldRef"]["resource"].split(".", 1)
            return str(c.get("resources", {}).get(res, {}).get(kind, "0"))
        kind = "configMapKeyRef" if "configMapKeyRef" in vf else "secretKeyRef"
        ref, optional = vf[kind], vf[kind].get("optional", False)
        data = (self._configmap if kind == "configMapKeyRef" else self._secret)(ref["name"], optional)
        if data is None or ref["key"] not in data:
            if optional:
                return None
            raise ConfigError(f"key {ref['key']!r} not found in {kind[:-6]} {ref['name']!r}")
        v = data[ref["key"]]
        return v.decode(errors="replace") if isinstance(v, bytes) else v

    def _fetch(self, kind: str, name: str, optional: bool) -> dict | None:
        obj = self.api.get(f"/api/v1/namespaces/{self.ns}/{kind}s/{name}")
        if obj is None and not optional:
            raise ConfigError(f"{kind} {name!r} not found")
        return obj

    def _configmap(self, name: str, optional: bool) -> dict | None:
        obj = self._fetch("configmap", name, optional)
        if obj is None:
            return None
        data = dict(obj.get("data") or {})
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
        return data

    def _secret(self, name: str, optional: bool) -> dict | None:
        obj = self._fetch("secret", name, optional)
        if obj is None:
            return None
        return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}

    def _materialize_volumes(self) -> dict[str, Path]:
        out = {}
        for v in self.pod["spec"].get("volumes") or []:
            d = self.dir / "volumes" / v["name"]
            if "hostPath" in v:
                out[v["name"]] = Path(v["hostPath"]["path"])
                continue
            if "persistentVolumeClaim" in v:
                d = Path(self.runner.work_dir).parent / "pvcs" / self.ns / v["persistentVolumeClaim"]["claimName"]
            d.mkdir(parents=True, exist_ok=True)
            out[v["name"]] = d
            sources = v["projected"]["sources"] if "projected" in v else [v]
            mode = (v.get("projected") or v.get("configMap") or v.get("secret")
                    or v.get("downwardAPI") or {}).get("defaultMode", 0o644)
            for src in sources:
                self._write_source(d, src, mode)
        return out

    def _write_source(self, d: Path, src: dict, mode: int) -> None:
        files: dict[str, tuple[bytes | str, int | None]] = {}
        if "configMap" in src or "secret" in src:
            kind = "configMap" if "configMap" in src else "secret"
            ref = src[kind]
            name = ref.get("name") or ref.get("secretName")
            optional = ref.get("optional", False)
            data = (self._configmap if kind == "configMap" else self._secret)(name, optional) or {}
            items = ref.get("items") or [{"key": k, "path": k} for k in data]
            for it in items:
                if it["key"] not in data:
                    if optional:
                        continue
                    raise ConfigError(f"key {it['key']!r} not found in {kind} {name!r}")
                files[it["path"]] = (data[it["key"]], it.get("mode"))
        elif "downwardAPI" in src:
            for it in src["downwardAPI"].get("items") or []:
                if "fieldRef" in it:
                    files[it["path"]] = (field_value(self.pod, it["fieldRef"]["fieldPath"]), it.get("mode"))
        elif "serviceAccountToken" in src:
            token = self.runner.service_account_token(self.pod, src["serviceAccountToken"])
            if token:
                files[src["serviceAccountToken"]["path"]] = (token, None)
        for path, (content, item_mode) in files.items():
            f = d / path
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_bytes(content.encode() if isinstance(content, str) else content)
            f.chmod(item_mode if item_mode is not None else mode)

    # ------------------------------------------------------------------ status
    def _waiting(self, c: dict, reason: str, message: str | None = None) -> dict:
        waiting = {"reason": reason, **({"message": message} if message else {})}
        old = self.statuses.get(c["name"]) or self.init_statuses.get(c["name"]) or {}
        return {"name": c["name"], "image": c.get("image", ""), "imageID": "", "ready": False,
                "started": False, "restartCount": old.get("restartCount", 0),
                "state": {"waiting": waiting}, "lastState": old.get("lastState", {})}

    def _set_condition(self, ctype: str, status: str) -> None:
        if self.conditions.get(ctype, ("",))[0] != status:
            self.conditions[ctype] = (status, now())

    def _write_status(self, phase: str, reason: str | None = None, message: str | None = None) -> None:
        ready = "True" if phase == "Running" and all(s["ready"] for s in self.statuses.values()) else "False"
        self._set_condition("ContainersReady", ready)
        self._set_condition("Ready", ready)
        conditions = [{"type": t, "status": s, "lastTransitionTime": ts, "lastProbeTime": None,
                       **({"reason": "PodCompleted"} if s == "False" and phase in ("Succeeded", "Failed")
                          and t != "PodScheduled" else {})}
                      for t, (s, ts) in self.conditions.items()]
        status = {"phase": phase, "conditions": conditions, "hostIP": "127.0.0.1",
                  "hostIPs": [{"ip": "127.0.0.1"}], "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
                  "startTime": self.start_time,
                  "containerStatuses": list(self.statuses.values()),
                  "reason": reason, "message": message}
        if self.init_statuses:
            status["initContainerStatuses"] = list(self.init_statuses.values())
        self.runner.patch_pod_status(self.ns, self.pod_name, status)


def kill_marked(uid: str) -> None:
    """SIGKILL every process of the pod, also those in their own session (torchrun's workers) or
    orphaned by their parent, as a kubelet does by killing the container's cgroup."""
    mark = f"{POD_MARK}={uid}".encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if mark in f.read().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            pass

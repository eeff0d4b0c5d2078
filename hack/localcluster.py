#!/usr/bin/env python3
"""A real, local Kubernetes control plane for development and tests (dev tooling, not product).

    python hack/localcluster.py up       # build binaries if needed, start, wait until healthy
    python hack/localcluster.py up --kueue   # ... plus real Kueue (localcluster_kueue.py); sticks until --purge
    python hack/localcluster.py status   # exit 0 when everything is up and healthy
    python hack/localcluster.py down     # stop everything started by `up` (idempotent)
    python hack/localcluster.py down --purge   # ... and delete the cluster state in .local/

Runs on loopback with free ports: etcd, kube-apiserver (token auth, Node+RBAC authorization,
service-account signing keys), kube-controller-manager (job, garbage collector, namespace,
service accounts, ...), SeaweedFS S3 (credentials required) and hack/podrunner.py, which plays
kubelet + scheduler for one Node ``local-gpu-node`` with ``nvidia.com/gpu: 8``.

Everything lives under ``<repo>/.local/``: ``kubeconfig`` (admin), ``s3.env``, ``state.json``
(ports, secrets), ``pids/``, ``logs/``, ``pods/`` (pod runner work dirs). Ports and credentials are
kept across down/up so etcd data stays consistent (a port found taken right before its component
starts is replaced, below the kernel's ephemeral range); ``down --purge`` starts from scratch.
Binaries: see hack/build_binaries.py (``KUBEBUILDER_ASSETS`` is honoured).

Failure handling (hack/localcluster_proc.py): a component is dead only when its process exited
(Popen handle, or the pid file's pid with the same start time); a failed attempt stops everything it
started, process groups included, before the one retry; a final failure names the component, its
exit status and log tail, and exits 1 with nothing left running. ``down`` also stops leftovers no
pid file accounts for (any process whose command line names this .local/'s files).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_binaries
import localcluster_kueue as kueue
import localcluster_pki as pki
import localcluster_proc as proc

REPO = Path(__file__).resolve().parent.parent
LOCAL = Path(os.environ.get("LORA_LOCAL_DIR", REPO / ".local"))
NODE_NAME = "local-gpu-node"
SERVICE_CIDR = "10.96.0.0/16"
CONTROLLERS = ",".join(f"{c}-controller" for c in [
    "job", "cronjob", "ttl-after-finished", "garbage-collector", "namespace", "serviceaccount",
    "serviceaccount-token", "resourcequota", "root-ca-certificate-publisher", "replicaset",
    "deployment", "statefulset", "disruption", "endpoints", "endpointslice",
    "clusterrole-aggregation",
])  # deliberately no node-lifecycle-controller: it would taint our fake node
# Components in start order; `down` stops them in reverse.
COMPONENTS = ("etcd", "s3", "kube-apiserver", "kube-controller-manager", "podrunner")
OPTIONAL = ("kueue",)  # started when state.json says so (`up --kueue` sets it; it sticks)
STOP_TIMEOUT = {"s3": 3.0, "kube-apiserver": 5.0, "podrunner": 15.0, "kueue": 10.0}


def log(msg: str) -> None:
    print(f"[localcluster {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- state, ports, binaries

# The ports each component listens on: checked free right before that component starts.
PORTS = {"etcd": ("etcd", "etcd_peer"),
         "s3": ("s3", "s3_grpc", "weed_master", "weed_master_grpc", "weed_volume", "weed_volume_grpc",
                "weed_filer", "weed_filer_grpc"),
         "kube-apiserver": ("apiserver",),
         "kueue": kueue.PORTS}
PORT_NAMES = tuple(p for ports in PORTS.values() for p in ports)


def load_state() -> dict:
    path = LOCAL / "state.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    state.setdefault("admin_token", secrets.token_hex(16))
    state.setdefault("kcm_token", secrets.token_hex(16))
    state.setdefault("s3_access_key", "lora-dev")
    state.setdefault("s3_secret_key", secrets.token_hex(16))
    ports = state.setdefault("ports", {})
    for name in PORT_NAMES:
        if name not in ports:
            ports[name] = proc.pick_port(set(ports.values()))
    save_state(state)
    return state


def save_state(state: dict) -> None:
    LOCAL.mkdir(parents=True, exist_ok=True)
    path = LOCAL / "state.json"
    path.write_text(json.dumps(state, indent=2) + "\n")
    path.chmod(0o600)


def claim_ports(st: dict, component: str) -> None:
    """Move a component to new ports where its recorded ones are taken, right before it starts.

    Ports are kept across down/up where possible (etcd's data remembers its peer URL; a fresh
    kubeconfig is not needed), and the files that name them are rewritten when one moves.
    """
    ports = st["ports"]
    busy = [name for name in PORTS.get(component, ()) if not proc.port_free(ports[name])]
    for name in busy:
        new = proc.pick_port(set(ports.values()))
        log(f"port {ports[name]} ({name}) is taken; using {new}")
        ports[name] = new
    if busy:
        save_state(st)
        write_client_files(st)


def write_client_files(st: dict) -> None:
    pki.write_kubeconfigs(LOCAL, st)
    write_s3_env(st)


def find_binary(name: str) -> str:
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    candidates = [Path(assets) / name] if assets else []
    candidates.append(build_binaries.bin_dir() / name)
    candidates.append(Path(sys.executable).parent / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    raise SystemExit(f"{name} not found (run hack/build-binaries.sh, or pip install the dev extras)")


def signature(component: str) -> str:
    """One argument of the component's command line that names this .local/: finds leftovers."""
    return {"etcd": f"--data-dir={LOCAL / 'etcd'}",
            "s3": f"-dir={LOCAL / 's3'}",
            "kube-apiserver": f"--tls-cert-file={LOCAL / 'pki' / 'apiserver.crt'}",
            "kube-controller-manager": f"--kubeconfig={LOCAL / 'kube-controller-manager.kubeconfig'}",
            "podrunner": f"--work-dir={LOCAL / 'pods'}",
            "kueue": f"--config={LOCAL / 'kueue' / 'config.yaml'}"}[component]


def components(st: dict) -> tuple[str, ...]:
    return COMPONENTS + (("kueue",) if st.get("kueue") else ())


def recorded(name: str) -> proc.Proc | None:
    return proc.recorded(name, LOCAL / "pids", LOCAL / "logs")


# ---------------------------------------------------------------- component command lines

def etcd_argv(st: dict) -> list[str]:
    p = st["ports"]
    return [find_binary("etcd"), "--name=local", signature("etcd"),
            f"--listen-client-urls=http://127.0.0.1:{p['etcd']}",
            f"--advertise-client-urls=http://127.0.0.1:{p['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{p['etcd_peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd_peer']}",
            f"--initial-cluster=local=http://127.0.0.1:{p['etcd_peer']}",
            "--unsafe-no-fsync", "--log-level=warn", "--quota-backend-bytes=2147483648"]


def apiserver_argv(st: dict) -> list[str]:
    p, k = st["ports"], LOCAL / "pki"
    return [find_binary("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={p['apiserver']}",
            signature("kube-apiserver"), f"--tls-private-key-file={k / 'apiserver.key'}",
            f"--client-ca-file={k / 'ca.crt'}",
            f"--token-auth-file={k / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC", "--anonymous-auth=true",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={k / 'sa.pub'}",
            f"--service-account-signing-key-file={k / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # The kubernetes Service cannot point at loopback; pods get KUBERNETES_SERVICE_HOST
            # from the pod runner instead.
            "--endpoint-reconciler-type=none",
            "--allow-privileged=true", "--profiling=false", "--v=1"]


def controller_manager_argv(st: dict) -> list[str]:
    k = LOCAL / "pki"
    return [find_binary("kube-controller-manager"),
            signature("kube-controller-manager"),
            f"--controllers={CONTROLLERS}", "--leader-elect=false",
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={k / 'sa.key'}", f"--root-ca-file={k / 'ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--secure-port=0", "--v=1",
            # The stock 20 requests/s per controller (burst 30) makes the Job controller take minutes
            # to start or finish a thousand Jobs (a pod create and status writes each); clusters
            # that run that many raise it, and so does this one (bench/operator_bench.py).
            "--kube-api-qps=100", "--kube-api-burst=200"]


def s3_argv(st: dict) -> list[str]:
    p = st["ports"]
    (LOCAL / "s3").mkdir(exist_ok=True)
    config = LOCAL / "s3-identities.json"
    config.write_text(json.dumps({"identities": [{
        "name": "admin",
        "credentials": [{"accessKey": st["s3_access_key"], "secretKey": st["s3_secret_key"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    config.chmod(0o600)
    sock = LOCAL / "pids"
    return [find_binary("weed"), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            signature("s3"), "-master.electionTimeout=1s", "-master.telemetry=false",
            f"-master.port={p['weed_master']}", f"-master.port.grpc={p['weed_master_grpc']}",
            "-master.volumeSizeLimitMB=256", "-volume.max=0", "-volume.preStopSeconds=0",
            f"-volume.port={p['weed_volume']}", f"-volume.port.grpc={p['weed_volume_grpc']}",
            f"-filer.port={p['weed_filer']}", f"-filer.port.grpc={p['weed_filer_grpc']}",
            f"-filer.localSocket={sock / 'weed-filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            f"-s3.localSocket={sock / 'weed-s3.sock'}"]


def podrunner_python() -> str:
    """An interpreter with the kubernetes client: $LORA_PYTHON, this one, or the project venv."""
    import importlib.util

    if os.environ.get("LORA_PYTHON"):
        return os.environ["LORA_PYTHON"]
    venv = build_binaries.CACHE / "venv" / "bin" / "python"
    if importlib.util.find_spec("kubernetes") is None and venv.exists():
        return str(venv)
    return sys.executable


def podrunner_env(st: dict) -> dict[str, str]:
    """Pods run this checkout's code, as the operator does: PYTHONPATH (a worktree in front of a
    shared editable install) passes through to them."""
    passenv = [n for n in os.environ.get("LORA_PODRUNNER_PASSENV", "").split(",") if n]
    if os.environ.get("PYTHONPATH") and "PYTHONPATH" not in passenv:
        passenv.append("PYTHONPATH")
    return dict(os.environ, LORA_CLUSTER_APISERVER_PORT=str(st["ports"]["apiserver"]),
                LORA_PODRUNNER_PASSENV=",".join(passenv))


def podrunner_argv(st: dict) -> list[str]:
    python = podrunner_python()
    return [python, str(REPO / "hack" / "podrunner.py"), f"--kubeconfig={LOCAL / 'kubeconfig'}",
            f"--node-name={NODE_NAME}", signature("podrunner")]


# ---------------------------------------------------------------- health

def _get(url: str, token: str | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(LOCAL / "pki" / "ca.crt"))
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, ssl.SSLError):
        return 0, b""


# Which component a failing health check points at.
CHECK_COMPONENT = {"s3": "s3", "apiserver /readyz": "kube-apiserver",
                   "default serviceaccount": "kube-controller-manager",
                   f"node {NODE_NAME} Ready": "podrunner", "kueue /readyz": "kueue"}


def checks(st: dict, procs: dict[str, proc.Proc] | None = None) -> dict[str, bool]:
    """Named health checks, cheapest first; each is True when healthy. ``procs``: the processes
    this `up` started (judged by their Popen handles); otherwise the pid files are read."""
    api = f"https://127.0.0.1:{st['ports']['apiserver']}"
    tok = st["admin_token"]
    out = {"s3": _get(f"http://127.0.0.1:{st['ports']['s3']}/")[0] in (200, 403)}
    out["apiserver /readyz"] = _get(f"{api}/readyz", tok)[0] == 200
    out["default serviceaccount"] = out["apiserver /readyz"] and _get(
        f"{api}/api/v1/namespaces/default/serviceaccounts/default", tok)[0] == 200
    code, body = _get(f"{api}/api/v1/nodes/{NODE_NAME}", tok) if out["apiserver /readyz"] else (0, b"")
    ready = code == 200 and any(c["type"] == "Ready" and c["status"] == "True"
                                for c in json.loads(body).get("status", {}).get("conditions", []))
    out[f"node {NODE_NAME} Ready"] = ready
    if st.get("kueue"):
        out["kueue /readyz"] = _get(f"http://127.0.0.1:{st['ports']['kueue_health']}/readyz")[0] == 200
    for name in components(st):
        p = procs.get(name) if procs is not None else recorded(name)
        out[f"process {name}"] = p is not None and p.alive()
    return out


def ensure_running(procs: dict[str, proc.Proc]) -> None:
    for p in procs.values():
        if not p.alive():
            raise proc.StartError(p.name, p.exit_reason(), p.log)


def wait_healthy(st: dict, procs: dict[str, proc.Proc], deadline: float) -> None:
    while True:
        ensure_running(procs)
        result = checks(st, procs)
        if all(result.values()):
            return
        if time.monotonic() > deadline:
            name = next(CHECK_COMPONENT.get(k, k) for k, v in result.items() if not v)
            failing = ", ".join(k for k, v in result.items() if not v)
            raise proc.StartError(name, f"not healthy in time (failing: {failing})", LOCAL / "logs" / f"{name}.log")
        time.sleep(0.25)


def wait_for(p: proc.Proc, probe, deadline: float) -> None:
    while not probe():
        if not p.alive():
            raise proc.StartError(p.name, p.exit_reason(), p.log)
        if time.monotonic() > deadline:
            raise proc.StartError(p.name, "not ready in time", p.log)
        time.sleep(0.1)


# ---------------------------------------------------------------- commands

ATTEMPTS = 2


def cmd_up(args: argparse.Namespace) -> int:
    started = time.monotonic()
    initialised = (LOCAL / "pki" / "ca.crt").exists()
    if args.kueue:
        save_state({**load_state(), "kueue": True})
    if initialised and all(checks(load_state()).values()):
        log(f"already up ({time.monotonic() - started:.1f}s); KUBECONFIG={LOCAL / 'kubeconfig'}")
        return 0
    cmd_down(argparse.Namespace(purge=False, quiet=True))
    if not os.environ.get("KUBEBUILDER_ASSETS") or not all(
            (Path(os.environ["KUBEBUILDER_ASSETS"]) / b).is_file() for b in build_binaries.BINARIES):
        subprocess.run([sys.executable, str(Path(__file__).parent / "build_binaries.py")], check=True)
    st = load_state()
    if st.get("kueue"):
        subprocess.run([sys.executable, str(Path(__file__).parent / "build_binaries.py"), "--kueue"], check=True)
    pki.ensure(LOCAL / "pki", st, NODE_NAME)
    write_client_files(st)
    # A signal to `up` itself must not leave half a stack behind.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    for attempt in range(1, ATTEMPTS + 1):
        procs: dict[str, proc.Proc] = {}
        try:
            start_components(st, procs, time.monotonic() + args.timeout)
            wait_healthy(st, procs, time.monotonic() + args.timeout)
            if st.get("kueue"):
                apply_sample_queues(time.monotonic() + args.timeout)
        except proc.StartError as e:
            log(f"attempt {attempt}/{ATTEMPTS}: {e}")
            stop_all(procs)
            if attempt == ATTEMPTS:
                raise SystemExit(f"local cluster did not start: {e}\nnothing was left running") from None
            continue
        except BaseException:
            stop_all(procs)
            raise
        log(f"up in {time.monotonic() - started:.1f}s")
        log(f"export KUBECONFIG={LOCAL / 'kubeconfig'}; set -a; . {LOCAL / 's3.env'}; set +a")
        return 0
    return 1


def _exit_on_signal(signum, frame) -> None:
    raise SystemExit(128 + signum)


def start_components(st: dict, procs: dict[str, proc.Proc], deadline: float) -> None:
    def start(name: str, argv, env: dict | None = None) -> proc.Proc:
        claim_ports(st, name)
        p = procs[name] = proc.spawn(name, argv(st), LOCAL / "pids", LOCAL / "logs", LOCAL, env)
        log(f"started {name} (pid {p.pid}), log: {p.log}")
        return p

    etcd = start("etcd", etcd_argv)
    start("s3", s3_argv)
    wait_for(etcd, lambda: _get(f"http://127.0.0.1:{st['ports']['etcd']}/health")[0] == 200, deadline)
    api = start("kube-apiserver", apiserver_argv)
    url = f"https://127.0.0.1:{st['ports']['apiserver']}/readyz"
    wait_for(api, lambda: _get(url, st["admin_token"])[0] == 200, deadline)
    start("kube-controller-manager", controller_manager_argv)
    start("podrunner", podrunner_argv, env=podrunner_env(st))
    if st.get("kueue"):
        claim_ports(st, "kueue")
        install_kueue(st)
        start("kueue", kueue_argv, env=dict(os.environ, KUBECONFIG=str(LOCAL / "kubeconfig")))


# ---------------------------------------------------------------- Kueue (hack/localcluster_kueue.py)

def kubectl(*args: str, input: str | None = None, timeout: float = 120) -> None:
    cmd = [find_binary("kubectl"), f"--kubeconfig={LOCAL / 'kubeconfig'}", *args]
    done = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode:
        raise proc.StartError("kueue", f"kubectl {' '.join(args[:3])} failed: {done.stderr.strip()[-2000:]}")


def install_kueue(st: dict) -> None:
    kueue.install(LOCAL, st["ports"], build_binaries.kueue_source(), kubectl)


def kueue_argv(st: dict) -> list[str]:
    return [str(build_binaries.kueue_bin()), signature("kueue")]


def apply_sample_queues(deadline: float) -> None:
    kueue.apply_with_retry(kubectl, REPO / "examples" / "kueue" / "queues.yaml", deadline, proc.StartError)


def stop_all(procs: dict[str, proc.Proc]) -> None:
    """Stop what this attempt started, newest first, each with its whole process group."""
    for name in reversed(COMPONENTS + OPTIONAL):
        if name in procs:
            procs[name].stop(STOP_TIMEOUT.get(name, 10.0), log=log)
            (LOCAL / "pids" / f"{name}.pid").unlink(missing_ok=True)
            log(f"stopped {name} (pid {procs[name].pid})")


def write_s3_env(st: dict) -> None:
    path = LOCAL / "s3.env"
    path.write_text(f"S3_ENDPOINT=http://127.0.0.1:{st['ports']['s3']}\n"
                    f"AWS_ACCESS_KEY_ID={st['s3_access_key']}\n"
                    f"AWS_SECRET_ACCESS_KEY={st['s3_secret_key']}\n")
    path.chmod(0o600)


def read_s3_env(path: Path | None = None) -> dict[str, str]:
    """The S3 endpoint and credentials `up` wrote (for the demo and the benchmarks)."""
    text = (path or LOCAL / "s3.env").read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def stop_recorded() -> list[str]:
    """Stop each component its pid file names; returns the problems (survivors)."""
    problems = []
    for name in reversed(COMPONENTS + OPTIONAL):
        p = recorded(name)
        if p is not None and p.ours():
            try:
                p.stop(STOP_TIMEOUT.get(name, 10.0), log=log)
                log(f"stopped {name} (pid {p.pid})")
            except RuntimeError as e:
                problems.append(str(e))
        (LOCAL / "pids" / f"{name}.pid").unlink(missing_ok=True)
    return problems


def stop_pod_processes() -> None:
    """Pod processes the runner did not stop (it was killed): each pod container's pid file was
    written right after its process started, so a pid whose start time does not match is not ours."""
    for pid_path in (LOCAL / "pods").glob("*/*.pid"):
        try:
            pid = int(pid_path.read_text())
        except (OSError, ValueError):
            continue
        began = proc.started_at(pid)
        if began is not None and abs(began - pid_path.stat().st_mtime) < 5.0:
            proc.stop_leftovers([pid], log=log)


def cmd_down(args: argparse.Namespace) -> int:
    problems = stop_recorded()
    stop_pod_processes()
    leftovers = proc.with_argument({signature(name) for name in COMPONENTS + OPTIONAL})
    if leftovers:  # e.g. started by an `up` whose pid files were lost or overwritten
        proc.stop_leftovers(leftovers, log=log)
    if args.purge:
        for sub in ("etcd", "s3", "pods", "pvcs", "pki", "logs", "pids", "sessions", "kueue"):
            shutil.rmtree(LOCAL / sub, ignore_errors=True)
        for f in ("state.json", "kubeconfig", "kube-controller-manager.kubeconfig", "s3.env",
                  "s3-identities.json"):
            (LOCAL / f).unlink(missing_ok=True)
        log(f"purged {LOCAL}")
    elif not getattr(args, "quiet", False):
        log("down")
    if problems:
        raise SystemExit("down: " + "; ".join(problems))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if not (LOCAL / "state.json").exists():
        print("not initialised (run: python hack/localcluster.py up)")
        return 1
    st = load_state()
    result = checks(st)
    for name, ok in result.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")
    print(f"KUBECONFIG={LOCAL / 'kubeconfig'}")
    return 0 if all(result.values()) else 1


def locked(func):
    """Serialise up/down across processes (several test sessions may share one .local/)."""
    def wrapper(args: argparse.Namespace) -> int:
        import fcntl

        LOCAL.mkdir(parents=True, exist_ok=True)
        with open(LOCAL / "lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return func(args)
    return wrapper


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the local cluster (no-op when already healthy)")
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for health")
    up.add_argument("--kueue", action="store_true",
                    help="also install and run Kueue (hack/localcluster_kueue.py); stays on for later `up`s")
    up.set_defaults(func=locked(cmd_up))
    down = sub.add_parser("down", help="stop the local cluster")
    down.add_argument("--purge", action="store_true", help="also delete its state in .local/")
    down.set_defaults(func=locked(cmd_down))
    sub.add_parser("status", help="health of each component").set_defaults(func=cmd_status)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""The operator at scale on simulated pods: latency, footprint and API traffic per job.

For each N a fresh namespace gets N LoRATrainingJobs, sent at a fixed rate (RATE, 50/s: Argo CD's
default client QPS, a GitOps sync applying a thousand manifests as fast as its client lets it),
so the arrival does not depend on the operator under test; a send the API server holds up starts
late (`arrival_late_s`). Their pods run on a simulated node (hack/podrunner.py --simulate
--selected-only, started here next to the cluster's real node): no processes, a stand-in trainer
writes progress.json to S3 on a schedule (hack/podsim_script.py). Two groups:

* `instant` (a tenth, at least 5): the pod passes the gate and finishes at once; apply -> Succeeded.
* `training`: trains (a progress.json write every 10 s, as the real trainer's default) for as long
  as the measurement takes; after the window the bench fast-forwards them (the simulated node's
  `podsim.lora.dev/finish-before` annotation) and they pass the gate and succeed.

Measured, client-side clocks: apply (the create answered) -> child Job seen (every job; watch), apply -> Succeeded
(instant group). At the API server's /metrics (apiserver_request_total by verb/resource/
subresource, all clients): requests in the window while every training job trains, per job per
minute (the window opens once every training job's Job counts a Ready pod); LoRATrainingJob
status PATCHes (only the operator writes them); then, once every job has finished, status
PATCHes over an idle window that spans a resync (target 0). The operator's peak RSS (VmHWM) and
CPU seconds (utime + stime) come from /proc; where its time went (queue wait by lane, pass
durations) from its own /metrics, once every Job exists (`profile_arrival`) and at the end.
Each size's namespace stays until the series ends (its jobs have all finished) and is then
deleted in the background: no size waits for the garbage collector of another.

`baseline_src` runs the same series against another operator tree (e.g. `git archive` of an
earlier commit), so before/after are measured on the same machine in the same run.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HACK = ROOT / "hack"  # the local stack's modules (localcluster, localcluster_proc): on the path
if str(HACK) not in sys.path:
    sys.path.insert(0, str(HACK))
LOCAL = Path(os.environ.get("LORA_LOCAL_DIR", ROOT / ".local"))
KUBECONFIG = LOCAL / "kubeconfig"
SIM_NODE = "local-sim-node"
GROUP, VERSION, PLURAL = "training.lora.dev", "v1alpha1", "loratrainingjobs"
METRIC_RE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
LABEL_RE = re.compile(r'(\w+)="([^"]*)"')
INTERVAL = 30.0  # operator resync and progress interval (the defaults), so 2 status PATCHes/job/min at most
STEP_S = 10.0  # the stand-in trainer writes progress.json every 10 s (the real trainer's default)
TRAIN_S = 3600.0  # long enough for any N; ended by fast-forward after the window
# Jobs arrive at a fixed rate: Argo CD's and Flux's default client QPS (50), i.e. a GitOps sync of
# a thousand manifests applying them as fast as its client lets it.
RATE = 50.0
ARRIVAL_THREADS = 50  # 50/s holds while the API server answers within 1 s


def kubectl(*args: str, input: str | None = None) -> str:
    return subprocess.run(["kubectl", "--kubeconfig", str(KUBECONFIG), *args], input=input, text=True,
                          check=True, capture_output=True).stdout


def request_counts() -> Counter:
    """apiserver_request_total summed over codes etc.: {(verb, resource, subresource): n}."""
    counts: Counter = Counter()
    for line in kubectl("get", "--raw", "/metrics").splitlines():
        m = METRIC_RE.match(line)
        if m:
            labels = dict(LABEL_RE.findall(m.group("labels")))
            counts[(labels.get("verb", ""), labels.get("resource", ""), labels.get("subresource", ""))] += \
                float(m.group("value"))
    return counts


def _deltas(before: Counter, after: Counter) -> dict[str, float]:
    """Requests made between two request_counts readings, by "verb/resource[/subresource]"."""
    return {"/".join(filter(None, k)): after[k] - before[k] for k in after if after[k] > before[k]}


def per_job(before: Counter, after: Counter, n: int, top: int = 15) -> dict[str, float]:
    """API requests (all clients) between two readings per job, by verb/resource/subresource,
    the `top` most frequent, and their total."""
    delta = {k: v / max(1, n) for k, v in _deltas(before, after).items()}
    rows = sorted(delta.items(), key=lambda kv: -kv[1])
    return {"total": round(sum(delta.values()), 2), **{k: round(v, 2) for k, v in rows[:top]}}


def status_patches(counts: Counter) -> float:
    return counts[("PATCH", PLURAL, "status")]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def proc_figures(pid: int) -> tuple[float, float]:
    """(VmHWM MB, CPU seconds) of a live process."""
    hwm = next((int(line.split()[1]) / 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:")), float("nan"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return hwm, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def component_cpu(extra: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far (utime + stime, all threads) of each local-stack component its pid file
    names (.local/pids: kube-apiserver, etcd, kube-controller-manager, ...) and of `extra`
    (name -> pid); a process gone or unreadable is left out."""
    from localcluster_proc import recorded  # hack/ (see HACK)

    pids = dict(extra)
    for record in sorted((LOCAL / "pids").glob("*.pid")):
        proc = recorded(record.stem, LOCAL / "pids", LOCAL / "logs")
        if proc is not None:
            pids.setdefault(record.stem, proc.pid)
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = proc_figures(pid)[1]
        except (OSError, IndexError, ValueError):
            continue
    return out


def cpu_between(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each process spent between two component_cpu readings, busiest first."""
    spent = {k: round(after[k] - before[k], 1) for k in after if k in before}
    return dict(sorted(spent.items(), key=lambda kv: -kv[1]))


def _job(name: str, bucket: str, steps: int, step_s: float) -> dict:
    notes = {"fake-trainer/steps": str(steps), "fake-trainer/step-seconds": str(step_s),
             "fake-trainer/checkpoint-every": "6"}
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRATrainingJob",
            "metadata": {"name": name, "annotations": notes},
            "spec": {"baseModel": {"uri": "s3://models/tiny", "revision": "sha256:" + "0" * 64},
                     "dataset": {"train": "s3://data/train.jsonl"}, "output": {"uri": f"s3://{bucket}/{name}"},
                     "storage": {"secretName": "s3-credentials"},
                     "resources": {"gpus": 0, "nodeSelector": {"kubernetes.io/hostname": SIM_NODE}}}}


def start_sim_node(work: Path) -> subprocess.Popen:
    argv = [sys.executable, str(HACK / "podrunner.py"), "--simulate", "--selected-only",
            f"--node-name={SIM_NODE}", f"--kubeconfig={KUBECONFIG}", f"--work-dir={work / 'sim-pods'}"]
    with (work / "sim-node.log").open("a") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_operator(namespace: str, log: Path, s3_endpoint: str, src: Path | None,
                    metrics_port: int) -> subprocess.Popen:
    """The operator on one namespace; returns once its liveness endpoint answers (start-up under
    load takes seconds and is not what we measure)."""
    health = f"http://127.0.0.1:{_free_port()}/healthz"
    env = {**os.environ, "KUBECONFIG": str(KUBECONFIG), "LORA_S3_ENDPOINT": s3_endpoint,
           "LORA_METRICS_PORT": str(metrics_port),
           "LORA_LIVENESS_ENDPOINT": health, "LORA_RESYNC_INTERVAL": str(INTERVAL),
           "LORA_PROGRESS_INTERVAL": str(INTERVAL),
           # the jobs select the simulated node by hostname; the platform's policy must allow that key
           "LORA_ALLOWED_NODE_SELECTOR_KEYS": "kubernetes.io/hostname"}
    if src is not None:  # the baseline tree's operator package first on the path
        env["PYTHONPATH"] = os.pathsep.join([str(src / "operator"), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "lora_operator", "--namespace", namespace], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def live() -> bool:
        try:
            return urllib.request.urlopen(health, timeout=1).status == 200
        except OSError:
            return proc.poll() is not None
    _wait(live, 90, poll=0.3)
    if proc.poll() is not None:
        raise RuntimeError(f"operator exited: {log.read_text()[-2000:]}")
    time.sleep(2)  # kopf's initial listings
    return proc


def operator_profile(port: int) -> dict:
    """Where the operator's time went, from its own /metrics: passes, and the time a queued pass
    waited for a worker by lane (mean; p95 as the upper bound of its histogram bucket). An
    operator without these metrics (an older tree) gives {}."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("lora_operator_queue_wait_seconds", "lora_operator_reconcile_seconds")):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    out = {}
    for label, prefix in (("pass", "lora_operator_reconcile_seconds"),
                          ("wait_urgent", 'lora_operator_queue_wait_seconds'),
                          ("wait_normal", 'lora_operator_queue_wait_seconds')):
        sel = "" if label == "pass" else f'lane="{label.split("_")[1]}"'
        count = samples.get(f"{prefix}_count{{{sel}}}" if sel else f"{prefix}_count", 0.0)
        if not count:
            continue
        total = samples.get(f"{prefix}_sum{{{sel}}}" if sel else f"{prefix}_sum", 0.0)
        buckets = sorted((float(m.group(1)), v) for k, v in samples.items()
                         if k.startswith(f"{prefix}_bucket") and (not sel or sel in k)
                         and (m := re.search(r'le="([^"]+)"', k)) and m.group(1) != "+Inf")
        p95 = next((le for le, v in buckets if v >= 0.95 * count), float("inf"))
        out[label] = {"count": int(count), "mean_s": round(total / count, 4), "p95_le_s": p95}
    return out


class Watcher:
    """First time (client clock) each job's Job appeared, its Job had a Ready pod, it Succeeded."""

    def __init__(self, namespace: str):
        self.namespace = namespace
        self.job_seen: dict[str, float] = {}
        self.ready: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.succeeded: dict[str, float] = {}
        self.status_writes: list[tuple[float, str]] = []  # (client clock, job) of each new status seen
        self._status: dict[str, str] = {}
        self.stop = threading.Event()

    def start(self) -> None:
        for target in (self._jobs, self._ltjs):
            threading.Thread(target=target, daemon=True).start()

    def _stream(self, fn, *args):
        """Watch events, resuming from the last resourceVersion (a re-list of N objects is load)."""
        from kubernetes import client, watch
        from kubernetes.client.exceptions import ApiException

        api, rv = client.ApiClient(), None
        while not self.stop.is_set():
            w = watch.Watch()
            try:
                kwargs = {"timeout_seconds": 300, **({"resource_version": rv} if rv else {})}
                for event in w.stream(fn(api), *args, **kwargs):
                    rv = w.resource_version
                    yield event["object"]
                    if self.stop.is_set():
                        return
            except ApiException as exc:
                rv = None if exc.status == 410 else rv
            except Exception as exc:  # a dropped watch is re-opened; the first sighting is what counts
                print(f"watch: {exc!r}", flush=True)
                time.sleep(1)

    def _jobs(self) -> None:
        from kubernetes import client

        for job in self._stream(lambda api: client.BatchV1Api(api).list_namespaced_job, self.namespace):
            name = (job.metadata.labels or {}).get(f"{GROUP}/job") or job.metadata.name.rsplit("-a", 1)[0]
            t = time.monotonic()
            self.job_seen.setdefault(name, t)
            if job.status.ready or job.status.succeeded:
                self.ready.setdefault(name, t)
            if any(c.type in ("Complete", "Failed") and c.status == "True" for c in job.status.conditions or ()):
                self.finished.setdefault(name, t)

    def _ltjs(self) -> None:
        from kubernetes import client

        def lister(api):
            return client.CustomObjectsApi(api).list_namespaced_custom_object
        for obj in self._stream(lister, GROUP, VERSION, self.namespace, PLURAL):
            self.saw_ltj(obj, time.monotonic())

    def saw_ltj(self, obj: dict, t: float) -> None:
        """One LoRATrainingJob from the watch. Only the operator writes status, so a status that
        differs from the last one seen of that job is one status write (the first sighting is
        the create; a re-list after a dropped watch repeats statuses seen and counts nothing)."""
        name, status = obj["metadata"]["name"], obj.get("status") or {}
        if status.get("phase") == "Succeeded":
            self.succeeded.setdefault(name, t)
        text = json.dumps(status, sort_keys=True)
        if self._status.get(name) != text:
            if name in self._status:
                self.status_writes.append((t, name))
            self._status[name] = text

    def writes_between(self, start: float, end: float, jobs: set[str]) -> Counter:
        """Status writes per job of `jobs` seen in [start, end) (client clock)."""
        return Counter(name for t, name in list(self.status_writes) if start <= t < end and name in jobs)


def _wait(predicate, timeout: float, poll: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


def _minio(s3env: dict):
    from minio import Minio

    endpoint = s3env["S3_ENDPOINT"]
    return Minio(endpoint.split("://", 1)[1], access_key=s3env["AWS_ACCESS_KEY_ID"],
                 secret_key=s3env["AWS_SECRET_ACCESS_KEY"], secure=endpoint.startswith("https"))


def drop_buckets(s3env: dict) -> int:
    """Delete every bucket an operator bench made (`bench-*`, one per size, named after its
    namespace, with all its objects); returns how many. SeaweedFS keeps volumes per bucket (a
    collection), and 40-odd leftover buckets of earlier runs filled the local stack's volume
    server: the stand-in trainers' writes failed with "No writable volumes"."""
    from minio.deleteobjects import DeleteObject

    minio = _minio(s3env)
    dropped = 0
    for bucket in minio.list_buckets():
        if not bucket.name.startswith("bench-"):
            continue
        objects = (DeleteObject(o.object_name) for o in minio.list_objects(bucket.name, recursive=True))
        for error in minio.remove_objects(bucket.name, objects):
            raise RuntimeError(f"cannot empty bucket {bucket.name}: {error}")
        minio.remove_bucket(bucket.name)
        dropped += 1
    return dropped


def _prepare(namespace: str, s3env: dict) -> str:
    from kubernetes import client

    core = client.CoreV1Api()
    core.create_namespace({"metadata": {"name": namespace}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "s3-credentials"}, "stringData": {
        "AWS_ACCESS_KEY_ID": s3env["AWS_ACCESS_KEY_ID"], "AWS_SECRET_ACCESS_KEY": s3env["AWS_SECRET_ACCESS_KEY"]}})
    bucket = namespace
    _minio(s3env).make_bucket(bucket)
    return bucket


def _create_all(namespace: str, bucket: str, n: int, rate: float) -> tuple[dict[str, float], set[str], float]:
    """Job i is sent at i / rate seconds (a fixed arrival, whatever the operator does), by enough
    client threads that a slow answer delays no later send; a send the API server holds up starts
    late. Returns creation times (when the API server answered), the instant group, and the
    latest start behind schedule in seconds."""
    from kubernetes import client

    custom = client.CustomObjectsApi(client.ApiClient(_pool_config(ARRIVAL_THREADS)))
    instant = {f"bench-{i:04d}" for i in range(0, n, 10)} if n >= 50 else {f"bench-{i:04d}" for i in range(min(n, 5))}
    created: dict[str, float] = {}
    late = [0.0]
    t0 = time.monotonic()

    def create(i: int) -> None:
        name = f"bench-{i:04d}"
        due = t0 + i / rate
        time.sleep(max(0.0, due - time.monotonic()))
        late[0] = max(late[0], time.monotonic() - due)
        steps, step_s = (1, 0.0) if name in instant else (int(TRAIN_S / STEP_S), STEP_S)
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, _job(name, bucket, steps, step_s))
        created[name] = time.monotonic()

    with ThreadPoolExecutor(ARRIVAL_THREADS) as pool:
        list(pool.map(create, range(n)))
    return created, instant, late[0]


def _pool_config(size: int):
    from kubernetes import client

    settings = client.Configuration.get_default_copy()
    settings.connection_pool_maxsize = size
    return settings


def run_one(n: int, work: Path, s3env: dict, src: Path | None = None, label: str = "ours",
            window_s: float = 60.0, idle_s: float = INTERVAL + 5, rate: float = RATE, sim_pid: int = 0) -> dict:
    """One size on a fresh namespace. The namespace is left in place (every job in it has
    finished, so it costs the API server nothing while the next size runs); `run` deletes all of
    them at the end, so no size waits for the garbage collector of the one before."""
    namespace = f"bench-{re.sub('[^a-z0-9]+', '-', label.lower())}-{n}-{int(time.time()) % 100000}"
    bucket = _prepare(namespace, s3env)
    metrics_port = _free_port()
    operator = _start_operator(namespace, work / f"operator-{label}-{n}.log", s3env["S3_ENDPOINT"], src,
                               metrics_port)
    watcher = Watcher(namespace)
    watcher.start()
    result: dict = {"n": n, "operator": label, "interval_s": INTERVAL, "arrival_per_s": rate,
                    "namespace": namespace, "loadavg_start": os.getloadavg()[0]}
    processes = {"operator": operator.pid, "bench": os.getpid(), **({"sim-node": sim_pid} if sim_pid else {})}
    try:
        requests0, cpu0, t0 = request_counts(), component_cpu(processes), time.monotonic()
        created, instant, late = _create_all(namespace, bucket, n, rate)
        result.update(create_s=time.monotonic() - t0, arrival_late_s=round(late, 2))
        training = set(created) - instant
        _wait(lambda: len(watcher.job_seen) >= n, 60 + n * 0.2)
        result["all_jobs_s"] = time.monotonic() - t0
        # Who spent the 2 cores from the first apply to the last Job (the operator's share is
        # what it can change; the API server's and etcd's grow with its requests).
        result["cpu_arrival_s"] = cpu_between(cpu0, component_cpu(processes))
        result["requests_arrival_per_job"] = per_job(requests0, request_counts(), n)
        result["profile_arrival"] = operator_profile(metrics_port)  # the passes up to every Job
        # Training means a Ready pod (the operator looks at a starting attempt's pods until then).
        _wait(lambda: training <= set(watcher.ready), 60 + n * 0.2)
        result["all_ready_s"] = time.monotonic() - t0
        _wait(lambda: instant <= set(watcher.succeeded), 30)  # their last writes stay out of the window
        result.update(_window(watcher, training, window_s))
        kubectl("annotate", "node", SIM_NODE, "--overwrite", f"podsim.lora.dev/finish-before={time.time():.3f}")
        t1 = time.monotonic()
        _wait(lambda: len(watcher.succeeded) >= n, 120 + n * 0.6, poll=1)  # 0.2/job ran out at 1,000 under load
        result["finish_all_s"] = time.monotonic() - t1
        # Idle: every job has its final status; the window spans at least one resync (idle_s >
        # INTERVAL), which looks at every job and must write nothing.
        time.sleep(3)
        before = request_counts()
        time.sleep(idle_s)
        result["idle_status_patches"] = status_patches(request_counts()) - status_patches(before)
        result["idle_window_s"] = idle_s
        result["operator_peak_rss_mb"], result["operator_cpu_s"] = proc_figures(operator.pid)
        result["profile"] = operator_profile(metrics_port)
        result["loadavg_end"] = os.getloadavg()[0]  # the 2 cores are shared: say how busy they were
    finally:
        watcher.stop.set()
        os.killpg(operator.pid, signal.SIGTERM)
        try:
            operator.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(operator.pid, signal.SIGKILL)
    apply_job = [watcher.job_seen[k] - created[k] for k in created if k in watcher.job_seen]
    apply_done = [watcher.succeeded[k] - created[k] for k in instant if k in watcher.succeeded]
    result.update(jobs_seen=len(apply_job), p50_s=percentile(apply_job, 0.5), p95_s=percentile(apply_job, 0.95),
                  succeeded=len(watcher.succeeded), instant=len(instant),
                  succeeded_p95_s=percentile(apply_done, 0.95))
    return result


def _window(watcher: Watcher, training: set[str], window_s: float) -> dict:
    """API requests while every training job trains (ends early if one finishes)."""
    all_training = training <= set(watcher.ready)
    before, t0 = request_counts(), time.monotonic()
    while time.monotonic() - t0 < window_s and not (training & set(watcher.finished)):
        time.sleep(0.5)
    span = min(window_s, time.monotonic() - t0)
    after, elapsed = request_counts(), time.monotonic() - t0
    # Per job, from the watch: exactly `span` seconds (the scrape of the API server's /metrics at
    # the end takes seconds at N = 2,000, and the resync reads every job in one burst, so a
    # count over a window a little longer than one interval holds a second read of the jobs read
    # first: the per-minute rate above then overstates; this one is per interval).
    time.sleep(2)  # the last writes' watch events arrive
    writes = watcher.writes_between(t0, t0 + span, training)
    per_interval = sum(writes.values()) / max(1, len(training)) / (span / INTERVAL)
    per_job_min = 60.0 / elapsed / max(1, len(training))
    delta = {k: round(v * per_job_min, 3) for k, v in _deltas(before, after).items()}
    return {"window_s": round(elapsed, 1), "window_all_training": all_training,
            "training_jobs": len(training),
            "status_patches_per_job_min": delta.get(f"PATCH/{PLURAL}/status", 0.0),
            "status_writes_per_job_interval": round(per_interval, 3),
            "status_writes_max_per_job": max(writes.values(), default=0), "status_window_s": round(span, 2),
            "requests_per_job_min": round(sum(delta.values()), 3),
            "list_jobs_per_job_min": delta.get("LIST/jobs", 0.0),
            "requests_by_verb_resource": dict(sorted(delta.items(), key=lambda kv: -kv[1]))}


def settle(timeout: float = 900.0, poll: float = 5.0) -> float:
    """Wait until no namespace of an earlier run (`bench-*`, deleted in the background when that
    series ended) is left; returns the seconds waited. Their garbage collection is a GET and a
    DELETE per object for a minute or two (the namespace controller at 100 QPS; as long as the
    stack stays down if it is stopped before that), which a size measured
    alongside would count as its own traffic (1.6 NetworkPolicy GETs and DELETEs per job per
    minute in one N = 1,000 window) and share its CPU with. Leftovers not yet deleting (a run
    killed before its end) are deleted now."""
    t0 = time.monotonic()
    while True:
        rows = [line.split() for line in kubectl("get", "namespaces", "--no-headers").splitlines()]
        ours = [r for r in rows if r and r[0].startswith("bench-")]
        left = [r[0] for r in ours]
        if not left:
            return round(time.monotonic() - t0, 1)
        active = [r[0] for r in ours if r[1] == "Active"]
        if active:
            kubectl("delete", "namespace", *active, "--wait=false")
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"namespaces of an earlier run still deleting after {timeout:.0f} s: {left}")
        print(f"waiting for {len(left)} namespace(s) of an earlier run to be deleted", flush=True)
        time.sleep(poll)


def controller_manager_qps() -> str:
    """The running kube-controller-manager's client rate, read from its command line (a cluster
    started before hack/localcluster.py raised it still runs the stock 20: restart it)."""
    signature = f"--kubeconfig={LOCAL / 'kube-controller-manager.kubeconfig'}"
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if signature in argv:
            flags = dict(a[2:].split("=", 1) for a in argv if a.startswith("--kube-api-") and "=" in a)
            return f"{flags.get('kube-api-qps', '20 (stock)')} burst {flags.get('kube-api-burst', '30 (stock)')}"
    return "unknown"


def baseline_tree(ref: str, work: Path) -> Path:
    """`git archive REF operator/` into work: the operator as it was at REF."""
    dest = work / f"baseline-{ref[:12]}"
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "operator"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def figures(results: list[dict]) -> list[dict]:
    targets = {50: 2.0, 1000: 5.0}
    rows = []
    for r in results:
        who = "" if r["operator"] == "ours" else f" [{r['operator']}]"
        n, target = r["n"], targets.get(r["n"])
        limit = 60.0 / r["interval_s"]
        rows += [
            {"figure": f"apply->Job p95 s (N={n} at {r['arrival_per_s']:g}/s, p50 {r['p50_s']:.2f}){who}",
             "ours": r["p95_s"],
             "target": f"< {target}" if target else "-", "met": (r["p95_s"] < target) if target else None},
            {"figure": f"apply->Succeeded p95 s (N={n}, instant){who}", "ours": r["succeeded_p95_s"],
             "target": "-", "met": None},
            {"figure": f"operator peak RSS MB (N={n}){who}", "ours": r["operator_peak_rss_mb"],
             "target": "< 300" if n >= 2000 else "-", "met": r["operator_peak_rss_mb"] < 300 if n >= 2000 else None},
            {"figure": f"operator CPU s (N={n}){who}", "ours": r["operator_cpu_s"], "target": "-", "met": None},
            {"figure": f"status writes/job/{r['interval_s']:g} s interval training (N={n}){who}",
             "ours": r["status_writes_per_job_interval"], "target": "<= 1",
             "met": r["status_writes_per_job_interval"] <= 1},
            {"figure": f"status PATCH/job/min training, API server (N={n}){who}", "ours": r["status_patches_per_job_min"],
             "target": f"~{limit:g}", "met": None},
            {"figure": f"API requests/job/min training (N={n}){who}", "ours": r["requests_per_job_min"],
             "target": "-", "met": None},
            {"figure": f"LIST jobs/job/min training (N={n}){who}", "ours": r["list_jobs_per_job_min"],
             "target": "~0", "met": r["list_jobs_per_job_min"] < 0.5},
            {"figure": f"idle status PATCHes in {r['idle_window_s']:.0f} s (N={n}){who}",
             "ours": r["idle_status_patches"], "target": "0",
             # not idle when jobs were still finishing: then the figure says nothing
             "met": r["idle_status_patches"] == 0 if r["succeeded"] == n else None},
        ]
    for row in rows:
        row.update(baseline=None, ratio=None)
    return rows


def run(work: Path, sizes=(50, 500, 1000, 2000), baseline_ref: str | None = None,
        baseline_sizes=(500,), **timing) -> dict:
    """timing: window_s, idle_s, rate of run_one (the smoke test makes them short)."""
    from kubernetes import config
    from localcluster import read_s3_env

    work.mkdir(parents=True, exist_ok=True)
    config.load_kube_config(str(KUBECONFIG))
    kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    s3env = read_s3_env()
    if not controller_manager_qps().startswith("100 "):
        print(f"warning: kube-controller-manager at {controller_manager_qps()} requests/s, not the 100 of "
              "hack/localcluster.py (a cluster started before that change): `localcluster.py down; up`", flush=True)
    settled_s = settle()  # before the clock of any size starts, and before the simulated node
    drop_buckets(s3env)  # of a run killed before its end
    sim = start_sim_node(work)
    results = []
    try:
        time.sleep(3)
        if baseline_ref:
            src = baseline_tree(baseline_ref, work)
            for n in baseline_sizes:
                results.append(run_one(n, work, s3env, src=src, label=f"before {baseline_ref[:12]}",
                                      sim_pid=sim.pid, **timing))
                print(json.dumps(results[-1]), flush=True)
        for n in sizes:
            results.append(run_one(n, work, s3env, sim_pid=sim.pid, **timing))
            print(json.dumps(results[-1]), flush=True)
    finally:
        os.killpg(sim.pid, signal.SIGTERM)
        sim.wait(30)
        subprocess.run(["kubectl", "--kubeconfig", str(KUBECONFIG), "delete", "node", SIM_NODE, "--wait=false"],
                       capture_output=True, check=False)
        # The sizes' namespaces go now, in the background (nothing is measured any more).
        spaces = [r["namespace"] for r in results]
        if spaces:
            subprocess.run(["kubectl", "--kubeconfig", str(KUBECONFIG), "delete", "namespace", *spaces,
                            "--wait=false"], capture_output=True, check=False)
        drop_buckets(s3env)  # every job has finished (or the run failed): nothing writes to them now
    settings = {"sizes": list(sizes), "baseline_ref": baseline_ref,
                "baseline_sizes": list(baseline_sizes) if baseline_ref else [],
                "arrival_per_s": timing.get("rate", RATE), "arrival_threads": ARRIVAL_THREADS,
                "resync_and_progress_interval_s": INTERVAL, "progress_write_every_s": STEP_S,
                "kube_controller_manager_qps": controller_manager_qps(),
                "apply": "the create's answer (client clock); Job seen by a watch",
                "window": "opens once every training job's Job counts a Ready pod",
                "namespaces": "kept until the series ends, then deleted in the background",
                "settled_s": settled_s}
    return {"settings": {**settings, **{k: v for k, v in timing.items() if k != "rate"}},
            "raw": results, "figures": figures(results)}

"""The operator's long-lived objects, built once at startup from the config.

Who triggers a pass: every trigger puts the job's key on a de-duplicating work queue that
`config.workers` threads drain: kopf's event handler (a job new to this operator, including every
job at start-up, or a spec change: a new generation), changes of child Jobs (the Job informer,
clients/informer.py), the resync timer, and a failed pass (again after RETRY_S). The event's or
the resync's body of the job goes with its key, so the pass needs no GET (see reconcile.py for
when it GETs anyway).

The event handler's passes go in the queue's urgent lane (someone waits for the Job), the rest in
the normal lane (workqueue.py); a pass that started an attempt queues its status write as a
normal pass (Reconciler.later). While a thousand new jobs arrive, the API server's time goes to
their ConfigMaps, NetworkPolicies and Jobs first; their status writes (and the Events with them)
mostly follow.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ..api import KIND
from ..api.channel import CHANNEL_KIND
from ..builders import LABEL_JOB, MANAGED_BY
from ..clients.kube import KubeClient
from ..clients.storage import ProgressStore
from ..config import OperatorConfig
from ..observability.metrics import Metrics
from ..status import is_terminal
from .channel import ChannelReconciler
from .reconcile import Reconciler, resource_version
from .workqueue import WorkQueue, start_workers

log = logging.getLogger(__name__)


HANDLER_THREADS = 8  # kopf's executor: the channel handlers (kopf_handlers.py)
RETRY_S = 5.0  # a failed pass runs again after this long (and at every resync)


class Runtime:
    def __init__(self, config: OperatorConfig, namespaces: Iterable[str] = (), kube: KubeClient | None = None):
        self.config = config
        self.namespaces = tuple(namespaces)
        # One pooled connection per thread that may call the API at once: kopf's, the workers and
        # their side creates (reconcile.py: two each), the informers, the resync, the event posters.
        self.kube = kube or KubeClient(timeout=config.request_timeout,
                                       pool_size=HANDLER_THREADS + 3 * config.workers + 8)
        self.metrics = Metrics()
        store = ProgressStore()
        self.reconciler = Reconciler(config, self.kube, store, self.metrics, later=self._later)
        self.channels = ChannelReconciler(config, self.kube, store)
        self.queue = WorkQueue(on_wait=lambda lane, s: self.metrics.queue_wait.labels(lane=lane).observe(s))
        self._held: dict[tuple[str, str], dict[str, Any]] = {}  # bodies for queued passes (no GET)
        self._seen: dict[tuple[str, str], tuple[str, Any]] = {}  # key -> (uid, generation) queued
        self._retry: dict[tuple[str, str], float] = {}  # key -> when a failed pass runs again
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.metrics.serve(self.config.metrics_port)
        self.kube.watch_jobs({"app.kubernetes.io/managed-by": MANAGED_BY}, self.namespaces,
                             self.reconcile_owner_of, self.config.watch_timeout, index_label=LABEL_JOB)
        start_workers(self.queue, self._work, self.config.workers, self._stop)
        self._thread = threading.Thread(target=self._resync_forever, name="lora-resync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def reconcile(self, namespace: str, name: str, fresh: Mapping[str, Any] | None = None) -> None:
        try:
            self.reconciler.reconcile(namespace, name, fresh)
        except Exception:
            self.metrics.reconcile_errors.labels(kind=KIND).inc()
            raise

    def _work(self, key: tuple[str, str]) -> None:
        """A queued pass, with the latest body held for the job when there is one (saves a GET);
        a failed pass is queued again after RETRY_S."""
        with self._lock:
            held = self._held.pop(key, None)
        try:
            with self.metrics.pass_time.time():
                self.reconcile(*key, held)
        except Exception:
            with self._lock:
                self._retry[key] = time.monotonic() + RETRY_S
            raise

    def _hold(self, body: Mapping[str, Any]) -> None:
        """Keep the newest body of a job for its next pass. Caller holds self._lock."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        held = self._held.get(key)
        if held is None or resource_version(body) >= resource_version(held):
            self._held[key] = body

    def _later(self, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        """A pass for this job in the normal lane, with the body its start pass used (it wrote no
        status, so the body is current): the start pass's status write, after new jobs' starts."""
        with self._lock:
            self._hold(body)
        self.enqueue(namespace, name)

    def on_job_event(self, kind: str | None, body: Mapping[str, Any]) -> None:
        """A watch event of a LoRATrainingJob (kind None: kopf's initial listing). Queues a pass
        when the job is new to this operator or its spec changed; its own status writes (and any
        other metadata or status change) queue nothing: the resync looks at the job anyway."""
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if kind == "DELETED":
            with self._lock:
                self._seen.pop(key, None)
                self._held.pop(key, None)
                self._retry.pop(key, None)
            self.reconciler.forget(f"{key[0]}/{key[1]}")
            return
        seen = (meta.get("uid"), meta.get("generation"))
        with self._lock:
            if self._seen.get(key) == seen:
                return
            self._seen[key] = seen
            self._hold(body)
        self.queue.add(key, urgent=True)  # someone waits for its Job (workqueue.py: lanes)

    def reconcile_channel(self, namespace: str, name: str) -> None:
        try:
            self.channels.reconcile(namespace, name)
        except Exception:
            self.metrics.reconcile_errors.labels(kind=CHANNEL_KIND).inc()
            raise

    def enqueue(self, namespace: str, name: str) -> None:
        self.queue.add((namespace, name))

    def reconcile_owner_of(self, child: Mapping[str, Any]) -> None:
        for ref in child.get("metadata", {}).get("ownerReferences") or ():
            if ref.get("kind") == KIND:
                self.enqueue(child["metadata"]["namespace"], ref["name"])

    def resync_once(self) -> int:
        """One LIST of all jobs; queue a pass for each one not finished, with its listed body
        (the pass uses it unless it is older than the job's last status write). Returns how many."""
        items = self.kube.list_ltjs(self.namespaces)
        queued = 0
        for item in items:
            meta, status = item["metadata"], item.get("status") or {}
            # A finished job's pass returns at once; skipping it here saves its GET.
            if is_terminal(status) and status.get("observedGeneration") == meta.get("generation"):
                self.metrics.set_phase(meta["uid"], status.get("phase"))
                continue
            with self._lock:
                self._hold(item)
            self.enqueue(meta["namespace"], meta["name"])
            queued += 1
        self.metrics.forget_except({i["metadata"]["uid"] for i in items})
        self.reconciler.forget_except(f"{i['metadata']['namespace']}/{i['metadata']['name']}" for i in items)
        live = {(i["metadata"]["namespace"], i["metadata"]["name"]) for i in items}
        with self._lock:
            for gone in [k for k in self._seen if k not in live]:
                self._seen.pop(gone, None)
        return queued

    def _retry_due(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [k for k, at in self._retry.items() if at <= now]
            for key in due:
                del self._retry[key]
        for key in due:
            self.enqueue(*key)

    def _resync_forever(self) -> None:
        """The level-based timer: every LORA_RESYNC_INTERVAL, one pass per unfinished job.

        One operator-wide loop instead of a per-object kopf timer, because kopf puts a finalizer on
        every object that has a timer, and this operator promises none (see config.py: Retention).
        """
        next_resync = time.monotonic() + self.config.resync_interval
        while not self._stop.wait(min(1.0, self.config.resync_interval)):
            self._retry_due()
            if time.monotonic() < next_resync:
                continue
            next_resync = time.monotonic() + self.config.resync_interval
            try:
                self.resync_once()
            except Exception as exc:
                log.warning("resync: cannot list LoRATrainingJobs: %s", exc)
            self._resync_channels()

    def _resync_channels(self) -> None:
        """Channels wait for their job to finish and retry storage errors: one pass each per resync."""
        try:
            channels = self.kube.list_channels(self.namespaces)
        except Exception as exc:  # e.g. the channel CRD is not installed (an older chart)
            log.warning("resync: cannot list LoRAAdapterChannels: %s", exc)
            return
        for item in channels:
            meta = item["metadata"]
            try:
                self.reconcile_channel(meta["namespace"], meta["name"])
            except Exception:
                log.exception("resync of channel %s/%s failed", meta["namespace"], meta["name"])

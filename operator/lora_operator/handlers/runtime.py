"""The operator's long-lived objects, built once at startup from the config.

Who triggers a pass: kopf's create/resume/update handlers run theirs at once (kopf retries them
on error); changes of child Jobs (the Job informer, clients/informer.py) and the resync timer put
the owner's key on a de-duplicating work queue that `config.workers` threads drain.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from ..api import KIND
from ..api.channel import CHANNEL_KIND
from ..builders import MANAGED_BY
from ..clients.kube import KubeClient
from ..clients.storage import ProgressStore
from ..config import OperatorConfig
from ..observability.metrics import Metrics
from ..status import is_terminal
from .channel import ChannelReconciler
from .reconcile import Reconciler
from .workqueue import WorkQueue, start_workers

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, config: OperatorConfig, namespaces: Iterable[str] = (), kube: KubeClient | None = None):
        self.config = config
        self.namespaces = tuple(namespaces)
        self.kube = kube or KubeClient(timeout=config.request_timeout)
        self.metrics = Metrics()
        store = ProgressStore()
        self.reconciler = Reconciler(config, self.kube, store, self.metrics)
        self.channels = ChannelReconciler(config, self.kube, store)
        self.queue = WorkQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.metrics.serve(self.config.metrics_port)
        self.kube.watch_jobs({"app.kubernetes.io/managed-by": MANAGED_BY}, self.namespaces,
                             self.reconcile_owner_of, self.config.watch_timeout)
        start_workers(self.queue, lambda key: self.reconcile(*key), self.config.workers, self._stop)
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
        """One LIST of all jobs; queue a pass for each one not finished. Returns how many."""
        items = self.kube.list_ltjs(self.namespaces)
        queued = 0
        for item in items:
            meta, status = item["metadata"], item.get("status") or {}
            # A finished job's pass returns at once; skipping it here saves its GET.
            if is_terminal(status) and status.get("observedGeneration") == meta.get("generation"):
                self.metrics.set_phase(meta["uid"], status.get("phase"))
                continue
            self.enqueue(meta["namespace"], meta["name"])
            queued += 1
        self.metrics.forget_except({i["metadata"]["uid"] for i in items})
        return queued

    def _resync_forever(self) -> None:
        """The level-based timer: every LORA_RESYNC_INTERVAL, one pass per unfinished job.

        One operator-wide loop instead of a per-object kopf timer, because kopf puts a finalizer on
        every object that has a timer, and this operator promises none (see config.py: Retention).
        """
        while not self._stop.wait(self.config.resync_interval):
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

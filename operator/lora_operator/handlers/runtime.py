"""The operator's long-lived objects, built once at startup from the config."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from ..api import KIND
from ..api.channel import CHANNEL_KIND
from ..clients.kube import KubeClient
from ..clients.storage import ProgressStore
from ..config import OperatorConfig
from ..observability.metrics import Metrics
from .channel import ChannelReconciler
from .reconcile import Reconciler

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
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.metrics.serve(self.config.metrics_port)
        self._thread = threading.Thread(target=self._resync_forever, name="lora-resync", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def reconcile(self, namespace: str, name: str) -> None:
        try:
            self.reconciler.reconcile(namespace, name)
        except Exception:
            self.metrics.reconcile_errors.labels(kind=KIND).inc()
            raise

    def reconcile_channel(self, namespace: str, name: str) -> None:
        try:
            self.channels.reconcile(namespace, name)
        except Exception:
            self.metrics.reconcile_errors.labels(kind=CHANNEL_KIND).inc()
            raise

    def reconcile_owner_of(self, child: Mapping[str, Any]) -> None:
        for ref in child.get("metadata", {}).get("ownerReferences") or ():
            if ref.get("kind") == KIND:
                self.reconcile(child["metadata"]["namespace"], ref["name"])

    def _resync_forever(self) -> None:
        """The level-based timer: every LORA_RESYNC_INTERVAL, one pass per unfinished job.

        One operator-wide loop instead of a per-object kopf timer, because kopf puts a finalizer on
        every object that has a timer, and this operator promises none (see config.py: Retention).
        """
        while not self._stop.wait(self.config.resync_interval):
            try:
                items = self.kube.list_ltjs(self.namespaces)
            except Exception as exc:
                log.warning("resync: cannot list LoRATrainingJobs: %s", exc)
                continue
            for item in items:
                meta = item["metadata"]
                try:
                    self.reconcile(meta["namespace"], meta["name"])
                except Exception:
                    log.exception("resync of %s/%s failed", meta["namespace"], meta["name"])
            self.metrics.forget_except({i["metadata"]["uid"] for i in items})
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

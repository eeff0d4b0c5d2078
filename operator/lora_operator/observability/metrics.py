"""Prometheus metrics of the operator, served on LORA_METRICS_PORT (/metrics)."""

from __future__ import annotations

import threading
from datetime import datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from ..api import PHASES

_SHORT = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)  # seconds of one pass or queue wait
_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600)


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return max(0.0, (_parse_time(end) - _parse_time(start)).total_seconds())


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("lora_operator_jobs", "LoRATrainingJobs by phase", ["phase"], registry=r)
        self.reconcile_errors = Counter("lora_operator_reconcile_errors_total",
                                        "Reconcile passes that raised", ["kind"], registry=r)
        self.reconciles = Counter("lora_operator_reconciles_total", "Reconcile passes", registry=r)
        self.queue_wait = Histogram("lora_operator_queue_wait_seconds",
                                    "Time a queued pass waited for a worker", ["lane"], buckets=_SHORT, registry=r)
        self.pass_time = Histogram("lora_operator_reconcile_seconds", "Duration of one reconcile pass",
                                   buckets=_SHORT, registry=r)
        self.job_created = Histogram("lora_operator_apply_to_job_created_seconds",
                                     "LoRATrainingJob creation to its first Job", buckets=_BUCKETS, registry=r)
        self.queue_time = Histogram("lora_operator_time_in_queue_seconds",
                                    "LoRATrainingJob creation to first Running", buckets=_BUCKETS, registry=r)
        self.training = Histogram("lora_operator_training_duration_seconds",
                                  "startTime to completionTime of finished jobs", ["phase"],
                                  buckets=_BUCKETS, registry=r)
        self._phases: dict[str, str] = {}
        self._lock = threading.Lock()
        for p in PHASES:  # every phase is exported, 0 until a job is in it
            self.jobs.labels(phase=p).set(0)

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, registry=self.registry)

    def set_phase(self, uid: str, phase: str | None) -> None:
        """O(1): move one job between phase counts (passes call this for every job)."""
        with self._lock:
            old = self._phases.pop(uid, None)
            if phase:
                self._phases[uid] = phase
            if old == phase:
                return
            if old:
                self.jobs.labels(phase=old).dec()
            if phase:
                self.jobs.labels(phase=phase).inc()

    def forget_except(self, uids: set[str]) -> None:
        for uid in set(self._phases) - uids:
            self.set_phase(uid, None)

    def observe_between(self, histogram, start: str | None, end: str | None, **labels) -> None:
        seconds = _seconds_between(start, end)
        if seconds is not None:
            (histogram.labels(**labels) if labels else histogram).observe(seconds)

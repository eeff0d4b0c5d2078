"""One level-based pass over one LoRATrainingJob: observe, act, derive, write.

Every pass starts from a fresh GET and the live children, so it is the same after an operator
restart, a retried handler or a missed event. Passes for one object are serialized by a lock (kopf
handlers, the child-Job watch and the resync thread may all ask at once); children have
deterministic names, so a repeated create adopts (AlreadyExists) instead of duplicating.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..api import LoRATrainingJobSpec, SpecError, parse_spec
from ..builders import (
    LABEL_JOB,
    MANAGED_BY,
    JobParams,
    Owner,
    build_configmap,
    build_job,
    build_service,
    selector_labels,
)
from ..clients.kube import KubeClient, now_rfc3339
from ..clients.storage import ProgressStore
from ..config import OperatorConfig
from ..observability.metrics import Metrics
from ..status import (
    DEACTIVATED_BY,
    OWNED_FIELDS,
    Blocked,
    JobView,
    Observed,
    WorkloadView,
    attempt_events,
    check_kueue,
    check_policy,
    check_quota,
    check_running_limit,
    conditions,
    derive_status,
    is_terminal,
    job_view,
    plan,
    resolve_image,
    resolve_queue,
    running_elsewhere,
    transition_events,
    workload_view,
)
from ..status.channel import resolve_champion

log = logging.getLogger(__name__)
KUEUE_GROUP = "kueue.x-k8s.io"


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or ())


class Reconciler:
    def __init__(self, config: OperatorConfig, kube: KubeClient, storage: ProgressStore, metrics: Metrics,
                 clock: Callable[[], str] = now_rfc3339):
        self.config, self.kube, self.storage, self.metrics, self.clock = config, kube, storage, metrics, clock
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._progress: dict[str, tuple[float, dict | None]] = {}

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def reconcile(self, namespace: str, name: str, fresh: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """Run one pass; returns the status written (or kept), None when the object is gone.

        `fresh`: a body just delivered by the watch for a new object (kopf's create handler),
        which saves the GET on the path from apply to Job; every other pass GETs."""
        with self._lock(f"{namespace}/{name}"):
            body = dict(fresh) if fresh is not None else self.kube.get_ltj(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None
            self.metrics.reconciles.inc()
            return self._pass(body)

    def _pass(self, body: dict[str, Any]) -> dict[str, Any]:
        prev = body.get("status") or {}
        generation = body["metadata"].get("generation")
        if is_terminal(prev) and prev.get("observedGeneration") == generation:
            self.metrics.set_phase(body["metadata"]["uid"], prev.get("phase"))
            return prev
        owner = Owner.from_body(body)
        now = self.clock()
        spec, invalid = self._validate(body)
        if invalid or spec is None:
            return self._write(body, Observed(generation, now, prev, invalid=invalid))
        queue = resolve_queue(spec, self.config)
        raw = [j for j in self.kube.list_jobs(owner.namespace, selector_labels(owner.name)) if _owned_by(j, owner.uid)]
        jobs = [self._view(owner, job, prev) for job in raw]
        workload = self._workload(owner, raw) if queue else None
        decision = plan(jobs, prev.get("attempts") or (), suspend=spec.suspend,
                        max_retries=spec.max_retries, kueue_managed=bool(queue), workload=workload)
        if decision.suspend_job is not None:
            jobs = self._set_suspend(owner, jobs, decision.suspend_job)
        if decision.workload_active is not None and workload is not None:
            workload = self._set_workload_active(owner, workload, decision.workload_active)
        blocked: Blocked | None = None
        started = False
        if decision.start_attempt:
            blocked = self._admission(owner, spec, queue)
            if blocked is None:
                jobs.append(self._start(body, owner, spec, queue, decision.start_attempt))
                started = True
        # A Job created this pass has written nothing yet: read on the next pass, not now.
        progress = None if started else self._read_progress(owner, spec, jobs)
        return self._write(body, Observed(
            generation, now, prev, suspend=spec.suspend, max_retries=spec.max_retries, queue_name=queue,
            jobs=tuple(jobs), blocked=blocked, progress=progress, workload=workload))

    def _validate(self, body: Mapping[str, Any]) -> tuple[LoRATrainingJobSpec | None, tuple[str, str] | None]:
        try:
            spec = parse_spec(body.get("spec"))
        except SpecError as exc:
            return None, (conditions.INVALID_SPEC, str(exc))
        return spec, check_policy(spec, self.config)

    def _view(self, owner: Owner, job: Mapping[str, Any], prev: Mapping[str, Any]) -> JobView:
        """Look at the pods only once per finished attempt: afterwards status.attempts remembers."""
        view = job_view(job)
        recorded = next((a for a in prev.get("attempts") or () if a.get("index") == view.attempt), {})
        if view.outcome and not recorded.get("outcome"):
            return job_view(job, self.kube.list_job_pods(owner.namespace, view.name))
        return view

    def _set_suspend(self, owner: Owner, jobs: list[JobView], suspend: bool) -> list[JobView]:
        current = max(jobs, key=lambda j: j.attempt)
        log.info("%s Job %s/%s", "suspending" if suspend else "resuming", owner.namespace, current.name)
        patched = job_view(self.kube.patch_job_suspend(owner.namespace, current.name, suspend))
        return [patched if j.name == current.name else j for j in jobs]

    def _workload(self, owner: Owner, raw: list[dict[str, Any]]) -> WorkloadView | None:
        """Kueue's Workload of the live (unfinished) Job, if any."""
        live = [j for j in raw if job_view(j).outcome is None]
        if not live:
            return None
        current = max(live, key=lambda j: job_view(j).attempt)
        found = self.kube.get_workload(owner.namespace, current["metadata"]["uid"])
        return workload_view(found) if found else None

    def _set_workload_active(self, owner: Owner, workload: WorkloadView, active: bool) -> WorkloadView:
        log.info("%s Kueue Workload %s/%s", "reactivating" if active else "deactivating", owner.namespace, workload.name)
        marker = None if active else MANAGED_BY  # reactivate later only what we deactivated
        return workload_view(self.kube.patch_workload_active(owner.namespace, workload.name, active,
                                                             {DEACTIVATED_BY: marker}))

    def _admission(self, owner: Owner, spec: LoRATrainingJobSpec, queue: str | None) -> Blocked | None:
        if queue:
            blocked = check_kueue(queue, self.kube.has_api_group(KUEUE_GROUP))
            if blocked:
                return blocked
        if self.config.policy.max_running_jobs_per_namespace:
            siblings = self.kube.list_jobs(owner.namespace, {"app.kubernetes.io/managed-by": MANAGED_BY})
            mine = selector_labels(owner.name)[LABEL_JOB]
            blocked = check_running_limit(running_elsewhere(siblings, mine, LABEL_JOB), self.config)
            if blocked:
                return blocked
        return check_quota(self.kube.list_quotas(owner.namespace), spec)

    def _start(self, body: Mapping[str, Any], owner: Owner, spec: LoRATrainingJobSpec,
               queue: str | None, attempt: int) -> JobView:
        image, endpoint = resolve_image(spec, self.config), self.config.s3_endpoint
        self.kube.create(build_configmap(owner, spec, image=image, endpoint=endpoint,
                                         champion=self._champion(owner, spec)))
        if spec.resources.nodes > 1:
            self.kube.create(build_service(owner))
        params = JobParams(attempt=attempt, image=image, trainer_command=self.config.trainer_command,
                           endpoint=endpoint, queue_name=queue,
                           termination_grace_seconds=self.config.termination_grace_seconds,
                           rendezvous_timeout_seconds=self.config.rendezvous_timeout_seconds,
                           collective_timeout_seconds=self.config.collective_timeout_seconds)
        job = self.kube.create(build_job(owner, spec, params))
        log.info("attempt %d of %s/%s: Job %s", attempt, owner.namespace, owner.name, job["metadata"]["name"])
        self.kube.emit_event(body, "Normal", "AttemptStarted", f"Job {job['metadata']['name']} (attempt {attempt})")
        if attempt == 1:
            self.metrics.observe_between(self.metrics.job_created, body["metadata"].get("creationTimestamp"),
                                         job["metadata"].get("creationTimestamp"))
        return job_view(job)

    def _champion(self, owner: Owner, spec: LoRATrainingJobSpec) -> dict[str, Any] | None:
        """Resolved once, when the first attempt's ConfigMap is made; later attempts reuse it."""
        gate = spec.evaluation.gate.champion
        if gate is None:
            return None
        body = self.kube.get_channel(owner.namespace, gate.channel)
        return resolve_champion(gate.channel, body, spec.base_model.revision)

    def _read_progress(self, owner: Owner, spec: LoRATrainingJobSpec, jobs: list[JobView]) -> dict | None:
        """progress.json, at most once per LORA_PROGRESS_INTERVAL, always when an attempt ended."""
        if not jobs:
            return None
        current = max(jobs, key=lambda j: j.attempt)
        cached = self._progress.get(owner.uid)
        fresh = cached and time.monotonic() - cached[0] < self.config.progress_interval
        if fresh and current.outcome is None:
            return cached[1]
        endpoint = spec.storage.endpoint or self.config.s3_endpoint
        if not endpoint:
            return None
        access, secret = self._credentials(owner, spec)
        data = self.storage.read_progress(endpoint, spec.output.uri, access, secret)
        self._progress[owner.uid] = (time.monotonic(), data)
        return data

    def _credentials(self, owner: Owner, spec: LoRATrainingJobSpec) -> tuple[str | None, str | None]:
        if self.config.s3_access_key:
            return self.config.s3_access_key, self.config.s3_secret_key
        if spec.storage.secret_name and self.config.read_job_secrets:
            keys = self.kube.read_secret_keys(owner.namespace, spec.storage.secret_name,
                                              ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
            return keys.get("AWS_ACCESS_KEY_ID"), keys.get("AWS_SECRET_ACCESS_KEY")
        return None, None

    def _write(self, body: Mapping[str, Any], obs: Observed) -> dict[str, Any]:
        meta, prev = body["metadata"], obs.previous
        status = derive_status(obs)
        if status != {k: prev.get(k) for k in OWNED_FIELDS}:
            self.kube.patch_status(meta["namespace"], meta["name"], status)
        for event in [*attempt_events(prev.get("attempts"), status["attempts"]),
                      *transition_events(prev.get("conditions"), status["conditions"])]:
            log.info("%s/%s %s: %s", meta["namespace"], meta["name"], event.reason, event.message)
            self.kube.emit_event(body, event.type, event.reason, event.message)
        self._observe(meta, prev, status)
        return status

    def _observe(self, meta: Mapping[str, Any], prev: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        self.metrics.set_phase(meta["uid"], status["phase"])
        if status.get("startTime") and not prev.get("startTime"):
            self.metrics.observe_between(self.metrics.queue_time, meta.get("creationTimestamp"), status["startTime"])
        if is_terminal(status) and not is_terminal(prev):
            self.metrics.observe_between(self.metrics.training, status.get("startTime"),
                                         status.get("completionTime"), phase=status["phase"])

"""One level-based pass over one LoRATrainingJob: observe, act, derive, write.

Every pass starts from a fresh body and the live children, so it is the same after an operator
restart, a retried handler or a missed event. Passes for one object are serialized by a lock (kopf
handlers, the child-Job watch and the resync thread may all ask at once); children have
deterministic names, so a repeated create finds its own child (AlreadyExists) instead of
duplicating. A child of that name owned by anything else (an orphan of a deleted job of the same
name, or an object a tenant made up) is never used: the job waits with Admitted=False NameConflict.

A fresh body is a GET, or one the caller already holds that is no older than this operator's
last status write of the job: the watch event's body (kopf's event handler) or the resync's LIST
(a GET per job per resync pass was the largest request count while training at N = 1,000). The
operator is the only writer of the status, so such a body's status is current; its spec is at
most as stale as the watch, and a spec change (a new generation) queues a pass of its own.

Memory per job (locks, the last progress.json, the resourceVersion last written) is dropped when
the job is found gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

from ..api import KIND, LoRATrainingJobSpec, SpecError, check_name, parse_spec
from ..builders import (
    LABEL_JOB,
    MANAGED_BY,
    JobParams,
    Owner,
    build_configmap,
    build_job,
    build_network_policy,
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
    accept_report,
    attempt_events,
    attempt_started,
    check_kueue,
    check_policy,
    check_quota,
    check_running_limit,
    conditions,
    derive_status,
    egress_ports,
    is_own_endpoint,
    is_terminal,
    job_endpoint,
    job_view,
    live_pods,
    plan,
    resolve_image,
    resolve_queue,
    running_elsewhere,
    total_gpus,
    transition_events,
    workload_view,
)
from ..status.channel import resolve_champion
from .starts import StartLedger

log = logging.getLogger(__name__)
READ_DUE = 0.75  # of the progress interval: a progress read is due (see _read_progress)
KUEUE_GROUP = "kueue.x-k8s.io"


def resource_version(obj: Mapping[str, Any] | None) -> int:
    """A resourceVersion as a number (etcd's revision), -1 when absent or not a number."""
    try:
        return int(((obj or {}).get("metadata") or {}).get("resourceVersion"))
    except (TypeError, ValueError):
        return -1


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in obj.get("metadata", {}).get("ownerReferences") or ())


class NameTaken(Exception):
    """A child's name belongs to an object this LoRATrainingJob does not own."""

    def __init__(self, obj: Mapping[str, Any]):
        meta = obj.get("metadata", {})
        owners = ", ".join(f"{r.get('kind')} {r.get('name')} (uid {r.get('uid')})"
                           for r in meta.get("ownerReferences") or ()) or "no owner"
        super().__init__(f"{obj.get('kind')} {meta.get('namespace')}/{meta.get('name')} already exists and is not "
                         f"owned by this {KIND} (owned by {owners}); it is left untouched: delete or rename it")


@dataclass
class _Read:
    """The last progress.json read of one job, and the problems already reported for it."""

    uid: str
    at: float
    report: dict | None
    reported: tuple[str, ...] = ()


class Reconciler:
    def __init__(self, config: OperatorConfig, kube: KubeClient, storage: ProgressStore, metrics: Metrics,
                 clock: Callable[[], str] = now_rfc3339,
                 later: Callable[[str, str, Mapping[str, Any]], None] | None = None):
        """later(namespace, name, body): when given, a pass that started an attempt leaves its
        status write to a pass it queues this way (the runtime's normal lane), so that while new
        jobs arrive their starts come first; without it the pass writes at once."""
        self.config, self.kube, self.storage, self.metrics, self.clock = config, kube, storage, metrics, clock
        self.later = later
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._progress: dict[str, _Read] = {}
        self._starts = StartLedger()  # the namespace running limit under parallel passes
        self._written: dict[str, int] = {}  # key -> resourceVersion of our last status write
        # A start's children other than the Job are created side by side (workers x 2 at most).
        self._side = ThreadPoolExecutor(max_workers=2 * config.workers, thread_name_prefix="lora-children")

    def _lock(self, key: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def forget(self, key: str) -> None:
        """Drop what is kept for one job (`namespace/name`): it is gone."""
        with self._guard:
            self._locks.pop(key, None)
            self._progress.pop(key, None)
            self._written.pop(key, None)

    def forget_except(self, keys: Iterable[str]) -> None:
        """Drop what is kept for every job not in `keys` (the live ones, from a full list)."""
        live = set(keys)
        with self._guard:
            for gone in [k for k in self._locks if k not in live]:
                self._locks.pop(gone, None)
            for gone in [k for k in self._progress if k not in live]:
                self._progress.pop(gone, None)
            for gone in [k for k in self._written if k not in live]:
                self._written.pop(gone, None)

    def reconcile(self, namespace: str, name: str, fresh: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """Run one pass; returns the status written (or kept), None when the object is gone.

        `fresh`: a body the caller holds (the watch event's: no GET on the path from apply to
        Job; the resync's LIST: no GET per job per resync), used when it is no older than
        our last status write of the job; otherwise, and without one, the pass GETs."""
        key = f"{namespace}/{name}"
        with self._lock(key):
            written = self._written.get(key)
            usable = fresh is not None and (written is None or resource_version(fresh) >= written)
            body = dict(fresh) if usable else self.kube.get_ltj(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                self.forget(key)
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
        started: JobView | None = None
        if decision.start_attempt:
            limited = self.config.policy.max_running_jobs_per_namespace > 0
            with self._starts.lock(owner.namespace) if limited else nullcontext():  # count, then create
                blocked = self._previous_pods_gone(owner, jobs) or self._admission(owner, spec, queue)
                if blocked is None:
                    try:
                        started = self._start(body, owner, spec, queue, decision.start_attempt)
                        jobs.append(started)
                    except NameTaken as taken:
                        blocked = Blocked(conditions.NAME_CONFLICT, str(taken))
                if started and limited:
                    self._starts.started(owner.namespace, started.name, selector_labels(owner.name)[LABEL_JOB])
        observed = Observed(generation, now, prev, suspend=spec.suspend, max_retries=spec.max_retries,
                            queue_name=queue, jobs=tuple(jobs), blocked=blocked, workload=workload)
        if started:
            # A Job created this pass has written nothing yet: no progress read until the interval.
            self._progress[f"{owner.namespace}/{owner.name}"] = _Read(owner.uid, time.monotonic(), None)
            if self.later is not None:  # the status write waits behind the next new job's start
                self.later(owner.namespace, owner.name, body)
                return derive_status(observed)
            return self._write(body, observed)
        return self._write(body, replace(observed, progress=self._read_progress(body, owner, spec, jobs)))

    def _validate(self, body: Mapping[str, Any]) -> tuple[LoRATrainingJobSpec | None, tuple[str, str] | None]:
        try:
            spec = parse_spec(body.get("spec"))
            check_name(body["metadata"]["name"], spec)
        except SpecError as exc:
            return None, (conditions.INVALID_SPEC, str(exc))
        return spec, check_policy(spec, self.config)

    def _view(self, owner: Owner, job: Mapping[str, Any], prev: Mapping[str, Any]) -> JobView:
        """Look at the pods once per finished attempt (afterwards status.attempts remembers), and
        while a live attempt's pods are not ready (to name a missing Secret)."""
        view = job_view(job)
        recorded = next((a for a in prev.get("attempts") or () if a.get("index") == view.attempt), {})
        finished_unrecorded = view.outcome and not recorded.get("outcome")
        starting = view.outcome is None and not view.suspended and view.active > view.ready
        if finished_unrecorded or starting:
            return job_view(job, self.kube.list_job_pods(owner.namespace, view.name))
        return view

    def _previous_pods_gone(self, owner: Owner, jobs: list[JobView]) -> Blocked | None:
        """Attempt N+1 starts only when attempt N's pods have stopped: they may still write checkpoints."""
        if not jobs:
            return None
        last = max(jobs, key=lambda j: j.attempt)
        running = last.terminating or len(live_pods(self.kube.list_job_pods(owner.namespace, last.name)))
        if not running:
            return None
        return Blocked(conditions.PODS_TERMINATING, (
            f"attempt {last.attempt + 1} starts when the {running} pod(s) of attempt {last.attempt} "
            f"(Job {last.name}) have stopped"))

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
        secret = spec.storage.secret_name
        if secret and self.config.read_job_secrets and self.kube.secret_exists(owner.namespace, secret) is False:
            return Blocked(conditions.SECRET_NOT_FOUND, (
                f"spec.storage.secretName: Secret {secret} does not exist in namespace {owner.namespace}; "
                "the job starts when it does"))
        if self.config.policy.max_running_jobs_per_namespace:
            siblings = self.kube.list_jobs(owner.namespace, {"app.kubernetes.io/managed-by": MANAGED_BY})
            mine = selector_labels(owner.name)[LABEL_JOB]
            listed = (j.get("metadata", {}).get("name") for j in siblings)
            running = running_elsewhere(siblings, mine, LABEL_JOB) + self._starts.unseen(owner.namespace, listed, mine)
            blocked = check_running_limit(running, self.config)
            if blocked:
                return blocked
        # Only GPUs are checked against quotas: a job without any needs no LIST on its way to a Job.
        return check_quota(self.kube.list_quotas(owner.namespace), spec) if total_gpus(spec) else None

    def _start(self, body: Mapping[str, Any], owner: Owner, spec: LoRATrainingJobSpec,
               queue: str | None, attempt: int) -> JobView:
        image, endpoint = resolve_image(spec, self.config), self.config.s3_endpoint
        first = [build_configmap(owner, spec, image=image, endpoint=endpoint, champion=self._champion(owner, spec))]
        if self.config.network_policy:
            first.append(build_network_policy(owner, egress_ports(spec, self.config)))
        if spec.resources.nodes > 1:
            first.append(build_service(owner))
        # All of them exist before the Job does (its pods never run unfenced, and find their
        # ConfigMap and Service); they do not depend on each other, so one round trip for all.
        self._create_all(owner, first)
        params = JobParams(attempt=attempt, image=image, trainer_command=self.config.trainer_command,
                           endpoint=endpoint, queue_name=queue,
                           termination_grace_seconds=self.config.termination_grace_seconds,
                           ephemeral_storage=self.config.default_ephemeral_storage,
                           rendezvous_timeout_seconds=self.config.rendezvous_timeout_seconds,
                           collective_timeout_seconds=self.config.collective_timeout_seconds)
        job = self._create(owner, build_job(owner, spec, params))
        log.info("attempt %d of %s/%s: Job %s", attempt, owner.namespace, owner.name, job["metadata"]["name"])
        if attempt == 1:
            self.metrics.observe_between(self.metrics.job_created, body["metadata"].get("creationTimestamp"),
                                         job["metadata"].get("creationTimestamp"))
        return job_view(job)

    def _create_all(self, owner: Owner, manifests: list[Mapping[str, Any]]) -> None:
        """Create side by side; returns when all exist, raises the first failure (after all ended)."""
        if len(manifests) == 1:
            self._create(owner, manifests[0])
            return
        futures = [self._side.submit(self._create, owner, m) for m in manifests]
        wait(futures)
        for future in futures:
            future.result()

    def _create(self, owner: Owner, manifest: Mapping[str, Any]) -> dict[str, Any]:
        obj = self.kube.create(manifest)
        if not _owned_by(obj, owner.uid):
            raise NameTaken({"kind": manifest["kind"], **obj})
        return obj

    def _champion(self, owner: Owner, spec: LoRATrainingJobSpec) -> dict[str, Any] | None:
        """Resolved once, when the first attempt's ConfigMap is made; later attempts reuse it."""
        gate = spec.evaluation.gate.champion
        if gate is None:
            return None
        body = self.kube.get_channel(owner.namespace, gate.channel)
        return resolve_champion(gate.channel, body, spec.base_model.revision)

    def _read_progress(self, body: Mapping[str, Any], owner: Owner, spec: LoRATrainingJobSpec,
                       jobs: list[JobView]) -> dict | None:
        """progress.json, about once per LORA_PROGRESS_INTERVAL, always when an attempt ended.

        The resync (every interval) is what brings most reads; its passes come a few seconds early
        or late with the queue's wait, so a read is due after READ_DUE of the interval. A strict
        "a whole interval" skipped every early resync pass, and jobs started together then read
        once per two intervals, all in the same half (the bench's N = 1,000 window saw none).
        Only the validated part is used; what was dropped is told once, as a Warning Event.
        """
        if not jobs:
            return None
        key = f"{owner.namespace}/{owner.name}"
        current = max(jobs, key=lambda j: j.attempt)
        cached = self._progress.get(key)
        cached = cached if cached and cached.uid == owner.uid else None
        due = READ_DUE * self.config.progress_interval
        if cached and current.outcome is None and time.monotonic() - cached.at < due:
            return cached.report
        endpoint = job_endpoint(spec, self.config)
        if not endpoint:
            return None
        access, secret = self._credentials(owner, spec, endpoint)
        report, problems = accept_report(self.storage.read_progress(endpoint, spec.output.uri, access, secret),
                                         owner.uid)
        reported = cached.reported if cached else ()
        if problems and problems != reported:
            self.kube.emit_event(body, "Warning", conditions.INVALID_PROGRESS, "; ".join(problems))
        self._progress[key] = _Read(owner.uid, time.monotonic(), report, problems or reported)
        return report

    def _credentials(self, owner: Owner, spec: LoRATrainingJobSpec, endpoint: str) -> tuple[str | None, str | None]:
        """The operator's own keys only for its own endpoint; else the job's Secret, from the job's
        namespace (the endpoint passed the policy's allowlist); else none (anonymous)."""
        if self.config.s3_access_key and is_own_endpoint(endpoint, self.config):
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
            written = self.kube.patch_status(meta["namespace"], meta["name"], status)
            if resource_version(written) >= 0:
                with self._guard:
                    self._written[f"{meta['namespace']}/{meta['name']}"] = resource_version(written)
        events = attempt_started(prev.get("attempts"), status["attempts"],
                                 transition_events(prev.get("conditions"), status["conditions"]))
        for event in [*attempt_events(prev.get("attempts"), status["attempts"]), *events]:
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

"""Pure promotion logic for LoRAAdapterChannel: may this job be promoted, and the channel's status.

Decision order (the table tests pin it): invalid spec > no channel root > pointer unreadable >
already live > job missing or unfinished (Pending) > job failed or gate not Passed > base revision
differs > artifacts incomplete or invalid > promote. Anything but "promote" leaves the pointer and
the syncer ConfigMap as they are, so a refused promotion keeps serving the old adapter.

Everything about a job's artifacts is read from lora-metadata.json under the job's own
spec.output.uri (the status' URIs come from the trainer's progress.json and are not trusted for
locations), and an artifact URI outside that prefix is refused: a channel must not be pointed at
another tenant's files.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ..api.channel import ChannelPointer, LoRAAdapterChannelSpec, PromotionRecord, PublishedMetadata
from . import conditions as c
from .events import Event

# Condition types
PROMOTED = "Promoted"
SYNCER_UPDATED = "SyncerUpdated"
CHANNEL_TYPES = (PROMOTED, SYNCER_UPDATED, c.READY, c.RECONCILING, c.STALLED)  # the last three: kstatus

# Reasons: waiting (phase Pending)
WAITING_FOR_JOB = "WaitingForJob"
JOB_NOT_FOUND = "JobNotFound"
# Reasons: refused (phase Refused; only a spec change helps)
GATE_NOT_PASSED = "GateNotPassed"
JOB_FAILED = "JobFailed"
BASE_REVISION_MISMATCH = "BaseRevisionMismatch"
ARTIFACTS_INCOMPLETE = "ArtifactsIncomplete"
ARTIFACTS_INVALID = "ArtifactsInvalid"
NO_ADAPTER = "NoAdapter"
# Reasons: failed (phase Failed; the platform must act, retried every pass)
CHANNEL_ROOT_UNSET = "ChannelRootNotConfigured"
STORAGE_ERROR = "StorageError"
SYNCER_CONFLICT = "ConfigMapNotManaged"
# Reasons: fine
LIVE = "Live"
SYNCED = "Synced"

PENDING_REASONS = frozenset({WAITING_FOR_JOB, JOB_NOT_FOUND})
REFUSED_REASONS = frozenset({GATE_NOT_PASSED, JOB_FAILED, BASE_REVISION_MISMATCH, ARTIFACTS_INCOMPLETE,
                             ARTIFACTS_INVALID, NO_ADAPTER})
OWNED_FIELDS = ("observedGeneration", "phase", "conditions", "live", "previous", "history", "pointer",
                "syncerConfigMap")


@dataclass(frozen=True)
class Refusal:
    reason: str
    message: str


def check_job(spec: LoRAAdapterChannelSpec, job: Mapping[str, Any] | None) -> Refusal | None:
    """May the named LoRATrainingJob be promoted, judging by its spec and operator-written status?"""
    if job is None:
        return Refusal(JOB_NOT_FOUND, f"LoRATrainingJob {spec.job_name} not found in this namespace")
    status = job.get("status") or {}
    phase, verdict = status.get("phase"), (status.get("evaluation") or {}).get("verdict")
    if phase == "Rejected" or verdict == "Failed":
        reasons = "; ".join((status.get("evaluation") or {}).get("reasons") or ()) or "gate verdict Failed"
        return Refusal(GATE_NOT_PASSED, f"{spec.job_name} did not pass its gate: {reasons}")
    if phase == "Failed":
        return Refusal(JOB_FAILED, f"{spec.job_name} failed; nothing was published")
    job_revision = ((job.get("spec") or {}).get("baseModel") or {}).get("revision")
    if job_revision != spec.base_model.revision:
        return Refusal(BASE_REVISION_MISMATCH, _revision_text(spec, job_revision))
    if phase != "Succeeded":
        return Refusal(WAITING_FOR_JOB, f"{spec.job_name} is {phase or 'Pending'}; promoted once it Succeeded")
    if verdict != "Passed":
        return Refusal(GATE_NOT_PASSED, f"{spec.job_name} has no Passed gate verdict")
    return None


def _revision_text(spec: LoRAAdapterChannelSpec, got: str | None) -> str:
    return (f"{spec.job_name} was trained on base revision {got}, the channel serves "
            f"{spec.base_model.revision}; adapters are not portable across base revisions")


def check_metadata(spec: LoRAAdapterChannelSpec, output_uri: str,
                   raw: Any) -> tuple[PublishedMetadata | None, Refusal | None]:
    """Parse and check lora-metadata.json (None when absent) against the channel and the job."""
    if raw is None:
        return None, Refusal(ARTIFACTS_INCOMPLETE, f"{output_uri.rstrip('/')}/lora-metadata.json is missing: "
                                                   "the artifacts are not (completely) published")
    try:
        meta = PublishedMetadata.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        return None, Refusal(ARTIFACTS_INVALID, f"lora-metadata.json: {where}: {first['msg']}")
    if meta.base_model.revision != spec.base_model.revision:
        return None, Refusal(BASE_REVISION_MISMATCH, _revision_text(spec, meta.base_model.revision))
    gate = meta.eval.get("gate") if isinstance(meta.eval.get("gate"), dict) else {}
    if gate.get("verdict") != "Passed":
        return None, Refusal(GATE_NOT_PASSED, "lora-metadata.json does not record a Passed gate")
    prefix = output_uri.rstrip("/") + "/"
    outside = [f"{k}={v}" for k, v in meta.artifacts.items() if v and not str(v).startswith(prefix)]
    if outside:
        return None, Refusal(ARTIFACTS_INVALID, f"artifacts outside the job's output {prefix}: {', '.join(outside)}")
    if not meta.artifacts.get("adapter") and not meta.artifacts.get("merged"):
        return None, Refusal(NO_ADAPTER, "lora-metadata.json lists no adapter and no merged weights")
    if spec.vllm and not meta.artifacts.get("adapter"):
        return None, Refusal(NO_ADAPTER, "vLLM LoRA serving needs the adapter (output.format adapter or both)")
    return meta, None


def parse_pointer(raw: Any) -> tuple[ChannelPointer | None, str | None]:
    """A stored pointer, or the reason it cannot be used (then nothing is overwritten)."""
    if raw is None:
        return None, None
    try:
        return ChannelPointer.model_validate(raw), None
    except ValidationError as exc:
        return None, f"pointer object is not a valid pointer: {exc.errors(include_url=False)[0]['msg']}"


def is_live(spec: LoRAAdapterChannelSpec, pointer: ChannelPointer | None, job: Mapping[str, Any] | None) -> bool:
    """The wanted job is what the pointer serves (a deleted job keeps serving its artifacts; a job
    recreated under the same name is a new run and is promoted again)."""
    if pointer is None or pointer.live.job_name != spec.job_name:
        return False
    uid = ((job or {}).get("metadata") or {}).get("uid")
    return job is None or uid == pointer.live.job_uid


def from_history(spec: LoRAAdapterChannelSpec, pointer: ChannelPointer | None) -> PromotionRecord | None:
    """A rollback to a job that is gone (GitOps tools prune the old LoRATrainingJob when a new name
    is committed): its record in the pointer history was checked when it was first promoted, and its
    artifacts are kept on delete, so it can be served again while it is within historyLimit."""
    if pointer is None:
        return None
    return next((r for r in pointer.history if r.job_name == spec.job_name
                 and r.base_model.revision == spec.base_model.revision), None)


@dataclass(frozen=True)
class ChannelObserved:
    generation: int | None
    now: str
    previous: Mapping[str, Any]
    pointer: ChannelPointer | None = None
    pointer_uri: str | None = None
    refusal: Refusal | None = None  # why the wanted job is not live
    syncer: Refusal | None = None  # why the syncer ConfigMap is not in step (None: in step or not asked)
    syncer_name: str | None = None


def _phase(obs: ChannelObserved) -> str:
    if obs.refusal is None:
        return "Failed" if obs.syncer else "Live"
    if obs.refusal.reason in PENDING_REASONS:
        return "Pending"
    return "Refused" if obs.refusal.reason in REFUSED_REASONS else "Failed"


def _conditions(obs: ChannelObserved) -> list[dict[str, Any]]:
    live = obs.pointer.live if obs.pointer else None
    if obs.refusal is None and live is not None:
        promoted = c.condition(PROMOTED, c.TRUE, LIVE, f"run {live.run_id} of {live.job_name} is live")
    else:
        refusal = obs.refusal or Refusal(WAITING_FOR_JOB, "")
        promoted = c.condition(PROMOTED, c.FALSE, refusal.reason, refusal.message)
    out = [promoted]
    if obs.syncer_name:
        out.append(c.condition(SYNCER_UPDATED, c.FALSE, obs.syncer.reason, obs.syncer.message) if obs.syncer
                   else c.condition(SYNCER_UPDATED, c.TRUE, SYNCED, f"ConfigMap {obs.syncer_name} lists the live adapter"))
    blocking = next((cond for cond in out if cond["status"] != c.TRUE), None)
    out.append(c.condition(c.READY, c.FALSE, blocking["reason"], blocking["message"]) if blocking
               else c.condition(c.READY, c.TRUE, LIVE, promoted["message"]))
    # kstatus: Pending is work in progress; Refused and Failed need a person (Flux/Argo report them).
    phase = _phase(obs)
    why = (blocking or {}).get("reason", LIVE), (blocking or {}).get("message", "")
    out.append(c.condition(c.RECONCILING, c.TRUE if phase == "Pending" else c.FALSE, *why))
    out.append(c.condition(c.STALLED, c.TRUE if phase in ("Refused", "Failed") else c.FALSE, *why))
    return out


def derive_channel_status(obs: ChannelObserved) -> dict[str, Any]:
    prev = obs.previous or {}
    conditions = c.merge_conditions(prev.get("conditions"), _conditions(obs), now=obs.now, generation=obs.generation)
    pointer = obs.pointer
    status: dict[str, Any] = {"observedGeneration": obs.generation, "phase": _phase(obs), "conditions": conditions,
                              "live": None, "previous": None, "history": [], "pointer": obs.pointer_uri,
                              "syncerConfigMap": obs.syncer_name}
    if pointer is not None:
        status["live"] = pointer.live.to_wire()
        status["history"] = [r.to_wire() for r in pointer.history]
        status["previous"] = status["history"][0] if status["history"] else None
    return status


def promotion_event(record: PromotionRecord, replaced: PromotionRecord | None) -> Event:
    text = f"promoted run {record.run_id} of LoRATrainingJob {record.job_name}"
    text += f" (replaced run {replaced.run_id} of {replaced.job_name})" if replaced else " (first promotion)"
    if record.eval_summary:
        text += f"; {record.eval_summary}"
    return Event("Normal", "Promoted", text[:1024])


def channel_events(old: Iterable[Mapping[str, Any]] | None, new: Iterable[Mapping[str, Any]]) -> list[Event]:
    """A Warning each time a refusal or failure appears or changes reason; Normal when the syncer
    ConfigMap comes back in step. (Promotions get their own event from the reconciler.)"""
    before = {cond.get("type"): cond for cond in old or ()}
    events = []
    for cond in new:
        prior = before.get(cond["type"]) or {}
        changed = (prior.get("status"), prior.get("reason")) != (cond["status"], cond["reason"])
        if not changed or cond["type"] in (c.READY, c.RECONCILING, c.STALLED):
            continue
        if cond["status"] == c.FALSE and cond["reason"] not in PENDING_REASONS:
            events.append(Event("Warning", cond["reason"], cond.get("message", "")[:1024]))
        elif cond["type"] == SYNCER_UPDATED and cond["status"] == c.TRUE:
            events.append(Event("Normal", SYNCER_UPDATED, cond.get("message", "")[:1024]))
    return events


def resolve_champion(channel: str, body: Mapping[str, Any] | None, revision: str) -> dict[str, Any]:
    """The champion a job's gate compares with, for the trainer's config (`champion:` in job.yaml).

    Taken from the channel's operator-written status when the job starts. No live adapter, or one on
    another base revision (not comparable on this base), gives `{channel, missing}`: the trainer
    reports "no champion" instead of failing, so the first promotion of a channel is possible.
    """
    if body is None:
        return {"channel": channel, "missing": f"LoRAAdapterChannel {channel} not found"}
    live = (body.get("status") or {}).get("live") or {}
    if not live.get("adapter"):
        return {"channel": channel, "missing": f"channel {channel} serves no adapter yet"}
    live_revision = (live.get("baseModel") or {}).get("revision")
    if live_revision != revision:
        return {"channel": channel, "missing": f"channel {channel} serves base revision {live_revision}, "
                                               f"the job trains on {revision}"}
    return {"channel": channel, "runId": live.get("runId"), "jobName": live.get("jobName"),
            "adapter": live["adapter"], "metadata": live.get("metadata")}

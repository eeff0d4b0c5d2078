"""One level-based pass over one LoRAAdapterChannel: read the pointer, decide, promote, sync, write.

The pointer object in storage is the truth about what a channel serves (status mirrors it), so a
lost status, a restarted operator or a repeated pass converge to the same result. The pointer is
written before the syncer ConfigMap: when the ConfigMap write fails, the next pass finds the pointer
live and retries only the ConfigMap. Passes for one channel are serialized by a lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from ..api import LoRATrainingJobSpec, SpecError, parse_spec
from ..api.channel import ChannelPointer, LoRAAdapterChannelSpec, PromotionRecord, parse_channel_spec
from ..builders.pointer import adapter_id, build_record, next_pointer, pointer_uri
from ..builders.syncer import ChannelServing, build_syncer_configmap, is_ours
from ..clients.kube import KubeClient, now_rfc3339
from ..clients.storage import ProgressStore, StorageError
from ..config import OperatorConfig
from ..status import channel as ch
from ..status.channel import ChannelObserved, Refusal

log = logging.getLogger(__name__)
METADATA_FILE = "lora-metadata.json"


class ChannelReconciler:
    def __init__(self, config: OperatorConfig, kube: KubeClient, storage: ProgressStore,
                 clock: Callable[[], str] = now_rfc3339):
        self.config, self.kube, self.storage, self.clock = config, kube, storage, clock
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def reconcile(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._guard:
            lock = self._locks.setdefault(f"{namespace}/{name}", threading.Lock())
        with lock:
            body = self.kube.get_channel(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None
            return self._write(body, self._pass(body))

    def _pass(self, body: dict[str, Any]) -> ChannelObserved:
        meta, prev = body["metadata"], body.get("status") or {}
        base = {"generation": meta.get("generation"), "now": self.clock(), "previous": prev}
        try:
            spec = parse_channel_spec(body.get("spec"))
        except SpecError as exc:
            return ChannelObserved(**base, refusal=Refusal("InvalidSpec", str(exc)))
        if not self.config.channel_root:
            return ChannelObserved(**base, refusal=Refusal(
                ch.CHANNEL_ROOT_UNSET, "the operator has no LORA_CHANNEL_ROOT (Helm: channels.root)"))
        uri = pointer_uri(self.config.channel_root, meta["namespace"], meta["name"])
        base["pointer_uri"] = uri
        try:
            pointer, bad = ch.parse_pointer(self._root_read(uri))
        except StorageError as exc:
            return ChannelObserved(**base, refusal=Refusal(ch.STORAGE_ERROR, f"cannot read the pointer: {exc}"))
        if bad:
            return ChannelObserved(**base, refusal=Refusal(ch.STORAGE_ERROR, f"{uri}: {bad}; not overwritten"))
        pointer, refusal = self._promote(body, spec, pointer, uri)
        syncer = self._sync(body, spec, pointer) if spec.vllm else None
        return ChannelObserved(**base, pointer=pointer, refusal=refusal, syncer=syncer,
                               syncer_name=spec.vllm.config_map_name if spec.vllm else None)

    def _promote(self, body: dict[str, Any], spec: LoRAAdapterChannelSpec, pointer: ChannelPointer | None,
                 uri: str) -> tuple[ChannelPointer | None, Refusal | None]:
        namespace = body["metadata"]["namespace"]
        job = self.kube.get_ltj(namespace, spec.job_name)
        if ch.is_live(spec, pointer, job):
            return pointer, None
        earlier = ch.from_history(spec, pointer) if job is None else None
        if earlier is not None:
            vllm_id = adapter_id(spec, body["metadata"]["name"], spec.job_name) if spec.vllm else None
            record = earlier.model_copy(update={"promoted_at": self.clock(), "adapter_id": vllm_id})
            return self._publish(body, spec, pointer, uri, record)
        refusal = ch.check_job(spec, job)
        if refusal:
            return pointer, refusal
        job_spec = parse_spec(job.get("spec"))
        metadata_uri = f"{job_spec.output.uri.rstrip('/')}/{METADATA_FILE}"
        try:
            raw = self._job_read(namespace, job_spec, metadata_uri)
        except StorageError as exc:
            return pointer, Refusal(ch.ARTIFACTS_INCOMPLETE, f"cannot read lora-metadata.json: {exc}")
        meta, refusal = ch.check_metadata(spec, job_spec.output.uri, raw)
        if refusal:
            return pointer, refusal
        record = build_record(spec, body["metadata"]["name"], job, meta, metadata_uri, self.clock())
        return self._publish(body, spec, pointer, uri, record)

    def _publish(self, body: dict[str, Any], spec: LoRAAdapterChannelSpec, pointer: ChannelPointer | None,
                 uri: str, record: PromotionRecord) -> tuple[ChannelPointer | None, Refusal | None]:
        namespace = body["metadata"]["namespace"]
        new = next_pointer(f"{namespace}/{body['metadata']['name']}", pointer, record, spec.history_limit)
        try:
            self._root_write(uri, new.to_wire())
        except StorageError as exc:  # the old pointer is still in place
            return pointer, Refusal(ch.STORAGE_ERROR, f"cannot write the pointer: {exc}")
        event = ch.promotion_event(record, pointer.live if pointer else None)
        log.info("%s/%s %s", namespace, body["metadata"]["name"], event.message)
        self.kube.emit_event(body, event.type, event.reason, event.message)
        return new, None

    def _sync(self, body: dict[str, Any], spec: LoRAAdapterChannelSpec,
              pointer: ChannelPointer | None) -> Refusal | None:
        """Write the pool's syncer ConfigMap from every channel naming it; None when in step."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        mine = ChannelServing(name, spec.vllm, pointer.live if pointer else None,
                              tuple(pointer.history) if pointer else ())
        servings = [mine] + [s for s in map(_serving, self.kube.list_channels((namespace,)))
                             if s and s.channel != name and s.vllm.config_map_name == spec.vllm.config_map_name]
        wanted = build_syncer_configmap(namespace, servings)
        current = self.kube.get_configmap(namespace, spec.vllm.config_map_name)
        if current is None:
            self.kube.create(wanted)
        elif not is_ours(current):
            return Refusal(ch.SYNCER_CONFLICT, f"ConfigMap {spec.vllm.config_map_name} exists and was not created "
                                               "by lora-operator; not overwritten")
        elif current.get("data") != wanted["data"] or \
                current["metadata"].get("annotations", {}) != wanted["metadata"]["annotations"]:
            self.kube.replace_configmap(wanted, current["metadata"]["resourceVersion"])
        return None

    def _root_read(self, uri: str) -> Any:
        return self.storage.get_json(self.config.s3_endpoint or "", uri, self.config.s3_access_key,
                                     self.config.s3_secret_key)

    def _root_write(self, uri: str, document: Any) -> None:
        self.storage.put_json(self.config.s3_endpoint or "", uri, document, self.config.s3_access_key,
                              self.config.s3_secret_key)

    def _job_read(self, namespace: str, spec: LoRATrainingJobSpec, uri: str) -> Any:
        """Read with the job's own Secret when it names one (the tenant's own access, so a channel
        cannot read what its tenant cannot); the operator's credentials only for its own endpoint."""
        endpoint = spec.storage.endpoint or self.config.s3_endpoint
        if not endpoint:
            raise StorageError("no S3 endpoint for the job")
        access = secret = None
        if spec.storage.secret_name and self.config.read_job_secrets:
            keys = self.kube.read_secret_keys(namespace, spec.storage.secret_name,
                                              ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))
            access, secret = keys.get("AWS_ACCESS_KEY_ID"), keys.get("AWS_SECRET_ACCESS_KEY")
        elif endpoint == self.config.s3_endpoint:
            access, secret = self.config.s3_access_key, self.config.s3_secret_key
        return self.storage.get_json(endpoint, uri, access, secret)

    def _write(self, body: Mapping[str, Any], obs: ChannelObserved) -> dict[str, Any]:
        meta, prev = body["metadata"], obs.previous
        status = ch.derive_channel_status(obs)
        if status != {k: prev.get(k) for k in ch.OWNED_FIELDS}:
            self.kube.patch_channel_status(meta["namespace"], meta["name"], status)
        for event in ch.channel_events(prev.get("conditions"), status["conditions"]):
            log.info("%s/%s %s: %s", meta["namespace"], meta["name"], event.reason, event.message)
            self.kube.emit_event(body, event.type, event.reason, event.message)
        return status


def _serving(body: Mapping[str, Any]) -> ChannelServing | None:
    """Another channel as the syncer needs it: its spec and its (operator-written) status."""
    try:
        spec = parse_channel_spec(body.get("spec"))
    except SpecError:
        return None
    if spec.vllm is None:
        return None
    status = body.get("status") or {}
    try:
        pointer = ChannelPointer.model_validate({"schemaVersion": 1, "channel": "", "live": status["live"],
                                                 "history": status.get("history") or []})
    except (KeyError, TypeError, ValidationError):
        return ChannelServing(body["metadata"]["name"], spec.vllm)
    return ChannelServing(body["metadata"]["name"], spec.vllm, pointer.live, tuple(pointer.history))

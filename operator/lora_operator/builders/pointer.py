"""The channel pointer object and the records it holds (pure).

Layout under the platform's channel root (config LORA_CHANNEL_ROOT, never a tenant's prefix):
`<root>/<namespace>/<channel>/current.json`. The whole pointer, history included, is one object
written in one PUT, so a reader (or a promotion that dies half-way) sees the old pointer or the new
one. The history is the previous `live` records, newest first, cut at spec.historyLimit.
"""

from __future__ import annotations

from typing import Any

from ..api.channel import (
    POINTER_SCHEMA_VERSION,
    ChannelPointer,
    LoRAAdapterChannelSpec,
    PromotionRecord,
    PublishedMetadata,
)
from ..api.spec import BaseModelRef

POINTER_FILE = "current.json"


def pointer_uri(root: str, namespace: str, channel: str) -> str:
    return f"{root.rstrip('/')}/{namespace}/{channel}/{POINTER_FILE}"


def adapter_id(spec: LoRAAdapterChannelSpec, channel: str, job_name: str) -> str:
    """The vLLM adapter name: versioned by job, because the syncer skips an id that is already
    loaded, so a new adapter under an old id would never reach the pods."""
    prefix = spec.vllm.adapter_name if spec.vllm and spec.vllm.adapter_name else channel
    return f"{prefix}-{job_name}"


def eval_summary(meta_eval: dict[str, Any]) -> str | None:
    """`held-out loss base 2.1000 -> adapter 1.2000 (champion 1.3000)` from lora-metadata.json's
    eval (eval.json: `base`/`adapter` are {loss, ...}; `champion` is {channel, runId, loss: {loss, ...}})."""
    def loss(key: str) -> float | None:
        value = meta_eval.get(key)
        while isinstance(value, dict):
            value = value.get("loss")
        return float(value) if isinstance(value, (int, float)) else None

    base, adapter, champion = loss("base"), loss("adapter"), loss("champion")
    if base is None or adapter is None:
        return None
    text = f"held-out loss base {base:.4f} -> adapter {adapter:.4f}"
    return text + (f" (champion {champion:.4f})" if champion is not None else "")


def build_record(spec: LoRAAdapterChannelSpec, channel: str, job: dict[str, Any], meta: PublishedMetadata,
                 metadata_uri: str, now: str) -> PromotionRecord:
    job_meta = job["metadata"]
    return PromotionRecord(
        run_id=meta.run_id,
        job_name=job_meta["name"],
        job_uid=job_meta.get("uid"),
        base_model=BaseModelRef(uri=meta.base_model.uri, revision=meta.base_model.revision),
        adapter=meta.artifacts.get("adapter"),
        merged=meta.artifacts.get("merged"),
        metadata=metadata_uri,
        adapter_id=adapter_id(spec, channel, job_meta["name"]) if spec.vllm else None,
        eval_summary=eval_summary(meta.eval),
        promoted_at=now,
    )


def next_pointer(channel_ref: str, current: ChannelPointer | None, record: PromotionRecord,
                 history_limit: int) -> ChannelPointer:
    history = ([current.live, *current.history] if current else [])[:history_limit]
    return ChannelPointer(schema_version=POINTER_SCHEMA_VERSION, channel=channel_ref, live=record, history=history)

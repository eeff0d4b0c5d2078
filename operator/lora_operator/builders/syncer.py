"""The vLLM LoRA syncer ConfigMap (pure).

Format: the Gateway API Inference Extension's dynamic LoRA sidecar ("lora-syncer"),
tools/dynamic-lora-sidecar/README.md of kubernetes-sigs/gateway-api-inference-extension at commit
ce242c064ce1 (see docs/promotion.md): key `configmap.yaml` holding `vLLMLoRAConfig` with `name`,
`port`, `defaultBaseModel`, `ensureExist.models[]` and `ensureNotExist.models[]` (`id`, `source`,
`base-model`). The sidecar loads ensureExist minus ensureNotExist and unloads the reverse.

Several channels may share one pool's ConfigMap (one adapter per tenant on one vLLM fleet), so the
ConfigMap is built from every channel naming it, level-based: live adapters are ensured to exist,
the channels' earlier adapters are ensured not to. Settings (name, port, base model) come from the
channel that sorts first, so channels that disagree cannot make the ConfigMap flap.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..api.channel import PromotionRecord, VLLMSyncerSpec
from .names import MANAGED_BY

SYNCER_KEY = "configmap.yaml"
LABEL_SYNCER = "training.lora.dev/lora-syncer"


@dataclass(frozen=True)
class ChannelServing:
    """One channel as the syncer sees it: its settings, what is live, what it served before."""

    channel: str
    vllm: VLLMSyncerSpec
    live: PromotionRecord | None = None
    history: tuple[PromotionRecord, ...] = field(default_factory=tuple)


def adapter_source(vllm: VLLMSyncerSpec, uri: str) -> str:
    rewrite = vllm.source_prefix
    if rewrite and uri.startswith(rewrite.storage):
        return rewrite.serving + uri[len(rewrite.storage):]
    return uri


def _model(vllm: VLLMSyncerSpec, record: PromotionRecord) -> dict[str, Any]:
    model = {"id": record.adapter_id, "source": adapter_source(vllm, record.adapter or "")}
    if vllm.base_model_name:
        model["base-model"] = vllm.base_model_name
    return model


def syncer_config(channels: Iterable[ChannelServing]) -> dict[str, Any]:
    ordered = sorted(channels, key=lambda ch: ch.channel)
    first = ordered[0].vllm
    live = {r.adapter_id: _model(ch.vllm, r) for ch in ordered for r in [ch.live]
            if r and r.adapter_id and r.adapter}
    retired = {r.adapter_id: _model(ch.vllm, r) for ch in ordered for r in ch.history
               if r.adapter_id and r.adapter and r.adapter_id not in live}
    config: dict[str, Any] = {"name": first.pool_name or first.config_map_name, "port": first.port}
    if first.base_model_name:
        config["defaultBaseModel"] = first.base_model_name
    config["ensureExist"] = {"models": [live[k] for k in sorted(live)]}
    config["ensureNotExist"] = {"models": [retired[k] for k in sorted(retired)]}
    return {"vLLMLoRAConfig": config}


def build_syncer_configmap(namespace: str, channels: Iterable[ChannelServing]) -> dict[str, Any]:
    channels = list(channels)
    name = channels[0].vllm.config_map_name
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": MANAGED_BY, LABEL_SYNCER: "true"},
            "annotations": {"training.lora.dev/channels": ",".join(sorted(ch.channel for ch in channels))},
        },
        "data": {SYNCER_KEY: yaml.safe_dump(syncer_config(channels), sort_keys=False)},
    }


def is_ours(configmap: dict[str, Any]) -> bool:
    labels = (configmap.get("metadata") or {}).get("labels") or {}
    return labels.get("app.kubernetes.io/managed-by") == MANAGED_BY and labels.get(LABEL_SYNCER) == "true"

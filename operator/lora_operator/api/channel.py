"""`LoRAAdapterChannel` (training.lora.dev/v1alpha1): which run a serving channel serves.

A channel names one LoRATrainingJob in its own namespace. The operator promotes that job's
published artifacts to a pointer object under the platform's channel root and, optionally, keeps a
vLLM LoRA-syncer ConfigMap in step. Rollback is a spec change back to the previous job name: one
line in Git. The same models describe the pointer object in storage (`ChannelPointer`), so the
status and the pointer cannot drift apart in shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Optional

from pydantic import ConfigDict, Field, ValidationError

from .base import ApiModel, SpecError
from .spec import BaseModelRef
from .status import Condition

CHANNEL_KIND = "LoRAAdapterChannel"
CHANNEL_PLURAL = "loraadapterchannels"
CHANNEL_SINGULAR = "loraadapterchannel"
CHANNEL_SHORT_NAMES = ("lac",)
POINTER_SCHEMA_VERSION = 1
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class SourcePrefix(ApiModel):
    """Rewrite of artifact URIs into paths the model servers can load (e.g. a mounted bucket)."""

    storage: str = Field(min_length=1, max_length=1024,
                         description="Prefix of the adapter URI in object storage, e.g. s3://adapters/.")
    serving: str = Field(min_length=1, max_length=1024,
                         description="What the model servers see instead, e.g. /mnt/adapters/.")


class VLLMSyncerSpec(ApiModel):
    """The Gateway API Inference Extension LoRA syncer ConfigMap of one vLLM pool."""

    config_map_name: str = Field(
        min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
        description="ConfigMap (in the channel's namespace) the syncer sidecar of the vLLM pool mounts. "
        "Channels naming the same ConfigMap share it; the operator creates it and refuses to touch one it "
        "did not create.")
    pool_name: Optional[str] = Field(
        default=None, max_length=253, description="vLLMLoRAConfig.name; default: the ConfigMap name.")
    port: int = Field(default=8000, ge=1, le=65535, description="vLLM port the syncer talks to.")
    base_model_name: Optional[str] = Field(
        default=None, max_length=512,
        description="The served base model name (vLLM --model), written as each adapter's base-model.")
    adapter_name: Optional[str] = Field(
        default=None, max_length=200, pattern=DNS_SUBDOMAIN,
        description="Prefix of the vLLM adapter id; the id is <adapterName>-<jobName>. Default: the channel name.")
    source_prefix: Optional[SourcePrefix] = Field(
        default=None, description="Rewrite the adapter URI into a path vLLM can load. Default: the URI as is.")


class LoRAAdapterChannelSpec(ApiModel):
    """The run a channel serves. Change jobName to promote; change it back to roll back."""

    job_name: str = Field(
        min_length=1, max_length=253, pattern=DNS_SUBDOMAIN,
        description="The LoRATrainingJob (same namespace) whose published adapter this channel serves. "
        "Promoted only when it Succeeded with a Passed gate, its artifacts are complete, and its base "
        "revision equals baseModel.revision.")
    base_model: BaseModelRef = Field(
        description="The base the serving fleet runs; adapters trained on another revision are refused.")
    history_limit: int = Field(
        default=5, ge=1, le=100,
        description="Previous promotions kept in the pointer object (and status), newest first.")
    vllm: Optional[VLLMSyncerSpec] = Field(
        default=None, description="Keep a vLLM pool's LoRA syncer ConfigMap in step with this channel.")


class PromotionRecord(ApiModel):
    """One promotion: what ran, from which job, on which base, where its artifacts are."""

    run_id: str = Field(max_length=256, description="runId from the job's lora-metadata.json.")
    job_name: str = Field(max_length=253, description="The LoRATrainingJob that produced it.")
    job_uid: Optional[str] = Field(default=None, max_length=64, description="Its metadata.uid.")
    base_model: BaseModelRef = Field(description="The base it was trained (and must be served) on.")
    adapter: Optional[str] = Field(default=None, max_length=1024, description="URI of the PEFT adapter.")
    merged: Optional[str] = Field(default=None, max_length=1024, description="URI of the merged weights.")
    metadata: Optional[str] = Field(default=None, max_length=1024, description="URI of lora-metadata.json.")
    adapter_id: Optional[str] = Field(default=None, max_length=512, description="Adapter id in vLLM, if synced.")
    eval_summary: Optional[str] = Field(default=None, max_length=1024, description="Gate results in one line.")
    promoted_at: Optional[str] = Field(default=None, description="When it became live (RFC 3339).")


class ChannelPointer(ApiModel):
    """`<channelRoot>/<namespace>/<channel>/current.json`: written in one PUT, so readers see the
    old pointer or the new one, never half of one."""

    model_config = ConfigDict(extra="ignore")  # newer operators may add fields; keep reading them

    schema_version: int = Field(description="Pointer format version.")
    channel: str = Field(max_length=512, description="<namespace>/<channel name>.")
    live: PromotionRecord = Field(description="What the channel serves.")
    history: list[PromotionRecord] = Field(default_factory=list, max_length=100,
                                           description="Previous promotions, newest first.")


ChannelPhase = Literal["Pending", "Live", "Refused", "Failed"]


class LoRAAdapterChannelStatus(ApiModel):
    """What the channel serves now, what it replaced, and why a requested run is not live."""

    model_config = ConfigDict(extra="allow")  # kopf bookkeeping lives here too

    observed_generation: Optional[int] = Field(default=None, description="Last generation reconciled.")
    phase: Optional[ChannelPhase] = Field(default=None, description="Live, Pending, Refused or Failed.")
    conditions: list[Condition] = Field(default_factory=list, description="Promoted, SyncerUpdated, Ready.")
    live: Optional[PromotionRecord] = Field(default=None, description="The promotion being served.")
    previous: Optional[PromotionRecord] = Field(default=None, description="What the live one replaced.")
    history: list[PromotionRecord] = Field(default_factory=list, description="Earlier promotions, newest first.")
    pointer: Optional[str] = Field(default=None, description="URI of the pointer object.")
    syncer_config_map: Optional[str] = Field(default=None, description="The vLLM syncer ConfigMap kept in step.")


class PublishedMetadata(ApiModel):
    """The few fields of a job's lora-metadata.json a promotion relies on (written by the trainer
    under a tenant-writable prefix: parsed strictly, sizes bounded, never trusted for locations)."""

    model_config = ConfigDict(extra="ignore", alias_generator=None, populate_by_name=True)

    schema_version: int = Field(alias="schemaVersion", ge=1)
    run_id: str = Field(alias="runId", min_length=1, max_length=256)
    base_model: BaseModelRef = Field(alias="baseModel")
    artifacts: dict[str, Optional[str]] = Field(default_factory=dict, max_length=16)
    eval: dict = Field(default_factory=dict)


def parse_channel_spec(raw: Mapping[str, Any] | None) -> LoRAAdapterChannelSpec:
    """Validate a channel spec; SpecError names the first bad field (spec.<camelCase path>)."""
    try:
        return LoRAAdapterChannelSpec.model_validate(dict(raw or {}))
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise SpecError("spec." + ".".join(str(p) for p in first["loc"]), first["msg"]) from None

"""Typed API of `training.lora.dev/v1alpha1` (pydantic only: no kopf, kubernetes or torch)."""

from .base import ApiModel, Rule, SpecError
from .channel import (
    CHANNEL_KIND,
    CHANNEL_PLURAL,
    ChannelPointer,
    LoRAAdapterChannelSpec,
    LoRAAdapterChannelStatus,
    PromotionRecord,
    VLLMSyncerSpec,
)
from .resource import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    parse_manifest,
    parse_spec,
)
from .spec import (
    ALL_LINEAR,
    MUTABLE_SPEC_FIELDS,
    BaseModelRef,
    ChampionGate,
    DatasetSpec,
    EvaluationSpec,
    GateSpec,
    GenerationCheck,
    LoRASpec,
    LoRATrainingJobSpec,
    OutputSpec,
    RegressionSpec,
    ResourcesSpec,
    StorageSpec,
    Toleration,
    TrainingSpec,
)
from .status import (
    PHASES,
    Artifacts,
    Attempt,
    Checkpoints,
    CheckResult,
    Condition,
    EvaluationStatus,
    LoRATrainingJobStatus,
    Progress,
)

__all__ = [name for name in dir() if not name.startswith("_")]

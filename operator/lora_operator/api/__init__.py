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
from .progress import (
    EXIT_DIVERGED,
    EXIT_ERROR,
    EXIT_INVALID_INPUT,
    EXIT_PREEMPTED,
    EXIT_SUCCEEDED,
    FINISHED_STATES,
    PROGRESS_FILE,
    RUNNING_STATES,
    TRAINER_STATES,
    ProgressReport,
    TrainerState,
    read_report,
)
from .resource import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    check_name,
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

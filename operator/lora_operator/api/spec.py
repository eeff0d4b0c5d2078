"""`LoRATrainingJob.spec` (training.lora.dev/v1alpha1): the user contract.

These models are the single source of truth: `crds/` is generated from them (`make crds`) and a
test fails when the checked-in CRD is stale. Field names are stable once shipped. Every field has
a description, which becomes the CRD's documentation (`kubectl explain ltj.spec...`).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator

from .base import ApiModel, Rule

# s3://bucket/prefix, hf://org/name, pvc://claim/path, file:///abs/path
URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|hf://[^/\s]+/[^\s]+|pvc://[a-z0-9][a-z0-9.-]*(/.*)?|file:///.*)$"
OUTPUT_URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|pvc://[a-z0-9][a-z0-9.-]*(/.*)?|file:///.*)$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
ALL_LINEAR = "all-linear"
DEFAULT_TARGET_MODULES = [ALL_LINEAR]
MAX_TEMPLATE_KWARGS = 16

Uri = str


def _uri(description: str, pattern: str = URI_PATTERN, **kw: Any) -> Any:
    return Field(pattern=pattern, max_length=1024, description=description, **kw)


class BaseModelRef(ApiModel):
    """The base model to adapt, pinned to an exact revision."""

    uri: Uri = _uri(
        "Where the base model lives: s3://bucket/prefix, hf://org/name, pvc://claim/path, or "
        "file:///path (local runs)."
    )
    revision: str = Field(
        min_length=1,
        max_length=128,
        description="Pinned revision: a hub commit hash, or the content hash printed by "
        "`lora-trainer fingerprint` (sha256:<hex>). The trainer refuses files that do not match.",
    )


class DatasetSpec(ApiModel):
    """Training and held-out data (JSONL)."""

    train: Uri = _uri("JSONL training data: s3://, pvc://, hf:// or file:// URI.")
    eval: Optional[Uri] = _uri(
        "Optional JSONL held-out data. When absent, evalFraction of train is held out.", default=None
    )
    eval_fraction: float = Field(
        default=0.1,
        gt=0,
        le=0.5,
        description="Fraction of train held out for evaluation when no eval file is given, in (0, 0.5].",
    )
    format: Literal["chat", "completion"] = Field(
        default="chat",
        description="chat: one JSON object per line with OpenAI-style `messages` (role, content); "
        "completion: objects with `prompt` and `completion`.",
    )
    max_seq_length: int = Field(
        default=0,
        ge=0,
        le=131072,
        description="Maximum tokens per example (and per packed row). Longer examples are handled "
        "by onOverlong. 0 = auto (the p95 of tokenized training lengths).",
    )
    on_overlong: Literal["drop", "truncate"] = Field(
        default="drop",
        description="drop: an example longer than maxSeqLength is left out (counted in progress.json "
        "and the metadata); truncate: keep its assistant turns that end within maxSeqLength and cut "
        "after the last of them (never mid-turn), dropping it when none fits.",
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra variables for the base model's chat template, as a serving stack passes "
        "them, e.g. {enable_thinking: false} for Qwen3. Used for training renders and evaluation "
        "prompts alike. String, number or boolean values; at most 16.",
    )
    packing: bool = Field(
        default=True,
        description="Pack examples into full-length rows without attention across examples.",
    )
    train_on_prompt: bool = Field(
        default=False,
        description="Also train on prompt (system/user) tokens. Default: loss only on assistant tokens.",
    )
    on_invalid_line: Literal["fail", "skip"] = Field(
        default="fail",
        description="fail: a malformed line stops the job with its file and line number; skip: "
        "skip it and count it in the status.",
    )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _scalar_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(value) > MAX_TEMPLATE_KWARGS:
            raise ValueError(f"at most {MAX_TEMPLATE_KWARGS} chat template variables")
        for key, item in value.items():
            if not isinstance(item, (str, int, float, bool)) or len(key) > 64:
                raise ValueError(f"{key[:64]}: chat template variables are short names with string, "
                                 "number or boolean values")
        return value


class LoRASpec(ApiModel):
    """The low-rank adapter."""

    rank: int = Field(default=16, ge=1, le=1024, description="LoRA rank r.")
    alpha: Optional[float] = Field(
        default=None,
        gt=0,
        le=4096,
        description="LoRA alpha; the update is scaled by alpha/rank. Default: 2 x rank.",
    )
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default=list(DEFAULT_TARGET_MODULES),
        min_length=1,
        max_length=64,
        description="Module names to adapt, or [\"all-linear\"] for every linear layer of the decoder "
        "except the output head (covers fused projections such as Phi-3's qkv_proj). Names that match "
        "nothing, or that cover only part of the decoder's linear layers, are reported before training.",
        json_schema_extra={"items": {"type": "string", "minLength": 1, "maxLength": 128}},
    )

    rules = (
        Rule(
            cel="!('all-linear' in self.targetModules) || size(self.targetModules) == 1",
            check=lambda m: ALL_LINEAR not in m.target_modules or len(m.target_modules) == 1,
            message="all-linear cannot be combined with other module names",
            field="targetModules",
        ),
    )

    @property
    def effective_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank


class TrainingSpec(ApiModel):
    """Optimisation hyperparameters."""

    epochs: int = Field(default=1, ge=0, le=1000, description="Passes over the training data.")
    max_steps: int = Field(
        default=0, ge=0, le=10_000_000, description="Optimizer steps; 0 = derived from epochs."
    )
    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="Peak learning rate.")
    batch_size: int = Field(
        default=4, ge=1, le=4096,
        description="Rows per device per micro-step; a packed row holds up to maxSeqLength tokens.",
    )
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=1024, description="Micro-steps per optimizer step."
    )
    warmup_ratio: float = Field(
        default=0.03, ge=0, lt=1, description="Fraction of steps with linear warm-up."
    )
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        default="cosine", description="Learning-rate schedule after warm-up."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(
        default=1.0, ge=0, le=1000, description="Gradient clipping norm; 0 disables clipping."
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Seed for data order, split and init.")
    gradient_checkpointing: Optional[bool] = Field(
        default=None,
        description="Recompute each decoder layer's activations in the backward pass (non-reentrant): "
        "much less memory, about a third more compute. Default: on for quantized bases, off otherwise.",
    )
    checkpoint_every_steps: int = Field(
        default=50, ge=1, le=1_000_000, description="Save a checkpoint every N optimizer steps."
    )
    eval_every_steps: int = Field(
        default=50, ge=1, le=1_000_000, description="Compute held-out loss every N optimizer steps."
    )
    keep_checkpoints: int = Field(
        default=2,
        ge=1,
        le=100,
        description="Checkpoints kept besides the best one (the latest N); older ones are pruned.",
    )

    rules = (
        Rule(
            cel="self.epochs > 0 || self.maxSteps > 0",
            check=lambda m: m.epochs > 0 or m.max_steps > 0,
            message="set epochs or maxSteps above 0",
            field="epochs",
        ),
    )


CheckType = Literal["exactMatch", "validJson", "jsonSchema", "mustMatch", "mustNotMatch"]


class GenerationCheck(ApiModel):
    """A check run on greedy generations for the held-out prompts."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Name of the check, shown in the status and eval.json.",
    )
    type: CheckType = Field(
        description="exactMatch (equals the reference reply), validJson, jsonSchema, mustMatch "
        "(regex found), mustNotMatch (regex absent)."
    )
    pattern: Optional[str] = Field(
        default=None, max_length=1024, description="Regex for mustMatch / mustNotMatch (Python syntax)."
    )
    json_schema: Optional[dict[str, Any]] = Field(
        default=None,
        alias="schema",
        description="JSON Schema the reply must satisfy, for type jsonSchema.",
    )
    min_pass_rate: float = Field(
        default=0.0, ge=0, le=1, description="Minimum fraction of samples that must pass (0..1)."
    )

    rules = (
        Rule(
            cel="!(self.type in ['mustMatch', 'mustNotMatch']) || has(self.pattern)",
            check=lambda m: m.type not in ("mustMatch", "mustNotMatch") or m.pattern is not None,
            message="mustMatch and mustNotMatch checks need a pattern",
            field="pattern",
        ),
        Rule(
            cel="self.type != 'jsonSchema' || has(self.schema)",
            check=lambda m: m.type != "jsonSchema" or m.json_schema is not None,
            message="jsonSchema checks need a schema",
            field="schema",
        ),
    )


class ChampionGate(ApiModel):
    """Compare with the adapter a LoRAAdapterChannel serves now (the champion), on the same data."""

    channel: str = Field(
        min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="LoRAAdapterChannel in the job's namespace whose live adapter is the champion. The "
        "trainer then scores base, champion and new adapter on the same held-out and regression data. "
        "A channel with nothing live on the job's base revision means no champion (reported, not failed).")
    max_loss_increase: float = Field(
        default=0.0, ge=0, le=1,
        description="Maximum relative held-out loss increase over the champion; 0 = no worse than the champion.")
    max_regression_loss_increase: float = Field(
        default=0.0, ge=0, le=10,
        description="Maximum relative loss increase over the champion on regressionDataset (when set).")
    max_pass_rate_drop: float = Field(
        default=0.0, ge=0, le=1,
        description="Maximum drop of each generation check's pass rate below the champion's (absolute).")


class GateSpec(ApiModel):
    """Thresholds an adapter must meet to be published. No thresholds: passes, and says so."""

    max_eval_loss: Optional[float] = Field(
        default=None, gt=0, description="Maximum held-out loss of the adapter."
    )
    min_loss_improvement: Optional[float] = Field(
        default=None,
        ge=0,
        lt=1,
        description="Minimum relative held-out loss improvement over the base model, e.g. 0.1 = 10 % lower.",
    )
    checks: list[GenerationCheck] = Field(
        default_factory=list, max_length=32, description="Generation checks with pass-rate thresholds."
    )
    champion: Optional[ChampionGate] = Field(
        default=None, description="Also require no worse than the adapter a channel serves now."
    )


class RegressionSpec(ApiModel):
    """General-purpose data that must not get much worse (catches forgetting)."""

    uri: Uri = _uri("JSONL data in the dataset's format.")
    max_loss_regression: float = Field(
        default=0.05,
        ge=0,
        le=10,
        description="Maximum relative loss increase of adapter over base on this data, e.g. 0.05 = 5 %.",
    )


class EvaluationSpec(ApiModel):
    """Evaluation of base and adapter on the held-out data, and the publishing gate."""

    gate: GateSpec = Field(default_factory=GateSpec, description="Thresholds for publishing.")
    regression_dataset: Optional[RegressionSpec] = Field(
        default=None, description="Optional forgetting check on general data."
    )
    max_new_tokens: int = Field(
        default=128, ge=1, le=8192, description="Tokens generated per prompt for the checks (greedy)."
    )
    max_samples: int = Field(
        default=64, ge=1, le=100_000, description="Held-out prompts used for generation checks."
    )


class OutputSpec(ApiModel):
    """Where artifacts and checkpoints go."""

    uri: Uri = _uri(
        "Prefix for checkpoints/, published/<release>/ and lora-metadata.json (s3://, pvc://; file:// for the "
        "local CLI only, the operator refuses it).",
        pattern=OUTPUT_URI_PATTERN,
    )
    format: Literal["adapter", "merged", "both"] = Field(
        default="adapter", description="Publish the PEFT adapter, merged weights, or both."
    )
    vllm_max_lora_rank: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="The --max-lora-rank of the vLLM server meant to serve the adapter (vLLM's default "
        "is 16); the export reports every setting that server could not load (rank, DoRA, bias, modules "
        "to save, embedding or head targets) in lora-metadata.json.",
    )


class StorageSpec(ApiModel):
    """S3-compatible object storage."""

    endpoint: Optional[str] = Field(
        default=None,
        max_length=512,
        pattern=r"^https?://[^\s/]+(/.*)?$",
        description="S3 endpoint URL (http:// or https://). Default: the operator's configured endpoint. "
        "Another endpoint must be on the platform's allowlist.",
    )
    secret_name: Optional[str] = Field(
        default=None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Secret in the job's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.",
    )


class Toleration(ApiModel):
    """A Kubernetes toleration (core/v1)."""

    key: Optional[str] = Field(default=None, max_length=316, description="Taint key.")
    operator: Optional[Literal["Exists", "Equal"]] = Field(default=None, description="Exists or Equal.")
    value: Optional[str] = Field(default=None, max_length=63, description="Taint value.")
    effect: Optional[Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]] = Field(
        default=None, description="Taint effect to tolerate; empty = all."
    )
    toleration_seconds: Optional[int] = Field(
        default=None, ge=0, description="For NoExecute: how long the pod stays bound."
    )


class ResourcesSpec(ApiModel):
    """Compute for each trainer pod."""

    gpus: int = Field(
        default=1, ge=0, le=64,
        description="GPUs per node; 0 = a CPU-only job (one gloo process per node when nodes > 1).",
    )
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        max_length=253,
        pattern=r"^[a-z0-9.-]+/[a-z0-9._-]+$",
        description="Extended resource name of the GPU.",
    )
    nodes: int = Field(
        default=1, ge=1, le=256,
        description="Nodes (pods) for multi-node training: an Indexed Job and a headless Service; "
        "the pods rendezvous with torchrun at pod 0.",
    )
    cpu: Optional[str] = Field(
        default=None, pattern=QUANTITY_PATTERN, max_length=32, description="CPU request, e.g. \"8\"."
    )
    memory: Optional[str] = Field(
        default=None, pattern=QUANTITY_PATTERN, max_length=32, description="Memory request, e.g. \"64Gi\"."
    )
    ephemeral_storage: Optional[str] = Field(
        default=None,
        pattern=QUANTITY_PATTERN,
        max_length=32,
        description="Local disk per pod for the base model, data and checkpoints, e.g. \"200Gi\": the "
        "pod's ephemeral-storage request and the work volume's sizeLimit (the pod is evicted beyond it). "
        "Default: the operator's LORA_DEFAULT_EPHEMERAL_STORAGE.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, max_length=32,
        description="Node labels the pods must match; only keys the platform's policy allows."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32,
        description="Tolerations for tainted GPU nodes; only those the platform's policy allows."
    )
    priority_class_name: Optional[str] = Field(
        default=None, max_length=253,
        description="PriorityClass of the pods; only one the platform's policy allows. With a queue (Kueue) "
        "the name of a WorkloadPriorityClass, set as the Job's kueue.x-k8s.io/priority-class label (pods then "
        "get no priorityClassName).",
    )


class LoRATrainingJobSpec(ApiModel):
    """The desired training run. Everything but `suspend` is immutable once created."""

    base_model: BaseModelRef = Field(description="The base model, pinned.")
    dataset: DatasetSpec = Field(description="Training and held-out data.")
    lora: LoRASpec = Field(default_factory=LoRASpec, description="Adapter shape.")
    quantization: Literal["none", "nf4", "int8"] = Field(
        default="nf4", description="Base weights: nf4 (QLoRA, default), int8, or none (16/32-bit LoRA)."
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        default="auto",
        description="Attention kernel: auto = sdpa where the architecture supports it (Gemma-2 does "
        "not), eager otherwise.",
    )
    double_quant: bool = Field(default=True, description="Quantize the NF4 scales too (QLoRA double quant).")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="Dtype of matmuls and of the LoRA weights' compute."
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Hyperparameters.")
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Evaluation and gate.")
    output: OutputSpec = Field(description="Where artifacts go.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="Object storage access.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Compute per pod.")
    image: Optional[str] = Field(
        default=None,
        max_length=512,
        description="Trainer image; default from the operator's config. Must be in the allowed list.",
    )
    queue_name: Optional[str] = Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Kueue LocalQueue; the Job is created suspended with kueue.x-k8s.io/queue-name.",
    )
    max_retries: int = Field(
        default=3, ge=0, le=20, description="New attempts after a lost or failed pod; each resumes."
    )
    active_deadline_seconds: Optional[int] = Field(
        default=None, ge=60, le=31_536_000, description="Wall-clock limit of one attempt."
    )
    suspend: bool = Field(default=False, description="Stop the run (checkpoint kept); false resumes it.")


# Fields that may change after creation; everything else in spec is immutable.
MUTABLE_SPEC_FIELDS = frozenset({"suspend"})

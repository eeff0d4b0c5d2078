"""`LoRATrainingJob.status`: written only by the operator, derived from the observed world.

The CRD keeps unknown fields under `status` (x-kubernetes-preserve-unknown-fields) because kopf
stores its own progress bookkeeping there; pruning it would make kopf re-run handlers forever.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import ConfigDict, Field

from .base import ApiModel

Phase = Literal["Pending", "Queued", "Suspended", "Training", "Evaluating", "Exporting", "Succeeded", "Failed", "Rejected"]
PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]


class Condition(ApiModel):
    """A metav1.Condition."""

    type: str = Field(max_length=316, description="Condition type, e.g. Succeeded, Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", max_length=1024, description="CamelCase reason.")
    message: str = Field(default="", max_length=32768, description="Human-readable detail.")
    last_transition_time: Optional[str] = Field(
        default=None, description="When status last flipped (RFC 3339)."
    )
    observed_generation: Optional[int] = Field(
        default=None, description="metadata.generation this condition was computed from."
    )


class Progress(ApiModel):
    """Training progress mirrored from progress.json in object storage."""

    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int = Field(default=0, description="Planned optimizer steps.")
    percent: int = Field(default=0, description="step / totalSteps, in percent.")
    summary: str = Field(default="", description="step/total for kubectl get.")
    epoch: Optional[float] = Field(default=None, description="Fractional epoch.")
    loss: Optional[float] = Field(default=None, description="Latest training loss.")
    eval_loss: Optional[float] = Field(default=None, description="Latest held-out loss.")
    learning_rate: Optional[float] = Field(default=None, description="Current learning rate.")
    tokens_per_second: Optional[float] = Field(default=None, description="Training throughput.")
    eta_seconds: Optional[int] = Field(default=None, description="Estimated seconds left.")
    updated_at: Optional[str] = Field(default=None, description="When the trainer wrote this.")


class Checkpoints(ApiModel):
    """Complete checkpoints in object storage."""

    latest: Optional[str] = Field(default=None, description="URI of the latest complete checkpoint.")
    best: Optional[str] = Field(default=None, description="URI of the checkpoint with the lowest eval loss.")
    best_eval_loss: Optional[float] = Field(default=None, description="Eval loss of the best one.")


class CheckResult(ApiModel):
    """Base vs adapter (and champion, when the gate names a channel) on one metric."""

    name: str = Field(description="Check or metric name.")
    base: Optional[float] = Field(default=None, description="Base model value.")
    adapter: Optional[float] = Field(default=None, description="Adapter value.")
    champion: Optional[float] = Field(default=None, description="Value of the channel's live adapter, if compared.")
    threshold: Optional[str] = Field(default=None, description="Threshold from the gate, as text.")
    passed: Optional[bool] = Field(default=None, description="Whether the adapter met the threshold.")


class EvaluationStatus(ApiModel):
    """Outcome of the evaluation gate."""

    verdict: Optional[Literal["Passed", "Failed"]] = Field(default=None, description="Gate verdict.")
    reasons: list[str] = Field(default_factory=list, description="One line per failed threshold.")
    results: list[CheckResult] = Field(default_factory=list, description="Base vs adapter per metric.")


class Artifacts(ApiModel):
    """Published artifacts (only after the gate passed)."""

    adapter: Optional[str] = Field(default=None, description="URI of the PEFT adapter.")
    merged: Optional[str] = Field(default=None, description="URI of the merged weights.")
    metadata: Optional[str] = Field(default=None, description="URI of lora-metadata.json.")


class Attempt(ApiModel):
    """One run of the trainer Job."""

    index: int = Field(description="Attempt number, from 1.")
    job_name: str = Field(description="Name of the batch/v1 Job.")
    started_at: Optional[str] = Field(default=None, description="When the attempt started.")
    finished_at: Optional[str] = Field(default=None, description="When it ended.")
    outcome: Optional[str] = Field(default=None, description="Succeeded, Failed, or empty while running.")
    reason: Optional[str] = Field(default=None, description="OOMKilled, Evicted, Error, DeadlineExceeded...")
    exit_code: Optional[int] = Field(default=None, description="Trainer exit code.")
    message: Optional[str] = Field(default=None, description="Termination message of the trainer.")
    failed_rank: Optional[int] = Field(
        default=None, description="Multi-node: node rank (completion index) of the pod that failed first."
    )
    failed_pod: Optional[str] = Field(default=None, description="Multi-node: the pod that failed first.")
    preemptions: Optional[int] = Field(
        default=None, description="Times Kueue preempted this attempt (the trainer checkpointed; not a failure).")
    last_preempted_at: Optional[str] = Field(default=None, description="When Kueue last evicted it.")
    preempted_at_step: Optional[int] = Field(default=None, description="Step reached at the last preemption.")
    resume_from_step: Optional[int] = Field(
        default=None, description="Step of the checkpoint the last preemption resumes from.")
    steps_redone: Optional[int] = Field(
        default=None, description="Optimizer steps trained again after preemptions: time lost to preemption.")


class Workers(ApiModel):
    """Pods of the current attempt."""

    ready: int = Field(default=0, description="Ready pods.")
    total: int = Field(default=1, description="Pods the attempt runs (spec.resources.nodes).")
    summary: str = Field(default="", description="ready/total for kubectl get -o wide.")


class LoRATrainingJobStatus(ApiModel):
    """What the operator observed and derived."""

    model_config = ConfigDict(extra="allow")  # kopf bookkeeping lives here too

    observed_generation: Optional[int] = Field(default=None, description="Last generation reconciled.")
    phase: Optional[Phase] = Field(default=None, description="Summary of the conditions, for kubectl get.")
    conditions: list[Condition] = Field(default_factory=list, description="Latest observations.")
    progress: Optional[Progress] = Field(default=None, description="Training progress.")
    checkpoints: Optional[Checkpoints] = Field(default=None, description="Checkpoints in storage.")
    evaluation: Optional[EvaluationStatus] = Field(default=None, description="Evaluation and gate.")
    artifacts: Optional[Artifacts] = Field(default=None, description="Published artifacts.")
    attempts: list[Attempt] = Field(default_factory=list, description="Trainer attempts, oldest first.")
    job_name: Optional[str] = Field(default=None, description="Current child batch/v1 Job.")
    workers: Optional[Workers] = Field(default=None, description="Ready/total pods of the current attempt.")
    skipped_lines: Optional[int] = Field(default=None, description="Invalid data lines skipped.")
    dataset_hashes: dict[str, str] = Field(default_factory=dict, description="sha256 per dataset file.")
    start_time: Optional[str] = Field(default=None, description="When training first started.")
    completion_time: Optional[str] = Field(default=None, description="When the job ended.")

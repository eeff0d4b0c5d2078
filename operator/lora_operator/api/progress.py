"""The trainer -> operator contract: `<output.uri>/progress.json`, the exit codes and the states.

The trainer writes progress.json through `ProgressReport` (strict, finite JSON); the operator
reads it with `read_report`, which is lenient per field: a field that does not validate is
dropped and named in the returned problems, the rest is used. The file sits in storage that the
job's own code can write, so nothing in it is trusted: numbers must be finite and bounded,
strings short, and a report whose `jobUid` is not the reading job's uid is not used at all (it
belongs to another job, or to an earlier job of the same name).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

PROGRESS_FILE = "progress.json"

# Exit codes of `lora-trainer run`: they say whether another attempt can help.
EXIT_SUCCEEDED = 0  # finished; progress.json says Succeeded or Rejected (gate refused the adapter)
EXIT_ERROR = 1  # anything unexpected: worth a retry
EXIT_INVALID_INPUT = 2  # bad data, spec or base revision: the same input fails again, never retried
EXIT_DIVERGED = 4  # a non-finite loss: the same spec diverges again, so no blind retry
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped after a checkpoint; the next attempt resumes

TrainerState = Literal["Preparing", "Training", "Evaluating", "Exporting", "Succeeded", "Failed", "Rejected",
                       "Preempted"]
TRAINER_STATES: tuple[str, ...] = TrainerState.__args__  # type: ignore[attr-defined]
RUNNING_STATES: tuple[str, ...] = ("Preparing", "Training", "Evaluating", "Exporting")
FINISHED_STATES: tuple[str, ...] = ("Succeeded", "Rejected")  # what an exit 0 may end in

MAX_COUNT = 2**53 - 1  # exact in every JSON reader
Finite = Annotated[float, Field(allow_inf_nan=False, ge=-1e30, le=1e30)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Uri = Annotated[str, Field(max_length=1024)]
Text = Annotated[str, Field(max_length=4096)]


class ReportModel(BaseModel):
    """camelCase JSON, exact types (no "3" for 3), unknown keys ignored (newer trainers)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, strict=True, extra="ignore")

    def to_wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class CheckReport(ReportModel):
    """Base vs adapter on one metric or generation check."""

    name: Annotated[str, Field(min_length=1, max_length=256)]
    base: Optional[Finite] = None
    adapter: Optional[Finite] = None
    champion: Optional[Finite] = None  # the channel's live adapter, when the gate compares against one
    threshold: Optional[Annotated[str, Field(max_length=256)]] = None
    passed: Optional[bool] = None


class EvalReport(ReportModel):
    """The gate's outcome, in the shape of status.evaluation."""

    verdict: Optional[Literal["Passed", "Failed"]] = None
    reasons: Annotated[list[Text], Field(max_length=64)] = Field(default_factory=list)
    results: Annotated[list[CheckReport], Field(max_length=128)] = Field(default_factory=list)


class ArtifactsReport(ReportModel):
    """URIs of what was published (only after the gate passed)."""

    adapter: Optional[Uri] = None
    merged: Optional[Uri] = None
    eval: Optional[Uri] = None
    metadata: Optional[Uri] = None


class RejectedCheckpoint(ReportModel):
    """A checkpoint found but not used on resume (manifest, digest or content check failed)."""

    step: Count
    reason: Annotated[str, Field(max_length=1024)] = ""


class ProgressReport(ReportModel):
    """progress.json. Every field is optional to a reader; the trainer fills what it knows."""

    job_uid: Optional[Annotated[str, Field(max_length=128)]] = Field(
        default=None, description="metadata.uid of the LoRATrainingJob this run belongs to.")
    attempt: Optional[Annotated[int, Field(ge=1, le=10_000)]] = Field(default=None, description="LORA_ATTEMPT.")
    rank: Optional[Annotated[int, Field(ge=0, le=100_000)]] = Field(default=None, description="Rank of the writer (0).")
    world_size: Optional[Annotated[int, Field(ge=1, le=100_000)]] = Field(default=None, description="Processes in the run, all nodes.")
    state: Optional[TrainerState] = Field(default=None, description="Where the run is.")
    step: Optional[Count] = Field(default=None, description="Optimizer steps done.")
    total_steps: Optional[Count] = Field(default=None, description="Planned optimizer steps.")
    epoch: Optional[Finite] = Field(default=None, description="Fractional epoch.")
    loss: Optional[Finite] = Field(default=None, description="Mean training loss of the latest step.")
    eval_loss: Optional[Finite] = Field(default=None, description="Latest held-out loss.")
    learning_rate: Optional[Finite] = Field(default=None, description="Current learning rate.")
    tokens_per_second: Optional[Finite] = Field(default=None, description="Non-padding tokens/s, all ranks.")
    peak_memory_bytes: Optional[Count] = Field(default=None, description="Peak memory of rank 0.")
    mfu: Optional[Finite] = Field(default=None, description="Model FLOPs utilisation in [0, 1].")
    eta_seconds: Optional[Count] = Field(default=None, description="Estimated seconds of training left.")
    last_checkpoint: Optional[Uri] = Field(default=None, description="Latest COMPLETE checkpoint.")
    best_checkpoint: Optional[Uri] = Field(default=None, description="Checkpoint with the lowest evalLoss.")
    best_eval_loss: Optional[Finite] = Field(default=None, description="Its evalLoss.")
    dataset_hashes: Annotated[dict[Uri, Annotated[str, Field(max_length=128)]], Field(max_length=64)] = Field(
        default_factory=dict, description="{uri: sha256:<hex>} of every dataset file read.")
    skipped_lines: Optional[Count] = Field(default=None, description="Invalid lines skipped.")
    max_seq_length: Optional[Count] = Field(default=None, description="Resolved maximum example/row length.")
    dropped_examples: Optional[Count] = Field(default=None, description="Examples left out (too long, nothing to train).")
    truncated_examples: Optional[Count] = Field(default=None, description="Examples cut after a whole turn.")
    warnings: Optional[Annotated[list[Text], Field(max_length=64)]] = Field(
        default=None, description="Reported before training, e.g. LoRA targets that miss layers.")
    trainable_params: Optional[Count] = Field(default=None, description="Trainable (LoRA) parameters.")
    trainable_fraction: Optional[Finite] = Field(default=None, description="Trainable / all parameters.")
    updated_at: Optional[Annotated[str, Field(max_length=64)]] = Field(default=None, description="RFC 3339.")
    error: Optional[Text] = Field(default=None, description="One-line error when Failed.")
    eval: Optional[EvalReport] = Field(default=None, description="Gate outcome, after evaluation.")
    artifacts: Optional[ArtifactsReport] = Field(default=None, description="Published URIs.")
    rejected_checkpoints: Optional[Annotated[list[RejectedCheckpoint], Field(max_length=256)]] = Field(
        default=None, description="Checkpoints found but not used on resume.")


def _nested(annotation: Any) -> type[ReportModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, ReportModel):
        return annotation
    for arg in getattr(annotation, "__args__", None) or ():
        found = _nested(arg)
        if found:
            return found
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _lenient(model: type[ReportModel], data: Mapping[str, Any], where: str) -> tuple[dict | None, list[str]]:
    """The subset of `data` that validates as `model` (None when even that fails) and the problems."""
    fields = {f.alias or name: f for name, f in model.model_fields.items()}
    kept = {k: v for k, v in data.items() if k in fields and v is not None}
    problems: list[str] = []
    repaired: set[str] = set()
    for _ in range(2 * len(fields) + 2):
        try:
            model.model_validate(kept)
            return kept, problems
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
        first: dict[str, str] = {}
        for err in errors:
            key = str(err["loc"][0]) if err["loc"] else ""
            if key not in kept:  # a required field is missing: the object is unusable
                return None, problems + [f"{where}{key or PROGRESS_FILE}: {err['msg']}"]
            first.setdefault(key, err["msg"])
        for key, msg in first.items():
            fixed, more = (None, []) if key in repaired else _repair(fields[key].annotation, kept[key], f"{where}{key}")
            repaired.add(key)
            if fixed is None:
                problems.append(f"{where}{key}: {msg} (got {_shown(kept.pop(key))})")
            else:
                kept[key] = fixed
                problems += more
    return None, problems


def _repair(annotation: Any, value: Any, where: str) -> tuple[Any, list[str]]:
    """Drop the bad parts inside a nested report (or a list of them); None when nothing is left to keep."""
    sub = _nested(annotation)
    if sub is None:
        return None, []
    if isinstance(value, Mapping):
        return _lenient(sub, value, f"{where}.")
    if isinstance(value, list) and getattr(annotation, "__origin__", None) is list:
        items, problems = [], []
        for i, item in enumerate(value[:128]):
            fixed, more = _lenient(sub, item, f"{where}[{i}].") if isinstance(item, Mapping) else (None, [])
            problems += more or ([] if fixed is not None else [f"{where}[{i}]: not a valid entry"])
            if fixed is not None:
                items.append(fixed)
        return items, problems
    return None, []


def read_report(raw: Any) -> tuple[ProgressReport, list[str]]:
    """progress.json as parsed JSON -> the valid part of it, and one line per dropped field."""
    if not isinstance(raw, Mapping):
        return ProgressReport(), [f"{PROGRESS_FILE}: not a JSON object"]
    kept, problems = _lenient(ProgressReport, raw, "")
    return ProgressReport.model_validate(kept or {}), problems

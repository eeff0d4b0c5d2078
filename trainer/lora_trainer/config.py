"""The trainer's inputs: the job (from the spec, the user contract) and the runtime settings (from
env and flags: where storage is, where to work, how often to report). The spec never carries
runtime settings and the runtime settings never change what is trained.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from lora_operator.api import KIND, LoRATrainingJobSpec, SpecError, parse_manifest, parse_spec


@dataclass(frozen=True)
class Job:
    """One resolved LoRATrainingJob."""

    spec: LoRATrainingJobSpec
    name: str = "local"
    namespace: str = "default"
    uid: str = ""  # metadata.uid when run by the operator: job identity, progress.json jobUid
    champion: Optional[dict] = None
    "The champion the operator resolved for spec.evaluation.gate.champion ({channel, runId, adapter} or {channel, missing})."


def load_job(path: Path | str) -> Job:
    """Read a whole LoRATrainingJob manifest (as mounted from the ConfigMap) or a bare spec."""
    try:
        obj = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SpecError("config", f"cannot read {path}: {exc}") from None
    if not isinstance(obj, dict):
        raise SpecError("config", f"{path} is not a YAML mapping")
    if obj.get("kind") == KIND:
        meta = obj.get("metadata") or {}
        champion = obj.get("champion") if isinstance(obj.get("champion"), dict) else None
        return Job(parse_manifest(obj), meta.get("name", "local"), meta.get("namespace", "default"),
                   uid=str(meta.get("uid") or ""), champion=champion)
    return Job(parse_spec(obj))


def _env_float(name: str, default: Optional[float]) -> Optional[float]:
    value = os.environ.get(name)
    return float(value) if value not in (None, "") else default


@dataclass
class RuntimeConfig:
    """Runtime settings of one trainer process (env and flags; not part of the spec)."""

    work_dir: Path = Path("/tmp/lora-trainer")
    "Local scratch: downloaded base model and data, checkpoints before upload."
    storage_dir: Optional[Path] = None
    "Use this directory as the object store (s3://bucket/key -> DIR/bucket/key) instead of S3."
    s3_endpoint: Optional[str] = None
    "S3 endpoint URL; default env S3_ENDPOINT, then spec.storage.endpoint. Keys come from AWS_* env."
    pvc_root: Path = Path("/mnt/pvc")
    "Where pvc://claim/path is mounted: PVC_ROOT/claim/path (env LORA_PVC_ROOT)."
    peak_flops: Optional[float] = None
    "Peak FLOP/s of one device, for MFU (env LORA_PEAK_FLOPS); unset = MFU not reported."
    progress_interval_s: float = 10.0
    "At most one progress.json write per this many seconds, besides state changes (env LORA_PROGRESS_INTERVAL_S)."
    termination_log: Path = Path("/dev/termination-log")
    "File for the final one-line JSON summary (env LORA_TERMINATION_LOG); ignored if not writable."
    attempt: int = 1
    "Attempt number, recorded in progress.json (env LORA_ATTEMPT)."
    log_every_steps: int = 1
    "Log a metrics line every N optimizer steps (non-TTY)."
    progress_bar: Optional[bool] = None
    "Force the progress bar on/off; default: on when stderr is a TTY."
    collective_timeout_s: Optional[float] = None
    "Seconds a rank waits in one collective before failing (env LORA_COLLECTIVE_TIMEOUT_S); unset: 30 min."
    retry_attempts: int = 30
    "Attempts per storage call at most (within retry_budget_s)."
    retry_base_delay_s: float = 0.5
    "First backoff delay; doubles per attempt, capped at 30 s."
    retry_budget_s: float = 300.0
    "Total seconds one storage call may spend retrying before the job fails (env LORA_STORAGE_RETRY_BUDGET_S)."

    def __post_init__(self):
        self.work_dir = Path(self.work_dir)
        if self.storage_dir is not None:
            self.storage_dir = Path(self.storage_dir)
        if self.progress_interval_s < 0:
            raise ValueError("progress_interval_s must be >= 0")
        if self.retry_attempts < 1:
            raise ValueError("retry_attempts must be >= 1")
        if self.retry_budget_s < 0:
            raise ValueError("retry_budget_s must be >= 0")

    @classmethod
    def from_env(cls, **overrides) -> RuntimeConfig:
        """Defaults <- environment <- explicit overrides (flags); None overrides are ignored."""
        env = {
            "s3_endpoint": os.environ.get("S3_ENDPOINT") or None,
            "pvc_root": os.environ.get("LORA_PVC_ROOT"),
            "peak_flops": _env_float("LORA_PEAK_FLOPS", None),
            "progress_interval_s": _env_float("LORA_PROGRESS_INTERVAL_S", None),
            "collective_timeout_s": _env_float("LORA_COLLECTIVE_TIMEOUT_S", None),
            "termination_log": os.environ.get("LORA_TERMINATION_LOG"),
            "attempt": os.environ.get("LORA_ATTEMPT"),
            "work_dir": os.environ.get("LORA_WORK_DIR"),
            "storage_dir": os.environ.get("LORA_STORAGE_DIR"),
            "retry_budget_s": _env_float("LORA_STORAGE_RETRY_BUDGET_S", None),
        }
        values = {k: v for k, v in env.items() if v not in (None, "")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "attempt" in values:
            values["attempt"] = int(values["attempt"])
        for key in ("pvc_root", "termination_log"):
            if key in values:
                values[key] = Path(values[key])
        return cls(**values)

    def store_kwargs(self, job: Optional[Job] = None) -> dict:
        """Keyword arguments for `storage.open_uri`."""
        endpoint = self.s3_endpoint or (job.spec.storage.endpoint if job else None)
        return {"storage_dir": self.storage_dir, "s3_endpoint": endpoint, "pvc_root": self.pvc_root,
                "retry_attempts": self.retry_attempts, "retry_base_delay_s": self.retry_base_delay_s,
                "retry_budget_s": self.retry_budget_s}

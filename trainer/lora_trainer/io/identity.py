"""Job identity: which job's checkpoints and artifacts an output prefix holds.

Every checkpoint (in its `COMPLETE` manifest) and every published set (in `lora-metadata.json`)
records the identity of the job that wrote it:

    {"job": {"namespace": ..., "name": ..., "uid": ...}, "fingerprint": "sha256:<hex>"}

`fingerprint` hashes what decides the trained weights: the base model (uri, revision), the dataset
settings and the SHA-256 of every dataset file, LoRA, quantization, dtype and the training
settings (not `keepCheckpoints`, which only decides what is kept). The uid is recorded for humans
and audits; it does not decide ownership, so a job deleted and re-applied unchanged resumes.

The rule (`check_owner`): a run may resume from or publish over a prefix only when everything
there was written by the same namespace/name with the same fingerprint. Anything else (another
job, the same job with different data or settings, checkpoints that record no identity) is
refused with `ForeignPrefix`, which names the prefix and the other job; the CLI maps it to exit 2
(retrying cannot help: use another output.uri or delete the prefix).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional

TRAINING_EXCLUDED = ("keepCheckpoints",)  # settings that do not change the trained weights


class ForeignPrefix(ValueError):
    """The output prefix holds another job's checkpoints or artifacts."""


@dataclass(frozen=True)
class JobIdentity:
    namespace: str
    name: str
    uid: str = ""
    fingerprint: Optional[str] = None  # None until the dataset hashes are known

    def to_dict(self) -> dict[str, Any]:
        return {"job": {"namespace": self.namespace, "name": self.name, "uid": self.uid},
                "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, data: Any) -> Optional[JobIdentity]:
        """The identity in a manifest or metadata document; None when it records none."""
        job = data.get("job") if isinstance(data, dict) else None
        if not isinstance(job, dict) or not job.get("name"):
            return None
        fp = data.get("fingerprint")
        return cls(str(job.get("namespace") or ""), str(job["name"]), str(job.get("uid") or ""),
                   fp if isinstance(fp, str) else None)

    def describe(self) -> str:
        uid = f" (uid {self.uid})" if self.uid else ""
        return f"job {self.namespace}/{self.name}{uid}"


def fingerprint(spec, dataset_hashes: dict[str, str]) -> str:
    """sha256 over the canonical JSON of the training-relevant spec and the dataset file hashes."""
    wire = spec.to_wire()
    training = {k: v for k, v in (wire.get("training") or {}).items() if k not in TRAINING_EXCLUDED}
    relevant = {
        "baseModel": {"uri": spec.base_model.uri, "revision": spec.base_model.revision},
        "dataset": wire.get("dataset"),
        "datasetHashes": dict(sorted(dataset_hashes.items())),
        "lora": wire.get("lora"),
        "quantization": wire.get("quantization"),
        "doubleQuant": wire.get("doubleQuant"),
        "computeDtype": wire.get("computeDtype"),
        "training": training,
    }
    canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def of_job(job, dataset_hashes: Optional[dict[str, str]] = None) -> JobIdentity:
    fp = fingerprint(job.spec, dataset_hashes) if dataset_hashes is not None else None
    return JobIdentity(job.namespace, job.name, getattr(job, "uid", "") or "", fp)


def conflict(mine: JobIdentity, found: Optional[JobIdentity]) -> Optional[str]:
    """Why `found` is not this job (None when it is). A None fingerprint on either side compares
    names only (the preflight check, before the dataset hashes are known)."""
    if found is None:
        return "records no job identity"
    if (found.namespace, found.name) != (mine.namespace, mine.name):
        return f"belongs to {found.describe()}"
    if mine.fingerprint and found.fingerprint and mine.fingerprint != found.fingerprint:
        return (f"belongs to {found.describe()} trained with different data or settings "
                f"(fingerprint {found.fingerprint[:19]}..., this run {mine.fingerprint[:19]}...)")
    return None


def check_owner(mine: JobIdentity, found: Optional[JobIdentity], what: str, prefix_uri: str) -> None:
    """Raise ForeignPrefix when `what` (e.g. "checkpoint step-4") under `prefix_uri` is not ours."""
    why = conflict(mine, found)
    if why:
        raise ForeignPrefix(f"output prefix {prefix_uri} is not this job's ({mine.describe()}): {what} {why}; "
                            "refusing to resume from or publish over it (use another output.uri, "
                            "or delete the prefix)")

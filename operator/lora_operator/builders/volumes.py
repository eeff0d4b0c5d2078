"""The spec's storage URIs, and the PersistentVolumeClaims a Job must mount to serve them.

The trainer maps `pvc://claim/path` to `PVC_ROOT/claim/path`, so every claim named by the spec is
mounted at `PVC_ROOT/claim`: read-write when the output lives on it, read-only when only inputs do.
`file://` URIs name a directory of the machine running the trainer; in a pod that is the pod's own
throwaway filesystem, so the operator refuses them (see status/policy.py) and mounts nothing.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from ..api import LoRATrainingJobSpec

PVC_ROOT = "/mnt/pvc"


def uri_fields(spec: LoRATrainingJobSpec) -> list[tuple[str, str]]:
    """(field path, URI) of every storage URI in the spec; the output last."""
    fields = [("spec.baseModel.uri", spec.base_model.uri), ("spec.dataset.train", spec.dataset.train)]
    if spec.dataset.eval:
        fields.append(("spec.dataset.eval", spec.dataset.eval))
    if spec.evaluation.regression_dataset is not None:
        fields.append(("spec.evaluation.regressionDataset.uri", spec.evaluation.regression_dataset.uri))
    fields.append(("spec.output.uri", spec.output.uri))
    return fields


def pvc_claims(spec: LoRATrainingJobSpec) -> dict[str, bool]:
    """claim -> read-only, in the order the spec names them."""
    claims: dict[str, bool] = {}
    for field, uri in uri_fields(spec):
        url = urlparse(uri)
        if url.scheme == "pvc":
            writable = field == "spec.output.uri"
            claims[url.netloc] = claims.get(url.netloc, True) and not writable
    return claims


def pvc_volumes(spec: LoRATrainingJobSpec) -> list[dict[str, Any]]:
    return [{"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}
            for i, (claim, read_only) in enumerate(pvc_claims(spec).items())]


def pvc_mounts(spec: LoRATrainingJobSpec) -> list[dict[str, Any]]:
    return [{"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}", "readOnly": read_only}
            for i, (claim, read_only) in enumerate(pvc_claims(spec).items())]

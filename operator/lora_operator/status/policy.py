"""Admission decisions: cluster policy, GPU quota, running-job limit. Pure: data in, verdict out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..api import LoRATrainingJobSpec
from ..builders.volumes import uri_fields
from ..config import OperatorConfig, Policy
from . import conditions as c
from .observed import Blocked


def resolve_image(spec: LoRATrainingJobSpec, config: OperatorConfig) -> str:
    return spec.image or config.default_image


def resolve_queue(spec: LoRATrainingJobSpec, config: OperatorConfig) -> str | None:
    return spec.queue_name or config.default_queue


def total_gpus(spec: LoRATrainingJobSpec) -> int:
    return spec.resources.gpus * spec.resources.nodes


def _image_allowed(image: str, allowed: Iterable[str]) -> bool:
    for entry in allowed:
        if image == entry or (entry.endswith((":", "@", "/")) and image.startswith(entry)):
            return True
    return False


def check_policy(spec: LoRATrainingJobSpec, config: OperatorConfig) -> tuple[str, str] | None:
    """(PolicyViolation, message naming the field) when the cluster policy refuses this spec."""
    policy: Policy = config.policy
    for field, value in uri_fields(spec):
        if value.startswith("file://"):
            return c.POLICY_VIOLATION, (f"{field}: {value} is a file:// URI, which is for the local "
                                        "CLI only (a pod's files vanish with it); use s3:// or pvc://")
    uri = spec.base_model.uri
    prefixes = policy.allowed_base_model_prefixes
    if prefixes and not any(uri.startswith(p) for p in prefixes):
        return c.POLICY_VIOLATION, f"spec.baseModel.uri: {uri} is not under an allowed prefix ({', '.join(prefixes)})"
    gpus = total_gpus(spec)
    if policy.max_gpus_per_job and gpus > policy.max_gpus_per_job:
        return c.POLICY_VIOLATION, (
            f"spec.resources.gpus: {gpus} GPUs (gpus x nodes) exceed the limit of "
            f"{policy.max_gpus_per_job} per job"
        )
    image = resolve_image(spec, config)
    if policy.allowed_images and not _image_allowed(image, policy.allowed_images):
        return c.POLICY_VIOLATION, f"spec.image: {image} is not an allowed trainer image"
    return None


def _quantity(value: Any) -> float:
    text = str(value or "0").strip()
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    return float(text)


def check_quota(
    quotas: Iterable[Mapping[str, Any]], spec: LoRATrainingJobSpec
) -> Blocked | None:
    """Blocked(QuotaExceeded) when a namespace ResourceQuota cannot fit the job's GPUs.

    `quotas` are ResourceQuota objects (dicts); only `requests.<gpuResourceName>` is considered,
    the only form Kubernetes allows for extended resources in a quota.
    """
    need = total_gpus(spec)
    if need == 0:
        return None
    key = f"requests.{spec.resources.gpu_resource_name}"
    for quota in quotas:
        hard = (quota.get("status", {}).get("hard") or quota.get("spec", {}).get("hard") or {}).get(key)
        if hard is None:
            continue
        used = _quantity((quota.get("status", {}).get("used") or {}).get(key))
        free = _quantity(hard) - used
        if free < need:
            name = quota.get("metadata", {}).get("name", "?")
            return Blocked(c.QUOTA_EXCEEDED, (
                f"ResourceQuota {name}: {key} has {free:g} of {_quantity(hard):g} free, "
                f"the job needs {need}; waiting for room"
            ))
    return None


def check_running_limit(running_elsewhere: int, config: OperatorConfig) -> Blocked | None:
    limit = config.policy.max_running_jobs_per_namespace
    if limit and running_elsewhere >= limit:
        return Blocked(c.MAX_RUNNING_JOBS, (
            f"{running_elsewhere} training jobs already run in this namespace (limit {limit}); waiting"
        ))
    return None


def check_kueue(queue_name: str | None, kueue_installed: bool) -> Blocked | None:
    if queue_name and not kueue_installed:
        return Blocked(c.KUEUE_NOT_INSTALLED, (
            f"spec.queueName: queue {queue_name!r} needs Kueue, but the kueue.x-k8s.io API is not "
            "installed; install Kueue or drop queueName (and the operator's default queue)"
        ))
    return None

"""Admission decisions: cluster policy, GPU quota, running-job limit. Pure: data in, verdict out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlparse

from ..api import LoRATrainingJobSpec, Toleration
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


def normalize_endpoint(url: str | None) -> str | None:
    """scheme://host[:port][/path] in lower case, no trailing slash: the form endpoints are compared in."""
    if not url:
        return None
    parsed = urlparse(url.strip())
    return f"{parsed.scheme.lower()}://{parsed.netloc.lower()}{parsed.path.rstrip('/')}"


def allowed_endpoints(config: OperatorConfig) -> frozenset[str]:
    """The operator's own endpoint and the policy's list: the only ones a job may name."""
    found = (normalize_endpoint(e) for e in (config.s3_endpoint, *config.policy.allowed_endpoints))
    return frozenset(e for e in found if e)


def is_own_endpoint(endpoint: str | None, config: OperatorConfig) -> bool:
    """Whether the operator's own credentials may be sent there (its configured endpoint only)."""
    return bool(endpoint) and normalize_endpoint(endpoint) == normalize_endpoint(config.s3_endpoint)


def job_endpoint(spec: LoRATrainingJobSpec, config: OperatorConfig) -> str | None:
    return spec.storage.endpoint or config.s3_endpoint


def egress_ports(spec: LoRATrainingJobSpec, config: OperatorConfig) -> tuple[int, ...]:
    """TCP ports a job's pods need besides DNS: its object store, the Hub for hf:// URIs, extras."""
    ports = set(config.network_policy_egress_ports)
    endpoint = urlparse(job_endpoint(spec, config) or "")
    if endpoint.scheme in ("http", "https"):
        ports.add(endpoint.port or (443 if endpoint.scheme == "https" else 80))
    uris = (spec.base_model.uri, spec.dataset.train, spec.dataset.eval)
    if any(u and u.startswith("hf://") for u in uris):
        ports.add(443)
    return tuple(sorted(ports))


def _location(uri: str, endpoint: str | None) -> str:
    """Where a URI really points: an s3:// URI only means something together with its endpoint."""
    if uri.startswith("s3://") and endpoint:
        return f"{normalize_endpoint(endpoint)}/{uri.removeprefix('s3://')}"
    return uri


def _uri_allowed(uri: str, prefixes: Iterable[str], spec: LoRATrainingJobSpec, config: OperatorConfig) -> bool:
    where = _location(uri, job_endpoint(spec, config))
    for prefix in prefixes:
        if prefix.startswith(("http://", "https://")):  # <endpoint>/<bucket>/<prefix>
            parsed = urlparse(prefix)
            prefix = f"{parsed.scheme.lower()}://{parsed.netloc.lower()}{parsed.path}"
        if where.startswith(_location(prefix, config.s3_endpoint)):
            return True
    return False


def _toleration_matches(t: Toleration, allowed: Mapping[str, Any]) -> bool:
    if t.key != allowed.get("key"):
        return False
    if allowed.get("effect") and t.effect != allowed["effect"]:
        return False
    if allowed.get("operator") == "Exists":
        return True  # Equal on the same key is narrower than Exists
    value = allowed.get("value")
    return (t.operator or "Equal") == "Equal" and (value is None or t.value == value)


def _check_placement(spec: LoRATrainingJobSpec, policy: Policy) -> str | None:
    res = spec.resources
    for i, t in enumerate(res.tolerations):
        if not any(_toleration_matches(t, a) for a in policy.allowed_tolerations):
            return (f"spec.resources.tolerations[{i}]: {t.to_wire()} is not an allowed toleration "
                    f"(allowed: {list(policy.allowed_tolerations) or 'none'})")
    if res.priority_class_name and res.priority_class_name not in policy.allowed_priority_classes:
        return (f"spec.resources.priorityClassName: {res.priority_class_name!r} is not an allowed priority "
                f"class (allowed: {', '.join(policy.allowed_priority_classes) or 'none'})")
    for key in sorted(res.node_selector):
        if key not in policy.allowed_node_selector_keys:
            return (f"spec.resources.nodeSelector: key {key!r} is not allowed "
                    f"(allowed: {', '.join(policy.allowed_node_selector_keys) or 'none'})")
    return None


def _check_uris(spec: LoRATrainingJobSpec, config: OperatorConfig) -> str | None:
    policy = config.policy
    if spec.storage.endpoint and normalize_endpoint(spec.storage.endpoint) not in allowed_endpoints(config):
        return (f"spec.storage.endpoint: {spec.storage.endpoint} is not an allowed object-store endpoint "
                f"(allowed: {', '.join(sorted(allowed_endpoints(config))) or 'none'})")
    checks = [("spec.baseModel.uri", spec.base_model.uri, policy.allowed_base_model_prefixes)]
    regression = spec.evaluation.regression_dataset
    for field, uri in (("spec.dataset.train", spec.dataset.train), ("spec.dataset.eval", spec.dataset.eval),
                       ("spec.evaluation.regressionDataset.uri", regression.uri if regression else None)):
        checks.append((field, uri, policy.allowed_dataset_prefixes))
    for field, uri, prefixes in checks:
        if uri and prefixes and not _uri_allowed(uri, prefixes, spec, config):
            where = f" on {job_endpoint(spec, config)}" if uri.startswith("s3://") else ""
            return f"{field}: {uri}{where} is not under an allowed prefix ({', '.join(prefixes)})"
    return None


def check_policy(spec: LoRATrainingJobSpec, config: OperatorConfig) -> tuple[str, str] | None:
    """(PolicyViolation, message naming the field) when the cluster policy refuses this spec."""
    policy: Policy = config.policy
    for field, value in uri_fields(spec):
        if value.startswith("file://"):
            return c.POLICY_VIOLATION, (f"{field}: {value} is a file:// URI, which is for the local "
                                        "CLI only (a pod's files vanish with it); use s3:// or pvc://")
    refused = _check_uris(spec, config) or _check_placement(spec, policy)
    if refused:
        return c.POLICY_VIOLATION, refused
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

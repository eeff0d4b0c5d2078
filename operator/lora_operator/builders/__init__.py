"""Pure manifest builders: spec in, dict out; no I/O, no kubernetes/kopf imports."""

from .configmap import build_configmap, trainer_manifest
from .job import JobParams, build_job
from .names import (
    LABEL_ATTEMPT,
    LABEL_JOB,
    MANAGED_BY,
    QUEUE_LABEL,
    configmap_name,
    job_name,
    labels,
    selector_labels,
    service_name,
)
from .networkpolicy import build_network_policy, network_policy_name
from .owner import Owner
from .service import build_service

__all__ = [
    "LABEL_ATTEMPT",
    "LABEL_JOB",
    "MANAGED_BY",
    "QUEUE_LABEL",
    "JobParams",
    "Owner",
    "build_configmap",
    "build_job",
    "build_network_policy",
    "build_service",
    "configmap_name",
    "job_name",
    "labels",
    "network_policy_name",
    "selector_labels",
    "service_name",
    "trainer_manifest",
]

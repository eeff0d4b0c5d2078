"""Deterministic child names and labels.

Invariant: a child's name depends only on the LoRATrainingJob's name and the attempt number, so a
retried handler or a restarted operator computes the same name and adopts (AlreadyExists) instead
of creating a second Job for the same attempt.
"""

from __future__ import annotations

import hashlib

from ..api import GROUP

MAX_NAME = 63  # Job names end up in pod labels and pod hostnames (DNS-1123 labels)
MANAGED_BY = "lora-operator"
LABEL_JOB = f"{GROUP}/job"
LABEL_ATTEMPT = f"{GROUP}/attempt"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"  # names a WorkloadPriorityClass
CONFIG_DIR = "/etc/lora"
CONFIG_FILE = "job.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"


def child_name(owner: str, suffix: str) -> str:
    """`<owner>-<suffix>`, shortened with a stable hash when longer than 63 characters."""
    name = f"{owner}-{suffix}"
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(owner.encode()).hexdigest()[:8]
    keep = MAX_NAME - len(suffix) - len(digest) - 2
    return f"{owner[:keep].rstrip('-.')}-{digest}-{suffix}"


def job_name(owner: str, attempt: int) -> str:
    return child_name(owner, f"a{attempt}")


def configmap_name(owner: str) -> str:
    return child_name(owner, "config")


def service_name(owner: str) -> str:
    return child_name(owner, "workers")


def selector_labels(owner: str) -> dict[str, str]:
    """Labels that find every child of one LoRATrainingJob."""
    return {"app.kubernetes.io/managed-by": MANAGED_BY, LABEL_JOB: _label_value(owner)}


def labels(owner: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "lora-trainer",
        "app.kubernetes.io/instance": _label_value(owner),
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "lora-operator",
        **selector_labels(owner),
    }


def _label_value(value: str) -> str:
    return value if len(value) <= MAX_NAME else child_name(value[:40], "x")[:MAX_NAME]

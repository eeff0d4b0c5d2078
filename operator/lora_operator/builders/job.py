"""The trainer's batch/v1 Job: one per attempt, Kueue-ready, locked down, checkpoint-friendly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..api import LoRATrainingJobSpec
from .names import (
    CONFIG_DIR,
    CONFIG_FILE,
    CONFIG_PATH,
    LABEL_ATTEMPT,
    PRIORITY_LABEL,
    QUEUE_LABEL,
    configmap_name,
    job_name,
    labels,
    service_name,
)
from .owner import Owner
from .service import MAIN_PORT
from .volumes import PVC_ROOT, pvc_claims, pvc_mounts, pvc_volumes

TERMINATION_LOG = "/dev/termination-log"
WORK_DIR = "/var/lib/lora"
UID = 1000
TMP_SIZE = "1Gi"  # /tmp holds only small scratch files; the work volume holds models and data
DEFAULT_EPHEMERAL_STORAGE = "100Gi"
SHM_SIZE = "8Gi"  # /dev/shm for NCCL when the spec sets no memory request


@dataclass(frozen=True)
class JobParams:
    """Everything a Job needs besides the spec, resolved by the operator."""

    attempt: int
    image: str
    trainer_command: tuple[str, ...] = ("lora-trainer", "run")
    endpoint: str | None = None
    queue_name: str | None = None
    termination_grace_seconds: int = 120
    ephemeral_storage: str = DEFAULT_EPHEMERAL_STORAGE  # when spec.resources.ephemeralStorage is empty
    rendezvous_timeout_seconds: int = 600  # multi-node: how long pod 0 waits for the others
    collective_timeout_seconds: int = 1800  # multi-node: how long a rank waits in one collective


def build_job(owner: Owner, spec: LoRATrainingJobSpec, params: JobParams) -> dict[str, Any]:
    name = job_name(owner.name, params.attempt)
    meta_labels = {**labels(owner.name, "trainer"), LABEL_ATTEMPT: str(params.attempt)}
    if params.queue_name:
        meta_labels[QUEUE_LABEL] = params.queue_name
        if spec.resources.priority_class_name:  # Kueue's WorkloadPriorityClass orders and preempts
            meta_labels[PRIORITY_LABEL] = spec.resources.priority_class_name
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,  # the operator retries itself, so every attempt is recorded
        # A pod is replaced (and the Job fails) only once the old one has stopped writing.
        "podReplacementPolicy": "Failed",
        "suspend": bool(params.queue_name) or spec.suspend,
        "template": {
            "metadata": {"labels": {k: v for k, v in meta_labels.items() if k not in (QUEUE_LABEL, PRIORITY_LABEL)}},
            "spec": _pod_spec(owner, spec, params, name),
        },
    }
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.resources.nodes > 1:
        job_spec.update(
            completionMode="Indexed", completions=spec.resources.nodes, parallelism=spec.resources.nodes
        )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": meta_labels,
            "ownerReferences": [owner.reference()],
        },
        "spec": job_spec,
    }


def _pod_spec(owner: Owner, spec: LoRATrainingJobSpec, params: JobParams, name: str) -> dict[str, Any]:
    res = spec.resources
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": params.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(owner, spec, params, name)],
        "volumes": _volumes(owner, spec, params),
    }
    if res.node_selector:
        pod["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod["tolerations"] = [t.to_wire() for t in res.tolerations]
    # Under Kueue the name is a WorkloadPriorityClass (the Job's label); a pod priorityClassName
    # naming no PriorityClass would stop the Job controller from creating the pods.
    if res.priority_class_name and not params.queue_name:
        pod["priorityClassName"] = res.priority_class_name
    if res.nodes > 1:
        pod["subdomain"] = service_name(owner.name)
    return pod


def _container(owner: Owner, spec: LoRATrainingJobSpec, params: JobParams, name: str) -> dict[str, Any]:
    return {
        "name": "trainer",
        "image": params.image,
        "imagePullPolicy": "IfNotPresent",
        "command": _command(owner, spec, params, name),
        "env": _env(spec, params),
        "resources": _resources(spec, params),
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": _mounts(spec),
        "workingDir": WORK_DIR,
    }


def _command(owner: Owner, spec: LoRATrainingJobSpec, params: JobParams, name: str) -> list[str]:
    res = spec.resources
    if res.nodes == 1:
        return [*params.trainer_command, CONFIG_PATH]
    # torchrun's static rendezvous: pod 0's agent serves the store on MAIN_PORT and waits at most
    # the timeout for the others; no restarts inside a pod (a new attempt resumes from a checkpoint).
    # lora_trainer.launch is torchrun that keeps the failed rank's exit code (2, 143) for the operator.
    return [
        "python", "-m", "lora_trainer.launch",
        "--nnodes", str(res.nodes),
        "--node_rank", "$(JOB_COMPLETION_INDEX)",
        "--nproc_per_node", str(max(res.gpus, 1)),
        "--master_addr", f"{name}-0.{service_name(owner.name)}",
        "--master_port", str(MAIN_PORT),
        "--rdzv_conf", f"timeout={params.rendezvous_timeout_seconds}",
        "--max_restarts", "0",
        "-m", "lora_trainer", "run", CONFIG_PATH,
    ]


def _env(spec: LoRATrainingJobSpec, params: JobParams) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if spec.resources.nodes > 1:  # first: later $(JOB_COMPLETION_INDEX) references need it defined
        env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}})
    env += [
        {"name": "LORA_ATTEMPT", "value": str(params.attempt)},
        {"name": "LORA_CONFIG", "value": CONFIG_PATH},
        {"name": "LORA_WORK_DIR", "value": WORK_DIR},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": f"{WORK_DIR}/hf"},
        {"name": "LORA_TERMINATION_LOG", "value": TERMINATION_LOG},  # the trainer writes its summary here
    ]
    if spec.resources.nodes > 1:
        env.append({"name": "LORA_COLLECTIVE_TIMEOUT_S", "value": str(params.collective_timeout_seconds)})
    if pvc_claims(spec):
        env.append({"name": "LORA_PVC_ROOT", "value": PVC_ROOT})
    endpoint = spec.storage.endpoint or params.endpoint
    if endpoint:
        env.append({"name": "S3_ENDPOINT", "value": endpoint})
    if spec.storage.secret_name:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": spec.storage.secret_name, "key": key}}})
    return env


def work_size(spec: LoRATrainingJobSpec, params: JobParams) -> str:
    """Local disk for base model, data and checkpoints: the spec's, else the operator's default."""
    return spec.resources.ephemeral_storage or params.ephemeral_storage


def _resources(spec: LoRATrainingJobSpec, params: JobParams) -> dict[str, Any]:
    res = spec.resources
    # The scheduler places the pod where the work volume fits; its sizeLimit evicts the pod
    # (not the node) when a run writes more than it asked for.
    requests: dict[str, str] = {"ephemeral-storage": work_size(spec, params)}
    limits: dict[str, str] = {}
    if res.cpu:
        requests["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    if res.gpus > 0:
        requests[res.gpu_resource_name] = limits[res.gpu_resource_name] = str(res.gpus)
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _mounts(spec: LoRATrainingJobSpec) -> list[dict[str, Any]]:
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "work", "mountPath": WORK_DIR},
    ]
    if _needs_shm(spec):
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return mounts + pvc_mounts(spec)


def _volumes(owner: Owner, spec: LoRATrainingJobSpec, params: JobParams) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": configmap_name(owner.name),
                                         "items": [{"key": CONFIG_FILE, "path": CONFIG_FILE}]}},
        {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE}},
        {"name": "work", "emptyDir": {"sizeLimit": work_size(spec, params)}},
    ]
    if _needs_shm(spec):
        # tmpfs counts against the pod's memory; bounded so a runaway writer cannot take the node's
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.memory or SHM_SIZE}})
    return volumes + pvc_volumes(spec)


def _needs_shm(spec: LoRATrainingJobSpec) -> bool:
    """NCCL needs more than the default 64 MiB /dev/shm once several processes talk."""
    return spec.resources.gpus > 1 or spec.resources.nodes > 1

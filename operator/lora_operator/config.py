"""Operator settings: every knob is an environment variable (the Helm chart maps values to them).

Pure: parsing only, no I/O. `OperatorConfig.from_env(os.environ)` is called once, by the single
`@kopf.on.startup` handler (handlers/kopf_handlers.py), which also applies the kopf settings.

Environment variables (Helm value in brackets is a suggestion for the chart):

  LORA_ALLOWED_BASE_MODEL_PREFIXES  comma list of URI prefixes a spec.baseModel.uri must start
                                    with; empty = any  [policy.allowedBaseModelPrefixes]. An s3://
                                    prefix means "on the operator's endpoint (LORA_S3_ENDPOINT)"; for
                                    another allowed endpoint write <endpoint>/<bucket>/<prefix>
  LORA_ALLOWED_DATASET_PREFIXES     the same for dataset.train, dataset.eval and
                                    evaluation.regressionDataset.uri  [policy.allowedDatasetPrefixes]
  LORA_ALLOWED_ENDPOINTS            comma list of S3 endpoints a spec.storage.endpoint may name besides
                                    LORA_S3_ENDPOINT; empty = only LORA_S3_ENDPOINT  [policy.allowedEndpoints]
  LORA_ALLOWED_TOLERATIONS          JSON list of tolerations a spec may use; a spec toleration must
                                    match one (same key; operator/value/effect equal where the entry
                                    sets them); empty = none  [policy.allowedTolerations]
  LORA_ALLOWED_PRIORITY_CLASSES     comma list of PriorityClass names; empty = none  [policy.allowedPriorityClasses]
  LORA_ALLOWED_NODE_SELECTOR_KEYS   comma list of node label keys spec.resources.nodeSelector may use;
                                    empty = none  [policy.allowedNodeSelectorKeys]
  LORA_MAX_GPUS_PER_JOB             max resources.gpus x resources.nodes; 0 = no limit  [policy.maxGpusPerJob]
  LORA_MAX_RUNNING_JOBS_PER_NAMESPACE  running trainer Jobs per namespace; 0 = no limit
                                    [policy.maxRunningJobsPerNamespace]
  LORA_ALLOWED_IMAGES               comma list of allowed trainer images (exact, or a prefix ending
                                    in ':' '@' or '/'); empty = any  [policy.allowedImages]
  LORA_DEFAULT_IMAGE                trainer image when spec.image is empty  [trainer.image]
  LORA_DEFAULT_QUEUE                Kueue LocalQueue when spec.queueName is empty; empty = no Kueue
                                    [kueue.defaultQueue]
  LORA_S3_ENDPOINT                  S3 endpoint when spec.storage.endpoint is empty  [s3.endpoint]
  LORA_S3_ACCESS_KEY_ID / LORA_S3_SECRET_ACCESS_KEY  (aliases AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)
                                    the operator's OWN (read-only is enough) credentials for reading
                                    progress.json, used only with LORA_S3_ENDPOINT; otherwise the
                                    operator reads the job's spec.storage.secretName Secret in the
                                    job's namespace (needs `get secrets`), else reads anonymously  [objectStore.*]
  LORA_CHANNEL_ROOT                 s3://bucket/prefix under which LoRAAdapterChannel pointers live
                                    (<root>/<namespace>/<channel>/current.json); written with the
                                    operator's own credentials, which then need write access to this
                                    prefix (and only to it). Unset: channels report
                                    ChannelRootNotConfigured  [channels.root]
  LORA_READ_JOB_SECRETS             false: never read job Secrets (then grant no `get secrets`;
                                    without own credentials progress.json is read anonymously)
  LORA_PROGRESS_INTERVAL            seconds between two progress.json reads per job (default 30)
  LORA_RESYNC_INTERVAL              seconds between two level-based passes over all jobs (default 30)
  LORA_WORKERS                      threads running passes queued by Job changes and the resync
                                    (default 16; kopf's create/resume handlers have their own 32)
  LORA_TRAINER_COMMAND              trainer command; the config path is appended (default
                                    "lora-trainer run"); tests point it at a fake trainer
  LORA_TERMINATION_GRACE_SECONDS    pod grace period for the final checkpoint (default 120)
  LORA_DEFAULT_EPHEMERAL_STORAGE    local disk per trainer pod when spec.resources.ephemeralStorage is
                                    empty (default 100Gi)  [trainer.ephemeralStorage]
  LORA_NETWORK_POLICY               false: create no NetworkPolicy per job (default true)  [networkPolicy.enabled]
  LORA_NETWORK_POLICY_EGRESS_PORTS  comma list of further TCP ports trainer pods may reach (besides DNS,
                                    the object-store ports and 443 for hf://)  [networkPolicy.extraEgressPorts]
  LORA_RENDEZVOUS_TIMEOUT_SECONDS   multi-node: how long pod 0 waits for the other pods (default 600)
  LORA_COLLECTIVE_TIMEOUT_SECONDS   multi-node: how long a rank waits in one collective before the
                                    attempt fails (default 1800)
  LORA_METRICS_PORT                 Prometheus /metrics port; 0 = off (default 8080)
  LORA_LIVENESS_ENDPOINT            kopf liveness URL (default http://0.0.0.0:8081/healthz)
  LORA_LOG_FORMAT                   plain | json (default plain)
  LORA_WATCH_TIMEOUT                server-side watch timeout, seconds (default 60)
  LORA_REQUEST_TIMEOUT              API request timeout, seconds (default 30)
  LORA_NAMESPACES                   comma list of namespaces to watch; empty = all (the command
                                    line --namespace / --all-namespaces wins)

RBAC the operator needs: `RBAC_RULES` below (ClusterRole for --all-namespaces; with --namespace a
Role per namespace is enough for the namespaced rows, plus the cluster-scoped CRD row). In short:
  training.lora.dev  loratrainingjobs           get list watch patch   (patch: kopf's annotations)
  training.lora.dev  loratrainingjobs/status    get patch
  training.lora.dev  loratrainingjobs/finalizers  update  (blockOwnerDeletion on the children)
  batch              jobs                       get list watch create patch
  ""                 pods                       list                   (failure reasons of attempts)
  ""                 configmaps, services       get create
  networking.k8s.io  networkpolicies            get create             (one per job, LORA_NETWORK_POLICY)
  ""                 resourcequotas             list                   (GPU quota check)
  ""                 events                     create                 (ours and kopf's)
  ""                 secrets                    get    only to read a job's own storage Secret (the chart
                                                       grants it only with operator.readJobSecrets)
  ""                 namespaces                 list watch             (kopf, with --all-namespaces)
  apiextensions.k8s.io customresourcedefinitions  list watch         (kopf's resource scanning)
  kueue.x-k8s.io     workloads                  list patch             (Kueue's reasons; spec.active on suspend)
  API discovery (`/apis`, Kueue detection) is open to every authenticated user.
  training.lora.dev  loraadapterchannels        get list watch patch
  training.lora.dev  loraadapterchannels/status get patch
  ""                 configmaps                 update                 (the vLLM LoRA syncer ConfigMap)
tests/operator/test_operator_cluster.py runs the operator under exactly these rules.

Retention: the operator adds no finalizer. Deleting a LoRATrainingJob deletes its Jobs, Pods,
ConfigMap and Service through owner references (garbage collector); artifacts and checkpoints in
object storage are kept on purpose (they are the product; clean them up with a bucket lifecycle rule).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_IMAGE = "ghcr.io/lora-operator/trainer:0.1.0"

RBAC_RULES: tuple[dict, ...] = (
    {"apiGroups": ["training.lora.dev"], "resources": ["loratrainingjobs"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["training.lora.dev"], "resources": ["loratrainingjobs/status"], "verbs": ["get", "patch"]},
    # blockOwnerDeletion on children needs this where OwnerReferencesPermissionEnforcement is on
    {"apiGroups": ["training.lora.dev"], "resources": ["loratrainingjobs/finalizers"], "verbs": ["update"]},
    {"apiGroups": ["training.lora.dev"], "resources": ["loraadapterchannels"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["training.lora.dev"], "resources": ["loraadapterchannels/status"], "verbs": ["get", "patch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["configmaps", "services"], "verbs": ["get", "create"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "create"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["update"]},  # only syncer ConfigMaps it made
    {"apiGroups": [""], "resources": ["resourcequotas"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]},  # drop with LORA_S3_ACCESS_KEY_ID set
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["list", "patch"]},
)


def _get(env: Mapping[str, str], *names: str) -> str:
    """The first non-empty of several names (the primary name first, then accepted aliases)."""
    return next((env[n] for n in names if env.get(n, "").strip()), "")


def _list(value: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (value or "").split(",") if item.strip())


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _get(env, name)
    try:
        return int(raw) if raw.strip() else default
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _get(env, name)
    try:
        return float(raw) if raw.strip() else default
    except ValueError:
        raise ValueError(f"{name}: expected a number, got {raw!r}") from None


def _ports(env: Mapping[str, str], name: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(p) for p in _list(_get(env, name)))
    except ValueError:
        raise ValueError(f"{name}: expected a comma list of port numbers, got {_get(env, name)!r}") from None
    if not all(0 < p < 65536 for p in ports):
        raise ValueError(f"{name}: ports are 1..65535")
    return ports


def _tolerations(env: Mapping[str, str], name: str) -> tuple[dict, ...]:
    raw = _get(env, name).strip()
    try:
        value = json.loads(raw) if raw else []
    except ValueError:
        raise ValueError(f"{name}: expected a JSON list of tolerations, got {raw[:80]!r}") from None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ValueError(f"{name}: expected a JSON list of toleration objects")
    return tuple(value)


@dataclass(frozen=True)
class Policy:
    """What a spec may ask for in this cluster."""

    allowed_base_model_prefixes: tuple[str, ...] = ()
    max_gpus_per_job: int = 0
    max_running_jobs_per_namespace: int = 0
    allowed_images: tuple[str, ...] = ()
    allowed_dataset_prefixes: tuple[str, ...] = ()
    allowed_endpoints: tuple[str, ...] = ()  # besides the operator's own LORA_S3_ENDPOINT
    allowed_tolerations: tuple[Mapping[str, object], ...] = ()
    allowed_priority_classes: tuple[str, ...] = ()
    allowed_node_selector_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class OperatorConfig:
    policy: Policy = field(default_factory=Policy)
    default_image: str = DEFAULT_IMAGE
    default_queue: str | None = None
    s3_endpoint: str | None = None
    s3_access_key: str | None = field(default=None, repr=False)
    s3_secret_key: str | None = field(default=None, repr=False)
    read_job_secrets: bool = True
    progress_interval: float = 30.0
    resync_interval: float = 30.0
    trainer_command: tuple[str, ...] = ("lora-trainer", "run")
    termination_grace_seconds: int = 120
    default_ephemeral_storage: str = "100Gi"
    network_policy: bool = True
    network_policy_egress_ports: tuple[int, ...] = ()
    rendezvous_timeout_seconds: int = 600
    collective_timeout_seconds: int = 1800
    metrics_port: int = 8080
    liveness_endpoint: str = "http://0.0.0.0:8081/healthz"
    log_format: str = "plain"
    watch_timeout: float = 60.0
    request_timeout: float = 30.0
    namespaces: tuple[str, ...] = ()
    channel_root: str | None = None
    workers: int = 16

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OperatorConfig:
        policy = Policy(
            allowed_base_model_prefixes=_list(env.get("LORA_ALLOWED_BASE_MODEL_PREFIXES")),
            max_gpus_per_job=_int(env, "LORA_MAX_GPUS_PER_JOB", 0),
            max_running_jobs_per_namespace=_int(env, "LORA_MAX_RUNNING_JOBS_PER_NAMESPACE", 0),
            allowed_images=_list(env.get("LORA_ALLOWED_IMAGES")),
            allowed_dataset_prefixes=_list(env.get("LORA_ALLOWED_DATASET_PREFIXES")),
            allowed_endpoints=_list(env.get("LORA_ALLOWED_ENDPOINTS")),
            allowed_tolerations=_tolerations(env, "LORA_ALLOWED_TOLERATIONS"),
            allowed_priority_classes=_list(env.get("LORA_ALLOWED_PRIORITY_CLASSES")),
            allowed_node_selector_keys=_list(env.get("LORA_ALLOWED_NODE_SELECTOR_KEYS")),
        )
        log_format = env.get("LORA_LOG_FORMAT", "plain").strip() or "plain"
        if log_format not in ("plain", "json"):
            raise ValueError(f"LORA_LOG_FORMAT: expected plain or json, got {log_format!r}")
        return cls(
            policy=policy,
            default_image=_get(env, "LORA_DEFAULT_IMAGE").strip() or DEFAULT_IMAGE,
            default_queue=env.get("LORA_DEFAULT_QUEUE", "").strip() or None,
            s3_endpoint=env.get("LORA_S3_ENDPOINT", "").strip() or None,
            s3_access_key=_get(env, "LORA_S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID") or None,
            s3_secret_key=_get(env, "LORA_S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY") or None,
            read_job_secrets=_get(env, "LORA_READ_JOB_SECRETS").strip().lower() not in ("false", "0", "no"),
            progress_interval=_float(env, "LORA_PROGRESS_INTERVAL", 30.0),
            resync_interval=_float(env, "LORA_RESYNC_INTERVAL", 30.0),
            trainer_command=tuple(shlex.split(env.get("LORA_TRAINER_COMMAND", ""))) or ("lora-trainer", "run"),
            termination_grace_seconds=_int(env, "LORA_TERMINATION_GRACE_SECONDS", 120),
            default_ephemeral_storage=_get(env, "LORA_DEFAULT_EPHEMERAL_STORAGE").strip() or "100Gi",
            network_policy=_get(env, "LORA_NETWORK_POLICY").strip().lower() not in ("false", "0", "no"),
            network_policy_egress_ports=_ports(env, "LORA_NETWORK_POLICY_EGRESS_PORTS"),
            rendezvous_timeout_seconds=_int(env, "LORA_RENDEZVOUS_TIMEOUT_SECONDS", 600),
            collective_timeout_seconds=_int(env, "LORA_COLLECTIVE_TIMEOUT_SECONDS", 1800),
            metrics_port=_int(env, "LORA_METRICS_PORT", 8080),
            liveness_endpoint=env.get("LORA_LIVENESS_ENDPOINT", "").strip() or "http://0.0.0.0:8081/healthz",
            log_format=log_format,
            watch_timeout=_float(env, "LORA_WATCH_TIMEOUT", 60.0),
            request_timeout=_float(env, "LORA_REQUEST_TIMEOUT", 30.0),
            namespaces=_list(_get(env, "LORA_NAMESPACES")),
            channel_root=_channel_root(env.get("LORA_CHANNEL_ROOT", "")),
            workers=max(1, _int(env, "LORA_WORKERS", 16)),
        )


def _channel_root(raw: str) -> str | None:
    root = raw.strip().rstrip("/")
    if not root:
        return None
    bucket, _, prefix = root.removeprefix("s3://").partition("/")
    if not root.startswith("s3://") or not bucket or not prefix:
        raise ValueError(f"LORA_CHANNEL_ROOT: expected s3://bucket/prefix, got {raw!r}")
    return root

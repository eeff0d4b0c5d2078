"""The only module that talks to the Kubernetes API (kubernetes client, plain camelCase dicts)."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from ..api import GROUP, PLURAL, VERSION
from ..api.channel import CHANNEL_PLURAL
from .informer import JobInformer

log = logging.getLogger(__name__)
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
MERGE = "application/merge-patch+json"
MAX_EVENT_PREFIX = 253 - 13
# Kueue's storage version: read without its conversion webhook, so even while Kueue is down.
WORKLOADS = ("kueue.x-k8s.io", "v1beta2", "workloads")
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"
SECRET_TTL = 60.0  # seconds a job's storage credentials are reused (progress reads, not per read)
KUBECONFIG_REFRESH_S = 60.0  # see _throttled (kubeconfig and in-cluster loaders alike)


def _selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in labels.items())


def _json(response: Any) -> Any:
    return json.loads(response.data)


def event_name(owner: str) -> str:
    """`<owner>.<random>` within the 253 characters of a DNS subdomain, however long the owner's name."""
    return f"{owner[:MAX_EVENT_PREFIX].rstrip('-.')}.{uuid.uuid4().hex[:12]}"


def _throttled(hook: Callable[[Any], None], every: float) -> Callable[[Any], None]:
    """The config loader's refresh hook, at most once per `every` seconds.

    The client calls it before every request, and it sets the host and credentials again each
    time (0.2 ms of CPU, a fifth of a small request's). Once a minute still renews in time: the
    kubeconfig loader renews a token 5 minutes before it expires (EXPIRY_SKEW_PREVENTION_DELAY),
    and in a cluster the kubelet replaces the projected service-account token at 80% of its
    lifetime (10 minutes at the least), so the one read before is valid for minutes more."""
    last = [-every]
    lock = threading.Lock()

    def refresh(configuration: Any) -> None:
        with lock:
            if time.monotonic() - last[0] < every:
                return
            last[0] = time.monotonic()
        hook(configuration)
    return refresh


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeClient:
    def __init__(self, api_client: client.ApiClient | None = None, timeout: float = 30.0, pool_size: int = 64):
        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            settings = client.Configuration.get_default_copy()
            # kopf's executor, the workers, the informer, the resync and the event posters share it:
            # a pool smaller than the threads that use it drops connections ("Connection pool is
            # full", 250 times at N = 1,000 with 32) and the next request pays a TLS handshake.
            settings.connection_pool_maxsize = pool_size
            if settings.refresh_api_key_hook is not None:
                settings.refresh_api_key_hook = _throttled(settings.refresh_api_key_hook, KUBECONFIG_REFRESH_S)
            api_client = client.ApiClient(settings)
        self.api = api_client
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self.timeout = timeout
        self._groups: tuple[float, frozenset[str]] = (0.0, frozenset())
        self._secrets: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}
        self.jobs_informer: JobInformer | None = None
        self._events = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lora-events")

    def watch_jobs(self, labels: Mapping[str, str], namespaces: Iterable[str], on_change, watch_timeout: float,
                   index_label: str | None = None) -> None:
        """Serve list_jobs from a list+watch cache of the Jobs with these labels (see informer.py),
        indexed by the value of `index_label`."""
        self.jobs_informer = JobInformer(self.api, _selector(labels), namespaces, on_change, watch_timeout,
                                         index_label)
        self.jobs_informer.start()

    def _call(self, fn, *args, **kwargs) -> Any:
        return _json(fn(*args, _preload_content=False, _request_timeout=self.timeout, **kwargs))

    # LoRATrainingJobs
    def get_ltj(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list_ltjs(self, namespaces: Iterable[str] = ()) -> list[dict[str, Any]]:
        """All LoRATrainingJobs, from the API server's watch cache (resourceVersion=0: no etcd read)."""
        namespaces = tuple(namespaces)
        if not namespaces:
            return self._call(self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                              resource_version="0")["items"]
        items: list[dict[str, Any]] = []
        for ns in namespaces:
            items += self._call(self.custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL,
                                resource_version="0")["items"]
        return items

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        """Returns the object as written (its resourceVersion tells later reads whether they are older)."""
        return self._call(self.custom.patch_namespaced_custom_object_status,
                          GROUP, VERSION, namespace, PLURAL, name, {"status": dict(status)}, _content_type=MERGE)

    # LoRAAdapterChannels
    def get_channel(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get_custom(CHANNEL_PLURAL, namespace, name)

    def list_channels(self, namespaces: Iterable[str] = ()) -> list[dict[str, Any]]:
        return self._list_custom(CHANNEL_PLURAL, tuple(namespaces))

    def patch_channel_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, CHANNEL_PLURAL, name, {"status": dict(status)},
            _content_type=MERGE, _request_timeout=self.timeout)

    def _get_custom(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _list_custom(self, plural: str, namespaces: tuple[str, ...]) -> list[dict[str, Any]]:
        if not namespaces:
            return self._call(self.custom.list_cluster_custom_object, GROUP, VERSION, plural)["items"]
        items: list[dict[str, Any]] = []
        for ns in namespaces:
            items += self._call(self.custom.list_namespaced_custom_object, GROUP, VERSION, ns, plural)["items"]
        return items

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(self.core.read_namespaced_config_map, name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def replace_configmap(self, manifest: Mapping[str, Any], resource_version: str) -> dict[str, Any]:
        """Replace with the resourceVersion read: a concurrent writer makes this fail (409), not vanish."""
        body = {**manifest, "metadata": {**manifest["metadata"], "resourceVersion": resource_version}}
        meta = body["metadata"]
        return self._call(self.core.replace_namespaced_config_map, meta["name"], meta["namespace"], body)

    # Children
    def list_jobs(self, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        cached = self.jobs_informer.jobs(namespace, labels) if self.jobs_informer else None
        if cached is not None:
            return cached
        return self._call(self.batch.list_namespaced_job, namespace, label_selector=_selector(labels))["items"]

    def list_job_pods(self, namespace: str, job_name: str) -> list[dict[str, Any]]:
        selector = f"{JOB_NAME_LABEL}={job_name}"
        return self._call(self.core.list_namespaced_pod, namespace, label_selector=selector)["items"]

    def create(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Create, or return the existing object of that name (AlreadyExists): idempotent.

        The existing object may belong to someone else; the caller checks its ownerReferences.
        """
        kind, ns, name = manifest["kind"], manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        create, read = {
            "Job": (self.batch.create_namespaced_job, self.batch.read_namespaced_job),
            "ConfigMap": (self.core.create_namespaced_config_map, self.core.read_namespaced_config_map),
            "Service": (self.core.create_namespaced_service, self.core.read_namespaced_service),
            "NetworkPolicy": (self.networking.create_namespaced_network_policy,
                              self.networking.read_namespaced_network_policy),
        }[kind]
        try:
            obj = self._call(create, ns, dict(manifest))
        except ApiException as exc:
            if exc.status != 409:
                raise
            log.info("%s %s/%s already exists", kind, ns, name)
            obj = self._call(read, name, ns)
        if kind == "Job" and self.jobs_informer:
            self.jobs_informer.put(obj)
        return obj

    def patch_job_suspend(self, namespace: str, name: str, suspend: bool) -> dict[str, Any]:
        obj = self._call(self.batch.patch_namespaced_job, name, namespace, {"spec": {"suspend": suspend}})
        if self.jobs_informer:
            self.jobs_informer.put(obj)
        return obj

    # Kueue
    def get_workload(self, namespace: str, job_uid: str) -> dict[str, Any] | None:
        """The Workload Kueue keeps for a Job (None when there is none, or no Kueue)."""
        group, version, plural = WORKLOADS
        try:
            items = self._call(self.custom.list_namespaced_custom_object, group, version, namespace, plural,
                               label_selector=f"{JOB_UID_LABEL}={job_uid}")["items"]
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return max(items, key=lambda w: w["metadata"].get("creationTimestamp") or "", default=None)

    def patch_workload_active(self, namespace: str, name: str, active: bool, annotations: Mapping[str, Any]) -> dict:
        group, version, plural = WORKLOADS
        body = {"metadata": {"annotations": dict(annotations)}, "spec": {"active": active}}
        return self._call(self.custom.patch_namespaced_custom_object, group, version, namespace, plural, name, body,
                          _content_type=MERGE)

    def list_quotas(self, namespace: str) -> list[dict[str, Any]]:
        return self._call(self.core.list_namespaced_resource_quota, namespace)["items"]

    def has_api_group(self, group: str, ttl: float = 60.0) -> bool:
        fetched, groups = self._groups
        if time.monotonic() - fetched > ttl:
            found = self._call(client.ApisApi(self.api).get_api_versions)
            groups = frozenset(g["name"] for g in found.get("groups", []))
            self._groups = (time.monotonic(), groups)
        return group in groups

    def _secret_data(self, namespace: str, name: str) -> dict[str, str]:
        """A Secret's data, kept in memory for SECRET_TTL seconds, so progress reads and admission
        checks of a thousand jobs sharing one Secret do not GET it each time; a rotated key is
        picked up within that time. Raises ApiException (404: no such Secret)."""
        cached = self._secrets.get((namespace, name))
        if cached and time.monotonic() - cached[0] < SECRET_TTL:
            return cached[1]
        data = self._call(self.core.read_namespaced_secret, name, namespace).get("data") or {}
        self._secrets[(namespace, name)] = (time.monotonic(), data)
        return data

    def read_secret_keys(self, namespace: str, name: str, keys: Iterable[str]) -> dict[str, str]:
        """Decoded values of some keys of a Secret. Callers must never log or store them."""
        import base64

        try:
            data = self._secret_data(namespace, name)
        except ApiException as exc:
            log.warning("cannot read Secret %s/%s: %s", namespace, name, exc.reason)
            return {}
        return {k: base64.b64decode(data[k]).decode() for k in keys if k in data}

    def secret_exists(self, namespace: str, name: str) -> bool | None:
        """True or False; None when the operator may not look (no `get secrets`: RBAC default).

        Only a Secret seen is remembered (SECRET_TTL): a missing one is looked up again each time."""
        try:
            self._secret_data(namespace, name)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            if exc.status == 403:
                return None
            raise

    def emit_event(self, owner: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Post an Event in the background: best effort, and off the reconcile path."""
        self._events.submit(self._post_event, dict(owner), type_, reason, message)

    def _post_event(self, owner: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        meta = owner["metadata"]
        stamp = now_rfc3339()
        event = {
            "metadata": {"name": event_name(meta["name"]), "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": owner.get("apiVersion"), "kind": owner.get("kind"),
                               "name": meta["name"], "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": "lora-operator"}, "reportingComponent": "lora-operator",
            "reportingInstance": "lora-operator", "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], event, _request_timeout=self.timeout)
        except Exception as exc:  # an Event is best effort (and nobody waits for this future)
            log.warning("could not post event %s on %s: %s", reason, meta["name"], getattr(exc, "reason", exc))

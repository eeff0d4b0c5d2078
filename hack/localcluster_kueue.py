"""Real Kueue in the local stack (``localcluster.py up --kueue``, ``make cluster KUEUE=1``).

Kueue's manager runs as a host process next to the apiserver, which reaches its webhooks on
loopback. What that takes with Kueue v0.17, and why:

* CRDs come from the module source (``config/components/crd/bases``) and are applied server-side
  (the Workload CRD is 1.4 MB, too big for client-side apply's annotation). The five CRDs Kueue
  converts between v1beta1 and v1beta2 (CONVERTED) get its conversion webhook.
* Webhooks: only those for kueue.x-k8s.io objects and batch/v1 Jobs. The stock set also intercepts
  Pods, Deployments and StatefulSets with ``failurePolicy: Fail``, which would block every Pod
  whenever Kueue is down. The Job webhooks only see Jobs labelled ``kueue.x-k8s.io/queue-name``,
  so plain Jobs never depend on Kueue. ``clientConfig.service`` becomes
  ``url: https://127.0.0.1:<port><path>`` with the local CA as ``caBundle``.
* Config: no leader election; internal cert management off (the webhook serves a certificate
  from the local CA); the visibility server off (it wants certificates under /visibility); only
  the batch/job integration.
* With internal cert management off, Kueue v0.17 reads its metrics certificate from the fixed
  path /etc/kueue/metrics/certs whatever the metrics address; one is placed there when missing
  (that needs root; otherwise the error says what to create).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import localcluster_pki as pki

CONVERTED = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")
PORTS = ("kueue_webhook", "kueue_health", "kueue_metrics")
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
METRICS_CERTS = Path("/etc/kueue/metrics/certs")
NAMESPACE = "kueue-system"


def _yaml_docs(path: Path) -> list[dict]:
    import yaml  # the project venv has it; only `up --kueue` needs it

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the Workload CRD is 1.4 MB
    return [d for d in yaml.load_all(path.read_text(), Loader=loader) if d]


def manager_config(ports: dict, cert_dir: Path) -> dict:
    return {
        "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration",
        "namespace": NAMESPACE,
        "health": {"healthProbeBindAddress": f"127.0.0.1:{ports['kueue_health']}"},
        "metrics": {"bindAddress": f"127.0.0.1:{ports['kueue_metrics']}"},
        "webhook": {"host": "127.0.0.1", "port": ports["kueue_webhook"], "certDir": str(cert_dir)},
        "leaderElection": {"leaderElect": False},
        "internalCertManagement": {"enable": False},
        "featureGates": {"VisibilityOnDemand": False},
        "integrations": {"frameworks": ["batch/job"]},
    }


def crds(source: Path, webhook_url: str, ca_bundle: str) -> list[dict]:
    out = []
    for path in sorted((source / "config" / "components" / "crd" / "bases").glob("*.yaml")):
        for crd in _yaml_docs(path):
            if crd["spec"]["names"]["plural"] in CONVERTED:
                crd["spec"]["conversion"] = {"strategy": "Webhook", "webhook": {
                    "clientConfig": {"url": f"{webhook_url}/convert", "caBundle": ca_bundle},
                    "conversionReviewVersions": ["v1"]}}
            out.append(crd)
    return out


def _kept(hook: dict) -> bool:
    for rule in hook.get("rules") or ():
        if "kueue.x-k8s.io" in rule.get("apiGroups", ()):
            return True
        if "batch" in rule.get("apiGroups", ()) and "jobs" in rule.get("resources", ()):
            return True
    return False


def _is_job_hook(hook: dict) -> bool:
    return any("batch" in r.get("apiGroups", ()) for r in hook.get("rules") or ())


def webhook_configurations(source: Path, webhook_url: str, ca_bundle: str) -> list[dict]:
    out = []
    for config in _yaml_docs(source / "config" / "components" / "webhook" / "manifests.yaml"):
        hooks = [h for h in config.get("webhooks") or () if _kept(h)]
        for hook in hooks:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": f"{webhook_url}{path}", "caBundle": ca_bundle}
            if _is_job_hook(hook):
                hook["objectSelector"] = {"matchExpressions": [{"key": QUEUE_LABEL, "operator": "Exists"}]}
        config["metadata"] = {"name": f"kueue-{config['metadata']['name']}"}
        config["webhooks"] = hooks
        out.append(config)
    return out


def manifests(source: Path, port: int, ca_crt: Path) -> list[dict]:
    """Everything applied before the manager starts: namespace, CRDs, webhook configurations."""
    url, ca = f"https://127.0.0.1:{port}", base64.b64encode(ca_crt.read_bytes()).decode()
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}
    return [namespace, *crds(source, url, ca), *webhook_configurations(source, url, ca)]


def prepare_certs(cert_dir: Path, crt: Path, key: Path) -> None:
    """The webhook certificate in certDir (controller-runtime's tls.crt/tls.key names), and the
    metrics certificate at Kueue's fixed path when nothing is there yet."""
    cert_dir.mkdir(parents=True, exist_ok=True)
    for src, name in ((crt, "tls.crt"), (key, "tls.key")):
        shutil.copyfile(src, cert_dir / name)
        (cert_dir / name).chmod(0o600)
    if (METRICS_CERTS / "tls.crt").is_file() and (METRICS_CERTS / "tls.key").is_file():
        return
    try:
        METRICS_CERTS.mkdir(parents=True, exist_ok=True)
        for src, name in ((crt, "tls.crt"), (key, "tls.key")):
            tmp = METRICS_CERTS / f".{name}.{os.getpid()}"
            shutil.copyfile(src, tmp)
            tmp.chmod(0o600)
            tmp.replace(METRICS_CERTS / name)
    except PermissionError:
        raise SystemExit(
            f"Kueue needs {METRICS_CERTS}/tls.crt and tls.key (a fixed path in Kueue v0.17 when internal "
            f"cert management is off); create them as root, e.g. copy {crt} and {key} there") from None


def write_config(path: Path, ports: dict, cert_dir: Path) -> Path:
    path.write_text(json.dumps(manager_config(ports, cert_dir), indent=2) + "\n")  # JSON is YAML
    return path


APPLY = ("apply", "--server-side", "--force-conflicts", "--field-manager=localcluster", "-f")


def install(local: Path, ports: dict, source: Path, kubectl: Callable[..., None]) -> None:
    """Certificates and config, the CRDs, then webhook configurations pointing at this start's
    port (re-applied on every start: the port may have moved)."""
    crt, key = pki.serving_cert(local / "pki", "kueue-webhook", ["IP:127.0.0.1", "DNS:localhost"])
    prepare_certs(local / "kueue" / "certs", crt, key)
    write_config(local / "kueue" / "config.yaml", ports, local / "kueue" / "certs")
    docs = manifests(source, ports["kueue_webhook"], local / "pki" / "ca.crt")
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    rest = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
    kubectl(*APPLY, "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": crds}))
    kubectl("wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{d['metadata']['name']}" for d in crds])
    kubectl(*APPLY, "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": rest}))


def apply_with_retry(kubectl: Callable[..., None], path: Path, deadline: float, error: type[Exception]) -> None:
    """Apply a file of Kueue objects; Kueue's own webhooks validate them, so retry while they warm up."""
    while True:
        try:
            return kubectl(*APPLY, str(path))
        except error:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)

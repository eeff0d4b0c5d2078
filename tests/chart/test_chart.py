"""The chart rendered by the real helm: lint, schema, least-privilege RBAC, the operator Deployment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_operator import config

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lora-operator"

NAMESPACED = {"watchNamespaces": ["team-a", "team-b"]}
WITH_CREDENTIALS = {"objectStore": {"existingSecret": "operator-s3"}}
DANGEROUS_VERBS = {"*", "escalate", "bind", "impersonate", "deletecollection"}


def grants(rules: list[dict]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples; resourceNames-restricted rules are not used here."""
    return {(g, r, v) for rule in rules for g in rule.get("apiGroups", [])
            for r in rule.get("resources", []) for v in rule.get("verbs", [])}


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = of_kind(docs, kind)
    return doc


def all_grants(docs: list[dict]) -> set[tuple[str, str, str]]:
    return grants([rule for d in docs if d["kind"] in ("ClusterRole", "Role") for rule in d["rules"]])


def container(docs: list[dict]) -> dict:
    (c,) = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


# --- lint and schema ------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [{}, NAMESPACED, WITH_CREDENTIALS,
                                    {"metrics": {"serviceMonitor": {"enabled": True}}}],
                         ids=["cluster-wide", "namespaced", "own-credentials", "service-monitor"])
def test_should_pass_helm_lint_strict(helm, set_args, values):
    helm.run("lint", "--strict", str(CHART), *set_args(values))


@pytest.mark.parametrize("values, complaint", [
    ({"operator": {"replicas": 2}}, "replicas"),
    ({"operator": {"logFormat": "text"}}, "logFormat"),
    ({"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
    ({"policy": {"maxGpusPerJob": -1}}, "maxGpusPerJob"),
    ({"channels": {"root": "s3://platform"}}, "root"),
    ({"imagee": {}}, "imagee"),
], ids=["two replicas", "unknown log format", "invalid namespace", "negative GPU limit", "bucket as channel root",
        "typo key"])
def test_should_reject_invalid_values_through_the_schema(helm, set_args, values, complaint):
    proc = helm.run("template", "rel", str(CHART), *set_args(values), check=False)
    assert proc.returncode != 0 and complaint in proc.stderr, proc.stderr


def test_should_refuse_half_of_the_credentials(helm, set_args):
    values = {"objectStore": {"credentials": {"accessKeyId": "only-this"}}}
    proc = helm.run("template", "rel", str(CHART), *set_args(values), check=False)
    assert proc.returncode != 0 and "accessKeyId and secretAccessKey" in proc.stderr


# --- CRD ------------------------------------------------------------------------------------------

def test_should_ship_the_generated_crd_unchanged():
    shipped = sorted(p.name for p in (CHART / "crds").iterdir())
    generated = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    assert shipped == generated
    for name in generated:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"charts/lora-operator/crds/{name} differs from crds/{name}: run `make crds`")


# --- RBAC -----------------------------------------------------------------------------------------

SECRET_READS = {("", "secrets", "get")}
READ_JOB_SECRETS = {"operator": {"readJobSecrets": True}}


def test_should_grant_cluster_wide_exactly_the_rules_the_operator_declares(render):
    assert all_grants(render(**READ_JOB_SECRETS)) == grants(list(config.RBAC_RULES))


def test_should_read_no_secret_anywhere_by_default(render):
    docs = render()
    assert all_grants(docs) == grants(list(config.RBAC_RULES)) - SECRET_READS
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert env["LORA_READ_JOB_SECRETS"] == "false"


def test_should_create_network_policies_only_when_enabled(render):
    assert ("networking.k8s.io", "networkpolicies", "create") in all_grants(render())
    docs = render(networkPolicy={"enabled": False})
    assert not {g for g in all_grants(docs) if g[1] == "networkpolicies"}
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert config.OperatorConfig.from_env(env).network_policy is False


def test_should_grant_namespaced_rules_only_in_watched_namespaces(render):
    docs = render(**NAMESPACED, **READ_JOB_SECRETS)
    roles = of_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = of_kind(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(b["subjects"] == [{"kind": "ServiceAccount", "name": "rel-lora-operator", "namespace": "ops"}]
               for b in bindings)
    assert grants(one(docs, "ClusterRole")["rules"]) == {
        ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    }, "namespaced mode must not read anything cluster-wide but CRDs"
    expected = grants(list(config.RBAC_RULES)) - {("", "namespaces", "list"), ("", "namespaces", "watch")}
    assert all_grants(docs) == expected


@pytest.mark.parametrize("values", [{**WITH_CREDENTIALS, **READ_JOB_SECRETS}, {"operator": {"readJobSecrets": False}},
                                    {"objectStore": {"credentials": {"accessKeyId": "a", "secretAccessKey": "b"}},
                                     **READ_JOB_SECRETS}],
                         ids=["existing secret", "readJobSecrets false", "chart-made secret"])
def test_should_not_touch_secrets_when_the_operator_has_its_own_credentials_or_may_not(render, values):
    docs = render(**values)
    assert not {g for g in all_grants(docs) if g[1] == "secrets"}
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    assert env["LORA_READ_JOB_SECRETS"] == "false"


@pytest.mark.parametrize("values", [{}, NAMESPACED], ids=["cluster-wide", "namespaced"])
def test_should_never_grant_wildcards_secret_listing_crd_writes_or_pod_creation(render, values):
    docs = render(**values)
    for doc in of_kind(docs, "ClusterRole") + of_kind(docs, "Role"):
        for rule in doc["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule[key], f"{doc['kind']} {doc['metadata']['name']}: {rule}"
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
    granted = all_grants(docs)
    assert {v for _, r, v in granted if r == "secrets"} <= {"get"}
    assert not {v for _, r, v in granted if r == "customresourcedefinitions"} - {"list", "watch"}
    assert not {v for _, r, v in granted if r == "pods"} - {"get", "list", "watch"}
    # jobs' status is the operator's to write, the jobs themselves are not (kopf keeps no state on them)
    assert {v for _, r, v in granted if r == "loratrainingjobs"} == {"get", "list", "watch"}
    assert ("training.lora.dev", "loratrainingjobs/status", "patch") in granted
    assert not {v for _, _, v in granted} & DANGEROUS_VERBS
    assert not {r for g, r, _ in granted if g == "rbac.authorization.k8s.io"}
    for binding in of_kind(docs, "ClusterRoleBinding") + of_kind(docs, "RoleBinding"):
        assert binding["roleRef"]["name"] not in ("cluster-admin", "admin", "edit")


def test_should_name_cluster_objects_after_the_release_namespace(render):
    names = {d["metadata"]["name"] for d in render(namespace="ml-platform")
             if d["kind"] in ("ClusterRole", "ClusterRoleBinding")}
    assert names == {"ml-platform-rel-lora-operator"}


# --- Deployment -----------------------------------------------------------------------------------

def test_should_run_one_recreated_non_root_read_only_operator(render):
    deployment = one(render(), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    (c,) = pod["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/tmp"}
    assert pod["serviceAccountName"] == one(render(), "ServiceAccount")["metadata"]["name"]


def test_should_probe_kopfs_liveness_endpoint(render):
    c = container(render())
    assert "--liveness=http://0.0.0.0:8081/healthz" in c["args"]
    probe = c["livenessProbe"]["httpGet"]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}[probe["port"]]
    assert (probe["path"], port) == ("/healthz", 8081)


@pytest.mark.parametrize("values, scope", [({}, ["--all-namespaces"]),
                                           (NAMESPACED, ["--namespace=team-a", "--namespace=team-b"])],
                         ids=["cluster-wide", "namespaced"])
def test_should_scope_the_operator_like_its_rbac(render, values, scope):
    assert container(render(**values))["args"][1:] == scope


def test_should_set_only_environment_variables_the_operator_reads(render):
    source = (REPO / "operator" / "lora_operator" / "config.py").read_text()
    known = set(re.findall(r'"(LORA_[A-Z0-9_]+)"', source))
    docs = render(**WITH_CREDENTIALS, metrics={"port": 9090})
    env = {e["name"]: e for e in container(docs)["env"]}
    assert set(env) <= known, f"unknown to lora_operator.config: {set(env) - known}"
    assert env["LORA_METRICS_PORT"]["value"] == "9090"
    assert env["LORA_S3_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "operator-s3"


def test_should_map_policy_values_to_the_operator_config(render):
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    docs = render(policy={"allowedBaseModelPrefixes": ["s3://models/", "hf://org/"], "maxGpusPerJob": 4,
                          "maxRunningJobsPerNamespace": 2, "defaultQueue": "gpu",
                          "allowedDatasetPrefixes": ["s3://data/"], "allowedEndpoints": ["https://s3.b.example"],
                          "allowedTolerations": [toleration], "allowedPriorityClasses": ["batch-low"],
                          "allowedNodeSelectorKeys": ["gpu.product"]},
                  trainer={"image": {"repository": "reg/trainer", "tag": "1.2"}, "allowedImages": ["reg/exp/"],
                           "ephemeralStorage": "300Gi"},
                  networkPolicy={"extraEgressPorts": [443]},
                  progressIntervalSeconds=15, operator={"logFormat": "plain", "readJobSecrets": True})
    env = {e["name"]: e["value"] for e in container(docs)["env"] if "value" in e}
    parsed = config.OperatorConfig.from_env(env)
    assert parsed.policy == config.Policy(allowed_base_model_prefixes=("s3://models/", "hf://org/"),
                                          max_gpus_per_job=4, max_running_jobs_per_namespace=2,
                                          allowed_images=("reg/trainer:1.2", "reg/exp/"),
                                          allowed_dataset_prefixes=("s3://data/",),
                                          allowed_endpoints=("https://s3.b.example",),
                                          allowed_tolerations=(toleration,), allowed_priority_classes=("batch-low",),
                                          allowed_node_selector_keys=("gpu.product",))
    assert (parsed.default_ephemeral_storage, parsed.network_policy_egress_ports) == ("300Gi", (443,))
    assert (parsed.default_image, parsed.default_queue) == ("reg/trainer:1.2", "gpu")
    assert (parsed.progress_interval, parsed.log_format, parsed.read_job_secrets) == (15.0, "plain", True)


def test_should_accept_the_chart_defaults_in_the_operator_config(render):
    env = {e["name"]: e["value"] for e in container(render())["env"] if "value" in e}
    parsed = config.OperatorConfig.from_env(env)
    assert parsed.default_image.endswith(":0.1.0") and parsed.policy.allowed_images == (parsed.default_image,)
    assert parsed.policy.allowed_tolerations == () and parsed.network_policy and not parsed.read_job_secrets


def test_should_park_the_operator_with_zero_replicas(render):
    assert one(render(operator={"replicas": 0}), "Deployment")["spec"]["replicas"] == 0


# --- metrics, secret ------------------------------------------------------------------------------

def test_should_expose_metrics_on_a_cluster_ip_service_with_prometheus_annotations(render):
    docs = render(metrics={"port": 9100})
    service = one(docs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9100, "targetPort": "metrics", "protocol": "TCP"}]
    assert service["metadata"]["annotations"]["prometheus.io/port"] == "9100"
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    assert ports["metrics"] == 9100
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert not of_kind(docs, "ServiceMonitor")


def test_should_create_a_service_monitor_only_when_asked(render):
    monitor = one(render(metrics={"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}),
                  "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_should_create_credentials_only_from_explicit_values(render):
    assert not of_kind(render(), "Secret")
    assert not of_kind(render(**WITH_CREDENTIALS), "Secret")
    docs = render(objectStore={"credentials": {"accessKeyId": "AK", "secretAccessKey": "SK"}})
    secret = one(docs, "Secret")
    assert secret["stringData"] == {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"}
    ref = {e["name"]: e for e in container(docs)["env"]}["LORA_S3_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "AWS_SECRET_ACCESS_KEY"}


def test_should_pass_the_channel_root_to_the_operator(render):
    env = {e["name"]: e["value"] for e in container(render(channels={"root": "s3://platform/channels"}))["env"]
           if "value" in e}
    assert env["LORA_CHANNEL_ROOT"] == "s3://platform/channels"
    assert config.OperatorConfig.from_env(env).channel_root == "s3://platform/channels"
    with pytest.raises(ValueError, match="LORA_CHANNEL_ROOT"):
        config.OperatorConfig.from_env({"LORA_CHANNEL_ROOT": "s3://platform"})  # a bucket root is not a prefix

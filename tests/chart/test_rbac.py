"""The chart installed by the real helm into the local control plane, and its RBAC asked through
`kubectl auth can-i --as=<the operator's ServiceAccount>` (SubjectAccessReviews, Node+RBAC authorizer).

The operator Deployment is installed with zero replicas: the local pod runner does not run images,
and these tests are about what the ServiceAccount may do, not about the operator running.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

CHART = Path(__file__).resolve().parents[2] / "charts" / "lora-operator"
RELEASE = "ltj"
FULLNAME = f"{RELEASE}-lora-operator"  # the ServiceAccount and the namespaced RBAC objects
LTJ = "loratrainingjobs.training.lora.dev"
LAC = "loraadapterchannels.training.lora.dev"


class Installed:
    def __init__(self, cluster, helm, namespace: str, values: dict, set_args):
        self.cluster, self.helm, self.namespace = cluster, helm, namespace
        helm.run("install", RELEASE, str(CHART), "--namespace", namespace,
                 *set_args({"operator": {"replicas": 0}, **values}), kubeconfig=cluster.kubeconfig)
        self.sa = f"system:serviceaccount:{namespace}:{FULLNAME}"

    def can(self, verb: str, resource: str, *, namespace: str | None = None, subresource: str = "") -> bool:
        scope = ["--all-namespaces"] if namespace is None else ["-n", namespace]
        extra = [f"--subresource={subresource}"] if subresource else []
        proc = self.cluster.kubectl("auth", "can-i", verb, resource, *scope, *extra, f"--as={self.sa}",
                                    check=False)
        answer = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        assert answer in ("yes", "no"), f"can-i {verb} {resource}: {proc.stdout}{proc.stderr}"
        return answer == "yes"

    def uninstall(self) -> None:
        self.helm.run("uninstall", RELEASE, "--namespace", self.namespace, "--wait",
                      kubeconfig=self.cluster.kubeconfig)


@pytest.fixture
def extra_namespaces(cluster):
    """Two more fresh namespaces: a watched one and one the operator must not see."""
    names = [f"rbac-{role}-{uuid.uuid4().hex[:5]}" for role in ("watched", "other")]
    for name in names:
        cluster.kubectl("create", "namespace", name)
    yield names
    for name in names:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def install(cluster, helm, set_args):
    installed = []

    def _install(namespace: str, **values) -> Installed:
        installed.append(Installed(cluster, helm, namespace, values, set_args))
        return installed[-1]

    yield _install
    for release in installed:
        release.uninstall()


ALWAYS_DENIED = [
    ("delete", "customresourcedefinitions.apiextensions.k8s.io"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("list", "secrets"),
    ("watch", "secrets"),
    ("delete", "nodes"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"),
    ("bind", "clusterroles.rbac.authorization.k8s.io"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("impersonate", "serviceaccounts"),
    ("*", "*"),
]


def test_should_let_the_cluster_wide_operator_do_its_work_and_nothing_more(cluster, helm, namespace,
                                                                           extra_namespaces, install):
    release = install(namespace)
    anywhere = extra_namespaces[1]
    allowed = [
        ("create", "jobs.batch", anywhere, ""), ("patch", "jobs.batch", anywhere, ""),
        ("watch", "jobs.batch", None, ""),
        ("patch", LTJ, anywhere, "status"), ("watch", LTJ, None, ""),
        ("update", LTJ, anywhere, "finalizers"),
        ("create", "events", anywhere, ""), ("list", "pods", anywhere, ""),
        ("list", "resourcequotas", anywhere, ""), ("create", "configmaps", anywhere, ""),
        ("create", "networkpolicies.networking.k8s.io", anywhere, ""),
        ("watch", "namespaces", None, ""), ("watch", "customresourcedefinitions.apiextensions.k8s.io", None, ""),
        ("watch", LAC, None, ""), ("patch", LAC, anywhere, "status"), ("update", "configmaps", anywhere, ""),
    ]
    denied = [
        ("create", "pods", anywhere, ""), ("delete", "jobs.batch", anywhere, ""),
        ("delete", LTJ, anywhere, ""), ("update", LTJ, anywhere, "status"),
        ("patch", LTJ, anywhere, ""),  # only the status is the operator's to write
        ("get", "secrets", anywhere, ""), ("get", "secrets", "kube-system", ""), ("get", "secrets", namespace, ""),
        ("delete", "networkpolicies.networking.k8s.io", anywhere, ""),
        ("list", "secrets", anywhere, ""),
        ("list", "secrets", anywhere, ""), ("delete", LAC, anywhere, ""), ("create", LAC, anywhere, ""),
        ("delete", "configmaps", anywhere, ""),
        *[(verb, resource, None, "") for verb, resource in ALWAYS_DENIED],
    ]
    _expect(release, allowed, denied)


def test_should_read_job_secrets_cluster_wide_only_when_the_platform_opts_in(cluster, helm, namespace,
                                                                            extra_namespaces, install):
    release = install(namespace, operator={"replicas": 0, "readJobSecrets": True})
    _expect(release, [("get", "secrets", extra_namespaces[1], "")],
            [("list", "secrets", extra_namespaces[1], ""), ("watch", "secrets", None, "")])


def test_should_confine_the_namespaced_operator_to_its_watched_namespaces(cluster, helm, namespace,
                                                                          extra_namespaces, install):
    watched, other = extra_namespaces
    release = install(namespace, watchNamespaces=[watched], operator={"replicas": 0, "readJobSecrets": True})
    allowed = [
        ("create", "jobs.batch", watched, ""), ("patch", LTJ, watched, "status"),
        ("create", "events", watched, ""), ("list", "pods", watched, ""), ("list", "resourcequotas", watched, ""),
        ("get", "secrets", watched, ""), ("watch", "customresourcedefinitions.apiextensions.k8s.io", None, ""),
        ("create", "networkpolicies.networking.k8s.io", watched, ""),
        ("patch", LAC, watched, "status"), ("update", "configmaps", watched, ""),
    ]
    denied = [
        ("create", "jobs.batch", other, ""), ("get", "secrets", other, ""), ("list", "pods", other, ""),
        ("get", "secrets", "kube-system", ""), ("create", "networkpolicies.networking.k8s.io", other, ""),
        ("create", "jobs.batch", namespace, ""), ("get", "secrets", namespace, ""),
        ("watch", "jobs.batch", None, ""), ("list", "namespaces", None, ""), ("create", "pods", watched, ""),
        ("list", "secrets", watched, ""), ("update", "configmaps", other, ""), ("patch", LAC, other, "status"),
        ("patch", LTJ, watched, ""),
        *[(verb, resource, None, "") for verb, resource in ALWAYS_DENIED],
    ]
    _expect(release, allowed, denied)


def test_should_leave_no_rbac_behind_after_uninstall_but_keep_the_crd(cluster, helm, namespace, set_args):
    release = Installed(cluster, helm, namespace, {}, set_args)
    assert cluster.kubectl("get", "deployment", "-n", namespace, "-o", "name").stdout.strip()
    name = f"{namespace}-{FULLNAME}"
    cluster.kubectl("get", "clusterrole", name)
    release.uninstall()
    assert cluster.kubectl("get", "clusterrole", name, check=False).returncode != 0
    assert not release.can("create", "jobs.batch", namespace=namespace)
    cluster.kubectl("get", "crd", "loratrainingjobs.training.lora.dev")


def _expect(release: Installed, allowed: list, denied: list) -> None:
    wrong = [f"should allow {v} {r}{'/' + s if s else ''} in {ns or 'all namespaces'}"
             for v, r, ns, s in allowed if not release.can(v, r, namespace=ns, subresource=s)]
    wrong += [f"should deny {v} {r}{'/' + s if s else ''} in {ns or 'all namespaces'}"
              for v, r, ns, s in denied if release.can(v, r, namespace=ns, subresource=s)]
    assert not wrong, "\n".join(wrong)

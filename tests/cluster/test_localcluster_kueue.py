"""What `localcluster.py up --kueue` installs: Kueue v0.17's own manifests, trimmed and pointed at loopback.

Reads the module source from the Go module cache (downloaded once from the Go proxy, as the build does).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack"))
import build_binaries  # noqa: E402
import localcluster_kueue as kueue  # noqa: E402

pytestmark = pytest.mark.skipif(not shutil.which(build_binaries.GO) and not Path(build_binaries.GO).exists(),
                                reason="needs Go for the Kueue module source")


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    ca = tmp_path_factory.mktemp("pki") / "ca.crt"
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\nfake\n-----END CERTIFICATE-----\n")
    return kueue.manifests(build_binaries.kueue_source(), 23456, ca)


def test_webhooks_are_only_kueues_own_and_jobs_with_a_queue_label_on_loopback(docs):
    hooks = [h for d in docs if d["kind"].endswith("WebhookConfiguration") for h in d["webhooks"]]
    assert {h["name"] for h in hooks} >= {"mjob.kb.io", "vjob.kb.io", "mworkload.kb.io", "vworkload.kb.io"}
    for hook in hooks:
        groups = {g for rule in hook["rules"] for g in rule["apiGroups"]}
        assert groups in ({"kueue.x-k8s.io"}, {"batch"}), (hook["name"], groups)  # no pods, deployments, ...
        assert hook["clientConfig"]["url"].startswith("https://127.0.0.1:23456/") and hook["clientConfig"]["caBundle"]
        if groups == {"batch"}:
            assert hook["objectSelector"] == {"matchExpressions": [{"key": "kueue.x-k8s.io/queue-name",
                                                                    "operator": "Exists"}]}


def test_the_crds_kueue_converts_call_its_conversion_webhook(docs):
    crds = {d["spec"]["names"]["plural"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    assert "workloads" in crds and "workloadpriorityclasses" in crds
    for plural in kueue.CONVERTED:
        hook = crds[plural]["spec"]["conversion"]["webhook"]["clientConfig"]
        assert hook["url"] == "https://127.0.0.1:23456/convert", plural
    assert "conversion" not in crds["resourceflavors"]["spec"]


def test_the_manager_config_keeps_everything_on_loopback_without_leader_election(tmp_path):
    config = kueue.manager_config({"kueue_webhook": 1, "kueue_health": 2, "kueue_metrics": 3}, tmp_path)
    assert config["health"]["healthProbeBindAddress"] == "127.0.0.1:2"
    assert config["metrics"]["bindAddress"] == "127.0.0.1:3"
    assert config["webhook"] == {"host": "127.0.0.1", "port": 1, "certDir": str(tmp_path)}
    assert config["leaderElection"] == {"leaderElect": False}
    assert config["integrations"]["frameworks"] == ["batch/job"]

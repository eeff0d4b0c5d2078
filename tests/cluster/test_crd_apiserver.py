"""The generated CRD on a real kube-apiserver: install, apply, printer columns, refusals."""

from pathlib import Path

import pytest
import yaml
from overrides import with_overrides

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "minimal" / "job.yaml").read_text())


@pytest.fixture(scope="module")
def crd(cluster):
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    "crd/loratrainingjobs.training.lora.dev")


def _apply(cluster, namespace, manifest, check=False):
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=check)


def _with(path, value, name):
    return {**EXAMPLE, "metadata": {"name": name}, "spec": with_overrides(EXAMPLE["spec"], **{path: value})}


def test_should_accept_the_example_and_show_printer_columns(cluster, namespace, crd):
    _apply(cluster, namespace, EXAMPLE, check=True)
    header = cluster.kubectl("get", "ltj", "-n", namespace).stdout.splitlines()[0].split()
    assert header == ["NAME", "PHASE", "PROGRESS", "EVAL", "ADMISSION", "AGE"]  # Admission: Kueue's words
    wide = cluster.kubectl("get", "ltj", "-n", namespace, "-o", "wide").stdout.splitlines()[0].split()
    assert {"LOSS", "WORKERS"} <= set(wide)
    stored = yaml.safe_load(cluster.kubectl("get", "ltj", "minimal", "-n", namespace, "-o", "yaml").stdout)
    assert stored["spec"]["lora"]["rank"] == 16, "the API server should apply the schema defaults"
    assert stored["spec"]["quantization"] == "nf4"


INVALID = [
    ("unknown URI scheme", "baseModel.uri", "ftp://models/x", "spec.baseModel.uri"),
    ("missing revision", "baseModel.revision", None, "spec.baseModel.revision"),
    ("evalFraction out of range", "dataset.evalFraction", 0.9, "spec.dataset.evalFraction"),
    ("alpha not positive", "lora.alpha", 0, "spec.lora.alpha"),
    ("all-linear mixed", "lora.targetModules", ["all-linear", "q_proj"], "spec.lora.targetModules"),
    ("zero nodes", "resources.nodes", 0, "spec.resources.nodes"),
    ("bad quantization", "quantization", "fp4", "spec.quantization"),
    ("regex check without pattern", "evaluation.gate.checks", [{"name": "tone", "type": "mustMatch"}],
     "spec.evaluation.gate.checks[0].pattern"),
    ("unknown field", "lora.rnak", 4, "rnak"),
]


@pytest.mark.parametrize("case, path, value, field", INVALID, ids=[c[0] for c in INVALID])
def test_should_refuse_invalid_manifests_naming_the_field(cluster, namespace, crd, case, path, value, field):
    result = _apply(cluster, namespace, _with(path, value, "bad"))
    assert result.returncode != 0, f"{case} was accepted"
    assert field in result.stderr, result.stderr


def test_should_refuse_changes_to_the_training_spec_but_allow_suspend(cluster, namespace, crd):
    _apply(cluster, namespace, EXAMPLE, check=True)
    changed = _apply(cluster, namespace, _with("lora.rank", 8, "minimal"))
    assert changed.returncode != 0 and "lora: is immutable" in changed.stderr, changed.stderr
    _apply(cluster, namespace, _with("suspend", True, "minimal"), check=True)
    stored = yaml.safe_load(cluster.kubectl("get", "ltj", "minimal", "-n", namespace, "-o", "yaml").stdout)
    assert stored["spec"]["suspend"] is True

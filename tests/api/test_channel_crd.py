"""The checked-in LoRAAdapterChannel CRD is generated from the models; the spec is mutable."""

from pathlib import Path

import pytest
import yaml

from lora_operator.api import SpecError, crd
from lora_operator.api.channel import parse_channel_spec

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "training.lora.dev_loraadapterchannels.yaml"


def test_checked_in_channel_crd_is_fresh():
    assert CRD_FILE.read_text() == crd.render("channels"), "crds/ is stale: run `make crds`"


def test_should_show_the_wanted_and_the_live_job_in_kubectl_get():
    version = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"][0]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Wants"] == ".spec.jobName" and columns["Live"] == ".status.live.jobName"
    assert columns["Replaced"] == ".status.previous.jobName"
    assert version["subresources"] == {"status": {}}


def test_should_let_every_spec_field_change_so_rollback_is_an_edit():
    spec = crd.build_channel_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert not [r for r in spec.get("x-kubernetes-validations", []) if "oldSelf" in r["rule"]]


@pytest.mark.parametrize("raw, field", [
    ({"baseModel": {"uri": "s3://models/b", "revision": "r"}}, "spec.jobName"),
    ({"jobName": "Bad_Name", "baseModel": {"uri": "s3://models/b", "revision": "r"}}, "spec.jobName"),
    ({"jobName": "v1", "baseModel": {"uri": "s3://models/b", "revision": "r"}, "historyLimit": 0}, "spec.historyLimit"),
    ({"jobName": "v1", "baseModel": {"uri": "s3://models/b", "revision": "r"}, "vllm": {}}, "spec.vllm.configMapName"),
])
def test_should_name_the_bad_field(raw, field):
    with pytest.raises(SpecError) as err:
        parse_channel_spec(raw)
    assert err.value.field == field

"""The checked-in CRD is generated from the models and is a structural schema."""

from pathlib import Path

import yaml

from lora_operator.api import crd
from lora_operator.api.spec import MUTABLE_SPEC_FIELDS

CRD_FILE = Path(__file__).resolve().parents[2] / "crds" / "training.lora.dev_loratrainingjobs.yaml"


def test_checked_in_crd_is_fresh():
    assert CRD_FILE.read_text() == crd.render(), "crds/ is stale: run `make crds`"


def _walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for key, value in node.get("properties", {}).items():
            yield from _walk(value, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            yield from _walk(node["items"], f"{path}[]")


def _schema():
    return crd.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_schema_is_structural():
    for path, node in _walk(_schema()):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "$defs"} & set(node), path
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not ("properties" in node and "additionalProperties" in node), path


def test_status_keeps_unknown_fields_for_kopf_bookkeeping():
    assert _schema()["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True


def test_every_spec_field_except_suspend_is_immutable():
    spec = _schema()["properties"]["spec"]
    guarded = {rule["fieldPath"].lstrip(".") for rule in spec["x-kubernetes-validations"] if "oldSelf" in rule["rule"]}
    assert guarded == set(spec["properties"]) - MUTABLE_SPEC_FIELDS


def test_cross_field_rules_are_emitted_as_cel():
    lora = _schema()["properties"]["spec"]["properties"]["lora"]
    assert any("all-linear" in rule["rule"] for rule in lora["x-kubernetes-validations"])


def test_crd_declares_short_name_status_subresource_and_printer_columns():
    doc = yaml.safe_load(CRD_FILE.read_text())
    version = doc["spec"]["versions"][0]
    assert doc["spec"]["names"]["shortNames"] == ["ltj"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Phase", "Progress", "Loss", "Eval", "Workers",
                                                                         "Admission", "Age"]


def test_spec_reference_doc_is_fresh():
    from lora_operator.api import reference

    doc = CRD_FILE.parents[1] / "docs" / "spec-reference.md"
    assert doc.read_text() == reference.render(), "docs/spec-reference.md is stale: run `make crds`"

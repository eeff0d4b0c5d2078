"""Generate the CustomResourceDefinition from the pydantic models.

`python -m lora_operator.api.crd > crds/training.lora.dev_loratrainingjobs.yaml` and
`python -m lora_operator.api.crd channels > crds/training.lora.dev_loraadapterchannels.yaml` (`make crds`).
pydantic's JSON Schema is turned into a Kubernetes *structural* schema: `$ref`s inlined, optional
fields as plain properties (no `anyOf` with null), OpenAPI v3.0 bounds (`exclusiveMinimum: true`),
defaults kept so the API server fills them, and each model's `Rule`s emitted as CEL.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from . import channel as ch
from . import resource as r
from .base import ApiModel
from .spec import MUTABLE_SPEC_FIELDS, LoRATrainingJobSpec
from .status import LoRATrainingJobStatus

_DROP = {"title", "$defs", "discriminator"}
# `additionalProperties: false` is not structural next to `properties`; unknown fields are
# refused by kubectl's strict field validation and pruned by the API server instead.


def _models_by_name(model: type[ApiModel], seen: dict[str, type[ApiModel]]) -> dict[str, type[ApiModel]]:
    seen[model.__name__] = model
    for field in model.model_fields.values():
        for arg in _walk_types(field.annotation):
            if isinstance(arg, type) and issubclass(arg, ApiModel) and arg.__name__ not in seen:
                _models_by_name(arg, seen)
    return seen


def _walk_types(tp: Any):
    yield tp
    for arg in getattr(tp, "__args__", ()) or ():
        yield from _walk_types(arg)


def _structural(node: Any, defs: dict[str, Any], models: dict[str, type[ApiModel]]) -> Any:
    if isinstance(node, list):
        return [_structural(n, defs, models) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        merged = {**defs[name], **{k: v for k, v in node.items() if k != "$ref"}}
        out = _structural(merged, defs, models)
        rules = models[name].rules if name in models else ()
        if rules:
            out["x-kubernetes-validations"] = [
                {"rule": rule.cel, "message": f"{rule.field}: {rule.message}", "fieldPath": f".{rule.field}"}
                for rule in rules
            ]
        return out
    if "anyOf" in node:  # Optional[X] -> X
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) != 1:
            raise ValueError(f"unions are not structural: {node}")
        if rest.get("default", 0) is None:
            rest.pop("default")
        return _structural({**options[0], **rest}, defs, models)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "additionalProperties" and value is True:
            out["x-kubernetes-preserve-unknown-fields"] = True
        elif key == "additionalProperties" and value is False:
            continue
        elif key == "properties":
            out[key] = {k: _structural(v, defs, models) for k, v in value.items()}
        else:
            out[key] = _structural(value, defs, models)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if "const" in out:
        out["enum"] = [out.pop("const")]
    return out


def _filled_default(schema: dict[str, Any]) -> dict[str, Any]:
    """The object an empty `{}` becomes after defaulting, so CEL rules see every defaulted key.

    The API server validates a `default` against the schema's CEL rules as written, without
    defaulting inside it first, so `default: {}` would fail rules such as `self.nodes == 1 || ...`.
    """
    out: dict[str, Any] = {}
    for name, prop in schema.get("properties", {}).items():
        if "default" in prop:
            out[name] = prop["default"]
    return out


def _defaults_for_objects(schema: dict[str, Any]) -> None:
    """Give optional all-default object properties a default so the API server fills them in."""
    for name, prop in schema.get("properties", {}).items():
        if prop.get("type") == "object" and "properties" in prop:
            _defaults_for_objects(prop)
            if name not in schema.get("required", []) and "default" not in prop and not prop.get("required"):
                prop["default"] = _filled_default(prop)
        elif prop.get("type") == "array" and isinstance(prop.get("items"), dict):
            _defaults_for_objects(prop["items"])


def model_schema(model: type[ApiModel], fill_defaults: bool = True) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation", ref_template="#/$defs/{model}")
    defs = raw.get("$defs", {})
    models = _models_by_name(model, {})
    defs[model.__name__] = {k: v for k, v in raw.items() if k != "$defs"}
    schema = _structural({"$ref": f"#/$defs/{model.__name__}"}, defs, models)
    if fill_defaults:
        _defaults_for_objects(schema)
    return schema


def _immutability_rules(spec_schema: dict[str, Any]) -> list[dict[str, str]]:
    rules = []
    required = set(spec_schema.get("required", []))
    for name in spec_schema["properties"]:
        if name in MUTABLE_SPEC_FIELDS:
            continue
        if name in required:
            cel = f"self.{name} == oldSelf.{name}"
        else:
            cel = f"has(self.{name}) == has(oldSelf.{name}) && (!has(self.{name}) || self.{name} == oldSelf.{name})"
        rules.append({
            "rule": cel,
            "message": f"{name}: is immutable; only spec.suspend may change after creation",
            "fieldPath": f".{name}",
        })
    return rules


def build_crd() -> dict[str, Any]:
    spec = model_schema(LoRATrainingJobSpec)
    spec.setdefault("x-kubernetes-validations", []).extend(_immutability_rules(spec))
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "priority": 1},
        {"name": "Eval", "type": "string", "jsonPath": ".status.evaluation.verdict"},
        {"name": "Workers", "type": "string", "jsonPath": ".status.workers.summary", "priority": 1},
        # why a job waits (Kueue's own reason, a ResourceQuota, ...) or which Job runs it
        {"name": "Admission", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Admitted")].message'},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    names = {"kind": r.KIND, "plural": r.PLURAL, "singular": r.SINGULAR, "shortNames": list(r.SHORT_NAMES),
             "categories": ["lora", "training"]}
    # no fieldPath: metadata is not in the schema
    name_rule = {"rule": r.NAME_RULE_CEL, "message": r.NAME_RULE_MESSAGE}
    return _crd(names, spec, LoRATrainingJobSpec, LoRATrainingJobStatus, columns,
                "A LoRA/QLoRA fine-tuning run: train, evaluate, gate, publish.", top_rules=[name_rule])


def build_channel_crd() -> dict[str, Any]:
    """Every spec field of a channel may change: changing jobName is how one promotes and rolls back."""
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Wants", "type": "string", "jsonPath": ".spec.jobName"},
        {"name": "Live", "type": "string", "jsonPath": ".status.live.jobName"},
        {"name": "Run", "type": "string", "jsonPath": ".status.live.runId", "priority": 1},
        {"name": "Replaced", "type": "string", "jsonPath": ".status.previous.jobName"},
        {"name": "Promoted", "type": "date", "jsonPath": ".status.live.promotedAt"},
    ]
    names = {"kind": ch.CHANNEL_KIND, "plural": ch.CHANNEL_PLURAL, "singular": ch.CHANNEL_SINGULAR,
             "shortNames": list(ch.CHANNEL_SHORT_NAMES), "categories": ["lora"]}
    return _crd(names, model_schema(ch.LoRAAdapterChannelSpec), ch.LoRAAdapterChannelSpec,
                ch.LoRAAdapterChannelStatus, columns,
                "A serving channel: which LoRATrainingJob's adapter is live, and what it replaced.")


def _crd(names: dict[str, Any], spec: dict[str, Any], spec_model: type[ApiModel], status_model: type[ApiModel],
         columns: list[dict[str, Any]], description: str, top_rules: list[dict[str, str]] = ()) -> dict[str, Any]:
    """The CRD of one kind; `top_rules`: CEL rules on the whole object (they may read metadata)."""
    spec["description"] = spec_model.__doc__
    status = model_schema(status_model, fill_defaults=False)  # only the operator writes it
    status["x-kubernetes-preserve-unknown-fields"] = True
    status["description"] = status_model.__doc__
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{names['plural']}.{r.GROUP}"},
        "spec": {
            "group": r.GROUP,
            "scope": "Namespaced",
            "names": {"kind": names["kind"], "listKind": f"{names['kind']}List", "plural": names["plural"],
                      "singular": names["singular"], "shortNames": names["shortNames"],
                      "categories": names["categories"]},
            "versions": [{
                "name": r.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": description,
                    "required": ["spec"],
                    **({"x-kubernetes-validations": list(top_rules)} if top_rules else {}),
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec,
                        "status": status,
                    },
                }},
            }],
        },
    }


def render(which: str = "jobs") -> str:
    """`jobs` (default): the LoRATrainingJob CRD; `channels`: the LoRAAdapterChannel CRD."""
    header = "# Generated by `make crds` from operator/lora_operator/api. Do not edit.\n"
    crd = {"jobs": build_crd, "channels": build_channel_crd}[which]()
    return header + yaml.dump(crd, Dumper=_NoAliases, sort_keys=False, width=100)


class _NoAliases(yaml.SafeDumper):
    """Repeated defaults are written out in full: anchors in a CRD confuse readers and tools."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


if __name__ == "__main__":
    sys.stdout.write(render(*sys.argv[1:2]))

"""The whole `LoRATrainingJob` object and the one way to parse a spec from a dict."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from .base import SpecError
from .spec import LoRATrainingJobSpec

GROUP = "training.lora.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LoRATrainingJob"
PLURAL = "loratrainingjobs"
SINGULAR = "loratrainingjob"
SHORT_NAMES = ("ltj",)

# A multi-node job's pods find each other through a headless Service named after the job, and a
# Service name must be a DNS-1035 label (a letter first, no dots). The API server checks this
# with the same rule (NAME_RULE_CEL, emitted into the CRD), so the operator never meets it.
DNS_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_RULE_CEL = f"!has(self.spec.resources) || self.spec.resources.nodes == 1 || self.metadata.name.matches('{DNS_1035}')"
NAME_RULE_MESSAGE = ("metadata.name: a job with resources.nodes > 1 needs a name that starts with a letter and "
                     "has only lower-case letters, digits and '-' (its pods' Service is named after it)")


def _error_path(err: Mapping[str, Any], root: str) -> tuple[str, str]:
    parts = [root] if root else []
    for item in err["loc"]:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]"] if parts else [f"[{item}]"]
        else:
            parts.append(str(item))
    msg = str(err["msg"])
    # Cross-field rules say "<field>: <message>" (see base.ApiModel._check_rules).
    if err["type"] == "value_error" and ": " in msg:
        msg = msg.removeprefix("Value error, ")
        field, _, msg = msg.partition(": ")
        parts.append(field)
    return ".".join(parts), msg


def parse_spec(spec: Mapping[str, Any] | None, root: str = "spec") -> LoRATrainingJobSpec:
    """Validate a spec dict; on failure raise SpecError naming every bad field (first one in .field)."""
    try:
        return LoRATrainingJobSpec.model_validate(dict(spec or {}))
    except ValidationError as exc:
        errors = [_error_path(e, root) for e in exc.errors(include_url=False)]
        first_field = errors[0][0]
        text = "; ".join(f"{path}: {msg}" for path, msg in errors)
        raise SpecError(first_field, text.removeprefix(f"{first_field}: ")) from None


def check_name(name: str, spec: LoRATrainingJobSpec) -> None:
    """Raise SpecError when the children of a job of this name could not be created."""
    if spec.resources.nodes > 1 and not re.match(DNS_1035, name):
        raise SpecError("metadata.name", NAME_RULE_MESSAGE.removeprefix("metadata.name: "))


def parse_manifest(obj: Mapping[str, Any]) -> LoRATrainingJobSpec:
    """Parse a whole LoRATrainingJob manifest (as `kubectl apply` would send it)."""
    if obj.get("kind") != KIND or obj.get("apiVersion") != API_VERSION:
        raise SpecError("kind", f"expected apiVersion {API_VERSION} and kind {KIND}")
    return parse_spec(obj.get("spec"))

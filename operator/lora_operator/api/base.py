"""Base model and cross-field rules shared by every API type.

Invariant: a cross-field rule is written once, as a `Rule`, and enforced twice: by the API server
(emitted as a CEL `x-kubernetes-validations` entry into the generated CRD) and by pydantic when the
operator or the trainer parses a spec. Both must name the same field, so a user sees the same message
whether the rule fired at `kubectl apply` time or inside the operator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Rule:
    """A cross-field rule on one model: CEL for the API server, a predicate for Python."""

    cel: str
    check: Callable[[Any], bool]
    message: str
    field: str  # camelCase name of the field the message is about, relative to the model


class SpecError(ValueError):
    """A spec the models refuse; `field` is the dotted camelCase path of the culprit."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self):
        for rule in type(self).rules:
            if not rule.check(self):
                # pydantic prefixes the location of this model; the rule adds its own field.
                raise ValueError(f"{rule.field}: {rule.message}")
        return self

    def to_wire(self) -> dict[str, Any]:
        """The camelCase dict a Kubernetes object carries (defaults included, None dropped)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

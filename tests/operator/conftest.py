"""Small fixture factories for the operator tests (no big YAML fixtures)."""

from __future__ import annotations

from typing import Any

import pytest
from overrides import with_overrides

from lora_operator.api import parse_spec
from lora_operator.builders import Owner

BASE_SPEC: dict[str, Any] = {
    "baseModel": {"uri": "s3://models/tiny-base", "revision": "sha256:" + "0" * 64},
    "dataset": {"train": "s3://datasets/support/train.jsonl"},
    "output": {"uri": "s3://artifacts/demo"},
    "storage": {"secretName": "s3-credentials"},
}


def spec_dict(**overrides: Any) -> dict[str, Any]:
    """BASE_SPEC with dotted-path overrides: spec_dict(**{"resources.gpus": 0})."""
    return with_overrides(BASE_SPEC, **overrides)


@pytest.fixture
def make_spec_dict():
    return spec_dict


@pytest.fixture
def make_spec():
    return lambda **overrides: parse_spec(spec_dict(**overrides))


@pytest.fixture
def owner():
    return Owner(name="demo", namespace="team-a", uid="11111111-2222-3333-4444-555555555555",
                 labels={"team": "support"},
                 annotations={"kubectl.kubernetes.io/last-applied-configuration": "{...}", "note": "kept"})

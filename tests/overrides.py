"""Dotted-path overrides for small spec dicts, shared by the test factories."""

from __future__ import annotations

import copy
from typing import Any


def with_overrides(spec: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A deep copy of `spec` with {"lora.rank": 8}-style overrides; a value of None removes the key."""
    out = copy.deepcopy(spec)
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return out

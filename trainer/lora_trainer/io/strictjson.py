"""Strict JSON for everything the trainer writes (progress.json, eval.json, lora-metadata.json).

`loads` is the strict reader for documents read back from storage (manifests, the metadata pointer).

Python's `json.dumps` writes NaN and Infinity as bare tokens, which are not JSON: the apiserver and
most readers refuse the whole document. A number that is not finite is unknown, so it is written as
null; `allow_nan=False` then guarantees the output parses everywhere.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """`value` with every non-finite float (also inside dicts, lists, tuples) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, **kw) -> str:
    return json.dumps(finite(value), allow_nan=False, **kw)


def dump_bytes(value: Any, **kw) -> bytes:
    return dumps(value, **kw).encode()


def _refuse_constant(name: str):
    raise ValueError(f"non-finite number {name} is not JSON")


def loads(raw: bytes | str) -> Any:
    """Parse strict JSON: NaN/Infinity tokens (and undecodable bytes) raise ValueError."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise ValueError(str(exc)) from None

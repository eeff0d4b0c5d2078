"""User patterns on model output, bounded: regex checks never hang, JSON Schemas never fetch.

Tenants write `mustMatch`/`mustNotMatch` patterns and the model writes the text, so neither is
trusted. Python's `re` backtracks: `^(\\w+\\s?)+$` takes seconds on 73 characters and 4x more per
word. So:

- A pattern RE2 can compile (no backreferences or lookaround) runs on RE2 (google-re2): matching
  time is linear in the text, there is nothing to time out.
- Any other pattern runs on the `regex` engine with a per-text time limit. A search that runs out
  of time is neither a match nor a non-match: `search` returns None and the caller counts that
  output as failing the check and reports it. (The `regex` engine checks its clock coarsely; the
  measured overshoot is several times the limit, still bounded.)

JSON Schemas may only use local `$ref`s (`#/...`): a remote one is refused when the check is
compiled, and the validator's registry refuses to retrieve anything at validation time too.

No torch here (imported by the gate's table tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

PATTERN_TIMEOUT_S = 0.1  # per output; see the module docstring for the engine's overshoot


class PatternError(ValueError):
    """A pattern or schema that can never be evaluated safely."""


class BoundedPattern:
    """`search(text)` -> True / False, or None when the time limit ran out."""

    def __init__(self, pattern: str, timeout_s: float = PATTERN_TIMEOUT_S):
        self.pattern, self.timeout_s = pattern, timeout_s
        self.engine, self._compiled = _compile(pattern)

    def search(self, text: str) -> Optional[bool]:
        if self.engine == "re2":
            return self._compiled.search(text) is not None
        try:
            return self._compiled.search(text, timeout=self.timeout_s) is not None
        except TimeoutError:
            return None


def _compile(pattern: str) -> tuple[str, Any]:
    import re2

    options = re2.Options()
    options.log_errors = False  # an RE2-incompatible pattern is expected, not an error
    try:
        return "re2", re2.compile(pattern, options)
    except re2.error:
        pass
    import regex

    try:
        return "regex", regex.compile(pattern, flags=regex.VERSION0)
    except regex.error as exc:
        raise PatternError(f"invalid pattern: {exc}") from None


# --- JSON Schema ----------------------------------------------------------------------------------


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("$ref", "$dynamicRef", "$recursiveRef") and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _refuse_retrieval(uri: str):
    from referencing.exceptions import NoSuchResource

    raise NoSuchResource(ref=uri)


def offline_validator(schema: dict):
    """A jsonschema validator for `schema` that can never reach the network (PatternError if the
    schema is invalid or refers to anything outside itself)."""
    import jsonschema
    from referencing import Registry

    remote = sorted({ref for ref in _refs(schema) if not ref.startswith("#")})
    if remote:
        raise PatternError(f"remote $ref not allowed (nothing is fetched): {', '.join(remote)[:200]}")
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise PatternError(f"invalid JSON Schema: {exc.message}") from None
    return cls(schema, registry=Registry(retrieve=_refuse_retrieval))


def schema_valid(validator, value: Any) -> bool:
    """Validate; a reference that cannot be resolved offline is a failed output, never a fetch."""
    from referencing.exceptions import Unresolvable

    try:
        return validator.is_valid(value)
    except Unresolvable:
        return False

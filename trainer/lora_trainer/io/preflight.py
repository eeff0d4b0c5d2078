"""Checks that run before any GPU time or base-model download is spent.

- The output location is writable: a small object is written under `<output>/.preflight/` and
  deleted again (a missing bucket, wrong credentials or a read-only claim fail here, not after the
  first checkpoint).
- Every input is readable: dataset files exist, the base model prefix is not empty.
- The output prefix is this job's (identity.py, by namespace/name; the fingerprint is compared at
  resume, once the dataset hashes are known).

Each failure raises `PreflightError` with the URI and the store's own error. The CLI exits 2: the
same spec against the same storage fails the same way, so the operator fails the job at once.
Storage calls go through the retrying store, so a brief outage is retried before that verdict.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlparse

from . import storage


class PreflightError(RuntimeError):
    """The job cannot run against this storage; retrying cannot help."""


def _reason(exc: Exception) -> str:
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}"


def check_output_writable(store, key: str, uri: str) -> None:
    probe = storage.join(key, ".preflight", f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        store.put_bytes(probe, b"")
        store.delete_prefix(probe)
    except Exception as exc:
        raise PreflightError(f"output {uri} is not writable: {_reason(exc)}") from None


def check_input_readable(uri: str, *, prefix: bool = False, **store_kw) -> None:
    """`uri` names an existing object (or, with prefix=True, a non-empty prefix)."""
    if urlparse(uri).scheme == "hf":
        return  # fetched from the hub by revision; RevisionError names the problem there
    try:
        store, key = storage.open_uri(uri, **store_kw)
        found = bool(store.list(key)) if prefix else store.exists(key)
    except Exception as exc:
        raise PreflightError(f"input {uri} is not readable: {_reason(exc)}") from None
    if not found:
        raise PreflightError(f"input {uri} is not readable: nothing there")


def check_job(spec, out_store, out_key: str, **store_kw) -> None:
    """Output writable and inputs readable (see the module docstring)."""
    check_output_writable(out_store, out_key, spec.output.uri)
    check_input_readable(spec.base_model.uri, prefix=True, **store_kw)
    for uri in (spec.dataset.train, spec.dataset.eval):
        if uri:
            check_input_readable(uri, **store_kw)
    if spec.evaluation.regression_dataset is not None:
        check_input_readable(spec.evaluation.regression_dataset.uri, **store_kw)

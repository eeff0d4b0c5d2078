"""Thin kopf handlers: each one only names the object to reconcile (see reconcile.py)."""

from __future__ import annotations

import copy
import logging
import os

import kopf

from ..api import GROUP, PLURAL, VERSION
from ..api.channel import CHANNEL_PLURAL
from ..config import OperatorConfig
from .runtime import Runtime

PROGRESS_PREFIX = "kopf.lora.dev"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_) -> None:
    """The one place where env (Helm values) becomes operator and kopf settings."""
    config = OperatorConfig.from_env(os.environ)
    settings.watching.server_timeout = int(config.watch_timeout)
    settings.watching.client_timeout = config.watch_timeout + 10
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = config.request_timeout
    settings.networking.connect_timeout = 10
    settings.posting.level = logging.WARNING  # our own Events carry the story; kopf posts only trouble
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PROGRESS_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PROGRESS_PREFIX, key="last-handled-configuration")
    # Passes of kopf's handlers wait on the API server most of the time: at hundreds of new jobs a
    # few threads made apply -> Job a queue (bench/operator_bench.py); 32 keep requests in flight.
    settings.execution.max_workers = 32
    namespaces = getattr(memo, "namespaces", None) or config.namespaces
    memo.runtime = Runtime(config, namespaces)
    memo.runtime.start()
    logger.info("lora-operator configured: %s", config)


@kopf.on.cleanup()
def shutdown(memo: kopf.Memo, **_) -> None:
    if getattr(memo, "runtime", None):
        memo.runtime.stop()


@kopf.on.resume(GROUP, VERSION, PLURAL, backoff=5)
@kopf.on.create(GROUP, VERSION, PLURAL, backoff=5)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec.suspend", backoff=5)
def reconcile_job(namespace: str, name: str, memo: kopf.Memo, reason: str, body: kopf.Body, **_) -> None:
    # A new object's body comes straight from the watch: no GET needed before creating its Job.
    fresh = copy.deepcopy(dict(body)) if reason == kopf.Reason.CREATE else None
    memo.runtime.reconcile(namespace, name, fresh)


# Child Job changes reach the reconciler through the Job informer of runtime.py (one watch, a
# cache that replaces per-pass LISTs), not through a kopf handler.


@kopf.on.resume(GROUP, VERSION, CHANNEL_PLURAL, backoff=5)
@kopf.on.create(GROUP, VERSION, CHANNEL_PLURAL, backoff=5)
@kopf.on.update(GROUP, VERSION, CHANNEL_PLURAL, field="spec", backoff=5)
def reconcile_channel(namespace: str, name: str, memo: kopf.Memo, **_) -> None:
    """Promote (or roll back to) the job a channel names; the resync loop retries what must wait."""
    memo.runtime.reconcile_channel(namespace, name)

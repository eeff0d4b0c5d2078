"""Thin kopf handlers: each one only names the object to reconcile (see reconcile.py)."""

from __future__ import annotations

import logging
import os

import kopf

from ..api import GROUP, PLURAL, VERSION
from ..api.channel import CHANNEL_PLURAL
from ..config import OperatorConfig
from .runtime import HANDLER_THREADS, Runtime

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
    # kopf's executor runs the channel handlers only (jobs go through the work queue).
    settings.execution.max_workers = HANDLER_THREADS
    namespaces = getattr(memo, "namespaces", None) or config.namespaces
    memo.runtime = Runtime(config, namespaces)
    memo.runtime.start()
    logger.info("lora-operator configured: %s", config)


@kopf.on.cleanup()
def shutdown(memo: kopf.Memo, **_) -> None:
    if getattr(memo, "runtime", None):
        memo.runtime.stop()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def job_event(event: kopf.RawEvent, memo: kopf.Memo, **_) -> None:
    """Every LoRATrainingJob event: the runtime queues a pass when the job is new to it or its
    spec changed (generation), with this body (no GET), and forgets a deleted one.

    An event handler, not kopf's create/resume/update handlers: those store kopf's state in an
    annotation (a PATCH per new job, and a second create pass whenever the echo of that PATCH
    came later than kopf's consistency timeout) and run in kopf's executor; at a thousand new jobs
    they made apply -> Job a queue (bench/operator_bench.py). Async: it only decides and queues."""
    memo.runtime.on_job_event(event.get("type"), event["object"])


# Child Job changes reach the reconciler through the Job informer of runtime.py (one watch, a
# cache that replaces per-pass LISTs), not through a kopf handler.


@kopf.on.resume(GROUP, VERSION, CHANNEL_PLURAL, backoff=5)
@kopf.on.create(GROUP, VERSION, CHANNEL_PLURAL, backoff=5)
@kopf.on.update(GROUP, VERSION, CHANNEL_PLURAL, field="spec", backoff=5)
def reconcile_channel(namespace: str, name: str, memo: kopf.Memo, **_) -> None:
    """Promote (or roll back to) the job a channel names; the resync loop retries what must wait."""
    memo.runtime.reconcile_channel(namespace, name)

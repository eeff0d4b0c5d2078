"""status.attempts: one record per child Job, merged with what earlier passes already recorded.

Why status keeps them: a failed pod may be gone on the next pass (deleted, garbage-collected), so
its reason is observed once and then carried in status; everything else is re-observed every pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import conditions as c
from .observed import JobView

MAX_MESSAGE = 1024


def merge_attempts(previous: Iterable[Mapping[str, Any]], jobs: Iterable[JobView]) -> list[dict[str, Any]]:
    by_index = {int(a["index"]): dict(a) for a in previous or () if "index" in a}
    for job in jobs:
        record = by_index.get(job.attempt, {"index": job.attempt})
        record["jobName"] = job.name
        record["startedAt"] = record.get("startedAt") or job.start_time or job.created_at
        if job.outcome:
            record["outcome"] = job.outcome
            record["finishedAt"] = record.get("finishedAt") or job.completion_time
        if job.failure:
            record.update(reason=job.failure.reason, exitCode=job.failure.exit_code,
                          message=(job.failure.message or "")[:MAX_MESSAGE] or None,
                          failedRank=job.failure.node_rank, failedPod=job.failure.pod)
        elif job.outcome == "Succeeded" and "exitCode" not in record:
            record["exitCode"] = 0
        by_index[job.attempt] = {k: v for k, v in record.items() if v is not None}
    return [by_index[i] for i in sorted(by_index)]


def failed_count(attempts: Iterable[Mapping[str, Any]]) -> int:
    return sum(1 for a in attempts if a.get("outcome") == "Failed")


def final_failure_reason(attempts: list[Mapping[str, Any]], max_retries: int) -> str | None:
    """Why no further attempt may start after a failed one, or None when one may.

    Invalid input (trainer exit 2) and divergence (exit 4) are final at once: a retry of the same
    data and spec cannot help.
    """
    if attempts and attempts[-1].get("reason") in (c.INVALID_INPUT, c.DIVERGED):
        return attempts[-1]["reason"]
    if failed_count(attempts) > max_retries:
        return c.BACKOFF_LIMIT_EXCEEDED
    return None


def describe_failure(attempt: Mapping[str, Any]) -> str:
    text = f"attempt {attempt.get('index')} ({attempt.get('jobName')}) failed: "
    if attempt.get("failedRank") is not None:
        text += f"node rank {attempt['failedRank']} (pod {attempt.get('failedPod')}) first, "
    text += attempt.get("reason", "Error")
    if attempt.get("exitCode") is not None:
        text += f", exit code {attempt['exitCode']}"
    if attempt.get("message"):
        text += f": {attempt['message']}"
    return text

"""Events for condition transitions (pure): compare the old and new conditions."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from . import conditions as c
from .attempts import describe_failure

# kstatus conditions mirror the others; an Event for them would only repeat one.
_SILENT = {c.READY, c.RECONCILING, c.STALLED}


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def _key(cond: Mapping[str, Any]) -> tuple:
    return cond.get("status"), cond.get("reason")


def transition_events(old: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]) -> list[Event]:
    before = {cond.get("type"): cond for cond in old or ()}
    events = []
    for cond in new or ():
        if cond["type"] in _SILENT:
            continue
        prior = before.get(cond["type"])
        if prior is not None and _key(prior) == _key(cond):
            continue
        flipped = prior is None or prior.get("status") != cond["status"]
        if cond["status"] != c.TRUE and cond["reason"] not in c.WARNING_REASONS and (prior is None or not flipped):
            continue  # "not yet" conditions and their changing reasons are noise
        warning = cond["reason"] in c.WARNING_REASONS and (
            cond["status"] == c.TRUE or cond["type"] == c.ADMITTED or cond["type"] == c.RUNNING)
        text = f"{cond['type']}={cond['status']}" + (f": {cond['message']}" if cond.get("message") else "")
        events.append(Event("Warning" if warning else "Normal", cond["reason"], text[:1024]))
    return events


def attempt_events(old: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]) -> list[Event]:
    """One Warning per attempt that failed since the last pass, naming its cause (and, for a
    multi-node attempt, the pod and node rank that failed first). A failed attempt is followed by the
    next one in the same pass, so the Running condition alone would never show it."""
    failed_before = {a.get("index") for a in old or () if a.get("outcome") == "Failed"}
    return [Event("Warning", "AttemptFailed", describe_failure(a)[:1024])
            for a in new or () if a.get("outcome") == "Failed" and a.get("index") not in failed_before]



def attempt_started(old: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]],
                    transitions: list[Event]) -> list[Event]:
    """The Events of a status write, with one AttemptStarted (naming the Job) per attempt that
    status.attempts records for the first time, in place of the first attempt's Admitted=True
    JobCreated, which says the same with less (one Event per job less while a thousand start)."""
    before = {a.get("index") for a in old or ()}
    started = [Event("Normal", "AttemptStarted", f"Job {a.get('jobName')} (attempt {a.get('index')})")
               for a in new or () if a.get("index") not in before]
    if not started:
        return transitions
    return [*started, *(e for e in transitions if e.reason != c.JOB_CREATED)]

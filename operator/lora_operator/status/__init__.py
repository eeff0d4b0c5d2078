"""Pure status logic: observations in, conditions/status/plans out. No kubernetes, kopf or minio."""

from . import conditions
from .derive import OWNED_FIELDS, derive_status, is_terminal, phase_of
from .events import Event, attempt_events, transition_events
from .jobs import job_view
from .observed import Blocked, Failure, JobView, Observed
from .plan import Plan, plan, running_elsewhere
from .policy import (
    check_kueue,
    check_policy,
    check_quota,
    check_running_limit,
    resolve_image,
    resolve_queue,
)

__all__ = [
    "OWNED_FIELDS", "Blocked", "Event", "Failure", "attempt_events", "JobView", "Observed", "Plan", "check_kueue",
    "check_policy", "check_quota", "check_running_limit", "conditions", "derive_status", "is_terminal",
    "job_view", "phase_of", "plan", "resolve_image", "resolve_queue", "running_elsewhere",
    "transition_events",
]
from .workload import DEACTIVATED_BY, WorkloadView, workload_view

__all__ += ["DEACTIVATED_BY", "WorkloadView", "workload_view"]

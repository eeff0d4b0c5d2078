"""Pure status logic: observations in, conditions/status/plans out. No kubernetes, kopf or minio."""

from . import conditions
from .derive import OWNED_FIELDS, derive_status, is_terminal, phase_of
from .events import Event, attempt_events, attempt_started, transition_events
from .jobs import job_view, live_pods
from .observed import Blocked, Failure, JobView, Observed
from .plan import Plan, plan, running_elsewhere
from .policy import (
    allowed_endpoints,
    check_kueue,
    check_policy,
    check_quota,
    check_running_limit,
    egress_ports,
    is_own_endpoint,
    job_endpoint,
    resolve_image,
    resolve_queue,
    total_gpus,
)
from .progress import accept_report

__all__ = [
    "OWNED_FIELDS", "accept_report", "allowed_endpoints", "attempt_events", "attempt_started", "is_own_endpoint",
    "job_endpoint", "live_pods",
    "egress_ports", "Blocked", "Event", "Failure", "JobView", "Observed", "Plan", "check_kueue",
    "check_policy", "check_quota", "check_running_limit", "conditions", "derive_status", "is_terminal",
    "job_view", "phase_of", "plan", "resolve_image", "resolve_queue", "running_elsewhere",
    "total_gpus", "transition_events",
]
from .workload import DEACTIVATED_BY, WorkloadView, workload_view

__all__ += ["DEACTIVATED_BY", "WorkloadView", "workload_view"]

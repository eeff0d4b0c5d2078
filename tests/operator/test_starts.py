"""The namespace running-job limit under parallel passes: the start ledger (pure) and four jobs
applied at once against the real apiserver with a limit of one."""

from __future__ import annotations

import threading

import pytest
from ltj_cluster import apply, conditions, get, jobs, wait_for

from lora_operator.handlers.starts import StartLedger


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_started_job_counts_for_other_owners_until_the_list_shows_it_or_it_expires():
    clock = Clock()
    ledger = StartLedger(clock, ttl_s=60)
    ledger.started("team-a", "a-attempt-1", owner="a")
    assert ledger.unseen("team-a", [], owner="b") == 1  # the informer has not seen it yet
    assert ledger.unseen("team-a", [], owner="a") == 0  # a job's own attempts are not "elsewhere"
    assert ledger.unseen("team-b", [], owner="b") == 0  # per namespace
    assert ledger.unseen("team-a", ["a-attempt-1"], owner="b") == 0  # listed: the list counts it now
    ledger.started("team-a", "c-attempt-1", owner="c")
    clock.t = 61
    assert ledger.unseen("team-a", [], owner="b") == 0  # never listed: deleted; the list is the truth


def test_the_namespace_lock_is_one_lock_per_namespace():
    ledger = StartLedger()
    assert ledger.lock("a") is ledger.lock("a") and ledger.lock("a") is not ledger.lock("b")
    held = ledger.lock("a")
    held.acquire()
    got = []
    t = threading.Thread(target=lambda: got.append(ledger.lock("a").acquire(timeout=0.2)))
    t.start()
    t.join()
    held.release()
    assert got == [False]


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_should_start_one_job_when_four_arrive_together_under_a_limit_of_one(
        api, namespace, storage, operator_factory):
    operator_factory(LORA_MAX_RUNNING_JOBS_PER_NAMESPACE="1", LORA_WORKERS="16")
    names = [f"burst-{i}" for i in range(4)]
    threads = [threading.Thread(target=apply, args=(api, namespace, storage, n)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def settled():
        reasons = {}
        for n in names:
            status = get(api, namespace, n).get("status") or {}
            if not status.get("conditions"):
                return None
            reasons[n] = conditions(status).get("Admitted")
        return reasons

    reasons = wait_for(settled, 60, "every job admitted or refused")
    wait_for(lambda: len(jobs(api, namespace)) >= 1, 30, "the one Job")
    # Give a racing second start every chance to show up.
    wait_for(lambda: all(get(api, namespace, n).get("status", {}).get("observedGeneration") for n in names), 30)
    assert len(jobs(api, namespace)) == 1, jobs(api, namespace)
    refused = [n for n, r in reasons.items() if r and r[1] == "MaxRunningJobs"]
    assert len(refused) == 3, reasons

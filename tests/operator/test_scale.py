"""The pieces that keep passes cheap at a thousand jobs: work queue, Job cache, phase gauge."""

from __future__ import annotations

import threading

from kubernetes import client

from lora_operator.clients.informer import JobInformer, slim
from lora_operator.handlers.workqueue import WorkQueue, start_workers
from lora_operator.observability.metrics import Metrics


def _job(name, rv, active=0, labels=None, ns="ns"):
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": str(rv),
                         "labels": labels or {"training.lora.dev/job": name.rsplit("-a", 1)[0]},
                         "ownerReferences": [{"kind": "LoRATrainingJob", "name": name.rsplit("-a", 1)[0]}]},
            "spec": {"suspend": False, "template": {"spec": {"containers": [{"name": "x" * 1000}]}}},
            "status": {"active": active}}


def test_should_queue_a_key_once_however_often_it_changes_while_waiting():
    queue, stop = WorkQueue(), threading.Event()
    for _ in range(5):
        queue.add(("ns", "a"))
    queue.add(("ns", "b"))
    assert len(queue) == 2
    assert queue.get(stop) == ("ns", "a")


def test_should_run_a_key_changed_during_its_pass_once_more_afterwards_never_twice_at_once():
    queue, stop = WorkQueue(), threading.Event()
    queue.add("k")
    key = queue.get(stop)
    queue.add("k")  # changed while a worker has it
    assert len(queue) == 0, "not handed to a second worker while the first runs"
    queue.done(key)
    assert queue.get(stop) == "k"


def test_workers_drain_the_queue_and_survive_a_failing_pass():
    queue, stop, seen, done = WorkQueue(), threading.Event(), [], threading.Event()

    def work(key):
        seen.append(key)
        if len(seen) == 3:
            done.set()
        if key == 1:
            raise RuntimeError("boom")
    for key in (1, 2, 3):
        queue.add(key)
    start_workers(queue, work, 2, stop)
    assert done.wait(5)
    stop.set()
    assert sorted(seen) == [1, 2, 3]


def _informer(changes):
    informer = JobInformer(client.ApiClient(), "app.kubernetes.io/managed-by=lora-operator", ["ns"], changes.append)
    informer._synced["ns"] = True
    return informer


def test_should_answer_from_the_cache_only_once_synced_and_without_the_pod_template():
    informer = JobInformer(client.ApiClient(), "x=y", ["ns"])
    assert informer.jobs("ns", {}) is None, "not synced: the caller must LIST"
    informer = _informer([])
    informer._apply("ADDED", slim(_job("demo-a1", 5)))
    informer._apply("ADDED", slim(_job("other-a1", 6)))
    found = informer.jobs("ns", {"training.lora.dev/job": "demo"})
    assert [j["metadata"]["name"] for j in found] == ["demo-a1"]
    assert "template" not in found[0]["spec"] and informer.jobs("elsewhere", {}) == []


def test_should_notify_on_status_changes_only_and_drop_a_stale_write_through():
    changes = []
    informer = _informer(changes)
    informer._apply("ADDED", slim(_job("demo-a1", 5)))
    informer.put(_job("demo-a1", 5))  # our own create, already seen: no pass
    informer._apply("MODIFIED", slim(_job("demo-a1", 6)))  # only metadata moved
    assert len(changes) == 1
    informer._apply("MODIFIED", slim(_job("demo-a1", 7, active=1)))
    informer.put(_job("demo-a1", 6))  # a late copy of an older version
    assert len(changes) == 2 and informer.jobs("ns", {})[0]["status"]["active"] == 1
    informer._apply("DELETED", slim(_job("demo-a1", 8, active=1)))
    assert len(changes) == 3 and informer.jobs("ns", {}) == []


def test_phase_gauge_moves_jobs_between_phases():
    metrics = Metrics()

    def value(phase):
        return metrics.registry.get_sample_value("lora_operator_jobs", {"phase": phase})
    metrics.set_phase("a", "Training")
    metrics.set_phase("b", "Training")
    metrics.set_phase("a", "Succeeded")
    metrics.set_phase("a", "Succeeded")
    assert (value("Training"), value("Succeeded"), value("Pending")) == (1, 1, 0)
    metrics.forget_except({"a"})
    assert value("Training") == 0

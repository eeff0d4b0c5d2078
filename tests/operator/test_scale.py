"""The pieces that keep passes cheap at a thousand jobs: work queue, Job cache, phase gauge."""

from __future__ import annotations

import json
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


def test_should_hand_out_urgent_keys_first_and_move_a_waiting_key_up_once():
    waits, stop = [], threading.Event()
    queue = WorkQueue(on_wait=lambda lane, s: waits.append(lane))
    for key in ("upkeep-1", "upkeep-2", "moved"):
        queue.add(key)
    queue.add("new", urgent=True)
    queue.add("moved", urgent=True)  # e.g. a spec change while its resync pass waits
    queue.add("moved")  # and a Job change after that: still urgent, still once
    assert len(queue) == 4
    got = [queue.get(stop, poll=0.01) for _ in range(4)]
    assert got == ["new", "moved", "upkeep-1", "upkeep-2"]
    assert waits == ["urgent", "urgent", "normal", "normal"]
    stop.set()
    assert queue.get(stop, poll=0.01) is None, "the moved key's old place is not a second pass"


def test_should_hand_out_a_waiting_normal_key_after_a_run_of_urgent_ones():
    from lora_operator.handlers.workqueue import URGENT_RUN

    queue, stop = WorkQueue(), threading.Event()
    queue.add("upkeep")
    for i in range(2 * URGENT_RUN):
        queue.add(f"new-{i}", urgent=True)
    got = [queue.get(stop, poll=0.01) for _ in range(URGENT_RUN + 2)]
    assert got[URGENT_RUN] == "upkeep", "a burst of new jobs does not starve the status upkeep"
    assert got[:URGENT_RUN] == [f"new-{i}" for i in range(URGENT_RUN)] and got[-1] == f"new-{URGENT_RUN}"


def test_should_keep_an_urgent_change_urgent_when_it_arrives_during_the_keys_pass():
    queue, stop = WorkQueue(), threading.Event()
    queue.add("k")
    key = queue.get(stop)
    queue.add("k", urgent=True)
    queue.add("other")
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
    informer = JobInformer(client.ApiClient(), "app.kubernetes.io/managed-by=lora-operator", ["ns"], changes.append,
                           index_label="training.lora.dev/job")
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


def test_should_answer_by_the_index_label_and_keep_the_index_true_through_relabels_deletes_and_relists():
    informer = _informer([])
    for i in range(50):
        informer._apply("ADDED", slim(_job(f"job{i}-a1", 10 + i)))
    informer._apply("ADDED", slim(_job("job7-a2", 100)))
    informer._apply("ADDED", slim(_job("job7-a1", 101, ns="other")))

    def names(ns, owner):
        return sorted(j["metadata"]["name"] for j in informer.jobs(ns, {"training.lora.dev/job": owner}))
    assert names("ns", "job7") == ["job7-a1", "job7-a2"] and names("other", "job7") == ["job7-a1"]
    informer._apply("MODIFIED", slim(_job("job7-a2", 102, labels={"training.lora.dev/job": "job8"})))
    assert names("ns", "job7") == ["job7-a1"] and names("ns", "job8") == ["job7-a2", "job8-a1"]
    informer._apply("DELETED", slim(_job("job7-a1", 103)))
    assert names("ns", "job7") == [] and ("ns", "job7") not in informer._index
    # a re-list without a Job drops it from the index too
    informer._call = lambda ns, **_: type("R", (), {"data": json.dumps({
        "metadata": {"resourceVersion": "200"}, "items": [_job("job1-a1", 11)]})})()
    informer._list("ns")
    assert names("ns", "job8") == [] and names("ns", "job1") == ["job1-a1"] and names("other", "job7") == ["job7-a1"]
    # a query without the index label still scans the namespace
    assert [j["metadata"]["name"] for j in informer.jobs("ns", {})] == ["job1-a1"]


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


class _Passes:
    def __init__(self, fail=False):
        self.calls, self.forgotten, self.fail = [], [], fail

    def reconcile(self, namespace, name, fresh=None):
        self.calls.append((name, fresh and fresh["metadata"]["resourceVersion"]))
        if self.fail:
            raise RuntimeError("apiserver down")

    def forget(self, key):
        self.forgotten.append(key)


def _ltj(name, rv, generation=1, uid="u1"):
    return {"metadata": {"namespace": "ns", "name": name, "uid": uid, "generation": generation,
                         "resourceVersion": str(rv)}, "spec": {}, "status": {}}


def _drain_one(runtime):
    key = runtime.queue.get(threading.Event(), poll=0.01)
    try:
        runtime._work(key)
    finally:
        runtime.queue.done(key)


def test_should_queue_a_pass_for_a_new_job_or_a_new_generation_with_its_body_and_not_for_status_echoes():
    from lora_operator.config import OperatorConfig
    from lora_operator.handlers.runtime import Runtime

    runtime = Runtime(OperatorConfig(), kube=object())
    runtime.reconciler = passes = _Passes()
    runtime.on_job_event(None, _ltj("a", 5))  # kopf's initial listing (operator start)
    runtime.on_job_event("MODIFIED", _ltj("a", 6))  # our own status write: same generation
    assert len(runtime.queue) == 1
    _drain_one(runtime)
    assert passes.calls == [("a", "5")], "the event's body, no GET"
    runtime.on_job_event("MODIFIED", _ltj("a", 7))
    assert len(runtime.queue) == 0, "a status echo queues nothing"
    runtime.on_job_event("MODIFIED", _ltj("a", 8, generation=2))  # spec changed (e.g. suspend)
    runtime.on_job_event("MODIFIED", _ltj("a", 9, generation=3))
    _drain_one(runtime)
    assert passes.calls[-1] == ("a", "9"), "one pass, with the newest body"
    runtime.on_job_event("DELETED", _ltj("a", 10, generation=3))
    runtime.on_job_event("ADDED", _ltj("a", 11, uid="u2"))  # a new job of the same name
    assert passes.forgotten == ["ns/a"] and len(runtime.queue) == 1


def test_should_queue_a_new_job_ahead_of_the_upkeep_of_started_ones():
    from lora_operator.config import OperatorConfig
    from lora_operator.handlers.runtime import Runtime

    runtime = Runtime(OperatorConfig(), kube=object())
    runtime.reconcile_owner_of({"metadata": {"namespace": "ns", "ownerReferences": [
        {"kind": "LoRATrainingJob", "name": "started"}]}})  # its Job changed
    runtime.on_job_event("ADDED", _ltj("new", 5))
    assert runtime.queue.get(threading.Event()) == ("ns", "new")


def test_should_run_a_failed_pass_again_after_the_retry_delay(monkeypatch):
    from lora_operator.config import OperatorConfig
    from lora_operator.handlers import runtime as rt

    runtime = rt.Runtime(OperatorConfig(), kube=object())
    runtime.reconciler = _Passes(fail=True)
    runtime.on_job_event("ADDED", _ltj("a", 5))
    key = runtime.queue.get(threading.Event())
    try:
        runtime._work(key)
    except RuntimeError:
        pass
    runtime.queue.done(key)
    runtime._retry_due()
    assert len(runtime.queue) == 0, "not before the delay"
    monkeypatch.setattr(rt.time, "monotonic", lambda: 1e12)
    runtime._retry_due()
    assert len(runtime.queue) == 1


def test_should_run_the_kubeconfig_refresh_hook_at_most_once_a_minute(monkeypatch):
    from lora_operator.clients import kube

    now = [1000.0]
    monkeypatch.setattr(kube.time, "monotonic", lambda: now[0])
    calls = []
    refresh = kube._throttled(calls.append, kube.KUBECONFIG_REFRESH_S)
    refresh("conf-1")
    now[0] += kube.KUBECONFIG_REFRESH_S - 1
    refresh("conf-2")
    assert calls == ["conf-1"], "a second call inside the minute reuses the credentials already set"
    now[0] += 1
    refresh("conf-3")
    assert calls == ["conf-1", "conf-3"], "after a minute the loader looks again (it renews 5 min before expiry)"


def test_should_write_the_trainers_config_as_yaml_that_reads_back_as_the_manifest(owner, make_spec):
    import yaml

    from lora_operator.builders import build_configmap
    from lora_operator.builders.configmap import trainer_manifest

    spec = make_spec()
    text = build_configmap(owner, spec, image="img:1", endpoint="http://s3:9000")["data"]["job.yaml"]
    assert yaml.safe_load(text) == trainer_manifest(owner, spec, image="img:1", endpoint="http://s3:9000")
    assert not text.lstrip().startswith("{"), "block YAML a person can read, not one JSON line"

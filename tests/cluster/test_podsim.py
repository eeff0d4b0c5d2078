"""Simulated pods (hack/podrunner.py --simulate): scripted stages, no processes.

The script tests are pure; the cluster tests run a simulated node next to the local cluster's real
one (`--selected-only`), so they only touch pods that select it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "hack"))

import podsim_script as script  # noqa: E402

SIM_NODE = "test-sim-node"


def test_a_plain_pod_runs_for_its_annotated_seconds_and_exits_with_the_chosen_code():
    stages = script.pod_script({"podsim.lora.dev/run-seconds": "1.5", "podsim.lora.dev/exit-code": "7",
                                "podsim.lora.dev/termination-message": "boom"})
    assert stages == [script.Stage(at=1.5, exit=(7, "boom"))]
    assert script.pod_script({}) == [script.Stage(at=0.0, exit=(0, ""))]


def test_a_bad_annotation_is_refused_naming_it():
    with pytest.raises(script.ScriptError, match="podsim.lora.dev/run-seconds"):
        script.pod_script({"podsim.lora.dev/run-seconds": "soon"})
    with pytest.raises(script.ScriptError, match="outcome"):
        script.trainer_script(script.Trainer("s3://b/x", {"fake-trainer/outcome": "explode"}))


def test_the_stand_in_trainer_progresses_checkpoints_and_publishes_on_schedule():
    trainer = script.Trainer("s3://b/job", {"fake-trainer/steps": "4", "fake-trainer/step-seconds": "2",
                                            "fake-trainer/checkpoint-every": "2"})
    stages = script.trainer_script(trainer)
    states = [s.progress["state"] for s in stages if s.progress]
    assert states == ["Preparing", "Training", "Training", "Training", "Training", "Evaluating", "Succeeded"]
    assert [s.at for s in stages if s.progress and s.progress["state"] == "Training"] == [2, 4, 6, 8]
    assert [o for s in stages for o in s.objects if o.startswith("checkpoints/")] == [
        "checkpoints/step-2/COMPLETE", "checkpoints/step-4/COMPLETE"]
    last = stages[-1]
    assert last.exit[0] == 0 and json.loads(last.exit[1])["state"] == "Succeeded"
    assert last.progress["lastCheckpoint"] == "s3://b/job/checkpoints/step-4"
    assert last.progress["artifacts"]["adapter"] == "s3://b/job/adapter"
    assert set(last.progress) == set(script.PROGRESS_FIELDS)  # the trainer's schema, every key present


def test_a_second_attempt_resumes_after_the_checkpoint_the_first_left():
    first = script.trainer_script(script.Trainer("s3://b/j", {"fake-trainer/outcome": "fail-first-attempt"}))
    assert first[-1].exit[0] == 3 and first[-1].progress["state"] == "Failed"
    step = script.resume_step(first[-1].progress)
    assert step == 2
    second = script.trainer_script(script.Trainer("s3://b/j", {"fake-trainer/outcome": "fail-first-attempt"},
                                                  attempt=2, resume_step=step))
    assert [s.progress["step"] for s in second if s.progress and s.progress["state"] == "Training"] == [3, 4, 5]
    assert second[-1].exit[0] == 0


def test_outcomes_reject_crash_and_a_chosen_exit_code():
    def run(outcome, **notes):
        return script.trainer_script(script.Trainer("s3://b/j", {"fake-trainer/outcome": outcome, **notes}))[-1]
    assert run("reject").exit[0] == 0 and run("reject").progress["state"] == "Rejected"
    assert run("crash").exit[0] == 1
    assert run("exit:2", **{"fake-trainer/message": "bad line 3"}).exit == (2, "bad line 3")
    stopped = script.preempted(script.Trainer("s3://b/j"), {"state": "Training", "step": 3})
    assert stopped.exit[0] == 143 and stopped.progress["state"] == "Preempted"


# ---------------------------------------------------------------- against the local cluster

@pytest.fixture(scope="module")
def sim_node(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("podsim")
    with open(work / "runner.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "hack" / "podrunner.py"), "--simulate",
                                 "--selected-only", f"--node-name={SIM_NODE}", f"--kubeconfig={cluster.kubeconfig}",
                                 f"--work-dir={work}"], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    yield SIM_NODE
    proc.terminate()
    proc.wait(15)
    cluster.kubectl("delete", "node", SIM_NODE, "--wait=false", check=False)


def _pod(name: str, annotations: dict, **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "annotations": annotations},
            "spec": {"restartPolicy": "Never", "nodeSelector": {"kubernetes.io/hostname": SIM_NODE},
                     "containers": [{"name": "main", "image": "unused"}], **spec}}


def _wait(cluster, namespace, name, phases, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        proc = cluster.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
        pod = json.loads(proc.stdout) if proc.returncode == 0 else {}
        if pod.get("status", {}).get("phase") in phases:
            return pod
        assert time.monotonic() < deadline, f"pod {name} never reached {phases}: {pod.get('status')}"
        time.sleep(0.2)


@pytest.mark.cluster
def test_a_simulated_pod_runs_then_fails_with_the_chosen_exit_code_and_message(cluster, namespace, sim_node):
    pod = _pod("sim", {"podsim.lora.dev/run-seconds": "2", "podsim.lora.dev/exit-code": "7",
                       "podsim.lora.dev/termination-message": "simulated failure"})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))
    running = _wait(cluster, namespace, "sim", ("Running", "Failed"))
    assert running["spec"]["nodeName"] == sim_node and running["status"]["phase"] == "Running"
    done = _wait(cluster, namespace, "sim", ("Failed",))
    term = done["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["message"]) == (7, "simulated failure")


@pytest.mark.cluster
def test_the_real_node_leaves_pods_for_the_simulated_one_alone(cluster, namespace, sim_node):
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_pod("quick", {})))
    done = _wait(cluster, namespace, "quick", ("Succeeded", "Failed"))
    assert done["spec"]["nodeName"] == sim_node and done["status"]["phase"] == "Succeeded"


@pytest.mark.cluster
def test_a_simulated_trainer_pod_writes_progress_where_the_operator_reads_it(cluster, namespace, sim_node, s3):
    s3.client.make_bucket(s3.bucket)
    job = {"apiVersion": "training.lora.dev/v1alpha1", "kind": "LoRATrainingJob",
           "metadata": {"name": "j", "annotations": {"fake-trainer/steps": "3", "fake-trainer/step-seconds": "0.1"}},
           "spec": {"output": {"uri": f"s3://{s3.bucket}/j"}}}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"},
              "stringData": {"AWS_ACCESS_KEY_ID": cluster.s3_access_key, "AWS_SECRET_ACCESS_KEY": cluster.s3_secret_key}}
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "j-config"},
              "data": {"job.yaml": json.dumps(job)}}
    env = [{"name": "S3_ENDPOINT", "value": cluster.s3_endpoint}, {"name": "LORA_ATTEMPT", "value": "1"}] + [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": "creds", "key": k}}}
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    pod = _pod("trainer", {}, volumes=[{"name": "config", "configMap": {"name": "j-config"}}])
    pod["spec"]["containers"][0]["env"] = env
    cluster.kubectl("apply", "-n", namespace, "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [secret, config, pod]}))
    done = _wait(cluster, namespace, "trainer", ("Succeeded", "Failed"))
    assert done["status"]["phase"] == "Succeeded"
    summary = json.loads(done["status"]["containerStatuses"][0]["state"]["terminated"]["message"])
    assert summary["state"] == "Succeeded" and summary["step"] == 3
    progress = json.loads(s3.client.get_object(s3.bucket, "j/progress.json").read())
    assert progress["state"] == "Succeeded" and progress["lastCheckpoint"] == f"s3://{s3.bucket}/j/checkpoints/step-3"
    names = {o.object_name for o in s3.client.list_objects(s3.bucket, prefix="j/", recursive=True)}
    assert {"j/checkpoints/step-3/COMPLETE", "j/adapter/adapter_config.json"} <= names

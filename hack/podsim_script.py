"""What a simulated pod does and when (pure; used by hack/podsim.py, tested without a cluster).

A script is a list of `Stage`s, each due `at` seconds after the pod started running. A stage may
write the trainer's report (`progress`: the whole progress.json, built from a template with every
key of the trainer's schema) and empty marker objects (`objects`: checkpoint COMPLETE markers, the
adapter), and the last stage ends the container (`exit`: exit code and termination message).

Two kinds of pods:

* **Trainer pods** (their config volume holds a LoRATrainingJob): behaviour comes from the job's
  annotations, the same contract as tests/operator/fake_trainer.py:
    fake-trainer/steps             optimizer steps (default 5)
    fake-trainer/step-seconds      seconds per step (default 0.2)
    fake-trainer/outcome           succeed | reject | fail-first-attempt | crash | exit:<code>
    fake-trainer/message           termination message for exit:<code> (default a JSON summary)
    fake-trainer/checkpoint-every  a checkpoint every this many steps (default 1)
  A pod whose previous attempt left a checkpoint resumes after it, as the real trainer does.
* **Any other pod**: pod annotations, kwok-style:
    podsim.lora.dev/run-seconds          seconds Running before the container exits (default 0)
    podsim.lora.dev/exit-code            its exit code (default 0)
    podsim.lora.dev/termination-message  its termination message (default none)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

NOTE = "fake-trainer/"
POD_NOTE = "podsim.lora.dev/"
# Keys of the trainer's progress.json (trainer/lora_trainer/progress.py FIELDS); all present, null
# when unknown, like the real writer.
PROGRESS_FIELDS = ("state", "step", "totalSteps", "epoch", "loss", "evalLoss", "learningRate",
                   "tokensPerSecond", "peakMemoryBytes", "mfu", "etaSeconds", "lastCheckpoint",
                   "bestCheckpoint", "bestEvalLoss", "datasetHashes", "skippedLines", "trainableParams",
                   "trainableFraction", "attempt", "updatedAt", "error", "eval", "artifacts", "jobUid")
PREEMPTED_EXIT = 143


class ScriptError(ValueError):
    """An annotation the simulation cannot follow (the pod fails with this message)."""


@dataclass(frozen=True)
class Stage:
    at: float
    progress: Mapping | None = None
    objects: tuple[str, ...] = ()  # keys under the output prefix, written empty
    exit: tuple[int, str] | None = None


@dataclass(frozen=True)
class Trainer:
    """What the stand-in trainer needs to know about its job (from the mounted config and env)."""

    output_uri: str
    annotations: Mapping[str, str] = field(default_factory=dict)
    attempt: int = 1
    resume_step: int = 0  # the step of the latest checkpoint a previous attempt left
    job_uid: str = ""  # the LoRATrainingJob's uid: the operator ignores a report without it


def _number(notes: Mapping[str, str], key: str, default: float, kind=float):
    raw = notes.get(key)
    if raw is None or str(raw).strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ScriptError(f"annotation {key}: expected a number, got {raw!r}") from None
    if value < 0:
        raise ScriptError(f"annotation {key}: must be >= 0, got {raw!r}")
    return value


def pod_script(annotations: Mapping[str, str]) -> list[Stage]:
    run = _number(annotations, POD_NOTE + "run-seconds", 0.0)
    code = _number(annotations, POD_NOTE + "exit-code", 0, int)
    return [Stage(at=run, exit=(code, annotations.get(POD_NOTE + "termination-message", "")))]


def template(trainer: Trainer, total: int) -> dict:
    data = dict.fromkeys(PROGRESS_FIELDS)
    data.update(state="Preparing", step=trainer.resume_step, totalSteps=total, attempt=trainer.attempt,
                jobUid=trainer.job_uid,
                skippedLines=0, datasetHashes={"s3://simulated/train.jsonl": "sha256:" + "0" * 64})
    return data


def _summary(data: Mapping, **extra) -> str:
    keys = ("state", "step", "totalSteps", "loss", "lastCheckpoint", "attempt", "error")
    return json.dumps({**{k: data.get(k) for k in keys}, **extra}, sort_keys=True)


def trainer_script(trainer: Trainer) -> list[Stage]:
    notes = trainer.annotations
    steps = _number(notes, NOTE + "steps", 5, int)
    pause = _number(notes, NOTE + "step-seconds", 0.2)
    every = max(1, _number(notes, NOTE + "checkpoint-every", 1, int))
    outcome = notes.get(NOTE + "outcome", "succeed")
    if outcome not in ("succeed", "reject", "fail-first-attempt", "crash") and not outcome.startswith("exit:"):
        raise ScriptError(f"annotation {NOTE}outcome: unknown outcome {outcome!r}")
    base = trainer.output_uri.rstrip("/")
    data = template(trainer, steps)
    stages = [Stage(at=0.0, progress=dict(data))]
    if outcome == "crash":
        data.update(state="Failed", error="crashed on purpose")
        return [*stages, Stage(at=0.0, progress=dict(data), exit=(1, _summary(data)))]
    if outcome.startswith("exit:"):
        code = _number({"code": outcome[5:]}, "code", 0, int)
        message = notes.get(NOTE + "message") or _summary(data)
        return [*stages, Stage(at=0.0, exit=(code, message))]
    t = 0.0
    for step in range(trainer.resume_step + 1, steps + 1):
        t += pause
        objects: tuple[str, ...] = ()
        if step % every == 0 or step == steps:
            objects = (f"checkpoints/step-{step}/COMPLETE",)
            data["lastCheckpoint"] = f"{base}/checkpoints/step-{step}"
        data.update(state="Training", step=step, loss=round(2.0 / step, 4), tokensPerSecond=1000.0,
                    epoch=round(step / steps, 4), etaSeconds=int((steps - step) * pause))
        stages.append(Stage(at=t, progress=dict(data), objects=objects))
        if outcome == "fail-first-attempt" and trainer.attempt == 1 and step >= 2:
            data.update(state="Failed", error="injected failure")
            return [*stages, Stage(at=t, progress=dict(data), exit=(3, _summary(data)))]
    passed = outcome != "reject"
    data.update(state="Evaluating", eval={
        "verdict": "Passed" if passed else "Failed",
        "reasons": [] if passed else ["evalLoss 1.90 > maxEvalLoss 1.50"],
        "results": [{"name": "evalLoss", "base": 2.1, "adapter": 1.2 if passed else 1.9,
                     "threshold": "<= 1.5", "passed": passed}]})
    stages.append(Stage(at=t, progress=dict(data)))
    if not passed:
        data.update(state="Rejected")
        return [*stages, Stage(at=t, progress=dict(data), exit=(0, _summary(data)))]
    data.update(state="Succeeded", artifacts={"adapter": f"{base}/adapter", "metadata": f"{base}/lora-metadata.json"})
    return [*stages, Stage(at=t, progress=dict(data), objects=("adapter/adapter_config.json", "lora-metadata.json"),
                           exit=(0, _summary(data)))]


def preempted(trainer: Trainer | None, last: Mapping | None) -> Stage:
    """What SIGTERM does: the trainer records Preempted (after a checkpoint) and exits 143."""
    if trainer is None:
        return Stage(at=0.0, exit=(PREEMPTED_EXIT, ""))
    data = dict(last or template(trainer, 0), state="Preempted")
    return Stage(at=0.0, progress=data, exit=(PREEMPTED_EXIT, _summary(data)))


def resume_step(previous: Mapping | None) -> int:
    """The step of the checkpoint a previous attempt recorded in progress.json, else 0."""
    uri = (previous or {}).get("lastCheckpoint") or ""
    tail = uri.rstrip("/").rsplit("step-", 1)
    return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else 0

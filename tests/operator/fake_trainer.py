"""A stand-in for `lora-trainer run CONFIG` with the same contract, for operator tests.

Behaviour comes from annotations of the LoRATrainingJob (carried in the mounted config):
  fake-trainer/steps         optimizer steps (default 5), one every fake-trainer/step-seconds (0.2)
  fake-trainer/outcome       succeed | reject | fail-first-attempt (exit 3 on attempt 1) | crash (exit 1)
                             | no-verdict (says Succeeded and exits 0 without evaluating: a stubbed evaluator)
  fake-trainer/adapter-loss  held-out loss of the "adapter" (default 1.2; base is 2.1)
Publishes adapter/ and, last, lora-metadata.json (runId, baseModel, artifacts, eval) like the trainer.
With `champion:` in its config (spec.evaluation.gate.champion resolved by the operator) it takes the
champion's held-out loss from the champion's lora-metadata.json and rejects an adapter that is worse
than champion x (1 + maxLossIncrease) through the real gate code (lora_trainer.evaluation.champion).
Writes <output>/progress.json and checkpoints/step-N/COMPLETE, resumes from the latest checkpoint,
exits 143 after a "checkpoint" on SIGTERM, and writes a one-line JSON termination message.
"""

import json
import os
import signal
import sys
import time
from datetime import datetime, timezone
from io import BytesIO
from urllib.parse import urlparse

import yaml
from minio import Minio
from minio.error import S3Error

# Pods get a clean environment (no PYTHONPATH): import the tree this file belongs to, not the
# editable install, so a worktree's tests run its own gate code.
_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [os.path.join(_REPO, "operator"), os.path.join(_REPO, "trainer")]

from lora_operator.api import parse_spec  # noqa: E402
from lora_trainer.evaluation.champion import ChampionMetrics, champion_thresholds, with_champion_column  # noqa: E402


def now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    def __init__(self, output_uri):
        url = urlparse(os.environ["S3_ENDPOINT"])
        self.client = Minio(url.netloc, access_key=os.environ["AWS_ACCESS_KEY_ID"],
                            secret_key=os.environ["AWS_SECRET_ACCESS_KEY"], secure=False)
        out = urlparse(output_uri)
        self.bucket, self.prefix = out.netloc, out.path.strip("/")

    def uri(self, key):
        return f"s3://{self.bucket}/{self.prefix}/{key}"

    def put(self, key, data: bytes):
        self.client.put_object(self.bucket, f"{self.prefix}/{key}", BytesIO(data), len(data))

    def get_json(self, key):
        try:
            response = self.client.get_object(self.bucket, f"{self.prefix}/{key}")
            return json.loads(response.read())
        except (S3Error, ValueError):
            return None


def terminate(summary, code):
    path = os.environ.get("LORA_TERMINATION_LOG")
    if path:
        with open(path, "w") as fh:
            fh.write(json.dumps(summary))
    sys.exit(code)


def champion_loss(champion):
    """The champion's held-out loss, from its lora-metadata.json (the real trainer re-scores it)."""
    if not champion or not champion.get("metadata"):
        return None
    url = urlparse(champion["metadata"])
    client = Store(f"s3://{url.netloc}/").client
    meta = json.loads(client.get_object(url.netloc, url.path.lstrip("/")).read())
    return meta["eval"]["adapter"]["loss"]


def main():
    with open(sys.argv[-1]) as fh:
        config = yaml.safe_load(fh)
    notes = config["metadata"].get("annotations", {})
    steps = int(notes.get("fake-trainer/steps", "5"))
    pause = float(notes.get("fake-trainer/step-seconds", "0.2"))
    outcome = notes.get("fake-trainer/outcome", "succeed")
    attempt = int(os.environ.get("LORA_ATTEMPT", "1"))
    store = Store(config["spec"]["output"]["uri"])
    previous = store.get_json("progress.json") or {}
    state = {"state": "Preparing", "step": 0, "totalSteps": steps, "attempt": attempt, "loss": None,
             "lastCheckpoint": previous.get("lastCheckpoint"), "datasetHashes": {"s3://d/train.jsonl": "sha256:0"}}
    start = int((previous.get("lastCheckpoint") or "step-0").rsplit("step-", 1)[1].strip("/"))

    def write(**fields):
        state.update(fields, updatedAt=now())
        store.put("progress.json", json.dumps(state).encode())

    def on_sigterm(*_):
        write(state="Preempted")
        terminate({"state": "Preempted", "step": state["step"]}, 143)

    signal.signal(signal.SIGTERM, on_sigterm)
    write()
    if outcome == "crash":
        terminate({"state": "Failed", "error": "crashed on purpose"}, 1)  # 2 would mean invalid input
    for step in range(start + 1, steps + 1):
        time.sleep(pause)
        store.put(f"checkpoints/step-{step}/COMPLETE", b"")
        write(state="Training", step=step, loss=round(2.0 / step, 4), tokensPerSecond=1000.0,
              etaSeconds=int((steps - step) * pause), lastCheckpoint=store.uri(f"checkpoints/step-{step}"))
        if outcome == "fail-first-attempt" and attempt == 1 and step >= 2:
            write(state="Failed", error="injected failure")
            terminate({"state": "Failed", "error": "injected failure"}, 3)
    if outcome == "no-verdict":
        write(state="Succeeded")
        terminate({"state": "Succeeded", "step": steps}, 0)
    write(state="Evaluating")
    passed = outcome != "reject"
    loss = float(notes.get("fake-trainer/adapter-loss", "1.2")) if passed else 1.9
    reasons = [] if passed else ["evalLoss 1.90 > maxEvalLoss 1.50"]
    results = [{"name": "evalLoss", "base": 2.1, "adapter": loss, "threshold": "<= 1.5", "passed": passed}]
    champion = champion_loss(config.get("champion"))
    rows, champion_reasons, _ = champion_thresholds(  # the real gate's champion part
        parse_spec(config["spec"]).evaluation.gate, base_loss=2.1, adapter_loss=loss, adapter_checks={},
        regression=None, champion=None if champion is None else ChampionMetrics(loss=champion),
        missing=(config.get("champion") or {}).get("missing"))
    results = with_champion_column(results, None if champion is None else ChampionMetrics(loss=champion)) + rows
    reasons += champion_reasons
    passed = passed and not champion_reasons
    write(eval={"verdict": "Passed" if passed else "Failed", "reasons": reasons, "results": results})
    if not passed:
        write(state="Rejected")
        terminate({"state": "Rejected"}, 0)
    write(state="Exporting")
    store.put("adapter/adapter_config.json", b"{}")
    artifacts = {"adapter": store.uri("adapter"), "merged": None, "metadata": store.uri("lora-metadata.json")}
    store.put("lora-metadata.json", json.dumps({
        "schemaVersion": 1, "runId": f"{config['metadata']['name']}-{config['metadata'].get('uid', '')[:8]}",
        "baseModel": config["spec"]["baseModel"], "artifacts": artifacts,
        "eval": {"base": {"loss": 2.1}, "adapter": {"loss": loss}, "gate": {"verdict": "Passed"},
                 **({"champion": {**config["champion"], "loss": {"loss": champion}}} if champion is not None else {})},
    }).encode())
    write(state="Succeeded", artifacts={"adapter": store.uri("adapter"), "metadata": store.uri("lora-metadata.json")})
    terminate({"state": "Succeeded", "step": steps}, 0)


if __name__ == "__main__":
    main()

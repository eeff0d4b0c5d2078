"""progress.json: how the trainer reports to the operator (which mirrors it into status).

The schema, the states and the exit codes are `lora_operator.api.progress` (the one definition both
sides use); this module writes it through `ProgressReport`.

Written to `<output.uri>/progress.json` by rank 0 only: on every state change, and otherwise at
most once per LORA_PROGRESS_INTERVAL_S (default 10 s). The write replaces the whole object.

Schema (camelCase; every key is always present, unknown values are null):
  jobUid            metadata.uid of the LoRATrainingJob (the operator ignores a report of another uid)
  state             Preparing | Training | Evaluating | Exporting | Succeeded | Failed |
                    Rejected | Preempted. Preempted = stopped by SIGTERM after a checkpoint;
                    the next attempt resumes. Rejected = the evaluation gate refused the adapter.
  step              optimizer steps done (int)
  totalSteps        planned optimizer steps (int)
  epoch             fractional epoch (float)
  loss              mean training loss of the latest optimizer step (float)
  evalLoss          latest held-out loss (float)
  learningRate      current learning rate (float)
  tokensPerSecond   non-padding tokens per second, all ranks together (float)
  peakMemoryBytes   peak memory of rank 0: CUDA max allocated on GPU, max RSS on CPU (int)
  mfu               model FLOPs utilisation in [0, 1]; null without LORA_PEAK_FLOPS (float)
  etaSeconds        estimated seconds of training left (int)
  lastCheckpoint    URI of the latest COMPLETE checkpoint (str)
  bestCheckpoint    URI of the complete checkpoint with the lowest evalLoss (str)
  bestEvalLoss      its evalLoss (float)
  datasetHashes     {uri: "sha256:<hex>"} of every dataset file read
  skippedLines      invalid lines skipped (onInvalidLine: skip), records the template refused included (int)
  maxSeqLength      the resolved maximum example / packed row length (int)
  droppedExamples   examples left out: longer than maxSeqLength, or nothing to train (int)
  truncatedExamples examples cut after their last whole assistant turn (onOverlong: truncate) (int)
  warnings          reported before training, e.g. LoRA targets that miss some linear layers (list of str)
  trainableParams   trainable (LoRA) parameters (int)
  trainableFraction trainable / all parameters (float)
  attempt           attempt number (LORA_ATTEMPT, from 1) (int)
  rank              rank of the writer: always 0, the only rank that writes (int)
  worldSize         training processes of this attempt, all nodes together (int)
  updatedAt         RFC 3339 UTC time of this write (str)
  error             one-line error message when Failed (str)
  eval              gate outcome {verdict, reasons, results} in the shape of status.evaluation,
                    set after evaluation (evaluation.scoring.progress_eval)
  artifacts         {adapter, merged, eval, metadata} URIs once published
  rejectedCheckpoints [{step, reason}] checkpoints found but not used on resume (manifest, digest
                    or content check failed; see checkpoint.py)

Strict JSON: a number that is not finite (a NaN loss) is written as null (strictjson.py); a field
the contract refuses (too long, wrong type) is logged and written as null.

MFU counts 4 x N + 2 x trainable FLOPs per token (= 6 x trainable + 4 x frozen parameters):
forward 2N for every weight, backward 2N for the activation gradients through every weight and
2N for weight gradients of trainable ones only. For LoRA (trainable << N) this is the usual
~4 x N; the frozen base's 2N of weight gradients is never spent. Attention FLOPs are ignored.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from lora_operator.api import TRAINER_STATES, ProgressReport, read_report

from . import strictjson

log = logging.getLogger(__name__)

STATES = TRAINER_STATES
FIELDS = tuple(f.alias or name for name, f in ProgressReport.model_fields.items())
MAX_ERROR = 4000  # the contract keeps errors short; the log has them whole


def report_json(data: dict) -> bytes:
    """The report as strict JSON with every key, through the api contract."""
    data = strictjson.finite(data)
    if isinstance(data.get("error"), str):
        data["error"] = data["error"][:MAX_ERROR]
    report, problems = read_report(data)
    for problem in problems:
        log.warning("progress.json: %s", problem)
    return strictjson.dump_bytes(report.model_dump(by_alias=True, mode="json"), sort_keys=True)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ProgressWriter:
    """Keeps the latest progress and writes it at a bounded rate (see module docstring).

    `store` is None on ranks other than 0: they keep the values but never write.
    """

    def __init__(self, store, key: str, interval_s: float = 10.0, attempt: int = 1,
                 clock: Callable[[], float] = time.monotonic, job_uid: Optional[str] = None):
        self.store, self.key, self.interval_s, self.clock = store, key, interval_s, clock
        self.data: dict = {name: None for name in FIELDS}
        self.data.update(state="Preparing", step=0, totalSteps=0, datasetHashes={},
                         skippedLines=0, attempt=attempt, jobUid=job_uid)
        self._last_write: Optional[float] = None
        self.writes = 0

    def update(self, force: bool = False, **fields) -> bool:
        """Merge fields; write if the state changed, if forced, or if the interval passed."""
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise KeyError(f"unknown progress fields: {sorted(unknown)}")
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown state {fields['state']!r}")
        changed = "state" in fields and fields["state"] != self.data["state"]
        self.data.update(fields)
        due = self._last_write is None or self.clock() - self._last_write >= self.interval_s
        if force or changed or due:
            self.flush()
            return True
        return False

    def flush(self) -> None:
        self.data["updatedAt"] = now_rfc3339()
        self._last_write = self.clock()
        if self.store is None:
            return
        body = report_json(self.data)
        try:
            self.store.put_bytes(self.key, body)
            self.writes += 1
        except Exception as exc:
            log.warning("could not write progress.json: %s", exc)


def write_termination_message(path: Path, data: dict) -> None:
    """One-line JSON summary for the pod's termination message (Kubernetes keeps 4 KiB)."""
    keys = ("state", "step", "totalSteps", "loss", "evalLoss", "lastCheckpoint", "bestCheckpoint",
            "attempt", "rank", "worldSize", "error")
    summary = {k: data.get(k) for k in keys}
    if summary.get("error"):
        summary["error"] = str(summary["error"])[:2000]
    try:
        Path(path).write_text(strictjson.dumps(summary, sort_keys=True) + "\n")
    except OSError:
        pass


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def flops_per_token(trainable: int, total: int) -> int:
    """4 x N + 2 x trainable (see module docstring)."""
    return 6 * trainable + 4 * (total - trainable)


def mfu(tokens_per_s: float, trainable: int, total: int, peak_flops: Optional[float],
        world: int = 1) -> Optional[float]:
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token(trainable, total) / (peak_flops * world)

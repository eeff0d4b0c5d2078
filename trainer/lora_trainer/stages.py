"""The stages after training: evaluation (gate) and export, glued to the colleague's modules.

`evaluation.evaluate(spec, base_dir, adapter_dir, eval_records, tokenizer, ...)` scores the best
complete checkpoint (lowest eval loss) against the base; `evaluation.write_eval_json` stores
eval.json whatever the verdict; `export.publish(...)` publishes only a passed adapter. A refused
adapter ends in state Rejected.

Fail closed: the stage modules are plain imports (a broken install fails at start, never skips a
stage), and `run_export` refuses to publish without a report whose gate passed (`NoVerdict`).
The checkpoint evaluated and published is the verified one with the lowest recorded held-out loss
(`best_checkpoint`), and it must carry this job's identity.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import checkpoint as ckpt
from . import evaluation, export, storage
from . import identity as ident
from . import model as modelmod
from .config import Job, RuntimeConfig
from .progress import ProgressWriter

log = logging.getLogger(__name__)


class NoVerdict(RuntimeError):
    """Evaluation produced no gate verdict: nothing may be published."""


@dataclass
class StageContext:
    job: Job
    runtime: RuntimeConfig
    base_dir: Path  # verified base model files
    adapter_dir: Path  # PEFT adapter to evaluate / publish
    checkpoint: ckpt.CheckpointRef  # where that adapter came from
    heldout_jsonl: Path  # held-out records (dataset format), one JSON object per line
    output_store: Any  # storage.Store of spec.output.uri
    output_key: str  # key prefix of spec.output.uri in output_store
    progress: Optional[ProgressWriter] = None
    max_seq_length: Optional[int] = None  # the training length (auto = p95)
    dataset_hashes: dict = field(default_factory=dict)
    identity: Optional[ident.JobIdentity] = None
    checkpoint_eval_loss: Optional[float] = None  # the held-out loss training recorded for it

    @property
    def spec(self):
        return self.job.spec

    def eval_records(self) -> list[dict]:
        lines = self.heldout_jsonl.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def best_checkpoint(store, output_key: str, mine: ident.JobIdentity, dest: Path) -> tuple[ckpt.CheckpointRef, dict]:
    """Download the verified complete checkpoint with the lowest recorded eval loss to `dest`.

    Candidates are ranked by the `evalLoss` in their manifests (newest first among equals, those
    without a finite loss last); one that fails verification is skipped with a log line.
    Returns (ref, manifest). ForeignPrefix when a checkpoint is another job's.
    """
    where = store.describe(output_key)
    ranked = []
    for ref in ckpt.complete_newest_first(store, output_key):
        try:
            manifest = ckpt.read_manifest(store, ref)
        except ckpt.CheckpointInvalid as exc:
            log.error("skipping %s: %s", store.describe(ref.key), exc)
            continue
        ident.check_owner(mine, ident.JobIdentity.from_dict(manifest), f"checkpoint step-{ref.step}", where)
        loss = manifest.get("evalLoss")
        ranked.append((0 if isinstance(loss, (int, float)) else 1, loss or 0.0, -ref.step, ref, manifest))
    for *_, ref, manifest in sorted(ranked, key=lambda r: r[:3]):
        try:
            ckpt.fetch_verified(store, ref, dest, manifest, only="adapter/")
            return ref, manifest
        except ckpt.CheckpointInvalid as exc:
            log.error("skipping %s: %s", store.describe(ref.key), exc)
    raise FileNotFoundError(f"no complete, verified checkpoint under {store.describe(output_key)}")


def build_context(job: Job, rt: RuntimeConfig, progress=None, base_dir=None, prepared=None) -> StageContext:
    """Everything evaluate/export need, from storage (usable without a training process)."""
    skw = rt.store_kwargs(job)
    store, key = storage.open_uri(job.spec.output.uri, **skw)
    if base_dir is None:
        b = job.spec.base_model
        base_dir = modelmod.resolve_base(b.uri, b.revision, rt.work_dir, **skw)
    if prepared is None:
        from .prepare import prepare_data

        tok = modelmod.load_tokenizer(base_dir)
        prepared = prepare_data(job.spec.dataset, tok, rt.work_dir, job.spec.training.seed, **skw)
    mine = ident.of_job(job, prepared.dataset_hashes)
    local = rt.work_dir / "best"
    ref, manifest = best_checkpoint(store, key, mine, local)
    log.info("evaluating %s (held-out loss %s)", store.describe(ref.key), manifest.get("evalLoss"))
    return StageContext(job, rt, Path(base_dir), local / "adapter", ref, prepared.eval_jsonl, store, key,
                        progress, prepared.max_seq_length, dict(prepared.dataset_hashes), mine,
                        manifest.get("evalLoss"))


def run_evaluate(ctx: StageContext):
    """(report, passed); eval.json is written whatever the verdict."""
    mod = evaluation
    if ctx.progress:
        ctx.progress.update(state="Evaluating")
    spec = ctx.spec
    regression = None
    if spec.evaluation.regression_dataset is not None:
        regression, hashes = mod.load_regression_records(spec, ctx.runtime.work_dir,
                                                         **ctx.runtime.store_kwargs(ctx.job))
        ctx.dataset_hashes.update(hashes)
    tokenizer = modelmod.load_tokenizer(ctx.base_dir)
    report = mod.evaluate(spec, ctx.base_dir, ctx.adapter_dir, ctx.eval_records(), tokenizer,
                          regression_records=regression, max_seq_length=ctx.max_seq_length,
                          checkpoint_step=ctx.checkpoint.step)
    mod.write_eval_json(ctx.output_store, ctx.output_key, report)
    if ctx.progress:
        ctx.progress.update(eval=mod.progress_eval(report), datasetHashes=ctx.dataset_hashes)
    return report, bool(report.gate.passed)


def require_verdict(report) -> None:
    """NoVerdict unless `report` carries a gate verdict that passed (fail closed)."""
    gate = getattr(report, "gate", None)
    if gate is None or getattr(gate, "passed", None) is not True:
        raise NoVerdict("evaluation returned no passed gate verdict; nothing is published")


def run_export(ctx: StageContext, report) -> dict:
    """Publish a passed adapter; returns the artifact URIs."""
    require_verdict(report)
    mod = export
    if ctx.progress:
        ctx.progress.update(state="Exporting")
    tokenizer = modelmod.load_tokenizer(ctx.base_dir)
    uris = mod.publish(ctx.spec, ctx.output_store, ctx.output_key, ctx.base_dir, ctx.adapter_dir,
                       report, tokenizer, eval_records=ctx.eval_records(),
                       work_dir=ctx.runtime.work_dir, run_id=f"{ctx.job.name}-a{ctx.runtime.attempt}",
                       dataset_hashes=ctx.dataset_hashes, max_seq_length=ctx.max_seq_length,
                       identity=ctx.identity, checkpoint_eval_loss=ctx.checkpoint_eval_loss)
    if ctx.progress:
        ctx.progress.update(artifacts=uris)
    return uris

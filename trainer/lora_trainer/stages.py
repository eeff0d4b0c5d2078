"""The stages after training: evaluation (gate) and export, glued to the colleague's modules.

`evaluation.evaluate(spec, base_dir, adapter_dir, eval_records, tokenizer, ...)` scores the best
complete checkpoint (lowest eval loss) against the base; `evaluation.write_eval_json` stores
eval.json whatever the verdict; `export.publish(...)` publishes only a passed adapter. A refused
adapter ends in state Rejected. A stage whose module is not importable is skipped with a log line.
"""

from __future__ import annotations

import importlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import checkpoint as ckpt
from . import model as modelmod
from . import storage
from .config import Job, RuntimeConfig
from .progress import ProgressWriter

log = logging.getLogger(__name__)


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
    data_stats: dict = field(default_factory=dict)  # dropped / truncated / skipped counts

    @property
    def spec(self):
        return self.job.spec

    def eval_records(self) -> list[dict]:
        lines = self.heldout_jsonl.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def best_checkpoint(store, output_key: str) -> ckpt.CheckpointRef:
    """The complete checkpoint with the lowest eval loss (the latest one's record decides)."""
    latest = ckpt.latest_complete(store, output_key)
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint under {store.describe(output_key)}")
    state = json.loads(store.get_bytes(storage.join(latest.key, "state.json")))
    best = state.get("bestStep")
    for ref in ckpt.list_checkpoints(store, output_key):
        if ref.complete and ref.step == best:
            return ref
    return latest


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
    ref = best_checkpoint(store, key)
    local = rt.work_dir / "best"
    shutil.rmtree(local, ignore_errors=True)
    storage.download_prefix(store, storage.join(ref.key, "adapter"), local)
    return StageContext(job, rt, Path(base_dir), local, ref, prepared.eval_jsonl, store, key,
                        progress, prepared.max_seq_length, dict(prepared.dataset_hashes),
                        prepared.stats())


def _load(name: str):
    try:
        return importlib.import_module(f"lora_trainer.{name}")
    except ImportError as exc:
        log.warning("stage module lora_trainer.%s not available (%s); skipping it", name, exc)
        return None


def run_evaluate(ctx: StageContext):
    """(report, passed); eval.json is written whatever the verdict. No module: (None, True)."""
    mod = _load("evaluation")
    if mod is None:
        return None, True
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


def run_export(ctx: StageContext, report) -> Optional[dict]:
    """Publish a passed adapter; returns the artifact URIs (None when export is unavailable)."""
    mod = _load("export")
    if mod is None or report is None:
        return None
    if ctx.progress:
        ctx.progress.update(state="Exporting")
    tokenizer = modelmod.load_tokenizer(ctx.base_dir)
    uris = mod.publish(ctx.spec, ctx.output_store, ctx.output_key, ctx.base_dir, ctx.adapter_dir,
                       report, tokenizer, eval_records=ctx.eval_records(),
                       work_dir=ctx.runtime.work_dir, run_id=f"{ctx.job.name}-a{ctx.runtime.attempt}",
                       dataset_hashes=ctx.dataset_hashes, max_seq_length=ctx.max_seq_length,
                       data_stats=ctx.data_stats)
    if ctx.progress:
        ctx.progress.update(artifacts=uris)
    return uris

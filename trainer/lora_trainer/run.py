"""The run order of one job, in one screen: prepare -> train -> evaluate -> gate -> export.

`run` is `lora-trainer run` (all stages) and `lora-trainer train` (prepare and train); it reads as
the list of stages, each a plain call. `inspect_job` is `lora-trainer inspect`: prepare alone.
`run_after_training` is `lora-trainer evaluate|export` on the checkpoints of a finished run.
What each stage reads and writes:

  prepare   preflight (output writable, inputs readable, the prefix is this job's: io.preflight,
            io.identity) before anything is downloaded; reads the pinned base model and the dataset
            files (verified, hashed); resumes from the newest COMPLETE checkpoint that verifies
            (digests, job identity, no code run); writes only progress.json (state Preparing).
  train     writes checkpoints/step-N/ (COMPLETE manifest last, with eval loss and job identity;
            a new best eval loss forces one), metrics.jsonl, progress.json.
  evaluate  reads the verified checkpoint with the lowest recorded eval loss and the held-out
            records; writes eval.json, whatever the verdict. After training in this process it
            scores the trained model with that checkpoint's adapter loaded (evaluation.in_memory);
            the base's results come from cache/ when a verified entry matches (evaluation.base_cache).
  gate      pure: spec.evaluation + the measured metrics -> verdict (evaluation.gate); a refused
            adapter ends in state Rejected and nothing is published. No verdict, nothing published.
  export    writes published/<release>/ and, last, lora-metadata.json pointing at it (io.release).

Only rank 0 evaluates and exports. Errors propagate to `__main__`, which maps them to exit codes;
on the way out `_attempt` writes the final state to progress.json and the termination message.
SIGTERM sets a flag while training (checkpoint at the next step) and raises `Preempted` at once
during evaluation and export (the published set stays as it was; the next attempt redoes them
from the final checkpoint without retraining).
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lora_operator.api import SpecError

from . import export as exporting
from .config import Job, RuntimeConfig
from .data.prepare import Prepared, prepare_data
from .data.records import DataError
from .data.token_cache import token_cache
from .evaluation import in_memory, scoring
from .evaluation.base_cache import base_cache
from .io import identity as ident
from .io import storage
from .io.cache import places
from .io.identity import ForeignPrefix
from .io.preflight import PreflightError
from .io.progress import ProgressWriter, write_termination_message
from .model import checkpoint as ckpt
from .model.loading import RevisionError, load_tokenizer, resolve_base
from .recipe import Diverged, LoRARecipe, Preempted

log = logging.getLogger(__name__)

RUN = frozenset({"train", "evaluate", "export"})
TRAIN = frozenset({"train"})

# The input is wrong (spec, data, base revision, another job's prefix, unusable storage, a key
# that escapes its store): retrying cannot help (exit code 2).
INVALID_INPUT = (DataError, SpecError, RevisionError, ForeignPrefix, PreflightError, storage.UnsafeKey)


class NoVerdict(RuntimeError):
    """Evaluation produced no passed gate verdict: nothing may be published."""


# Failures reported by their message alone; anything else is a bug, reported with its type.
KNOWN_FAILURES = (*INVALID_INPUT, storage.StorageError, Diverged, NoVerdict)


def run(job: Job, rt: RuntimeConfig, stages: frozenset[str] = RUN) -> str:
    """Run the stages in order; returns the final state (Succeeded or Rejected)."""
    with _attempt(job, rt) as recipe:
        recipe.setup()  # prepare: verified base, data, LoRA model; resume from a checkpoint
        if "train" in stages:
            recipe.train()  # train: checkpoints; raises Preempted on SIGTERM
        if not recipe.rank0 or "evaluate" not in stages:
            return _finish(recipe, "Succeeded")
        signal.signal(signal.SIGTERM, _raise_preempted)  # no step boundary to wait for any more
        ctx = _context_after_training(recipe)
        report = evaluate(ctx)  # evaluate: eval.json, whatever the verdict
        if not gate_passed(report):  # gate
            return _finish(recipe, "Rejected")
        if "export" in stages:
            export(ctx, report)  # export: the published set, metadata last
        return _finish(recipe, "Succeeded")


def run_after_training(job: Job, rt: RuntimeConfig, publish: bool):
    """`lora-trainer evaluate|export`: evaluate -> gate -> export (when `publish`) on the best
    checkpoint of a finished run, without a training process or progress.json.
    Returns (report, artifact URIs or None)."""
    ctx = build_context(job, rt)
    report = evaluate(ctx)
    uris = export(ctx, report) if publish and gate_passed(report) else None
    return report, uris


def inspect_job(job: Job, rt: RuntimeConfig, *, limit: Optional[int], as_json: bool, out=None) -> dict:
    """`lora-trainer inspect`: the prepare stage alone (same data path as training), then a report
    of every training example with its trained tokens marked (data.inspection). Returns the summary."""
    import sys

    from .data.inspection import write_report
    from .data.prepare import inspection_items

    skw = rt.store_kwargs(job)
    b = job.spec.base_model
    tokenizer = load_tokenizer(resolve_base(b.uri, b.revision, rt.work_dir, **skw))
    prepared = prepare_data(job.spec.dataset, tokenizer, rt.work_dir, job.spec.training.seed,
                            cache=token_cache(**places(rt.work_dir)), **skw)  # inspect writes no output
    summary = {"examples": prepared.n_train, "dropped": len(prepared.drops), "truncated": prepared.truncated,
               "maxSeqLength": prepared.max_seq_length, "p95": prepared.p95}
    write_report(tokenizer, inspection_items(prepared), summary, as_json=as_json, limit=limit,
                 out=out or sys.stdout)
    return summary


def error_message(exc: BaseException) -> str:
    """The one-line error of progress.json, the termination message and the log."""
    return str(exc) if isinstance(exc, KNOWN_FAILURES) else f"{type(exc).__name__}: {exc}"


# --- the attempt ----------------------------------------------------------------------------------


@contextmanager
def _attempt(job: Job, rt: RuntimeConfig) -> Iterator[LoRARecipe]:
    """The recipe of this attempt. SIGTERM only sets a flag (the loop checkpoints at the next step
    boundary); on the way out the final state and the termination message are always written."""
    recipe = LoRARecipe(job, rt)
    previous = signal.signal(signal.SIGTERM, recipe.request_stop)
    error = None
    try:
        yield recipe
    except Preempted:
        recipe.progress.update(state="Preempted", force=True)  # only raised after setup opened it
        raise
    except Exception as exc:
        error = error_message(exc)
        if hasattr(recipe, "progress"):  # else setup failed before the output was opened
            recipe.progress.update(state="Failed", error=error, force=True)
        raise
    finally:
        acc = getattr(recipe, "acc", None)
        if acc is None or acc.is_local_main_process:  # one summary per pod, with its rank
            data = recipe.progress.data if hasattr(recipe, "progress") else {"state": "Failed",
                                                                              "error": error}
            write_termination_message(rt.termination_log, data)
        recipe.cleanup()
        signal.signal(signal.SIGTERM, previous)


def _raise_preempted(*_):
    raise Preempted("stopped by SIGTERM during evaluation or export; the published set is unchanged")


def _finish(recipe: LoRARecipe, state: str) -> str:
    recipe.progress.update(state=state, force=True)
    return state


# --- the stages after training --------------------------------------------------------------------


@dataclass
class StageContext:
    """Everything evaluate and export need, whether training ran in this process or not."""

    job: Job
    runtime: RuntimeConfig
    base_dir: Path  # verified base model files
    adapter_dir: Path  # PEFT adapter to evaluate / publish
    checkpoint: ckpt.CheckpointRef  # where that adapter came from
    heldout_jsonl: Path  # held-out records (dataset format), one JSON object per line
    output_store: storage.Store  # the store of spec.output.uri
    output_key: str  # key prefix of spec.output.uri in output_store
    progress: Optional[ProgressWriter] = None
    max_seq_length: Optional[int] = None  # the training length (auto = p95)
    dataset_hashes: dict = field(default_factory=dict)
    data_stats: dict = field(default_factory=dict)  # dropped / truncated / skipped counts
    identity: Optional[ident.JobIdentity] = None  # recorded with what is published
    checkpoint_eval_loss: Optional[float] = None  # the held-out loss training recorded for it
    world_size: int = 1  # training processes of the run that wrote the checkpoint
    model: Any = None  # the trained PeftModel with this adapter loaded (evaluation.in_memory), or None

    @property
    def spec(self):
        return self.job.spec

    def eval_records(self) -> list[dict]:
        lines = self.heldout_jsonl.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]


def best_checkpoint(store: storage.Store, output_key: str, mine: ident.JobIdentity,
                    dest: Path) -> tuple[ckpt.CheckpointRef, dict]:
    """Download the adapter of the verified complete checkpoint with the lowest recorded eval loss.

    Candidates are ranked by the `evalLoss` in their manifests (newer first among equals, those
    without a finite loss last); one that fails verification is skipped with a log line.
    Returns (ref, manifest); ForeignPrefix when a checkpoint is another job's.
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
    raise FileNotFoundError(f"no complete, verified checkpoint under {where}")


def build_context(job: Job, rt: RuntimeConfig, progress: Optional[ProgressWriter] = None,
                  base_dir: Optional[Path] = None, prepared: Optional[Prepared] = None) -> StageContext:
    """The context from storage; `base_dir` and `prepared` are reused when training just ran."""
    skw = rt.store_kwargs(job)
    store, key = storage.open_uri(job.spec.output.uri, **skw)
    if base_dir is None:
        b = job.spec.base_model
        base_dir = resolve_base(b.uri, b.revision, rt.work_dir, **skw)
    if prepared is None:
        tok = load_tokenizer(base_dir)
        cache = token_cache(**places(rt.work_dir, store, key), write_remote=True)
        prepared = prepare_data(job.spec.dataset, tok, rt.work_dir, job.spec.training.seed, cache=cache, **skw)
    mine = ident.of_job(job, prepared.dataset_hashes)
    local = rt.work_dir / "best"
    ref, manifest = best_checkpoint(store, key, mine, local)
    log.info("evaluating %s (held-out loss %s)", store.describe(ref.key), manifest.get("evalLoss"))
    return StageContext(job, rt, Path(base_dir), local / "adapter", ref, prepared.eval_jsonl, store, key,
                        progress, prepared.max_seq_length, dict(prepared.dataset_hashes),
                        data_stats=prepared.stats(), identity=mine,
                        checkpoint_eval_loss=manifest.get("evalLoss"),
                        world_size=int(manifest.get("worldSize") or 1))


def _context_after_training(recipe: LoRARecipe) -> StageContext:
    # The trained model is evaluated in place (evaluation.in_memory); the optimizer goes now.
    trained = recipe.acc.unwrap_model(recipe.model, keep_fp32_wrapper=False)
    del recipe.model, recipe.optimizer
    gc.collect()
    ctx = build_context(recipe.job, recipe.rt, recipe.progress, recipe.base_dir, recipe.data)
    ctx.model = in_memory.adopt(trained, ctx.adapter_dir, ctx.spec)
    return ctx


def evaluate(ctx: StageContext) -> scoring.EvalReport:
    """Score base and adapter and apply the gate; eval.json is written whatever the verdict."""
    if ctx.progress:
        ctx.progress.update(state="Evaluating")
    spec = ctx.spec
    regression = None
    if spec.evaluation.regression_dataset is not None:
        regression, hashes = scoring.load_regression_records(spec, ctx.runtime.work_dir,
                                                             **ctx.runtime.store_kwargs(ctx.job))
        ctx.dataset_hashes.update(hashes)
    tokenizer = load_tokenizer(ctx.base_dir)
    cache = base_cache(**places(ctx.runtime.work_dir, ctx.output_store, ctx.output_key),
                       write_remote=True)  # only rank 0 evaluates
    report = scoring.evaluate(spec, ctx.base_dir, ctx.adapter_dir, ctx.eval_records(), tokenizer,
                              regression_records=regression, max_seq_length=ctx.max_seq_length,
                              checkpoint_step=ctx.checkpoint.step, champion_dir=_fetch_champion(ctx),
                              champion=ctx.job.champion, model=ctx.model, base_cache=cache)
    ctx.model = None  # export loads what it needs; free the trained model first
    gc.collect()
    scoring.write_eval_json(ctx.output_store, ctx.output_key, report)
    if ctx.progress:
        ctx.progress.update(eval=scoring.progress_eval(report), datasetHashes=ctx.dataset_hashes)
    return report


def require_verdict(report) -> None:
    """NoVerdict unless `report` carries a gate verdict that passed (fail closed)."""
    gate = getattr(report, "gate", None)
    if gate is None or getattr(gate, "passed", None) is not True:
        raise NoVerdict("evaluation returned no passed gate verdict; nothing is published")


CHAMPION_FILES = ("adapter_config.json", "adapter_model.safetensors")  # all PEFT needs; no pickles


def _fetch_champion(ctx: StageContext) -> Optional[Path]:
    """Download the champion adapter the operator resolved (spec.evaluation.gate.champion); None
    when the gate names no channel or the channel serves nothing comparable. Only the config and
    the safetensors weights are fetched, so nothing in that prefix is ever unpickled. A champion
    that was resolved but cannot be read fails the attempt: no gate on missing evidence."""
    adapter = (ctx.job.champion or {}).get("adapter")
    if ctx.spec.evaluation.gate.champion is None or not adapter:
        return None
    store, key = storage.open_uri(adapter, **ctx.runtime.store_kwargs(ctx.job))
    local = ctx.runtime.work_dir / "champion"
    shutil.rmtree(local, ignore_errors=True)
    local.mkdir(parents=True)
    for name in CHAMPION_FILES:
        (local / name).write_bytes(store.get_bytes(storage.join(key, name)))
    return local


def gate_passed(report: scoring.EvalReport) -> bool:
    """The gate's verdict (evaluation.gate.apply_gate, computed by evaluate); a refusal is logged.
    No verdict at all is NoVerdict, never a pass."""
    if getattr(report, "gate", None) is None:
        raise NoVerdict("evaluation returned no gate verdict; nothing is published")
    if not report.gate.passed:
        log.warning("the evaluation gate refused the adapter: %s; not publishing",
                    "; ".join(report.gate.reasons))
    return bool(report.gate.passed)


def export(ctx: StageContext, report: scoring.EvalReport) -> dict:
    """Publish a passed adapter; returns the artifact URIs."""
    require_verdict(report)
    if ctx.progress:
        ctx.progress.update(state="Exporting")
    tokenizer = load_tokenizer(ctx.base_dir)
    uris = exporting.publish(ctx.spec, ctx.output_store, ctx.output_key, ctx.base_dir,
                             ctx.adapter_dir, report, tokenizer, eval_records=ctx.eval_records(),
                             work_dir=ctx.runtime.work_dir,
                             run_id=f"{ctx.job.name}-a{ctx.runtime.attempt}",
                             dataset_hashes=ctx.dataset_hashes, max_seq_length=ctx.max_seq_length,
                             data_stats=ctx.data_stats, identity=ctx.identity,
                             checkpoint_eval_loss=ctx.checkpoint_eval_loss, world_size=ctx.world_size)
    if ctx.progress:
        ctx.progress.update(artifacts=uris)
    return uris

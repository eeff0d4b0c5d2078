"""The LoRA/QLoRA training recipe: setup() -> train() -> cleanup(), on local paths.

Storage I/O goes through `storage` (downloads in setup, checkpoint uploads, progress.json), and
only rank 0 writes. The loss of an optimizer step is the mean over all target tokens of all its
micro-batches on all ranks (token counts are all-reduced before the backward passes), so the
result does not depend on how rows are split into micro-batches or processes.

Resume is exact: data order is a pure function of (seed, epoch, step) and the checkpoint holds the
adapter, optimizer, scheduler and RNG states, so a resumed run replays the same batches and
dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import shutil
import signal
import time
from contextlib import nullcontext
from datetime import timedelta
from typing import Optional

import torch

from .config import Job, RuntimeConfig
from .data.packing import Schedule, collate_packed, collate_padded
from .data.prepare import prepare_data
from .data.token_cache import token_cache
from .io import identity as ident
from .io import preflight, release, storage, strictjson
from .io.cache import places
from .io.progress import ProgressWriter, mfu, peak_memory_bytes
from .io.reporting import StepReporter
from .model import checkpoint as ckpt
from .model import loading
from .model.attention import PACKED_SDPA
from .model.lora import add_lora, param_counts
from .model.loss import sum_ce
from .model.targets import check_targets
from .model.verify import verify_files

log = logging.getLogger(__name__)


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved (if training had started)."""


class Diverged(RuntimeError):
    """The loss stopped being a finite number; the step was not applied."""


MIXED = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}


def adamw(params, **kw) -> torch.optim.AdamW:
    """AdamW with the fused kernel where the device has one (CPU and CUDA): one call per step
    instead of a dozen small ops per LoRA matrix (0.8 ms instead of 3.6 ms for 56 matrices here)."""
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, **kw)


class LoRARecipe:
    def __init__(self, job: Job, runtime: RuntimeConfig):
        self.job, self.spec, self.rt = job, job.spec, runtime
        self.step = 0
        self.best_eval: Optional[float] = None
        self.best_step: Optional[int] = None
        self.last_eval: Optional[tuple[int, float]] = None
        self.stop_requested = False
        self.history: list[dict] = []  # per-step loss, for tests and the summary
        self.warnings: list[str] = []  # reported before training (progress.json)

    # --- setup ------------------------------------------------------------------------------------

    def request_stop(self, *_):
        self.stop_requested = True

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import InitProcessGroupKwargs, set_seed

        mixed = MIXED[self.spec.compute_dtype]
        cpu = not torch.cuda.is_available()
        if cpu and mixed == "fp16":
            mixed = "no"  # fp16 autocast is a GPU feature
        # A lost peer must end the attempt, not hang it: every collective gives up after this.
        timeout = self.rt.collective_timeout_s
        handlers = [InitProcessGroupKwargs(timeout=timedelta(seconds=timeout))] if timeout else []
        self.acc = Accelerator(mixed_precision=mixed, cpu=cpu, kwargs_handlers=handlers)
        self.rank0 = self.acc.is_main_process
        log.info("rank %d of world size %d (local rank %d, %s)", self.acc.process_index,
                 self.acc.num_processes, self.acc.local_process_index, self.acc.distributed_type)
        set_seed(self.spec.training.seed)
        self.rt.work_dir.mkdir(parents=True, exist_ok=True)
        skw = self.rt.store_kwargs(self.job)
        self.out_store, self.out_key = storage.open_uri(self.spec.output.uri, **skw)
        self.identity = ident.of_job(self.job)  # names only until the dataset hashes are known
        if self.rank0:  # before any progress.json write, base download or GPU time
            preflight.check_job(self.spec, self.out_store, self.out_key, **skw)
            self.check_prefix_owner()
        self.progress = ProgressWriter(self.out_store if self.rank0 else None,
                                       storage.join(self.out_key, "progress.json"),
                                       self.rt.progress_interval_s, self.rt.attempt, job_uid=self.job.uid)
        self.progress.update(state="Preparing", rank=self.acc.process_index,
                             worldSize=self.acc.num_processes, force=True)
        base = self.spec.base_model
        with self.acc.local_main_process_first():
            self.base_dir = loading.resolve_base(base.uri, base.revision, self.rt.work_dir, **skw)
        self.tokenizer = loading.load_tokenizer(self.base_dir)
        with self.acc.local_main_process_first():
            cache = token_cache(**places(self.rt.work_dir, self.out_store, self.out_key), write_remote=self.rank0)
            self.data = prepare_data(self.spec.dataset, self.tokenizer, self.rt.work_dir,
                                     self.spec.training.seed, cache=cache, **skw)
        log.info("data: %s", self.data.summary())
        self.identity = ident.of_job(self.job, self.data.dataset_hashes)
        if self.rank0:
            self.check_prefix_owner()
        self._setup_model()
        self._setup_schedule()
        self.progress.update(datasetHashes=self.data.dataset_hashes, **self.data.stats(),
                             trainableParams=self.trainable,
                             trainableFraction=self.trainable / self.total_params,
                             totalSteps=self.total_steps, warnings=self.warnings)
        self._maybe_resume()
        if self.stop_requested:
            raise Preempted("stopped by SIGTERM before training started")

    def _setup_model(self) -> None:
        s = self.spec
        checkpointing = loading.gradient_checkpointing(s.training.gradient_checkpointing, s.quantization)
        base = loading.load_base(self.base_dir, s.quantization, s.double_quant, s.compute_dtype,
                                 self.acc.device, attn=s.attn_implementation, checkpointing=checkpointing)
        coverage = check_targets(base, s.lora.target_modules)
        self.warnings = [w for w in [coverage.warning()] if w]
        for warning in self.warnings:
            log.warning(warning)
        self.per_example_attention = base.config._attn_implementation == PACKED_SDPA
        log.info("attention %s, gradient checkpointing %s", base.config._attn_implementation,
                 "on" if checkpointing else "off")
        model = add_lora(base, s.lora.rank, s.lora.effective_alpha, s.lora.dropout,
                                  s.lora.target_modules)
        self.trainable, self.total_params = param_counts(model)
        log.info("trainable params: %d of %d (%.4f%%)", self.trainable, self.total_params,
                 100 * self.trainable / self.total_params)
        t = s.training
        self.trained_params = [p for p in model.parameters() if p.requires_grad]  # clipped each step
        optimizer = adamw(self.trained_params, lr=t.learning_rate, weight_decay=t.weight_decay)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)

    def _setup_schedule(self) -> None:
        from transformers import get_scheduler

        t = self.spec.training
        self.schedule = Schedule(len(self.data.train_rows), t.batch_size,
                                 t.gradient_accumulation_steps, self.acc.num_processes, t.seed)
        spe = self.schedule.steps_per_epoch
        self.total_steps = t.max_steps or t.epochs * spe
        rows = t.batch_size * t.gradient_accumulation_steps * self.acc.num_processes
        row_len = self.data.row_len or self.data.max_seq_length
        log.info("an optimizer step takes %d rows (batchSize %d x gradientAccumulationSteps %d x %d "
                 "processes) of up to %d tokens: up to %d tokens per step, %d steps per epoch",
                 rows, t.batch_size, t.gradient_accumulation_steps, self.acc.num_processes, row_len,
                 rows * row_len, spe)
        name = "constant_with_warmup" if t.lr_scheduler == "constant" else t.lr_scheduler
        # Not passed through accelerate.prepare: we step it exactly once per optimizer step.
        self.scheduler = get_scheduler(name, self.optimizer.optimizer if hasattr(
            self.optimizer, "optimizer") else self.optimizer,
            num_warmup_steps=math.ceil(t.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps)

    def check_prefix_owner(self) -> None:
        """ForeignPrefix unless the newest checkpoint and the published set are this job's."""
        where = self.out_store.describe(self.out_key)
        for ref in ckpt.complete_newest_first(self.out_store, self.out_key)[:1]:
            try:
                found = ident.JobIdentity.from_dict(ckpt.read_manifest(self.out_store, ref))
            except ckpt.CheckpointInvalid:
                continue  # unreadable: resume skips it and says so
            ident.check_owner(self.identity, found, f"checkpoint step-{ref.step}", where)
        release.check_owner(self.out_store, self.out_key, self.identity)

    def _maybe_resume(self) -> None:
        """Resume from the newest checkpoint that verifies; skip (and report) the ones that do not."""
        rejected = []
        for ref in ckpt.complete_newest_first(self.out_store, self.out_key):
            try:
                state = self._resume_from(ref)
            except ckpt.CheckpointInvalid as exc:
                log.error("not resuming from %s: %s", self.out_store.describe(ref.key), exc)
                rejected.append({"step": ref.step, "reason": str(exc)[:500]})
                continue
            self._restore_counters(state, ref, rejected)
            return
        if rejected:
            log.warning("no checkpoint verified; training from step 0")
            self.progress.update(rejectedCheckpoints=rejected, force=True)

    def _resume_from(self, ref) -> dict:
        manifest = ckpt.read_manifest(self.out_store, ref)
        ident.check_owner(self.identity, ident.JobIdentity.from_dict(manifest), f"checkpoint step-{ref.step}",
                          self.out_store.describe(self.out_key))
        local = self.rt.work_dir / "resume" / f"step-{ref.step}"
        with self.acc.local_main_process_first():
            if self.acc.is_local_main_process:  # one download per node; no raise between barriers
                try:
                    ckpt.fetch_verified(self.out_store, ref, local, manifest)
                except ckpt.CheckpointInvalid:
                    pass  # every rank finds the same fault just below
        verify_files(local, manifest, self.out_store.describe(ref.key))
        model = self.acc.unwrap_model(self.model)
        before = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
        where = self.out_store.describe(ref.key)
        try:
            state = ckpt.load_local(local, model, self.optimizer, self.scheduler, where)
            rank = self.acc.process_index
            if not ckpt.restore_rng(local, rank, where):  # a checkpoint written by fewer ranks
                torch.manual_seed(self.spec.training.seed + rank + state["step"])
            return state
        except ckpt.CheckpointInvalid:
            model.load_state_dict(before, strict=False)  # nothing of a rejected checkpoint stays
            raise

    def _restore_counters(self, state: dict, ref, rejected: list) -> None:
        self.step = state["step"]
        self.best_eval, self.best_step = state.get("bestEvalLoss"), state.get("bestStep")
        self.history = state.get("history", [])
        log.info("resumed from %s at step %d", self.out_store.describe(ref.key), self.step)
        steps = {r.step for r in ckpt.list_checkpoints(self.out_store, self.out_key) if r.complete}
        best = self._ckpt_uri(self.best_step) if self.best_step in steps else None
        self.progress.update(step=self.step, lastCheckpoint=self._ckpt_uri(ref.step), bestCheckpoint=best,
                             bestEvalLoss=self.best_eval if best else None,
                             rejectedCheckpoints=rejected or None)

    # --- training ---------------------------------------------------------------------------------

    def _batch(self, rows):
        if self.data.row_len:  # without the padding columns all rows end with
            return collate_packed(rows, self.data.row_len, self.tokenizer.pad_token_id).trimmed()
        return collate_padded(rows, self.tokenizer.pad_token_id)

    def _sum_ce(self, batch, model=None) -> torch.Tensor:
        """Summed CE over the batch's trained tokens, without full-row logits (see loss.py)."""
        batch = batch.to(self.acc.device)
        inputs = batch.model_inputs(segments=self.per_example_attention)
        with self.acc.autocast():
            return sum_ce(model if model is not None else self.model, inputs, batch.labels)

    def _all_sum(self, value: float) -> float:
        if self.acc.num_processes == 1:
            return float(value)
        return self._all_sums(torch.tensor([float(value)], device=self.acc.device, dtype=torch.float64))[0]

    def _all_sums(self, values: torch.Tensor) -> list[float]:
        """Sums over ranks of a 1-d float64 tensor on the device: one host sync, one collective."""
        if self.acc.num_processes > 1:
            values = self.acc.reduce(values, reduction="sum")
        return values.tolist()

    def train_step(self) -> dict:
        """One optimizer step over `accum` micro-batches; returns its metrics.

        The summed loss stays on the device until every backward pass is queued, so a step costs
        one host sync (plus the token-count all-reduce that scales the loss), not one per
        micro-batch."""
        epoch, in_epoch = divmod(self.step, self.schedule.steps_per_epoch)
        micro = self.schedule.micro_batches(epoch, in_epoch, self.acc.process_index)
        batches = [self._batch([self.data.train_rows[i] for i in idx]) for idx in micro]
        n_targets = self._all_sum(sum(b.n_targets for b in batches))
        scale = self.acc.num_processes / max(n_targets, 1.0)
        loss_sum = torch.zeros((), device=self.acc.device, dtype=torch.float64)
        for j, batch in enumerate(batches):
            sync = j == len(batches) - 1
            with nullcontext() if sync else self.acc.no_sync(self.model):
                ce = self._sum_ce(batch)
                self.acc.backward(ce * scale)
            loss_sum += ce.detach().to(torch.float64)
        tokens = float(sum(b.n_tokens for b in batches))
        loss_total, tokens = self._all_sums(torch.stack([loss_sum, loss_sum.new_tensor(tokens)]))
        loss = loss_total / max(n_targets, 1.0)
        if not math.isfinite(loss):  # every rank sees the same sum, so all stop together
            raise Diverged(f"non-finite loss ({loss}) at step {self.step + 1}: training diverged; the step "
                           "was not applied (lower training.learningRate, or check the data)")
        if self.spec.training.max_grad_norm > 0:
            self.acc.clip_grad_norm_(self.trained_params, self.spec.training.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": loss, "learningRate": lr, "tokens": tokens,
                "epoch": self.step / self.schedule.steps_per_epoch}

    def train(self) -> None:
        """Run to total_steps; raises Preempted after saving a checkpoint on SIGTERM."""
        self.progress.update(state="Training", step=self.step)
        reporter = StepReporter(self.total_steps, self.step, self.rt, enabled=self.rank0)
        self.model.train()
        t_cfg = self.spec.training
        while self.step < self.total_steps:
            t0 = time.perf_counter()
            m = self.train_step()
            elapsed = time.perf_counter() - t0
            self.history.append({"step": self.step, "loss": m["loss"]})
            eval_loss, new_best = None, False
            if self.step % t_cfg.eval_every_steps == 0 or self.step == self.total_steps:
                eval_loss = self.evaluate()
                self.history[-1]["evalLoss"] = eval_loss
                new_best = self.best_step == self.step
            self._report(reporter, m, elapsed, eval_loss)
            stop = self._all_sum(1.0 if self.stop_requested else 0.0) > 0
            due = self.step % t_cfg.checkpoint_every_steps == 0 or self.step == self.total_steps
            if due or stop or new_best:  # a new best is checkpointed: "best" always names one
                self.save_checkpoint()
            if stop:
                raise Preempted(f"stopped by SIGTERM at step {self.step}")
        reporter.close()

    def _report(self, reporter, m: dict, elapsed: float, eval_loss: Optional[float]) -> None:
        tps = reporter.tokens_per_second(m["tokens"], elapsed)
        fields = {
            "step": self.step, "epoch": round(m["epoch"], 4), "loss": m["loss"],
            "learningRate": m["learningRate"], "tokensPerSecond": round(tps, 1),
            "peakMemoryBytes": peak_memory_bytes(self.acc.device),
            "mfu": mfu(tps, self.trainable, self.total_params, self.rt.peak_flops,
                       self.acc.num_processes),
            "etaSeconds": reporter.eta_seconds(self.step),
        }
        if eval_loss is not None:
            fields["evalLoss"] = eval_loss
        reporter.log(fields)
        self.progress.update(**fields)

    def evaluate(self) -> float:
        """The held-out loss at this step; tracks the best one."""
        loss = self._heldout_loss()
        self.last_eval = (self.step, loss)
        if math.isfinite(loss) and (self.best_eval is None or loss < self.best_eval):
            self.best_eval, self.best_step = loss, self.step
        return loss

    @torch.no_grad()
    def _heldout_loss(self) -> float:
        """Mean cross-entropy over all target tokens of the held-out rows (all ranks).

        Ranks may hold different numbers of rows (rows[rank::world], and fitting may drop some),
        so forwards go through the unwrapped model: a DDP forward is a collective (it broadcasts
        buffers) and uneven calls would hang. Only the sums are all-reduced."""
        self.model.eval()
        model = self.acc.unwrap_model(self.model)
        rows = self.data.eval_rows
        rank, world, bs = self.acc.process_index, self.acc.num_processes, self.spec.training.batch_size
        mine = rows[rank::world]
        total, count = torch.zeros((), device=self.acc.device, dtype=torch.float64), 0
        for i in range(0, len(mine), bs):
            batch = self._batch(mine[i:i + bs])
            total += self._sum_ce(batch, model).to(torch.float64)  # no host sync per batch
            count += batch.n_targets
        self.model.train()
        total_sum, count_sum = self._all_sums(torch.stack([total, total.new_tensor(float(count))]))
        return total_sum / max(count_sum, 1.0)

    # --- checkpoints ------------------------------------------------------------------------------

    def _ckpt_uri(self, step: int) -> str:
        return self.out_store.describe(storage.join(self.out_key, "checkpoints", f"step-{step}"))

    def save_checkpoint(self) -> None:
        """Save and upload step-N (rank 0), prune old ones, then report it (never before COMPLETE)."""
        if self.last_eval is None or self.last_eval[0] != self.step:
            self.evaluate()  # every checkpoint carries its own eval loss, so "best" means something
        rng_states = self._rng_states()  # every rank's, so each resumes with its own
        if self.rank0:
            local = self.rt.work_dir / "checkpoints" / f"step-{self.step}"
            shutil.rmtree(local, ignore_errors=True)
            epoch, in_epoch = divmod(self.step, self.schedule.steps_per_epoch)
            state = {"step": self.step, "evalLoss": self.last_eval[1], "bestEvalLoss": self.best_eval,
                     "bestStep": self.best_step, "dataPosition": {"epoch": epoch, "stepInEpoch": in_epoch},
                     "totalSteps": self.total_steps, "history": self.history,
                     "worldSize": self.acc.num_processes}
            ckpt.save_local(local, self.acc.unwrap_model(self.model), self.optimizer,
                            self.scheduler, state, rng_states)
            ckpt.upload(self.out_store, local, self.out_key, self.step,
                        {"evalLoss": self.last_eval[1], "worldSize": self.acc.num_processes,
                         **self.identity.to_dict()})
            ckpt.prune(self.out_store, self.out_key, self.spec.training.keep_checkpoints,
                       self.best_step)
            shutil.rmtree(local, ignore_errors=True)
            self._write_metrics()
            self.progress.update(force=True, lastCheckpoint=self._ckpt_uri(self.step),
                                 bestCheckpoint=self._ckpt_uri(self.best_step),
                                 bestEvalLoss=self.best_eval)
        self.acc.wait_for_everyone()

    def _rng_states(self) -> list[dict]:
        """The RNG state of every rank, index = rank (all ranks take part; only rank 0 writes)."""
        mine = ckpt.rng_state()
        if self.acc.num_processes == 1:
            return [mine]
        states: list = [None] * self.acc.num_processes
        torch.distributed.all_gather_object(states, mine)
        return states

    def _write_metrics(self) -> None:
        """metrics.jsonl: one line per step (loss, and evalLoss where evaluated), for loss plots.

        Rewritten whole at each checkpoint from the history the checkpoint also carries, so a
        resumed attempt continues the same curve.
        """
        lines = "".join(strictjson.dumps(h) + "\n" for h in self.history)
        self.out_store.put_bytes(storage.join(self.out_key, "metrics.jsonl"), lines.encode())

    def cleanup(self) -> None:
        from accelerate.state import AcceleratorState

        if hasattr(self, "acc"):
            self.acc.end_training()
            if self.acc.num_processes > 1 and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        AcceleratorState._reset_state(True)  # a later recipe in this process starts afresh


def install_sigterm(recipe: LoRARecipe):
    """SIGTERM only sets a flag; the loop checkpoints at the next step boundary."""
    return signal.signal(signal.SIGTERM, recipe.request_stop)

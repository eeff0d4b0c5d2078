"""Evaluation of the base model and the adapter on the same held-out data, and the gate verdict.

Entry points (`run.evaluate` calls these; nothing here does storage I/O except
`write_eval_json` and `load_regression_records`):

    report = evaluate(spec, base_dir, adapter_dir, eval_records, tokenizer,
                      regression_records=None, max_seq_length=None, checkpoint_step=None,
                      champion_dir=None, champion=None, model=None, base_cache=None)
    write_eval_json(store, output_key, report)        # <output>/eval.json, always (also when Rejected)
    progress_eval(report)                             # the dict for progress.json's `eval` key
    report.gate.passed / report.gate.reasons          # publish only when passed, else state Rejected

Measurement rules:
- Loss is the token-weighted mean NLL over the tokens training puts a loss on (`data.encoding`:
  assistant turns only unless trainOnPrompt), unpacked, fitted to the training maxSeqLength as
  training fits (onOverlong); perplexity = exp(loss). Base and adapter see identical token sets.
- The base is scored with the adapter disabled on the very same loaded model, so "base" is exactly
  what training started from (quantized as in training). Its results (loss, regression loss,
  replies) are kept in `base_cache` when given and reused while every input matches
  (evaluation.base_cache); pass rates are always recomputed from the replies.
- Generation checks: greedy, `maxNewTokens`, the first `maxSamples` held-out records, prompts
  rendered as a server renders them (chatTemplateKwargs included), replies without the template's
  reasoning block (see `generation.py` for how prompts, references and checks are defined;
  `generate` below).
- The champion (spec.evaluation.gate.champion: the adapter a channel serves) is loaded as a second
  adapter on the same model and scored on the same tokens, samples and regression data, so base,
  champion and adapter are three columns of one measurement.
- On CPU everything runs in float32 (bf16 matmuls on CPU are slow and not what a GPU does);
  on CUDA in spec.computeDtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..data.encoding import encode_records as _encode
from ..data.encoding import fit
from ..data.prepare import fetch
from ..data.records import IGNORE, Example, read_jsonl
from ..data.rendering import reasoning_tags, strip_reasoning
from ..io.cache import Cache
from ..io.storage import file_sha256, join
from ..io.strictjson import dump_bytes
from ..model.loading import load_base
from . import base_cache as bc
from . import generation
from .champion import ChampionMetrics
from .gate import CheckRates, EvalMetrics, GateVerdict, apply_gate

log = logging.getLogger(__name__)

TOKEN_BUDGET = 4096  # tokens per forward pass when scoring loss (bounds the fp32 logits)
GENERATE_BATCH = 8  # prompts per generate call (left padding: part of the base-eval cache key)
SHOWN_GENERATIONS = 3  # generations kept in eval.json for humans
CHAMPION = "champion"  # PEFT adapter name of the champion next to the adapter under test


@dataclass(frozen=True)
class LossResult:
    loss: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens}


@dataclass
class EvalReport:
    """Everything measured, plus the gate verdict. `to_dict()` is eval.json."""

    base: LossResult
    adapter: LossResult
    checks: list[dict[str, Any]]
    regression: Optional[dict[str, Any]]
    num_samples: dict[str, int]
    seed: int
    gate: GateVerdict
    checkpoint_step: Optional[int] = None
    generations: list[dict[str, str]] = field(default_factory=list)
    merged: Optional[dict[str, Any]] = None  # filled by export.publish: merged-model verification
    champion: Optional[dict[str, Any]] = None  # {channel, runId, loss, regression, checks} or {channel, missing}

    def champion_metrics(self) -> Optional[ChampionMetrics]:
        if not self.champion or "loss" not in self.champion:
            return None
        reg = self.champion.get("regression")
        return ChampionMetrics(loss=self.champion["loss"]["loss"], regression_loss=reg["loss"] if reg else None,
                               check_rates=dict(self.champion.get("checks") or {}),
                               run_id=self.champion.get("runId"), channel=self.champion.get("channel"))

    def metrics(self) -> EvalMetrics:
        rates = {c["name"]: CheckRates(c["base"], c["adapter"]) for c in self.checks}
        reg = (self.regression["base"]["loss"], self.regression["adapter"]["loss"]) if self.regression else None
        return EvalMetrics(self.base.loss, self.adapter.loss, rates, reg)

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base.to_dict(),
            "adapter": self.adapter.to_dict(),
            "checks": self.checks,
            "regression": self.regression,
            "numSamples": self.num_samples,
            "seed": self.seed,
            "checkpointStep": self.checkpoint_step,
            "gate": self.gate.to_dict(),
            "merged": self.merged,
            "generations": self.generations,
            "champion": self.champion,
        }


def progress_eval(report: EvalReport) -> dict[str, Any]:
    """progress.json's `eval`: the wire shape of the status' EvaluationStatus (verdict, reasons,
    results), so the operator can copy it into `status.evaluation` as is."""
    return {"verdict": report.gate.verdict, "reasons": list(report.gate.reasons),
            "results": [dict(r) for r in report.gate.results]}


def write_eval_json(store, output_key: str, report: EvalReport) -> str:
    """Write `<output>/eval.json`; returns its key. Written whatever the verdict."""
    key = join(output_key, "eval.json")
    store.put_bytes(key, dump_bytes(report.to_dict(), indent=1, sort_keys=True))
    return key


def load_regression_records(spec, work_dir: Path, **store_kw) -> tuple[list[dict], dict[str, str]]:
    """Download and parse spec.evaluation.regressionDataset; returns (records, {uri: sha256})."""
    uri = spec.evaluation.regression_dataset.uri
    path = fetch(uri, Path(work_dir) / "data", **store_kw)
    records, _ = read_jsonl(path, spec.dataset.format, spec.dataset.on_invalid_line, name=uri)
    return records, {uri: "sha256:" + file_sha256(path)}


# --- loss -----------------------------------------------------------------------------------------


def encode_records(records: Sequence[dict], tokenizer, dataset, max_seq_length: Optional[int]) -> list[Example]:
    """Tokenize and mask exactly as training does, fitted to the training length if given.

    Records the template refuses are left out here: training prepared the same file and already
    failed (or skipped them, as the spec asked)."""
    examples = _encode(tokenizer, list(records), dataset.format, dataset.train_on_prompt,
                       template_kwargs=dataset.chat_template_kwargs, on_invalid="skip").examples
    max_len = max_seq_length or dataset.max_seq_length
    return fit(examples, max_len, dataset.on_overlong).kept if max_len else examples


def _batches(examples: Sequence[Example], budget: int):
    batch: list[Example] = []
    for ex in sorted(examples, key=len):
        if batch and (len(batch) + 1) * len(ex) > budget:
            yield batch
            batch = []
        batch.append(ex)
    if batch:
        yield batch


def heldout_loss(model, examples: Sequence[Example], pad_id: int = 0, budget: int = TOKEN_BUDGET) -> LossResult:
    """Token-weighted mean NLL of `model` on the labelled tokens of `examples` (fp32 softmax)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in _batches(examples, budget):
            width = max(len(e) for e in batch)
            ids = torch.tensor([e.ids + [pad_id] * (width - len(e)) for e in batch], device=device)
            labels = torch.tensor([e.labels + [IGNORE] * (width - len(e)) for e in batch], device=device)
            mask = (torch.arange(width, device=device)[None] < torch.tensor([len(e) for e in batch], device=device)[:, None]).long()
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                ignore_index=IGNORE, reduction="sum")
            total += nll.item()
            count += int((target != IGNORE).sum())
    return LossResult(total / count if count else math.nan, count)


# --- generation ----------------------------------------------------------------------------------


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
             batch_size: int = GENERATE_BATCH) -> list[str]:
    """Greedy replies (special tokens dropped) for ``prompts``, batched with left padding.

    Prompts are tokenized without extra special tokens: the chat template already wrote them.
    """
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    stops = generation.stop_token_ids(tokenizer)
    replies: list[str] = []
    for start in range(0, len(prompts), batch_size):
        rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start:start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                eos_token_id=stops, pad_token_id=pad_id, use_cache=True,
            )
        replies += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return replies


# --- the whole evaluation -------------------------------------------------------------------------


def eval_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_adapted(spec, base_dir: Path, adapter_dir: Path, device: Optional[torch.device] = None):
    """The base exactly as training loaded it (quantization and all) with the adapter attached."""
    from peft import PeftModel

    device = device or eval_device()
    dtype = spec.compute_dtype if device.type == "cuda" else "float32"
    base = load_base(Path(base_dir), spec.quantization, spec.double_quant, dtype, device,
                     attn=spec.attn_implementation)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    return model.eval()


def _device_kind(model) -> str:
    """The device as far as it can change numbers: cpu, or the GPU's model name."""
    device = next(model.parameters()).device
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: pad, else eos, else 0 (model.loading.load_tokenizer sets pad)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


def _samples(spec, tokenizer, records) -> Optional[list]:
    """The generation samples, or None when there are no checks (nothing is generated)."""
    if not spec.evaluation.gate.checks:
        return None
    return generation.build_samples(records, tokenizer, spec.evaluation.max_samples,
                                    spec.dataset.chat_template_kwargs)


def _replies(spec, model, tokenizer, samples) -> list[str]:
    tags = reasoning_tags(tokenizer)
    replies = generate(model, tokenizer, [s.prompt for s in samples], spec.evaluation.max_new_tokens)
    return [strip_reasoning(r, tags) for r in replies]


def _run_checks(spec, model, tokenizer, samples, base_replies, champion: bool = False) -> tuple[list[dict], list[dict], int]:
    checks = spec.evaluation.gate.checks
    if samples is None:
        return [], [], 0
    adapter_replies = _replies(spec, model, tokenizer, samples)
    champion_replies = None
    if champion:
        with _using(model, CHAMPION):
            champion_replies = _replies(spec, model, tokenizer, samples)
    rows = [_check_row(c, base_replies, adapter_replies, samples) for c in checks]
    shown = [{"prompt": s.prompt, "reference": s.reference, "base": b, "adapter": a}
             for s, b, a in list(zip(samples, base_replies, adapter_replies))[:SHOWN_GENERATIONS]]
    if champion_replies is not None:
        for row, check in zip(rows, checks):
            row["champion"] = generation.score(check, champion_replies, samples).rate
        for item, reply in zip(shown, champion_replies):
            item["champion"] = reply
    return rows, shown, len(samples)


@contextmanager
def _using(model, name: str) -> Iterator[None]:
    """Score with adapter `name` active, then switch back to the adapter under test."""
    previous = model.active_adapter
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)


def _score_champion(model, champion_dir: Path, examples, reg_examples, pad_id) -> dict[str, Any]:
    """The champion's losses, on the same model (base loaded once) and the same tokens."""
    model.load_adapter(str(champion_dir), adapter_name=CHAMPION, is_trainable=False)
    with _using(model, CHAMPION):
        loss = heldout_loss(model, examples, pad_id)
        regression = heldout_loss(model, reg_examples, pad_id) if reg_examples is not None else None
    log.info("held-out loss: champion %.4f", loss.loss)
    return {"loss": loss.to_dict(), "regression": regression.to_dict() if regression else None}


def _check_row(check, base_replies, adapter_replies, samples) -> dict:
    """One check's pass rates; outputs whose pattern search ran out of time count as failed and
    are reported under `timeouts`."""
    base = generation.score(check, base_replies, samples)
    adapter = generation.score(check, adapter_replies, samples)
    row = {"name": check.name, "type": check.type, "minPassRate": check.min_pass_rate,
           "base": base.rate, "adapter": adapter.rate}
    if base.timeouts or adapter.timeouts:
        row["timeouts"] = {"base": base.timeouts, "adapter": adapter.timeouts}
        log.warning("check %s: %d base and %d adapter outputs ran out of time (counted as failed)",
                    check.name, base.timeouts, adapter.timeouts)
    return row


def _score_base(spec, model, tokenizer, examples, reg_ex, samples, pad_id) -> bc.BaseResults:
    """Everything measured on the base: the very same model with the adapter disabled."""
    with model.disable_adapter():
        loss = heldout_loss(model, examples, pad_id)
        reg = heldout_loss(model, reg_ex, pad_id) if reg_ex is not None else None
        replies = _replies(spec, model, tokenizer, samples) if samples is not None else None
    return bc.BaseResults(bc.BaseLoss(loss.loss, loss.tokens),
                          bc.BaseLoss(reg.loss, reg.tokens) if reg else None, replies)


def _base_results(spec, model, tokenizer, examples, reg_ex, samples, pad_id, cache: Optional[Cache],
                  key: Optional[str]) -> bc.BaseResults:
    """The base's results from `cache` when a valid entry matches, else measured (and kept)."""
    found = cache.load(key) if cache is not None else None
    if found is not None:
        try:
            return bc.decode(found[0], _targets(examples), _targets(reg_ex) if reg_ex is not None else None,
                             len(samples) if samples is not None else None)
        except ValueError as exc:  # fail closed: recompute, never pass on an unreadable entry
            log.warning("ignoring the base-eval cache entry %s: %s", key[:12], exc)
    results = _score_base(spec, model, tokenizer, examples, reg_ex, samples, pad_id)
    payload = bc.encode(results) if cache is not None else None
    if payload is not None:
        cache.save(key, payload)
    return results


def _targets(examples) -> int:
    """Tokens `heldout_loss` scores (labelled, after the causal shift)."""
    return sum(sum(1 for t in e.labels[1:] if t != IGNORE) for e in examples)


def _loss_result(value: bc.BaseLoss) -> LossResult:
    return LossResult(value.loss, value.tokens)


def evaluate(spec, base_dir: Path, adapter_dir: Path, eval_records: Sequence[dict], tokenizer, *,
             regression_records: Optional[Sequence[dict]] = None, max_seq_length: Optional[int] = None,
             checkpoint_step: Optional[int] = None, model=None, champion_dir: Optional[Path] = None,
             champion: Optional[dict[str, Any]] = None, base_cache: Optional[Cache] = None) -> EvalReport:
    """Score base and adapter (and the champion, when `champion_dir` holds one) on `eval_records`
    (raw JSONL records of the held-out set), run the generation checks and the regression data, and
    apply the gate. `champion` is the operator's resolution ({channel, runId, ...} or {channel, missing}).

    `model` may be an already loaded PeftModel (e.g. the recipe's, at the chosen checkpoint); by
    default the base is loaded from `base_dir` as in training and `adapter_dir` attached.
    `base_cache` (evaluation.base_cache) keeps the base's results for retries and re-runs.
    """
    for check in spec.evaluation.gate.checks:
        generation.compile_check(check)  # a broken check fails before minutes of generation
    torch.manual_seed(spec.training.seed)
    model = model if model is not None else load_adapted(spec, base_dir, adapter_dir)
    model.eval()
    pad_id = pad_token_id(tokenizer)
    examples = encode_records(eval_records, tokenizer, spec.dataset, max_seq_length)
    reg_ex = (encode_records(regression_records, tokenizer, spec.dataset, max_seq_length)
              if regression_records is not None else None)
    samples = _samples(spec, tokenizer, eval_records)
    key = (bc.base_key(spec, tokenizer, eval_records, regression_records, max_seq_length,
                       _device_kind(model), {"tokenBudget": TOKEN_BUDGET, "generateBatch": GENERATE_BATCH})
           if base_cache is not None else None)
    measured = _base_results(spec, model, tokenizer, examples, reg_ex, samples, pad_id, base_cache, key)
    base, adapter = _loss_result(measured.loss), heldout_loss(model, examples, pad_id)
    log.info("held-out loss: base %.4f, adapter %.4f (%d tokens)", base.loss, adapter.loss, adapter.tokens)
    regression = None
    if reg_ex is not None:
        rb, ra = _loss_result(measured.regression), heldout_loss(model, reg_ex, pad_id)
        regression = {"base": rb.to_dict(), "adapter": ra.to_dict(), "samples": len(reg_ex),
                      "increase": (ra.loss - rb.loss) / rb.loss if rb.loss > 0 else math.nan}
    scored = _score_champion(model, champion_dir, examples, reg_ex, pad_id) if champion_dir else None
    checks, shown, n_gen = _run_checks(spec, model, tokenizer, samples, measured.replies,
                                       champion=scored is not None)
    if scored is not None:
        scored["checks"] = {c["name"]: c["champion"] for c in checks}
    report = EvalReport(
        base=base, adapter=adapter, checks=checks, regression=regression,
        num_samples={"loss": len(examples), "generation": n_gen}, seed=spec.training.seed,
        gate=GateVerdict(True, [], []), checkpoint_step=checkpoint_step, generations=shown,
        champion={**(champion or {}), **(scored or {})} if (champion or scored) else None,
    )
    missing = (champion or {}).get("missing") if scored is None else None
    report.gate = apply_gate(spec.evaluation, report.metrics(), report.champion_metrics(), missing)
    log.info("gate %s%s", report.gate.verdict, "".join(f"\n  {r}" for r in report.gate.reasons))
    return report

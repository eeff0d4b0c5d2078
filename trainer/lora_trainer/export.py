"""Publishing an adapter that passed the gate: `published/<release>/{adapter,merged,eval.json}` and,
last, `lora-metadata.json` (the pointer to that release) under spec.output.uri.

Entry point (`run.export` calls it after `evaluation.scoring.evaluate` and the gate):

    uris = publish(spec, store, output_key, base_dir, adapter_dir, report, tokenizer,
                   eval_records=..., work_dir=..., run_id=..., dataset_hashes=...)
    # -> {"adapter": uri, "merged": uri | None, "eval": uri, "metadata": uri}
    # raises GateRejected (nothing published), MergeMismatch or ExportError (nothing complete).

Atomicity for readers (release.py). Everything is built locally, uploaded to a folder of its own,
`published/<release>/`, and only then does `lora-metadata.json` (one PUT) point at it. So a reader
sees the previous complete set or the new one, never a partial set next to metadata; a crash or
SIGTERM before the PUT leaves the previous set published. The metadata records the job identity,
the checkpoint step and its held-out loss; a publish over another job's set is refused.

The merged model. QLoRA trains against NF4 weights, but `merged/` must be a plain 16-bit model:
the base is reloaded in 16-bit (float32 on CPU), never the quantized one (merging into NF4 would
bake the quantization error into every weight, and dequantize-merge-requantize loses the update).
Hence the merge is verified against the 16-bit base + the *checkpoint's* adapter, unmerged: their
logits on a few held-out samples must agree within MERGE_TOLERANCE for the dtype, else the export
fails with the measured difference (`merge_tolerance`). The held-out loss is then recomputed on the merged model and
the gate's loss thresholds re-applied to it against the 16-bit base's loss on the same examples (the base it was
merged into, not the NF4 one training saw), because the artifact that ships is the one evaluated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from .evaluation.gate import apply_gate
from .evaluation.scoring import EvalReport, encode_records, eval_device, heldout_loss, pad_token_id
from .io import release, storage, strictjson
from .io.metadata import build_metadata

log = logging.getLogger(__name__)

# Allowed max |logit diff| of merged vs unmerged = atol + rtol * max |reference logit|.
# float32 agrees up to summation order (measured 4e-6 on the tiny test model). 16-bit rounds
# W + s*BA once per weight and the error grows through the layers, so allow several ulps of the
# largest logit (bf16 eps 2^-7, fp16 2^-10); measured on the tiny model on CPU: bf16 0.06 with
# max |logit| ~ 15, fp16 0.008. Not yet calibrated on a real model on a GPU.
MERGE_TOLERANCE = {"float32": (1e-3, 1e-5), "bfloat16": (0.0, 0.05), "float16": (0.0, 0.01)}
MERGE_SAMPLES = 4
MERGE_PROBE_TOKENS = 256  # per sample: enough to exercise every layer, bounded logits memory
VLLM_MAX_LORA_RANK = 512  # the largest --max-lora-rank vLLM accepts
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "output")


class ExportError(RuntimeError):
    """The artifacts cannot be produced as promised; nothing complete was published."""


class GateRejected(ExportError):
    def __init__(self, reasons: Sequence[str]):
        self.reasons = list(reasons)
        super().__init__("gate rejected the adapter: " + "; ".join(self.reasons))


class MergeMismatch(ExportError):
    """Merged weights do not reproduce base + adapter."""

    def __init__(self, max_abs_diff: float, tolerance: float, dtype: str):
        self.max_abs_diff, self.tolerance = max_abs_diff, tolerance
        super().__init__(f"merged model differs from base+adapter: max |logit diff| {max_abs_diff:.3g} "
                         f"> tolerance {tolerance:.3g} ({dtype})")


def merge_tolerance(dtype: str, max_abs_logit: float) -> float:
    atol, rtol = MERGE_TOLERANCE[dtype]
    return atol + rtol * max_abs_logit


# --- adapter/ -------------------------------------------------------------------------------------


def write_adapter(spec, adapter_dir: Path, tokenizer, dest: Path) -> tuple[dict, list[str]]:
    """PEFT adapter for `PeftModel.from_pretrained` and vLLM `--lora-modules`, plus the tokenizer
    and chat template used in training. Returns (adapter_config, warnings)."""
    adapter_dir, dest = Path(adapter_dir), Path(dest)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("modules_to_save"):
        raise ExportError(f"adapter has modules_to_save {config['modules_to_save']}: not a pure LoRA "
                          "adapter (vLLM cannot serve it)")
    rank, alpha = spec.lora.rank, spec.lora.effective_alpha
    if config.get("r") != rank or float(config.get("lora_alpha", -1)) != alpha:
        raise ExportError(f"adapter_config.json has r={config.get('r')} lora_alpha={config.get('lora_alpha')},"
                          f" the spec says rank={rank} alpha={alpha:g}")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ExportError(f"{adapter_dir} has no adapter_model.safetensors")
    warnings = vllm_problems(config, spec.output.vllm_max_lora_rank)
    for warning in warnings:
        log.warning(warning)
    config.update(base_model_name_or_path=loadable_base_name(spec.base_model.uri), inference_mode=True)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(dest))
    shutil.copyfile(adapter_dir / "adapter_model.safetensors", dest / "adapter_model.safetensors")
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return config, warnings


def loadable_base_name(uri: str) -> str:
    """What `AutoPeftModelForCausalLM` can load the base from: the hub id of hf://org/name, the
    path of file:///path, else the base directory's name (place the base under that name, or pass
    the base model explicitly). The URI and revision are in lora-metadata.json."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme == "hf":
        return f"{parsed.netloc}{parsed.path}".strip("/")
    if parsed.scheme == "file":
        return parsed.path
    return (parsed.path.rstrip("/").rsplit("/", 1)[-1]) or parsed.netloc


def _targets(config: dict) -> list[str]:
    targets = config.get("target_modules") or []
    return [targets] if isinstance(targets, str) else list(targets)


def vllm_problems(config: dict, max_lora_rank: int) -> list[str]:
    """Every reason `vllm serve --enable-lora --max-lora-rank <max_lora_rank>` would refuse the
    adapter (PEFT still loads it)."""
    out = []
    rank = config.get("r", 0)
    if rank > max_lora_rank:
        out.append(f"rank {rank} > the server's --max-lora-rank {max_lora_rank} (output.vllmMaxLoraRank): "
                   f"vLLM refuses to load this adapter")
    if rank > VLLM_MAX_LORA_RANK:
        out.append(f"rank {rank} > {VLLM_MAX_LORA_RANK}, the largest --max-lora-rank vLLM accepts")
    if config.get("use_dora"):
        out.append("use_dora: vLLM does not serve DoRA adapters")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        out.append("LoRA bias terms: vLLM does not serve them")
    if config.get("modules_to_save"):
        out.append(f"modules_to_save {config['modules_to_save']}: vLLM serves pure LoRA weights only")
    heads = [t for t in _targets(config) if t.rsplit(".", 1)[-1] in EMBEDDING_MODULES]
    if heads:
        out.append(f"LoRA on {', '.join(heads)}: vLLM does not serve embedding or output-head adapters")
    return out


# --- merged/ --------------------------------------------------------------------------------------


def merge_dtype(spec, device: torch.device) -> str:
    return "float32" if device.type == "cpu" else spec.compute_dtype


def _load_unquantized(base_dir: Path, dtype: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=getattr(torch, dtype))
    return model.to(device).eval()


def merge_adapter(base_dir: Path, adapter_dir: Path, dest: Path, tokenizer, *, dtype: str = "float32",
                  device: Optional[torch.device] = None) -> Path:
    """Reload the base in `dtype` (16-bit on GPU, float32 on CPU; never quantized), apply the
    adapter at its lora_alpha / r, merge with PEFT's non-finite check, save safetensors shards."""
    from peft import PeftModel

    device = device or eval_device()
    base = _load_unquantized(base_dir, dtype, device)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload(safe_merge=True)
    Path(dest).mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(dest), max_shard_size="4GB")
    tokenizer.save_pretrained(str(dest))
    del merged, base
    _free(device)
    return Path(dest)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _logits(model, token_lists) -> list[torch.Tensor]:
    out = []
    with torch.inference_mode():
        for ids in token_lists:
            ids = torch.tensor([ids], device=next(model.parameters()).device)
            out.append(model(input_ids=ids, use_cache=False).logits[0].float().cpu())
    return out


def verify_merge(spec, base_dir: Path, ref_adapter_dir: Path, merged_dir: Path, examples, report: EvalReport,
                 pad_id: int, *, dtype: str = "float32", device: Optional[torch.device] = None) -> dict:
    """Merged model vs 16-bit base + `ref_adapter_dir` (the evaluated checkpoint), unmerged.

    Raises MergeMismatch when max |logit diff| on the first MERGE_SAMPLES examples exceeds
    `merge_tolerance(dtype, max |reference logit|)`; returns the verification record (with the merged held-out loss and the gate
    re-applied to it) for eval.json and the metadata.
    """
    from peft import PeftModel

    device = device or eval_device()
    probe = [ex.ids[:MERGE_PROBE_TOKENS] for ex in examples[:MERGE_SAMPLES]]
    ref = PeftModel.from_pretrained(_load_unquantized(base_dir, dtype, device), str(ref_adapter_dir)).eval()
    want = _logits(ref, probe)
    with ref.disable_adapter():  # the 16-bit base the adapter was merged into, not the NF4 one
        base = heldout_loss(ref, examples, pad_id)
    del ref
    _free(device)
    merged = _load_unquantized(merged_dir, dtype, device)
    got = _logits(merged, probe)
    diff = max(float((a - b).abs().max()) for a, b in zip(want, got)) if probe else 0.0
    tolerance = merge_tolerance(dtype, max((float(a.abs().max()) for a in want), default=0.0))
    log.info("merge check: max |logit diff| %.3g (tolerance %g, %s, %d samples)", diff, tolerance, dtype, len(probe))
    if not diff <= tolerance:
        raise MergeMismatch(diff, tolerance, dtype)
    loss = heldout_loss(merged, examples, pad_id)
    metrics = dataclasses.replace(report.metrics(), base_loss=base.loss, adapter_loss=loss.loss)
    verdict = apply_gate(spec.evaluation, metrics)
    return {"maxAbsLogitDiff": diff, "tolerance": tolerance, "dtype": dtype, "samples": len(probe),
            "reference": "16-bit base + checkpoint adapter, unmerged",
            "evalLoss": loss.loss, "perplexity": loss.perplexity, "baseEvalLoss": base.loss,
            "gate": verdict.to_dict()}


# --- publishing -----------------------------------------------------------------------------------


def _files(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): "sha256:" + storage.file_sha256(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def publish(spec, store, output_key: str, base_dir: Path, adapter_dir: Path, report: EvalReport, tokenizer, *,
            eval_records: Sequence[dict], work_dir: Path, run_id: Optional[str] = None,
            dataset_hashes: Optional[dict] = None, max_seq_length: Optional[int] = None,
            started_at: Optional[str] = None, device: Optional[torch.device] = None,
            data_stats: Optional[dict] = None, identity=None,
            checkpoint_eval_loss: Optional[float] = None, world_size: int = 1) -> dict:
    """Build, verify, stage and promote the artifacts (see module docstring); returns their URIs.
    `world_size`: training processes of the run that wrote the checkpoint (for the metadata).

    `adapter_dir` is the evaluated checkpoint's PEFT adapter directory; `store`/`output_key` come
    from `storage.open_uri(spec.output.uri)`; `identity` (identity.JobIdentity) is recorded in the
    metadata and must match whatever is published there already.
    """
    from .io.identity import JobIdentity

    if not report.gate.passed:
        raise GateRejected(report.gate.reasons)
    run_id = run_id or uuid.uuid4().hex[:12]
    identity = identity or JobIdentity("", "local")
    release.check_owner(store, output_key, identity)  # before minutes of merging
    local = Path(work_dir) / "publish" / run_id
    shutil.rmtree(local, ignore_errors=True)
    adapter_config, warnings = write_adapter(spec, adapter_dir, tokenizer, local / "adapter")
    if spec.output.format in ("merged", "both"):
        _merge_and_verify(spec, base_dir, Path(adapter_dir), local, report, tokenizer, eval_records,
                          max_seq_length, device)
    if spec.output.format == "merged":
        shutil.rmtree(local / "adapter")
    (local / "eval.json").write_text(strictjson.dumps(report.to_dict(), indent=1, sort_keys=True))

    def metadata(uris: dict) -> dict:
        meta = build_metadata(spec, report, adapter_config=adapter_config, tokenizer=tokenizer, artifacts=uris,
                              files=_files(local), dataset_hashes=dataset_hashes or {}, run_id=run_id,
                              started_at=started_at, warnings=warnings,
                              data={**(data_stats or {}), "maxSeqLength": max_seq_length},
                              vllm={"maxLoraRank": spec.output.vllm_max_lora_rank, "problems": warnings},
                              world_size=world_size)
        meta["checkpointEvalLoss"] = checkpoint_eval_loss
        return meta

    uris = release.promote(store, local, output_key, release.new_release(run_id), identity, metadata)
    shutil.rmtree(local, ignore_errors=True)
    log.info("published %s", ", ".join(f"{k}={v}" for k, v in uris.items() if v))
    return uris


def _merge_and_verify(spec, base_dir, adapter_dir, local, report, tokenizer, eval_records, max_seq_length, device):
    device = device or eval_device()
    dtype = merge_dtype(spec, device)
    # Merge what ships (adapter/ as written), verify against what was evaluated (the checkpoint).
    merge_adapter(base_dir, local / "adapter", local / "merged", tokenizer, dtype=dtype, device=device)
    examples = encode_records(eval_records, tokenizer, spec.dataset, max_seq_length)
    pad_id = pad_token_id(tokenizer)
    report.merged = verify_merge(spec, base_dir, adapter_dir, local / "merged", examples, report, pad_id,
                                 dtype=dtype, device=device)
    if not report.merged["gate"]["passed"]:
        raise GateRejected([f"merged {r}" for r in report.merged["gate"]["reasons"]])


__all__ = [
    "MERGE_TOLERANCE",
    "ExportError",
    "GateRejected",
    "MergeMismatch",
    "merge_adapter",
    "merge_tolerance",
    "publish",
    "verify_merge",
    "write_adapter",
]

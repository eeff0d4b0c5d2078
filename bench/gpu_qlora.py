"""GPU QLoRA benchmark: a 7B Llama-architecture model, NF4 + double quant, r=16 on all linear layers.

Prepared for a lent GPU machine (absolute figures): tokens/s, peak GPU memory and MFU of packed
rows (our trainer's data path) vs the common recipe's batches padded to their longest example
(what HF `Trainer` + `DataCollatorForSeq2Seq` feeds the model), same model, same run.
Weights are random (throughput and memory do not depend on their values; nothing can be
downloaded there). Targets: peak memory <= 12 GB, MFU >= 30 %. Whole run: under 8 minutes.

The GPU machine has torch/transformers/peft/accelerate but no bitsandbytes. Carry the wheel:
    here:  pip download bitsandbytes==0.50.2 --no-deps -d bench/wheels      (then `run` carries bench/wheels)
    there: pip install bench/wheels/*.whl && python bench/gpu_qlora.py --out $OUT/gpu.json

`python bench/gpu_qlora.py --dry-run` runs the same code on a tiny config on the CPU (2 steps).

`--trl` runs the same QLoRA job through our trainer and through TRL's `SFTTrainer` (bfd packing,
completion-only loss; see gpu_vs_trl.py) and reports tokens/s, MFU and peak memory of both with
ratios: `python bench/gpu_qlora.py --trl --out $OUT/trl.json` (about 6 minutes on one H100/H200:
random 7B weights written once, each side loads them in its own process); `--trl --dry-run` is
the CPU smoke test of that path.
MFU = 4 x params x tokens/s over a measured bf16 matmul peak (LoRA: forward 2N, backward 2N).

`--memory` measures instead what bench/memory_bench.py measures on the CPU, for real sizes: peak
GPU memory of one training step of a Llama-3.1-8B-shaped NF4 model (128k vocabulary) on one
4096-token row, before (full fp32 logits, no gradient checkpointing) and after (chunked CE over
the trained positions, non-reentrant gradient checkpointing), next to memory_bench's estimate
and the guide's 24 GB. About 16 GB of disk for the random weights; a few minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=512, max_position_embeddings=512)


def matmul_peak_flops(device: str, n: int = 8192, iters: int = 20) -> float:
    import torch

    if device == "cpu":
        n, iters = 512, 3
    dtype = torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def save_random_base(cfg: dict, device: str, work: Path) -> Path:
    """Random bf16 weights of `cfg`, saved once to local disk; returns the directory."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    name = {id(LLAMA_7B): "llama-7b-random", id(LLAMA3_8B): "llama3-8b-random"}.get(id(cfg), "llama-tiny-random")
    path = work / f"{name}-v{cfg['vocab_size']}"
    if not (path / "config.json").exists():
        config = LlamaConfig(**cfg, tie_word_embeddings=False)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(path, safe_serialization=True)
        del model
    return path


def build_model(cfg: dict, device: str, work: Path):
    """The random base loaded quantized (NF4 + double quant), with LoRA r=16 on all linear layers."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = save_random_base(cfg, device, work)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": device})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"


def count_params(model) -> int:
    """Logical parameter count: a 4-bit weight stores two values per byte, so use its quant_state shape."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        total += math.prod(state.shape) if state is not None else p.numel()
    return total


def examples(n: int, vocab: int, max_len: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(int(2 ** rng.uniform(5, 11)) % max_len + 16)] for _ in range(n)]


def packed_batches(seqs: list[list[int]], seq_len: int):
    """Concatenate into full rows with restarting position ids (our trainer's packing)."""
    import torch

    row, pos = [], []
    for s in seqs:
        s = s[:seq_len]
        if len(row) + len(s) > seq_len:
            yield torch.tensor([row]), torch.tensor([pos])
            row, pos = [], []
        row += s
        pos += list(range(len(s)))
    if row:
        yield torch.tensor([row]), torch.tensor([pos])


def measure(model, batches, device: str, steps: int, warmup: int, padded: bool) -> dict:
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tokens, t0 = 0, None
    for i, batch in zip(range(steps + warmup), batches):
        if i == warmup:
            _sync(device)
            t0, tokens = time.perf_counter(), 0
        if padded:
            ids, mask = (t.to(device) for t in batch)
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            tokens += int(mask.sum())
        else:
            ids, pos = (t.to(device) for t in batch)
            loss = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False).loss
            tokens += ids.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"useful_tokens_per_s": tokens / seconds, "peak_memory_bytes": peak}


def memory_steps(model, device: str, tokens: int, vocab: int) -> dict:
    """Peak memory of one forward+backward, before (full logits, no checkpointing) and after."""
    import sys

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
    from lora_trainer.model import loss

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (1, tokens), generator=g).to(device)
    inputs = {"input_ids": ids, "position_ids": torch.arange(tokens, device=device)[None], "use_cache": False}
    out = {}
    for variant in ("before", "after"):
        if variant == "before":
            model.base_model.model.gradient_checkpointing_disable()
        else:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            ce = loss.full_ce(model, inputs, ids) if variant == "before" else loss.sum_ce(model, inputs, ids)
        ce.backward()
        model.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
        out[variant] = {"peak_bytes": peak, "step_bytes_above_model": peak - held if peak else None,
                        "loss": float(ce.detach()) / (tokens - 1)}
        del ce
    return out


def run_memory(args, device: str) -> dict:
    import memory_bench

    cfg, tokens = (TINY, 128) if args.dry_run else (LLAMA3_8B, 4096)
    model = build_model(cfg, device, args.work)
    report = {"tokens": tokens, "vocab": cfg["vocab_size"], **memory_steps(model, device, tokens, cfg["vocab_size"])}
    report["estimate"] = {"before": memory_bench.estimate_7b(tokens, chunked=False, checkpointing=False),
                          "after": memory_bench.estimate_7b(tokens)}
    report["guide_budget_bytes"] = memory_bench.GUIDE_BUDGET_BYTES
    return report


def padded_batches(seqs: list[list[int]], batch_size: int):
    """The HF-Trainer-style baseline: pad each batch to its longest example."""
    import torch

    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, :len(s)], mask[j, :len(s)] = torch.tensor(s), 1
        yield ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny config, 2 steps, CPU")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gpu-qlora"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--memory", action="store_true", help="peak memory of one step, before/after (see above)")
    parser.add_argument("--trl", action="store_true", help="ours vs TRL SFTTrainer on the same job (gpu_vs_trl.py)")
    parser.add_argument("--checkpointing", action="store_true", help="--trl: gradient checkpointing on both sides")
    parser.add_argument("--warmup", type=int, default=3, help="--trl: untimed steps first")
    parser.add_argument("--side-timeout", type=int, default=420, help="--trl: seconds per side at most")
    parser.add_argument("--trl-child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import sys


    sys.path.insert(0, str(Path(__file__).resolve().parent))
    device = "cpu" if args.dry_run else "cuda"
    if args.trl or args.trl_child:
        _trl(args)
        return
    if args.memory:
        args.work.mkdir(parents=True, exist_ok=True)
        report = run_memory(args, device)
        print(json.dumps(report, indent=1))
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
        return
    cfg, seq_len = (TINY, 128) if args.dry_run else (LLAMA_7B, args.seq_len)
    steps, warmup = (2, 1) if args.dry_run else (args.steps, 3)
    args.work.mkdir(parents=True, exist_ok=True)
    peak = matmul_peak_flops(device)
    model = build_model(cfg, device, args.work)
    n_params = count_params(model)
    seqs = examples(4000, cfg["vocab_size"], seq_len)
    results = {}
    for name, batches, padded in (("ours_packed", packed_batches(seqs, seq_len), False),
                                  ("baseline_padded", padded_batches(sorted(seqs, key=lambda _: 0), 2), True)):
        r = measure(model, batches, device, steps, warmup, padded)
        r["mfu"] = 4 * n_params * r["useful_tokens_per_s"] / peak
        results[name] = r
    report = {"device": device_name(device),
              "params": n_params, "matmul_peak_flops": peak, "seq_len": seq_len, **results,
              "targets": {"peak_memory_bytes": 12e9, "mfu": 0.30}}
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


def _trl(args) -> None:
    import gpu_vs_trl
    import torch

    if args.dry_run:
        args.seq_len, args.steps, args.warmup = 128, 2, 1
        torch.set_num_threads(1)
    if args.trl_child:  # one side, in its own process; the last stdout line is its JSON
        print(json.dumps(gpu_vs_trl.child(args.trl_child, args)))
        return
    report = gpu_vs_trl.run(args)
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

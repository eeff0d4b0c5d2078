"""`gpu_qlora.py --trl`: the same QLoRA job through our trainer and through TRL's `SFTTrainer`.

One base (7B Llama shape, random bf16 weights, a ChatML BPE tokenizer), one chat dataset of
variable-length conversations (32 to ~2000 tokens), loaded in NF4 + double quant with bf16 compute,
LoRA r=16 alpha=32 dropout 0 on all seven projections, AdamW at a constant lr, one packed row of up
to seq-len tokens per optimizer step, loss on the assistant reply only:
  ours  `lora_trainer.run.run(stages={train})` (the real recipe: prepare, packing, chunked CE),
        batchSize 1, packing, maxSeqLength = seq-len, gradientCheckpointing as --checkpointing;
  TRL   `SFTTrainer`, per-device batch 1, `packing=True, packing_strategy="bfd"` (padding-free,
        per-example attention from position ids), `max_length` = seq-len,
        `completion_only_loss=True` on the same conversations as prompt-completion records,
        `gradient_checkpointing` as --checkpointing.
Each side runs in its own process (clean peak memory). Per side: tokens/s over the steps after the
warm-up (each step timed between CUDA syncs; tokens = non-padding tokens fed), MFU (4 x params x
tokens/s over the measured bf16 matmul peak), peak `max_memory_allocated`; ratios ours / TRL.

`--dry-run` runs both sides on the CPU at tiny size (float32 compute, 2 steps) so CI covers the code.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

RANK, LR = 16, 2e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = [f"w{i}" for i in range(1500)]


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_data(path: Path, n: int, max_words: int, seed: int = 0) -> list[dict]:
    """Chat records whose lengths spread over (32, max_words) words, log-uniformly."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        total = int(2 ** rng.uniform(5, max(5.5, (max_words).bit_length() - 0.1)))
        total = max(8, min(total, max_words))
        reply = max(4, total // 3)
        rows.append({"messages": [{"role": "user", "content": _text(rng, total - reply)},
                                  {"role": "assistant", "content": _text(rng, reply)}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def fitting_rows(base: Path, path: Path, n: int, seq_len: int, scratch: Path) -> list[dict]:
    """`n` records whose rendered conversation fits `seq_len` tokens: ours would drop a longer one
    and TRL's bfd packing would truncate it, so both sides train exactly the same tokens."""
    from lora_trainer.data.encoding import encode_chat
    from lora_trainer.model.loading import load_tokenizer

    tok = load_tokenizer(base)
    rows = [r for r in write_data(scratch, 2 * n, seq_len)
            if all(len(ex) <= seq_len for ex in encode_chat(tok, r["messages"]))][:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def setup(work: Path, cfg: dict, seq_len: int, device: str, n: int = 400) -> dict:
    """Base dir (random weights + tokenizer), data (chat + prompt-completion), job spec."""
    import gpu_qlora

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
    from lora_trainer.io.storage import fingerprint_dir
    from lora_trainer.model.tiny_tokenizer import build_chatml_tokenizer

    base = gpu_qlora.save_random_base(cfg, device, work)
    if not (base / "tokenizer.json").exists():
        tok = build_chatml_tokenizer([" ".join(WORDS)] * 4, vocab_size=min(cfg["vocab_size"], 4096))
        tok.save_pretrained(str(base))
    store = work / "store"
    (store / "out").mkdir(parents=True, exist_ok=True)
    (store / "data").mkdir(parents=True, exist_ok=True)
    rows = fitting_rows(base, store / "data" / "train.jsonl", n, seq_len, work / "all.jsonl")
    write_data(store / "data" / "eval.jsonl", 4, 16, seed=1)
    pc = work / "train-pc.jsonl"
    pc.write_text("".join(json.dumps({"prompt": r["messages"][:-1], "completion": r["messages"][-1:]}) + "\n"
                          for r in rows))
    return {"base": str(base), "revision": fingerprint_dir(base), "store": str(store), "train_pc": str(pc)}


def _job(paths: dict, args, dtype: str, total_steps: int) -> dict:
    return {
        "baseModel": {"uri": f"file://{paths['base']}", "revision": paths["revision"]},
        "dataset": {"train": "s3://data/train.jsonl", "eval": "s3://data/eval.jsonl", "maxSeqLength": args.seq_len},
        "lora": {"rank": RANK, "alpha": 2 * RANK, "dropout": 0.0, "targetModules": TARGETS},
        "quantization": "nf4", "doubleQuant": True, "computeDtype": dtype,
        "training": {"maxSteps": total_steps, "batchSize": 1, "learningRate": LR, "warmupRatio": 0.0,
                     "lrScheduler": "constant", "seed": 7, "checkpointEverySteps": 100000,
                     "evalEverySteps": 100000, "maxGradNorm": 1.0, "gradientCheckpointing": args.checkpointing},
        "output": {"uri": "s3://out/ours"},
    }


class StepClock:
    """Step times between device syncs, and tokens per step, after `warmup` steps."""

    def __init__(self, device: str, warmup: int):
        self.device, self.warmup, self.steps, self.seconds, self.tokens, self.t = device, warmup, 0, 0.0, 0, 0.0

    def _sync(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def begin(self):
        self._sync()
        self.t = time.perf_counter()

    def end(self, tokens: int):
        self._sync()
        self.steps += 1
        if self.steps > self.warmup:
            self.seconds += time.perf_counter() - self.t
            self.tokens += tokens

    def report(self, n_params: int, peak_flops: float) -> dict:
        import torch

        tps = self.tokens / self.seconds if self.seconds else 0.0
        peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else None
        return {"tokens_per_s": tps, "mfu": 4 * n_params * tps / peak_flops, "peak_memory_bytes": peak,
                "timed_steps": self.steps - self.warmup, "timed_tokens": self.tokens}


def child_ours(paths: dict, args, device: str, clock: StepClock) -> int:
    import yaml

    from lora_trainer import run as running
    from lora_trainer.config import RuntimeConfig, load_job
    from lora_trainer.model.lora import param_counts
    from lora_trainer.recipe import LoRARecipe

    job_path = Path(args.work) / "job-ours.yaml"
    dtype = "bfloat16" if device == "cuda" else "float32"
    job_path.write_text(yaml.safe_dump(_job(paths, args, dtype, args.warmup + args.steps)))
    step, counted = LoRARecipe.train_step, {}

    def timed(self):  # times the loop's steps only; the recipe itself is unchanged
        counted.setdefault("params", param_counts(self.model)[1])
        clock.begin()
        m = step(self)
        clock.end(int(m["tokens"]))
        return m

    LoRARecipe.train_step = timed
    rt = RuntimeConfig(work_dir=Path(args.work) / "w-ours", storage_dir=Path(paths["store"]),
                       progress_interval_s=60, termination_log=Path(args.work) / "termination-log",
                       progress_bar=False)
    running.run(load_job(job_path), rt, frozenset({"train"}))
    return counted["params"]


def child_trl(paths: dict, args, device: str, clock: StepClock) -> int:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from lora_trainer.model.lora import param_counts

    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    tok = AutoTokenizer.from_pretrained(paths["base"])
    with open(paths["train_pc"]) as f:
        dataset = Dataset.from_list([json.loads(line) for line in f])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=dtype, quantization_config=quant,
                                                 device_map={"": device})
    fed = {"tokens": 0}  # counted at the embeddings: PEFT calls the base model's forward directly
    model.get_input_embeddings().register_forward_pre_hook(
        lambda m, a: fed.__setitem__("tokens", fed["tokens"] + a[0].numel()) if m.training else None)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            fed["tokens"] = 0
            clock.begin()

        def on_step_end(self, *a, **kw):
            clock.end(fed["tokens"])

    sft = SFTConfig(output_dir=str(Path(args.work) / "w-trl"), per_device_train_batch_size=1,
                    gradient_accumulation_steps=1, max_steps=args.warmup + args.steps, learning_rate=LR,
                    lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=7,
                    logging_steps=1000, save_strategy="no", eval_strategy="no", report_to=[], bf16=cuda,
                    use_cpu=not cuda, dataloader_num_workers=0, gradient_checkpointing=args.checkpointing,
                    packing=True, packing_strategy="bfd", max_length=args.seq_len, completion_only_loss=True)
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=sft, train_dataset=dataset, processing_class=tok, peft_config=lora,
                         callbacks=[Clock()])
    trainer.train()
    return param_counts(trainer.model)[1]


def child(kind: str, args) -> dict:
    import gpu_qlora
    import torch

    device = "cpu" if args.dry_run else "cuda"
    paths = json.loads(args.paths)
    clock = StepClock(device, args.warmup)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n_params = (child_ours if kind == "ours" else child_trl)(paths, args, device, clock)
    return clock.report(n_params, gpu_qlora.matmul_peak_flops(device))


def run(args) -> dict:
    """Setup once, then one process per side; returns the report."""
    import gpu_qlora
    import transformers
    import trl

    device = "cpu" if args.dry_run else "cuda"
    cfg = gpu_qlora.TINY if args.dry_run else gpu_qlora.LLAMA_7B
    args.work.mkdir(parents=True, exist_ok=True)
    paths = setup(args.work, cfg, args.seq_len, device)
    sides = {}
    for kind in ("trl", "ours"):
        cmd = [sys.executable, str(Path(__file__).with_name("gpu_qlora.py")), "--trl-child", kind,
               "--paths", json.dumps(paths), "--work", str(args.work), "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]
        cmd += ["--dry-run"] if args.dry_run else []
        cmd += ["--checkpointing"] if args.checkpointing else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1] / p) for p in ("trainer", "operator")]
            + [os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.side_timeout, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{kind} failed:\n{done.stderr[-4000:]}")
        sides[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    o, t = sides["ours"], sides["trl"]
    mem = (o["peak_memory_bytes"] / t["peak_memory_bytes"]) if o["peak_memory_bytes"] and t["peak_memory_bytes"] else None
    return {"device": gpu_qlora.device_name(device), "seq_len": args.seq_len, "steps": args.steps,
            "warmup": args.warmup, "gradient_checkpointing": "on" if args.checkpointing else "off",
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__},
            "ours": o, "trl": t,
            "ratios": {"tokens_per_s": o["tokens_per_s"] / t["tokens_per_s"] if t["tokens_per_s"] else None,
                       "peak_memory": mem},
            "targets": {"tokens_per_s": ">= 1.0", "peak_memory": "<= 1.0"}}

"""Ours vs TRL's `SFTTrainer` on the same QLoRA task, measured the way a user waits for an adapter.

Both sides: the same tiny Llama loaded in NF4 (double quant, float32 compute on the CPU), LoRA r=16,
alpha=32, dropout 0 on all seven projections, AdamW at a constant 2e-3 with no warmup, grad norm
clipped at 1.0, one epoch, one packed row of up to 512 tokens per optimizer step (ours: batchSize 1 and
maxSeqLength 512 with packing; TRL: per-device batch 1, `max_length=512`, `packing=True,
packing_strategy="bfd"`, which is padding-free with per-example attention from position ids), and
loss only on the assistant reply (ours: assistant-only labels on chat records; TRL:
`completion_only_loss=True` on the same conversations written as prompt-completion records).
Gradient checkpointing is off on both sides: ours turns it on by default for quantized bases, so the
spec sets `gradientCheckpointing: false`; TRL 1.x does not call `prepare_model_for_kbit_training`
and `gradient_checkpointing` defaults to False there.

Each run is a fresh process pinned to one thread; runs alternate (TRL first, then ours, then the
reverse) so drifting load on the shared machine hits both. Whole process = from the parent's spawn
(interpreter start, imports, data preparation, model load, training) to the adapter on disk; ours
includes its end-of-training held-out evaluation and checkpoint upload to local storage, TRL's has
no evaluation. Train loop = ours `LoRARecipe.train()` (which also evaluates the 48 held-out
examples at the last step and saves the checkpoint), TRL `trainer.train()`. Held-out loss: the
same plain-PEFT function (`trainer_bench.heldout_loss`) on both adapters over the float32 base.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trainer_bench as tb

SEED, EPOCHS, LR, RANK, MAX_LEN = 7, 1, 2e-3, 16, 512
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_prompt_completion(src: Path, dst: Path) -> Path:
    """The same conversations as TRL's conversational prompt-completion records."""
    with src.open() as f, dst.open("w") as out:
        for line in f:
            messages = json.loads(line)["messages"]
            out.write(json.dumps({"prompt": messages[:-1], "completion": messages[-1:]}) + "\n")
    return dst


def write_fitting(base: Path, path: Path, n: int, seed: int, scratch: Path) -> Path:
    """`n` chat examples of at most MAX_LEN tokens: both sides then train exactly the same tokens
    (an overlong example is dropped by ours and truncated by TRL's bfd packing)."""
    from lora_trainer.model.loading import load_tokenizer

    tb.write_data(scratch, 2 * n, seed)
    lines = scratch.read_text().splitlines()
    examples = tb._encode(load_tokenizer(base), str(scratch))
    assert len(examples) == len(lines), "one example per chat record"
    kept = [line for line, ex in zip(lines, examples) if len(ex) <= MAX_LEN][:n]
    assert len(kept) == n, f"only {len(kept)} of {2 * n} examples fit {MAX_LEN} tokens"
    path.write_text("\n".join(kept) + "\n")
    return path


def setup(work: Path, n_train: int, n_eval: int = 48) -> dict:
    import tiny
    import yaml

    from lora_trainer.io.storage import fingerprint_dir

    base = tiny.make_tiny_base(work / "base", hidden=256, layers=4, heads=4, vocab_size=512)
    data = work / "store" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (work / "store" / "out").mkdir(exist_ok=True)
    write_fitting(base, data / "train.jsonl", n_train, SEED, work / "all-train.jsonl")
    tb.write_data(data / "eval.jsonl", n_eval, SEED + 1)
    write_prompt_completion(data / "train.jsonl", work / "train-pc.jsonl")
    spec = {
        "baseModel": {"uri": f"file://{base}", "revision": fingerprint_dir(base)},
        "dataset": {"train": "s3://data/train.jsonl", "eval": "s3://data/eval.jsonl", "maxSeqLength": MAX_LEN},
        "lora": {"rank": RANK, "alpha": 2 * RANK, "dropout": 0.0, "targetModules": TARGETS},
        "quantization": "nf4", "doubleQuant": True, "computeDtype": "float32",
        "training": {"epochs": EPOCHS, "batchSize": 1, "learningRate": LR, "warmupRatio": 0.0,
                     "lrScheduler": "constant", "seed": SEED, "checkpointEverySteps": 100000,
                     "evalEverySteps": 100000, "maxGradNorm": 1.0, "gradientCheckpointing": False},
        "output": {"uri": "s3://out/bench"},
    }
    (work / "job.yaml").write_text(yaml.safe_dump(spec))
    return {"base": str(base), "train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl"),
            "train_pc": str(work / "train-pc.jsonl")}


def child_ours(work: Path, paths: dict, spawned: float, run_id: str) -> dict:
    from lora_trainer.__main__ import main
    from lora_trainer.io.storage import LocalStore
    from lora_trainer.model import checkpoint as ckpt
    from lora_trainer.model.loading import load_tokenizer
    from lora_trainer.recipe import LoRARecipe

    loop: dict = {}
    train = LoRARecipe.train

    def timed_train(self):  # times the loop only; the recipe itself is unchanged
        t = time.perf_counter()
        try:
            train(self)
        finally:
            loop["seconds"] = time.perf_counter() - t

    LoRARecipe.train = timed_train
    out = f"bench-{run_id}"
    job = work / f"job-{run_id}.yaml"
    job.write_text((work / "job.yaml").read_text().replace("s3://out/bench", f"s3://out/{out}"))
    code = main(["train", str(job), "--storage-dir", str(work / "store"),
                 "--work-dir", str(work / f"w-{run_id}"), "--no-progress-bar"])
    assert code == 0, f"lora-trainer train exited {code}"
    whole = time.time() - spawned
    rss = tb._rss_mb()
    store = LocalStore(work / "store" / "out")
    ref = ckpt.latest_complete(store, out)
    adapter = work / f"adapter-{run_id}"
    ckpt.fetch_verified(store, ref, adapter, ckpt.read_manifest(store, ref))
    examples = tb._encode(load_tokenizer(Path(paths["base"])), paths["train"])
    return {"whole_s": whole, "loop_s": loop["seconds"], "rss_mb": rss,
            "tokens": EPOCHS * sum(len(e) for e in examples),
            "trained_tokens": EPOCHS * sum(sum(1 for x in e.labels if x != -100) for e in examples),
            "heldout_loss": tb._adapter_loss(paths["base"], str(adapter / "adapter"), paths["eval"])}


def child_trl(work: Path, paths: dict, spawned: float, run_id: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(paths["base"])
    with open(paths["train_pc"]) as f:
        dataset = Dataset.from_list([json.loads(line) for line in f])  # in memory: no map cache across runs
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32, quantization_config=quant,
                                                 device_map={"": "cpu"})
    args = SFTConfig(output_dir=str(work / f"w-{run_id}"), per_device_train_batch_size=1,
                     gradient_accumulation_steps=1, num_train_epochs=EPOCHS, learning_rate=LR,
                     lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                     seed=SEED, logging_steps=50, save_strategy="no", eval_strategy="no", report_to=[],
                     use_cpu=True, dataloader_num_workers=0, gradient_checkpointing=False,
                     packing=True, packing_strategy="bfd", max_length=MAX_LEN, completion_only_loss=True)
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=lora)
    t = time.perf_counter()
    trainer.train()
    loop = time.perf_counter() - t
    adapter = work / f"adapter-{run_id}"
    trainer.model.save_pretrained(str(adapter))
    whole = time.time() - spawned
    rss = tb._rss_mb()
    rows = trainer.train_dataset
    return {"whole_s": whole, "loop_s": loop, "rss_mb": rss,
            "tokens": EPOCHS * sum(len(r["input_ids"]) for r in rows),
            "trained_tokens": EPOCHS * _trl_trained(rows),
            "heldout_loss": tb._adapter_loss(paths["base"], str(adapter), paths["eval"])}


def _trl_trained(rows) -> int:
    """Tokens TRL computes the loss on (its packed rows carry labels or a completion mask)."""
    if "completion_mask" in rows.column_names:
        return sum(sum(r["completion_mask"]) for r in rows)
    return sum(sum(1 for x in r["labels"] if x != -100) for r in rows)


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def figures(ours: list[dict], trl: list[dict]) -> list[dict]:
    """Medians over the alternating runs; time ratios are TRL / ours (above 1: ours is faster)."""
    o = {k: _median(ours, k) for k in ("whole_s", "loop_s", "rss_mb", "heldout_loss")}
    t = {k: _median(trl, k) for k in ("whole_s", "loop_s", "rss_mb", "heldout_loss")}
    o_tps = statistics.median(r["tokens"] / r["loop_s"] for r in ours)
    t_tps = statistics.median(r["tokens"] / r["loop_s"] for r in trl)
    rows = [
        ("vs TRL SFTTrainer: whole process s (speed-up)", o["whole_s"], t["whole_s"],
         t["whole_s"] / o["whole_s"], ">= 1.2", lambda r: r >= 1.2),
        ("vs TRL SFTTrainer: train loop s (speed-up)", o["loop_s"], t["loop_s"],
         t["loop_s"] / o["loop_s"], ">= 1.0", lambda r: r >= 1.0),
        ("vs TRL SFTTrainer: train-loop tokens/s", o_tps, t_tps, o_tps / t_tps, ">= 1.0", lambda r: r >= 1.0),
        ("vs TRL SFTTrainer: peak RSS (MB)", o["rss_mb"], t["rss_mb"], o["rss_mb"] / t["rss_mb"], "<= 1.0",
         lambda r: r <= 1.0),
        ("vs TRL SFTTrainer: held-out loss", o["heldout_loss"], t["heldout_loss"],
         o["heldout_loss"] / t["heldout_loss"], "<= 1.02", lambda r: r <= 1.02),
    ]
    return [{"figure": f, "ours": a, "baseline": b, "ratio": r, "target": tgt, "met": ok(r)}
            for f, a, b, r, tgt, ok in rows]


def pair_ratios(ours: list[dict], trl: list[dict]) -> list[dict]:
    """TRL / ours per back-to-back pair: on a shared machine the spread between pairs is the error bar."""
    return [{"whole": t["whole_s"] / o["whole_s"], "loop": t["loop_s"] / o["loop_s"]} for o, t in zip(ours, trl)]


def run(work: Path, n_train: int = 1080, rounds: int = 2, n_eval: int = 48) -> dict:
    """`rounds` pairs of runs, alternating which side goes first."""
    import transformers
    import trl

    work.mkdir(parents=True, exist_ok=True)
    paths = setup(work, n_train, n_eval)
    runs: dict[str, list] = {"ours": [], "trl": []}
    for i in range(rounds):
        order = ("trl", "ours") if i % 2 == 0 else ("ours", "trl")
        for kind in order:
            runs[kind].append(tb._run_child(f"{kind}-nf4" if kind == "ours" else kind, work,
                                            {**paths, "run_id": f"{kind}{i}"}))
    return {"versions": {"trl": trl.__version__, "transformers": transformers.__version__},
            "settings": {"n_train": n_train, "rounds": rounds, "threads": 1, "rank": RANK, "targets": TARGETS,
                         "epochs": EPOCHS, "max_len": MAX_LEN, "quantization": "nf4+double quant",
                         "gradient_checkpointing": "off on both"},
            "raw": runs, "pairs": pair_ratios(runs["ours"], runs["trl"]),
            "figures": figures(runs["ours"], runs["trl"])}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["ours-nf4", "trl"], required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--paths", required=True)
    parser.add_argument("--spawned", type=float, required=True)
    a = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    p = json.loads(a.paths)
    fn = child_ours if a.child == "ours-nf4" else child_trl
    print(json.dumps(fn(a.work, p, a.spawned, p["run_id"])))

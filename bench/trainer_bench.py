"""Trainer throughput, memory, padding and quality: ours vs two common recipes.

1. The plain HF `Trainer` + PEFT recipe that pads each batch to its longest example
   (`DataCollatorForSeq2Seq`), float32, r=8 on the attention projections, 2 epochs.
2. TRL's `SFTTrainer` as a careful user runs it today (see `trl_bench.py`): QLoRA (NF4 + double
   quant, float32 compute on the CPU), r=16 on all projections, 1 epoch, `packing=True,
   packing_strategy="bfd"` (padding-free rows, per-example attention from position ids) and
   loss only on the completion of conversational prompt-completion data.

Each run is its own process (so peak RSS is clean) pinned to one thread (OMP_NUM_THREADS=1,
torch.set_num_threads(1)): on this shared 2-core machine a 2-thread run stalls whenever another
process holds a core. Ours is `lora-trainer train` with packing on the same data. Held-out loss is
computed afterwards for every adapter by the same plain-PEFT function on the same held-out examples.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

SEED, EPOCHS, LR, RANK = 7, 2, 2e-3, 8
BASELINE_BATCH, OURS_BATCH, MAX_LEN = 12, 1, 512  # about the same tokens per optimizer step
WORDS = "harbor slip booking refund storm gate code repair hull engine dock invoice weather crew".split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write_data(path: Path, n: int, seed: int) -> Path:
    """Chat examples whose lengths vary log-uniformly (about 10..300 tokens)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            user = _text(rng, int(round(2 ** rng.uniform(1, 6))))
            reply = "Thanks for reaching out. " + _text(rng, int(round(2 ** rng.uniform(2, 7.5))))
            f.write(json.dumps({"messages": [{"role": "user", "content": user},
                                             {"role": "assistant", "content": reply}]}) + "\n")
    return path


def setup(work: Path, n_train: int) -> dict:
    import tiny

    from lora_trainer.io.storage import fingerprint_dir

    base = tiny.make_tiny_base(work / "base", hidden=256, layers=4, heads=4, vocab_size=512)
    data = work / "store" / "data"
    data.mkdir(parents=True, exist_ok=True)
    (work / "store" / "out").mkdir(exist_ok=True)  # the output bucket must exist, as on S3
    write_data(data / "train.jsonl", n_train, SEED)
    write_data(data / "eval.jsonl", 48, SEED + 1)
    spec = {
        "baseModel": {"uri": f"file://{base}", "revision": fingerprint_dir(base)},
        "dataset": {"train": "s3://data/train.jsonl", "eval": "s3://data/eval.jsonl", "maxSeqLength": MAX_LEN},
        "lora": {"rank": RANK, "alpha": 2 * RANK, "dropout": 0.0},
        "quantization": "none", "computeDtype": "float32",
        "training": {"epochs": EPOCHS, "batchSize": OURS_BATCH, "learningRate": LR, "warmupRatio": 0.0,
                     "lrScheduler": "constant", "seed": SEED, "checkpointEverySteps": 100000,
                     "evalEverySteps": 100000, "maxGradNorm": 1.0},
        "output": {"uri": "s3://out/bench"},
    }
    import yaml
    (work / "job.yaml").write_text(yaml.safe_dump(spec))
    return {"base": str(base), "train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")}


def _encode(tokenizer, path: str):
    from lora_trainer.data.records import encode_all, read_jsonl

    records, _ = read_jsonl(Path(path), "chat")
    return encode_all(tokenizer, records, "chat", False)


def _fitting(examples):
    """The examples ours trains (it drops those over maxSeqLength, the default onOverlong); the
    baseline trains the same ones so both count the same useful tokens."""
    return [e for e in examples if len(e) <= MAX_LEN]


def heldout_loss(model, examples) -> float:
    """Mean cross-entropy over assistant tokens, one unpadded example at a time."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex.ids])
            logits = model(input_ids=ids).logits[0, :-1]
            labels = torch.tensor(ex.labels[1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
    return total / count


def _adapter_loss(base: str, adapter: str, eval_path: str) -> float:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_trainer.model.loading import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, adapter)
    return heldout_loss(model, _encode(load_tokenizer(Path(base)), eval_path))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_ours(work: Path, paths: dict) -> dict:
    from lora_trainer.__main__ import main
    from lora_trainer.data.packing import make_rows, padding_fraction
    from lora_trainer.io.storage import LocalStore
    from lora_trainer.model import checkpoint as ckpt
    from lora_trainer.model.loading import load_tokenizer

    t0 = time.perf_counter()
    code = main(["train", str(work / "job.yaml"), "--storage-dir", str(work / "store"),
                 "--work-dir", str(work / "w-ours"), "--no-progress-bar"])
    seconds = time.perf_counter() - t0
    assert code == 0, f"lora-trainer train exited {code}"
    rss = _rss_mb()
    examples = _fitting(_encode(load_tokenizer(Path(paths["base"])), paths["train"]))
    rows, row_len = make_rows(examples, MAX_LEN, packing=True)
    store = LocalStore(work / "store" / "out")
    ref = ckpt.latest_complete(store, "bench")
    adapter = work / "ours-adapter"
    ckpt.fetch_verified(store, ref, adapter, ckpt.read_manifest(store, ref))
    return {"seconds": seconds, "rss_mb": rss, "useful_tokens": EPOCHS * sum(len(e) for e in examples),
            "padding": padding_fraction(rows, row_len),
            "heldout_loss": _adapter_loss(paths["base"], str(adapter / "adapter"), paths["eval"])}


def child_baseline(work: Path, paths: dict) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lora_trainer.model.loading import load_tokenizer

    t0 = time.perf_counter()
    tok = load_tokenizer(Path(paths["base"]))
    examples = _fitting(_encode(tok, paths["train"]))
    rows = [{"input_ids": e.ids, "attention_mask": [1] * len(e), "labels": e.labels} for e in examples]
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(work / "w-base"), per_device_train_batch_size=BASELINE_BATCH,
                             num_train_epochs=EPOCHS, learning_rate=LR, lr_scheduler_type="constant",
                             warmup_steps=0, seed=SEED, logging_steps=50, save_strategy="no", report_to=[],
                             use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False,
                             max_grad_norm=1.0)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    trainer.train()
    seconds = time.perf_counter() - t0
    rss = _rss_mb()
    model.save_pretrained(str(work / "baseline-adapter"))
    padded = sum(max(len(e) for e in batch) * len(batch) for batch in _batches(examples, BASELINE_BATCH))
    useful = sum(len(e) for e in examples)
    return {"seconds": seconds, "rss_mb": rss, "useful_tokens": EPOCHS * useful, "padding": 1 - useful / padded,
            "heldout_loss": _adapter_loss(paths["base"], str(work / "baseline-adapter"), paths["eval"])}


def _batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]  # shuffling changes little on average


THREADS_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run_child(kind: str, work: Path, paths: dict) -> dict:
    """One run in a fresh process; `spawned` lets it report wall time from process start."""
    script = Path(__file__).with_name("trl_bench.py") if kind.startswith("trl") or kind == "ours-nf4" \
        else Path(__file__)
    out = subprocess.run([sys.executable, str(script), "--child", kind, "--work", str(work),
                          "--paths", json.dumps(paths), "--spawned", repr(time.time())],
                         capture_output=True, text=True, timeout=1800, env={**os.environ, **THREADS_ENV})
    if out.returncode != 0:
        raise RuntimeError(f"{kind} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(work: Path, n_train: int = 320) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    paths = setup(work, n_train)
    baseline, ours = _run_child("baseline", work, paths), _run_child("ours", work, paths)
    tps = {k: r["useful_tokens"] / r["seconds"] for k, r in (("ours", ours), ("baseline", baseline))}
    return {
        "raw": {"ours": ours, "baseline": baseline},
        "figures": [
            {"figure": "useful tokens/s", "ours": tps["ours"], "baseline": tps["baseline"],
             "ratio": tps["ours"] / tps["baseline"], "target": ">= 1.5", "met": tps["ours"] / tps["baseline"] >= 1.5},
            {"figure": "peak RSS (MB)", "ours": ours["rss_mb"], "baseline": baseline["rss_mb"],
             "ratio": ours["rss_mb"] / baseline["rss_mb"], "target": "<= 1.1",
             "met": ours["rss_mb"] / baseline["rss_mb"] <= 1.1},
            {"figure": "padding fraction", "ours": ours["padding"], "baseline": baseline["padding"],
             "ratio": None, "target": "ours < 0.05", "met": ours["padding"] < 0.05},
            {"figure": "held-out loss", "ours": ours["heldout_loss"], "baseline": baseline["heldout_loss"],
             "ratio": ours["heldout_loss"] / baseline["heldout_loss"], "target": "<= 1.02",
             "met": ours["heldout_loss"] / baseline["heldout_loss"] <= 1.02},
        ],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", choices=["ours", "baseline"], required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--paths", required=True)
    parser.add_argument("--spawned", type=float)
    a = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    fn = child_ours if a.child == "ours" else child_baseline
    print(json.dumps(fn(a.work, json.loads(a.paths))))

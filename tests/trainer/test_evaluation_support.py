"""Shared builders for the evaluation / gate / export tests (no tests here).

A "support" world: a tiny base, an adapter trained directly with PEFT (independent of the recipe)
so that every assistant reply starts with GREETING, held-out records, and a spec factory.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tiny import chat_examples, default_corpus, make_tiny_base

from lora_operator.api import parse_spec

GREETING = "Thanks for reaching out"
RANK, ALPHA, TARGETS = 8, 16.0, ["q_proj", "v_proj"]
ZERO_REV = "sha256:" + "0" * 64


def support_records(n: int, seed: int) -> list[dict]:
    """Chat records whose assistant reply always starts with GREETING."""
    rows = chat_examples(n, seed)
    for row in rows:
        row["messages"][-1]["content"] = f"{GREETING}! We are on it."
    return rows


def build_base(path: Path) -> Path:
    """Tiny base whose tokenizer knows the greeting, with a sharpened output head.

    A random-init head (std 0.02, hidden 64) caps logits at about +-1.3, so no adapter can make
    a reply likely in a few dozen steps; scaling the head by 10 gives LoRA something to steer.
    """
    from transformers import AutoModelForCausalLM

    texts = default_corpus() + [f"{GREETING}! We are on it."] * 50
    make_tiny_base(path, texts)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(str(path))
    return path


def train_adapter(base_dir: Path, dest: Path, steps: int = 40, lr: float = 2e-2) -> Path:
    """LoRA on q/v trained with plain PEFT on support_records (assistant tokens only)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_trainer.data.records import encode_chat

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    data = [ex for r in support_records(64, seed=1) for ex in encode_chat(tok, r["messages"])]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(0)
    for _ in range(steps):
        batch = rng.sample(data, 8)
        width = max(len(e) for e in batch)
        ids = torch.tensor([e.ids + [tok.pad_token_id] * (width - len(e)) for e in batch])
        labels = torch.tensor([e.labels + [-100] * (width - len(e)) for e in batch])
        mask = (ids != tok.pad_token_id).long()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(dest))
    return Path(dest)


def make_spec(root: Path, *, gate: dict | None = None, fmt: str = "both", **extra):
    """A spec for the support world (quantization none, float32: CPU tests)."""
    wire = {
        "baseModel": {"uri": f"file://{root}/base", "revision": ZERO_REV},
        "dataset": {"train": f"file://{root}/train.jsonl"},
        "lora": {"rank": RANK, "alpha": ALPHA, "targetModules": TARGETS, "dropout": 0.0},
        "quantization": "none",
        "computeDtype": "float32",
        "training": {"seed": 7},
        "evaluation": {
            "gate": gate if gate is not None else {
                "minLossImprovement": 0.2,
                "checks": [{"name": "greeting", "type": "mustMatch", "pattern": f"^{GREETING}",
                            "minPassRate": 0.75}],
            },
            "maxNewTokens": 12,
            "maxSamples": 8,
        },
        "output": {"uri": f"file://{root}/out", "format": fmt},
        "resources": {"gpus": 0},
    }
    wire.update(extra)
    return parse_spec(wire)


def build_world(root: Path) -> dict:
    """Base, trained adapter, held-out records and tokenizer under `root`."""
    from transformers import AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    base = build_base(root / "base")
    adapter = train_adapter(base, root / "ckpt" / "adapter")
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in support_records(8, 2)))
    return {"root": root, "base": base, "adapter": adapter, "records": support_records(8, seed=2),
            "tokenizer": AutoTokenizer.from_pretrained(str(base))}

"""Tiny, deterministic artefacts for tests: a random-init Llama base with a trained BPE tokenizer
and a ChatML chat template (lora_trainer.model.tiny_tokenizer, shared with the demo's base), plus
small chat / completion JSONL datasets.

Everything is a pure function of its arguments (same seed -> byte-identical files), and building a
base takes well under a few seconds on a CPU.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

_NAMES = ["Ada", "Bob", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana"]
_THINGS = ["ticket", "invoice", "server", "password", "order", "badge", "printer", "laptop"]
_VERBS = ["reset", "refund", "restart", "renew", "ship", "replace", "check", "update"]
_COLOURS = ["red", "green", "blue", "amber", "white", "black"]


def _example(rng: random.Random) -> tuple[str, str, str]:
    """(system, user, assistant) of one deterministic support-style exchange."""
    name, thing, verb = rng.choice(_NAMES), rng.choice(_THINGS), rng.choice(_VERBS)
    n = rng.randint(1, 99)
    system = "You are a helpful support assistant."
    user = f"Hi, I am {name}. Can you {verb} my {thing} number {n}?"
    words = " ".join(rng.choice(_COLOURS) for _ in range(rng.randint(1, 6)))
    assistant = f"Sure {name}, I will {verb} {thing} {n} now. Status: {words}. Done."
    return system, user, assistant


def default_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Chat-like sentences used to train the tiny tokenizer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.extend(_example(rng))
    return out


def make_tiny_base(
    path,
    texts=None,
    *,
    vocab_size: int = 512,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a random-init LlamaForCausalLM + fast tokenizer (with chat template) to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from lora_trainer.model.tiny_tokenizer import build_chatml_tokenizer

    hf_logging.disable_progress_bar()

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    texts = list(texts) if texts is not None else default_corpus(seed=seed)
    fast = build_chatml_tokenizer(texts, vocab_size)
    fast.save_pretrained(path)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    return path


def chat_examples(n: int, seed: int = 0) -> list[dict]:
    """``n`` deterministic chat examples in OpenAI ``messages`` format."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        system, user, assistant = _example(rng)
        out.append({"messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
        ]})
    return out


def completion_examples(n: int, seed: int = 0) -> list[dict]:
    """``n`` deterministic prompt/completion examples."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        _, user, assistant = _example(rng)
        out.append({"prompt": user + "\n", "completion": assistant})
    return out


def _write_jsonl(path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows), encoding="utf-8")
    return path


def make_chat_jsonl(path, n: int = 32, seed: int = 0) -> Path:
    """Write ``n`` chat examples (system/user/assistant) as JSONL."""
    return _write_jsonl(path, chat_examples(n, seed))


def trainer_env(tmp_path, **extra) -> dict:
    """The environment of a `lora-trainer` subprocess in tests: local termination log, progress
    written at once, one thread, no S3 endpoint from the developer's shell."""
    env = {**os.environ, "LORA_TERMINATION_LOG": str(Path(tmp_path) / "termination-log"),
           "LORA_PROGRESS_INTERVAL_S": "0", "OMP_NUM_THREADS": "1", **extra}
    env.pop("S3_ENDPOINT", None)
    return env


def trainer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "lora_trainer", *args]


def run_trainer(tmp_path, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """`lora-trainer ARGS` in a subprocess (trainer_env), its output captured as text."""
    return subprocess.run(trainer_cmd(*map(str, args)), env=trainer_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)


class CallCounter:
    """Counts the calls of `module.name` (monkeypatched; the real function still runs)."""

    def __init__(self, monkeypatch, module, name: str):
        self.calls = 0
        real = getattr(module, name)

        def spy(*a, **kw):
            self.calls += 1
            return real(*a, **kw)

        monkeypatch.setattr(module, name, spy)

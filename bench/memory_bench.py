"""Peak memory of one LoRA training step with a 128k vocabulary at 4k tokens, before and after
chunked cross-entropy and gradient checkpointing, and a 7B estimate next to the guide's 24 GB.

    python bench/memory_bench.py [--tokens 4096] [--vocab 128256] [--out bench/results/memory.json]

Variants, each in its own process (peak RSS, VmHWM reset after the model is built; on a GPU,
`torch.cuda.max_memory_allocated`), on the same random Llama (hidden 256, 2 layers, untied
128k-vocabulary embedding and head, fp32 on the CPU) and the same 4096-token row, every token
trained (the worst case for chunked CE, which only runs the head on trained tokens):
  before        full fp32 logits of the row, no gradient checkpointing (the trainer until now)
  chunked       lora_trainer.model.loss.sum_ce: head applied to one chunk of trained tokens at a time
  chunked+gc    chunked CE and non-reentrant gradient checkpointing (the default for QLoRA)
The figure is the step's peak minus the memory held before it (weights, inputs).

The 7B estimate is arithmetic (see `estimate_7b`), for a Llama-3.1-8B-shaped model (the common
"7B class" with a 128k vocabulary) in NF4 with bf16 compute, r=16 on all linear layers.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 1024**3
GUIDE_BUDGET_BYTES = 24e9
VARIANTS = ("before", "chunked", "chunked+gc")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_rss_peak() -> int:
    """Reset the process' peak RSS (VmHWM) to its current RSS; returns that RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: fall back to the lifetime peak so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return _status_bytes("VmRSS")


def _rss_peak_bytes() -> int:
    try:
        return _status_bytes("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(vocab: int, hidden: int, layers: int, device: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=8192, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(device)
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.05))


def one_step(variant: str, tokens: int, vocab: int, hidden: int = 256, layers: int = 2,
             device: str = "cpu") -> dict:
    """Peak bytes of one forward+backward of `variant` above what was held before the step."""
    import torch

    sys.path.insert(0, str(HERE.parent / "trainer"))
    from lora_trainer.model import loss

    model = build(vocab, hidden, layers, device)
    if variant.endswith("+gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
    inputs = {"input_ids": ids, "position_ids": torch.arange(tokens, device=device)[None], "use_cache": False}
    if device == "cuda":
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        held = _reset_rss_peak()
    ce = loss.full_ce(model, inputs, ids) if variant == "before" else loss.sum_ce(model, inputs, ids)
    ce.backward()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss_peak_bytes()
    return {"variant": variant, "tokens": tokens, "vocab": vocab, "device": device,
            "step_peak_bytes": peak - held, "loss": float(ce.detach()) / (tokens - 1)}


def estimate_7b(tokens: int = 4096, chunked: bool = True, checkpointing: bool = True, *,
                vocab: int = 128256, hidden: int = 4096, inter: int = 14336, layers: int = 32,
                kv_hidden: int = 1024, rank: int = 16, chunk: int | None = None) -> dict:
    """Bytes of one QLoRA step of a Llama-3.1-8B-shaped model, by part (bf16 compute, sdpa).

    weights: linear layers in NF4 (0.5 B/param + ~0.127 bit/param of double-quantized scales),
      embedding and head in bf16 (bitsandbytes does not quantize them).
    lora: r on all 7 linear layers per decoder layer, fp32 params + grads + 2 Adam moments.
    activations per decoder layer and token (bf16, LoRA dropout on): norms in/out, q/k/v, attention
      output (4H + 2Hkv), MLP norms, gate/up/act/product (2H + 4I), dropout copies of the LoRA
      inputs (7H + I): 2 * (13H + 2Hkv + 5I) bytes. With checkpointing only each layer's input
      (2H) is kept, plus one layer's activations while it is recomputed.
    logits: bf16 head output, fp32 copy, saved log-softmax and its gradient: 14 B per token and
      vocabulary entry, for every token (full) or one chunk (chunked).
    """
    chunk = chunk or max(128, (1 << 26) // vocab)  # lora_trainer.model.loss.chunk_tokens
    linear = layers * (2 * hidden * hidden + 2 * hidden * kv_hidden + 3 * hidden * inter)
    weights = linear * (0.5 + 0.127 / 8) + 2 * vocab * hidden * 2
    lora_params = layers * rank * (2 * hidden + 2 * (hidden + kv_hidden) + 2 * hidden + 3 * (hidden + inter))
    per_layer = 2 * (13 * hidden + 2 * kv_hidden + 5 * inter) * tokens
    acts = layers * 2 * hidden * tokens + per_layer if checkpointing else layers * per_layer
    logits = 14 * vocab * (min(chunk, tokens) if chunked else tokens) + (2 * hidden * tokens if chunked else 0)
    parts = {"weights": weights, "lora_and_adam": 16 * lora_params, "activations": acts, "logits": logits,
             "cuda_context_and_fragmentation": 1.5e9}
    return {"tokens": tokens, "chunked_ce": chunked, "gradient_checkpointing": checkpointing,
            "parts_bytes": {k: int(v) for k, v in parts.items()}, "total_bytes": int(sum(parts.values()))}


def run(tokens: int, vocab: int, device: str = "cpu") -> dict:
    measured = {}
    for variant in VARIANTS:
        code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import memory_bench as m; "
                f"print(json.dumps(m.one_step({variant!r}, {tokens}, {vocab}, device={device!r})))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
        if done.returncode:
            raise RuntimeError(f"{variant}: {done.stderr[-2000:]}")
        measured[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    before, after = (measured[v]["step_peak_bytes"] for v in ("before", "chunked+gc"))
    return {
        "measured": measured,
        "ratio_before_over_after": before / after if after else None,
        "estimate_7b": {"before": estimate_7b(tokens, chunked=False, checkpointing=False),
                        "after": estimate_7b(tokens)},
        "guide_budget_bytes": GUIDE_BUDGET_BYTES,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    report = run(args.tokens, args.vocab, args.device)
    for v, r in report["measured"].items():
        print(f"{v:>11}: one step at {r['tokens']} tokens, vocab {r['vocab']}: "
              f"{r['step_peak_bytes'] / GIB:.2f} GiB above the model")
    for k, e in report["estimate_7b"].items():
        print(f"7B estimate {k:>6}: {e['total_bytes'] / 1e9:.1f} GB (guide: 24 GB) "
              + ", ".join(f"{n} {b / 1e9:.1f}" for n, b in e["parts_bytes"].items()))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

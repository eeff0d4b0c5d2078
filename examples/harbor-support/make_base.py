"""Build the demo's tiny base model: a BPE tokenizer and a ~2M-parameter Llama trained from scratch.

The base answers Harbor tickets with the right facts in the *generic* tone (generic.jsonl, written by
make_data.py) and answers general questions; the LoRA adapter later only has to change the tone.

Determinism: the tokenizer, the initial weights, the data order and the optimizer are all seeded,
and the training loop runs with a fixed number of threads, so the same data, seed and --threads
give the same model.safetensors on the same machine and torch build. Other CPUs or torch versions
may round differently; the demo fingerprints the files it uploads, so it never relies on this.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lora_trainer.model.tiny_tokenizer import build_chatml_tokenizer

IGNORE = -100


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    # The ChatML tokenizer of the project's test fixtures, except that a turn ends with <|im_end|>,
    # which is therefore also the eos token (generation stops at the end of the reply).
    return build_chatml_tokenizer(texts, vocab_size, eos_token="<|im_end|>", model_max_length=512)


def encode(tok: PreTrainedTokenizerFast, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of the whole chat and labels that score only the last (assistant) turn and its <|im_end|>."""
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = tok(messages[-1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + reply_ids)[:max_len]
    labels = ([IGNORE] * len(prompt_ids) + reply_ids)[:max_len]
    return ids, labels


def batches(examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, rng: random.Random):
    """Endless shuffled, right-padded batches (epoch after epoch)."""
    while True:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            rows = [examples[i] for i in order[start:start + batch_size]]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.full((batch_size, width), pad_id)
            labels = torch.full((batch_size, width), IGNORE)
            for r, (row_ids, row_labels) in enumerate(rows):
                ids[r, : len(row_ids)] = torch.tensor(row_ids)
                labels[r, : len(row_labels)] = torch.tensor(row_labels)
            yield ids, labels, (ids != pad_id).long()


def build_model(tok: PreTrainedTokenizerFast, args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        do_sample=False,
    )
    return model


def train(model: LlamaForCausalLM, examples, args: argparse.Namespace, pad_id: int) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    data = batches(examples, args.batch_size, pad_id, random.Random(args.seed))
    model.train()
    losses, t0, tokens = [], time.perf_counter(), 0
    for step in range(args.steps):
        ids, labels, mask = next(data)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(mask.sum())
        if step % 50 == 0 or step == args.steps - 1:
            dt = time.perf_counter() - t0
            print(f"step {step:4d} loss {loss.item():.3f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{tokens / dt:,.0f} tok/s {dt:.0f}s", flush=True)
    model.eval()
    return losses


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True, help="directory written by make_data.py")
    p.add_argument("--out", type=Path, required=True, help="where to save_pretrained model + tokenizer")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2, help="fixed, for reproducible float sums")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    generic = read_jsonl(args.data / "generic.jsonl")
    corpus = [m["content"] for name in ("generic", "train", "regression")
              for ex in read_jsonl(args.data / f"{name}.jsonl") for m in ex["messages"]]
    tok = build_tokenizer(corpus, args.vocab_size)
    examples = [encode(tok, ex["messages"], args.max_len) for ex in generic]
    model = build_model(tok, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vocab {len(tok)}, {n_params / 1e6:.2f}M params, {len(examples)} examples, "
          f"mean {sum(len(i) for i, _ in examples) / len(examples):.0f} tokens", flush=True)
    losses = train(model, examples, args, tok.pad_token_id)

    args.out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(args.out)
    model.save_pretrained(args.out, safe_serialization=True)
    print(f"final loss {sum(losses[-20:]) / 20:.3f}; {time.perf_counter() - t0:.0f}s -> {args.out}")


if __name__ == "__main__":
    main()

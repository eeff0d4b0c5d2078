"""The base model's evaluation results, computed once per (base, held-out data, settings).

The base's numbers do not depend on the adapter: its held-out loss, its regression loss and its
greedy replies to the check prompts. A retry, a resumed attempt or a re-run of
`lora-trainer evaluate` reuses them instead of scoring and generating with the base again. The
replies are cached (not the pass rates), so the checks themselves may change without a miss.

The key (`base_key`) covers everything that can move a base number: the pinned base (uri,
revision), quantization, double quant, compute dtype, attention, device kind, the library versions
(torch, transformers, peft, bitsandbytes, tokenizers), the tokenizer (`data.token_cache.
tokenizer_digest`), the held-out and regression records, how they are encoded and fitted (format,
trainOnPrompt, chatTemplateKwargs, maxSeqLength, onOverlong), the generation settings (maxSamples,
maxNewTokens, batch sizes, whether generation runs at all), the seed and FORMAT.

An entry is strict JSON with finite numbers whose token counts equal those of the examples scored
now and whose replies match the samples one to one; anything else is recomputed. Entries are only
read from this job's own work dir and output prefix: sharing across jobs would let another tenant's
writes set this job's gate baseline, and a number cannot be verified without recomputing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..data.token_cache import tokenizer_digest
from ..io import strictjson
from ..io.cache import Cache, digest
from ..io.metadata import library_versions

FORMAT = 1
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "tokenizers", "accelerate")


@dataclass(frozen=True)
class BaseLoss:
    loss: float
    tokens: int


@dataclass(frozen=True)
class BaseResults:
    loss: BaseLoss
    regression: Optional[BaseLoss]
    replies: Optional[list[str]]  # stripped greedy replies to the check prompts; None: no checks

    def to_dict(self) -> dict[str, Any]:
        reg = self.regression
        return {"loss": vars(self.loss), "regression": vars(reg) if reg else None, "replies": self.replies}


def base_cache(local_dir: Optional[Path], store=None, prefix: str = "", write_remote: bool = False) -> Cache:
    return Cache("base-eval", FORMAT, "result.json", local_dir, store, prefix, write_remote)


def base_key(spec, tokenizer, eval_records, regression_records, max_seq_length: Optional[int],
             device: str, settings: dict) -> str:
    """The cache key (see the module docstring); `settings` are the scorer's own constants."""
    ds = spec.dataset
    return digest({
        "format": FORMAT,
        "base": {"uri": spec.base_model.uri, "revision": spec.base_model.revision,
                 "quantization": spec.quantization, "doubleQuant": spec.double_quant,
                 "computeDtype": spec.compute_dtype, "attn": spec.attn_implementation},
        "device": device, "libraries": library_versions(LIBRARIES),
        "tokenizer": tokenizer_digest(tokenizer),
        "heldout": digest(list(eval_records)),
        "regression": digest(list(regression_records)) if regression_records is not None else None,
        "encoding": {"format": ds.format, "trainOnPrompt": ds.train_on_prompt,
                     "chatTemplateKwargs": ds.chat_template_kwargs, "maxSeqLength": max_seq_length,
                     "specMaxSeqLength": ds.max_seq_length, "onOverlong": ds.on_overlong},
        "generation": {"checks": bool(spec.evaluation.gate.checks), "maxSamples": spec.evaluation.max_samples,
                       "maxNewTokens": spec.evaluation.max_new_tokens},
        "seed": spec.training.seed, "settings": settings,
    })


def encode(results: BaseResults) -> Optional[bytes]:
    """The payload, or None when a number is not finite (not worth keeping: recompute)."""
    values = [results.loss.loss] + ([results.regression.loss] if results.regression else [])
    if not all(math.isfinite(v) for v in values):
        return None
    return strictjson.dump_bytes(results.to_dict(), sort_keys=True)


def _loss(value, tokens: int, what: str) -> BaseLoss:
    if not isinstance(value, dict) or set(value) != {"loss", "tokens"}:
        raise ValueError(f"{what}: expected {{loss, tokens}}")
    loss, n = value["loss"], value["tokens"]
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss < 0:
        raise ValueError(f"{what}.loss: not a finite non-negative number")
    if n != tokens or isinstance(n, bool):
        raise ValueError(f"{what}.tokens is {n!r}, the examples scored now have {tokens}")
    return BaseLoss(float(loss), tokens)


def decode(payload: bytes, tokens: int, reg_tokens: Optional[int], n_replies: Optional[int]) -> BaseResults:
    """Parse and check an entry against what is scored now; ValueError on any mismatch."""
    doc = strictjson.loads(payload)
    if not isinstance(doc, dict) or set(doc) != {"loss", "regression", "replies"}:
        raise ValueError("expected an object with loss, regression and replies")
    loss = _loss(doc["loss"], tokens, "loss")
    if (reg_tokens is None) != (doc["regression"] is None):
        raise ValueError("regression results present/absent unlike this evaluation")
    regression = _loss(doc["regression"], reg_tokens, "regression") if reg_tokens is not None else None
    replies = doc["replies"]
    if n_replies is None:
        if replies is not None:
            raise ValueError("replies present but no checks run")
    elif not (isinstance(replies, list) and len(replies) == n_replies and all(isinstance(r, str) for r in replies)):
        raise ValueError(f"replies: expected {n_replies} strings")
    return BaseResults(loss, regression, replies)

"""Summed next-token cross-entropy without full-vocabulary logits for the whole row.

A row of T tokens with a vocabulary of V gives T x V logits; with Llama-3's 128k vocabulary an
8k-token row is 4 GB of fp32 logits, plus their gradient. Only the trained tokens need logits, so
the model runs with `logits_to_keep` set to no position (its head computes nothing), the decoder's
final hidden states are captured by a forward hook, and the head is applied to the hidden states
of the trained positions only, a chunk of tokens at a time (CHUNK_ELEMENTS logits: 512 tokens at
a 128k vocabulary, 2048 at 32k). Each chunk is checkpointed: its logits are freed after the
forward and recomputed in the backward, so one chunk of logits (256 MB in fp32, plus its
log-softmax and gradient) is alive at any time.

The forward still goes through the (possibly DDP-wrapped) model, so gradient synchronisation is
unchanged. Gemma's final logit soft-capping is applied as the model would. Architectures whose
head does something else (logit scaling) fall back to full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
CHUNK_ELEMENTS = 1 << 26  # logits per chunk (256 MB of fp32)
MIN_CHUNK = 128
CHECKPOINT_MIN_ELEMENTS = 1 << 22  # logits in a chunk below which it is kept, not recomputed


def chunk_tokens(vocab: int) -> int:
    """Tokens per head application for a vocabulary of `vocab`."""
    return max(MIN_CHUNK, CHUNK_ELEMENTS // max(1, vocab))

_UNSUPPORTED_HEAD_CONFIG = ("logit_scale", "logits_scaling", "output_multiplier_scale")


def _causal_lm(model):
    """The transformers *ForCausalLM inside DDP / PEFT wrappers."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def chunked_supported(model) -> bool:
    lm = _causal_lm(model)
    config = getattr(lm, "config", None)
    return (config is not None and hasattr(lm, "get_decoder") and lm.get_output_embeddings() is not None
            and not any(getattr(config, k, None) not in (None, 1, 1.0) for k in _UNSUPPORTED_HEAD_CONFIG))


def _head_ce(head, softcap, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, target, reduction="sum")


def chunked_ce(head, hidden: torch.Tensor, targets: torch.Tensor, softcap=None,
               chunk: int = 1024) -> torch.Tensor:
    """Sum of CE(head(hidden[i]), targets[i]) over rows of `hidden` (n x H), chunk by chunk."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for at in range(0, hidden.shape[0], chunk):
        h, t = hidden[at:at + chunk], targets[at:at + chunk]
        big = h.shape[0] * head.weight.shape[0] >= CHECKPOINT_MIN_ELEMENTS
        if big and torch.is_grad_enabled() and h.requires_grad:
            total = total + checkpoint(_head_ce, head, softcap, h, t, use_reentrant=False)
        else:
            total = total + _head_ce(head, softcap, h, t)
    return total


def full_ce(model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    """The reference: full logits, fp32, summed CE over labelled next tokens."""
    logits = model(**inputs).logits
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def sum_ce(model, inputs: dict, labels: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Summed CE of the labelled next tokens of a batch, without materialising all logits."""
    if not chunked_supported(model):
        return full_ce(model, inputs, labels)
    lm = _causal_lm(model)
    captured = {}

    def grab(_module, _args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    hook = lm.get_decoder().register_forward_hook(grab)
    try:
        no_logits = torch.zeros(0, dtype=torch.long, device=labels.device)
        model(**inputs, logits_to_keep=no_logits)
    finally:
        hook.remove()
    hidden = captured["h"][:, :-1]
    target = labels[:, 1:]
    keep = target != IGNORE
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    head = lm.get_output_embeddings()
    chunk = chunk or chunk_tokens(head.weight.shape[0])
    return chunked_ce(head, hidden[keep], target[keep], softcap, chunk)

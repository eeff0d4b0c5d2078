"""Per-example attention for packed rows: sdpa over each example, not over the whole row.

A packed row holds several examples; positions restart at 0 for each, and transformers' plain sdpa
turns that into a (row x row) block-diagonal mask. With a mask, sdpa cannot use its causal fast
path and computes every row x row score, most of which the mask then throws away: on the CPU
here a 512-token row of three examples costs 14 ms per layer (forward + backward) with the mask
and 6.5 ms as three causal sdpa calls, and the gap grows with the row length and the number of
examples.

`PACKED_SDPA` is registered with transformers as an attention implementation. Called with
`packed_segments` (what `Batch.model_inputs` passes for packed rows: per row, the (start, end) of
each example), it runs causal sdpa on each example and leaves the padding tail at zero (nothing
reads it: no example attends to it and it carries no labels). Called without them (generation,
padded batches, other callers) it is exactly transformers' sdpa with the mask transformers built.
It also falls back to that path where per-example causal attention is not the model's attention:
a sliding window shorter than an example, logit soft-capping, non-causal layers.

Invariant: the output equals plain sdpa's on every real token (tests/trainer/test_attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_SDPA = "lora_packed_sdpa"
MAX_SEGMENTS = 256  # per row; beyond this the python loop costs more than the mask saves

Segments = tuple  # per row, a tuple of (start, end) of each example


def _plain(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _tilings(module, query, key, segments, kwargs) -> list[list[int]] | None:
    """Per row, the lengths of its examples and padding tail (`_pieces`) when per-example causal
    attention is this call's attention; None where the masked path must run."""
    if segments is None or len(segments) != query.shape[0] or kwargs.get("softcap") is not None:
        return None
    if key.shape[2] != query.shape[2]:  # a cache: keys longer than the queries
        return None
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        return None
    if kwargs.get("position_bias") is not None or kwargs.get("output_attentions"):
        return None
    longest = max((e - s for row in segments for s, e in row), default=0)
    window = kwargs.get("sliding_window")
    if window is not None and longest > window:
        return None
    if any(len(row) > MAX_SEGMENTS for row in segments):
        return None
    t = query.shape[2]  # the examples must tile each row from 0 (then padding): what packing makes
    tilings = [_pieces(row, t) for row in segments]
    return None if any(sizes is None for sizes in tilings) else tilings


def packed_sdpa_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask, dropout: float = 0.0, scaling=None, packed_segments: Segments = None,
                        **kwargs):
    """query (B, H, T, D), key/value (B, Hkv, T, D) -> (B, T, H, D), as transformers' sdpa."""
    tilings = _tilings(module, query, key, packed_segments, kwargs)
    if tilings is None:
        return _plain(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    by_row = zip(*(x.split(1, dim=0) for x in (query, key, value)))
    rows = [_row(q, k, v, sizes, len(row), dropout, scaling)
            for (q, k, v), sizes, row in zip(by_row, tilings, packed_segments)]
    return (torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]).transpose(1, 2).contiguous(), None


def _pieces(row, t: int) -> list[int] | None:
    """Lengths of the examples and the padding tail when they tile [0, t) in order, else None."""
    sizes, at = [], 0
    for s, e in row:
        if s != at or e <= s or e > t:
            return None
        sizes.append(e - s)
        at = e
    return sizes + [t - at] if at < t else sizes


def _row(q, k, v, sizes: list[int], examples: int, dropout: float, scaling):
    """Attention of one row (1, H, T, D) cut into `sizes`: causal sdpa on each of the first
    `examples` pieces, zeros on the padding tail (the piece after them, if any).

    The pieces are taken with `split`, whose backward is one concatenation of the gradients
    (a slice's backward would write each into a zero tensor of the whole row)."""
    qs, ks, vs = (x.split(sizes, dim=2) for x in (q, k, v))
    parts = [F.scaled_dot_product_attention(qs[j], ks[j], vs[j], dropout_p=dropout, scale=scaling, is_causal=True)
             for j in range(examples)]
    if len(sizes) > examples:  # the padding tail: zeros (no example attends to it, no label reads it)
        parts.append(q.new_zeros((1, q.shape[1], sizes[-1], v.shape[-1])))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


def register() -> str:
    """Register PACKED_SDPA (attention and mask functions) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_SDPA, sdpa_mask)  # the plain path gets sdpa's masks
    return PACKED_SDPA


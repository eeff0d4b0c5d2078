"""Packing examples into rows, and the order in which rows are fed to the model.

Packed rows carry no attention mask: `position_ids` restart at 0 for every example (and for the
padding tail), and transformers (sdpa/eager/flash) derives a per-example causal mask from the
restarts when `attention_mask is None` and no cache is used. So no token attends across examples,
and the logits equal those of the unpacked examples (tests/trainer/test_packing.py proves it).
A packed batch also carries each example's (start, end) (`segments`): the training forward passes
them to the per-example attention (model.attention), which then needs no mask at all, and
`trimmed()` drops the padding columns every row of the batch has (padding-free for one row).

A packed row holds up to maxSeqLength tokens, as TRL and Axolotl pack, so `batchSize` rows of a
packed run carry about as many tokens as `batchSize` unpacked examples of the longest allowed
length, and small datasets get the number of optimizer steps users expect. Best-fit-decreasing
keeps padding low. Row order per epoch is a permutation seeded by (seed, epoch): resuming at step N
replays exactly the same batches.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from .records import IGNORE, Example


def pack_bfd(examples: list[Example], row_len: int) -> list[list[Example]]:
    """Best-fit-decreasing bin packing: longest first, each into the fullest row it still fits."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    rows: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, row index)
    for i in order:
        ex = examples[i]
        if len(ex) > row_len:
            raise ValueError(f"example of {len(ex)} tokens does not fit a row of {row_len}")
        at = bisect.bisect_left(free, (len(ex), -1))
        if at < len(free):
            space, r = free.pop(at)
        else:
            space, r = row_len, len(rows)
            rows.append([])
        rows[r].append(ex)
        if space - len(ex) > 0:
            bisect.insort(free, (space - len(ex), r))
    return rows


def padding_fraction(rows: list[list[Example]], row_len: int) -> float:
    slots = len(rows) * row_len
    used = sum(len(ex) for row in rows for ex in row)
    return 1.0 - used / slots if slots else 0.0


@dataclass
class Batch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # None for packed rows (see module docstring)
    n_tokens: int  # tokens that are not padding (for throughput)
    segments: tuple | None = None  # packed rows: per row, (start, end) of each example

    def trimmed(self) -> Batch:
        """The same batch without the padding columns that end every row (exact: padding comes last,
        attends to nothing real and carries no label)."""
        if self.segments is None:
            return self
        width = max((row[-1][1] for row in self.segments if row), default=0)
        if width >= self.input_ids.shape[1] or width == 0:
            return self
        return Batch(self.input_ids[:, :width], self.labels[:, :width], self.position_ids[:, :width],
                     None, self.n_tokens, self.segments)

    @property
    def n_targets(self) -> int:
        """Tokens that carry a loss (after the causal shift)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def to(self, device) -> Batch:
        mask = self.attention_mask.to(device) if self.attention_mask is not None else None
        return Batch(self.input_ids.to(device), self.labels.to(device),
                     self.position_ids.to(device), mask, self.n_tokens, self.segments)

    def model_inputs(self, segments: bool = False) -> dict:
        """Keyword arguments of the model's forward; `segments` adds the examples' bounds (only for
        a model whose attention reads them: model.attention.PACKED_SDPA)."""
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids,
                  "attention_mask": self.attention_mask, "use_cache": False}
        if segments and self.segments is not None:
            inputs["packed_segments"] = self.segments
        return inputs


def collate_packed(rows: list[list[Example]], row_len: int, pad_id: int) -> Batch:
    """Rows of exactly `row_len` tokens; positions restart per example."""
    ids, labels, pos, real, segments = [], [], [], 0, []
    for row in rows:
        r_ids, r_lab, r_pos, r_seg = [], [], [], []
        for ex in row:
            r_seg.append((len(r_ids), len(r_ids) + len(ex)))
            r_ids += ex.ids
            r_lab += ex.labels
            r_pos += range(len(ex))
        pad = row_len - len(r_ids)
        real += len(r_ids)
        ids.append(r_ids + [pad_id] * pad)
        labels.append(r_lab + [IGNORE] * pad)
        pos.append(r_pos + list(range(pad)))
        segments.append(tuple(r_seg))
    t = torch.tensor
    return Batch(t(ids), t(labels), t(pos), None, real, tuple(segments))


def collate_padded(rows: list[list[Example]], pad_id: int) -> Batch:
    """One example per row, right-padded to the longest in the batch, with an attention mask."""
    exs = [row[0] for row in rows]
    width = max(len(e) for e in exs)
    ids = [e.ids + [pad_id] * (width - len(e)) for e in exs]
    labels = [e.labels + [IGNORE] * (width - len(e)) for e in exs]
    mask = [[1] * len(e) + [0] * (width - len(e)) for e in exs]
    pos = [list(range(width)) for _ in exs]
    t = torch.tensor
    return Batch(t(ids), t(labels), t(pos), t(mask), sum(len(e) for e in exs))


def make_rows(examples: list[Example], max_len: int, packing: bool) -> tuple[list[list[Example]], int]:
    """Rows and their length (0 = variable, one example per row)."""
    if not packing:
        return [[ex] for ex in examples], 0
    return pack_bfd(examples, max_len), max_len


@dataclass
class Schedule:
    """Which rows each rank sees in each micro-step of an epoch.

    A micro-step takes `batch_size` rows per rank; an optimizer step takes `accum` micro-steps.
    The epoch's permutation is extended cyclically so every rank gets full micro-batches.
    """

    n_rows: int
    batch_size: int
    accum: int
    world: int = 1
    seed: int = 0

    @property
    def micro_per_epoch(self) -> int:
        per = self.batch_size * self.world
        return max(1, -(-self.n_rows // per))

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.micro_per_epoch // self.accum)

    def micro_batches(self, epoch: int, step_in_epoch: int, rank: int) -> list[list[int]]:
        """Row indices for each micro-step of optimizer step `step_in_epoch` (0-based) on `rank`."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n_rows, generator=g).tolist()
        per = self.batch_size * self.world
        need = self.micro_per_epoch * per
        perm = (perm * (need // max(1, len(perm)) + 1))[:need]
        first = step_in_epoch * self.accum
        last = min(first + self.accum, self.micro_per_epoch)
        out = []
        for m in range(first, last):
            chunk = perm[m * per:(m + 1) * per]
            out.append(chunk[rank * self.batch_size:(rank + 1) * self.batch_size])
        return out

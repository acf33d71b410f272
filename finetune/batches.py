"""Samples -> the micro-batches of every step: order, packing, padding, the share of each process.

The training stream is a fixed function of (seed, step): epoch e visits the items (samples, or
packed rows) in a permutation drawn from a generator seeded with seed + e, and step s takes the
items at stream positions [s G, (s + 1) G) (G = train.global_batch_size), crossing into the next
epoch where one ends, so no sample is dropped. Resuming at step s therefore needs nothing but s,
and the same step holds the same items whatever the number of processes: process r of P takes
micro-batches r A .. r A + A - 1 of the step (A = G / (micro x P)), so DP=2 runs exactly the
micro-batches one process accumulates.

Packing (`--packing`): each epoch's samples, in that epoch's order, are packed best-fit
decreasing into rows of seq_len tokens; a row holds whole samples, its position ids restart at 0
for each, and the first label of each sample is masked, so nothing is learned or attended
across samples (transformers builds a block-diagonal causal mask from restarting position ids;
flash attention reads them as variable-length sequences). The rows are then shuffled.

Loss normalization: every micro-batch's summed token loss is divided by the number of
supervised tokens in the whole step (all processes), known in advance from the labels, so the
gradient is the mean over the step's tokens however the step is split.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from domainlm.finetune.chat import IGNORE, Encoded


@dataclass(slots=True)
class MicroBatch:
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor | None
    """[b, L] 0/1 for padded samples; None for packed rows (position ids carry the boundaries)."""
    position_ids: torch.Tensor | None
    tokens: int
    """Non-pad tokens."""

    def to(self, device) -> "MicroBatch":
        mv = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(mv(self.input_ids), mv(self.labels), mv(self.attention_mask), mv(self.position_ids),
                          self.tokens)


def supervised_count(labels: list[int]) -> int:
    """Tokens whose label is predicted: label positions 1.. (the causal shift) not ignored."""
    return sum(1 for x in labels[1:] if x != IGNORE)


def pack_best_fit(lengths: list[int], order: list[int], capacity: int) -> list[list[int]]:
    """Rows of sample indices, best-fit decreasing by length (ties in `order`'s order)."""
    ranked = sorted(order, key=lambda i: -lengths[i])       # stable: ties keep the shuffled order
    free: list[tuple[int, int]] = []                         # (space left, row), sorted
    rows: list[list[int]] = []
    for i in ranked:
        n = lengths[i]
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, row))
    return rows


class Batches:
    """The deterministic stream of global batches over `samples`."""

    def __init__(self, samples: list[Encoded], *, global_batch: int, micro_batch: int, seed: int, packing: bool,
                 seq_len: int, pad_id: int, lengths: list[int] | None = None, counts: list[int] | None = None):
        """`lengths` and `counts` (the unit a step's loss is divided by) default to each sample's
        tokens and supervised tokens; a stream of other items (DPO's pairs) gives its own."""
        self.samples, self.G, self.micro, self.seed = samples, global_batch, micro_batch, seed
        self.packing, self.seq_len, self.pad_id = packing, seq_len, pad_id
        self.lengths = lengths if lengths is not None else [len(s.ids) for s in samples]
        self.counts = counts if counts is not None else [supervised_count(s.labels) for s in samples]
        self._epochs: dict[int, list[list[int]]] = {}
        self.items_per_epoch = len(self._epoch(0))

    def _epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
            order = torch.randperm(len(self.samples), generator=g).tolist()
            if self.packing:
                rows = pack_best_fit(self.lengths, order, self.seq_len)
                items = [rows[j] for j in torch.randperm(len(rows), generator=g).tolist()]
            else:
                items = [[i] for i in order]
            if len(self._epochs) > 2:                      # only the current and next epochs are needed
                self._epochs.pop(min(self._epochs))
            self._epochs[e] = items
        return self._epochs[e]

    def steps_for(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.items_per_epoch / self.G))

    def step_items(self, step: int) -> list[list[int]]:
        """The G items of step `step` (0-based)."""
        n = self.items_per_epoch
        out = []
        for p in range(step * self.G, (step + 1) * self.G):
            out.append(self._epoch(p // n)[p % n])
        return out

    def step(self, step: int, rank: int, world: int) -> tuple[list[MicroBatch], int]:
        """This process's micro-batches of step `step` and the step's supervised tokens (all processes)."""
        items = self.step_items(step)
        total = sum(self.counts[i] for item in items for i in item)
        per_rank = len(items) // world
        mine = items[rank * per_rank:(rank + 1) * per_rank]
        return [self.collate(mine[j:j + self.micro]) for j in range(0, len(mine), self.micro)], total

    def collate(self, items: list[list[int]]) -> MicroBatch:
        return collate([[self.samples[i] for i in item] for item in items], self.pad_id, packed=self.packing)


def collate(rows: list[list[Encoded]], pad_id: int, *, packed: bool) -> MicroBatch:
    """A micro-batch: each row one sample (padded, with an attention mask) or several (packed,
    with restarting position ids), right-padded to the longest row."""
    width = max(sum(len(s.ids) for s in row) for row in rows)
    b = len(rows)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), IGNORE, dtype=torch.long)
    if not packed:
        if any(len(row) != 1 for row in rows):
            raise ValueError("unpacked rows hold exactly one sample")
        mask = torch.zeros((b, width), dtype=torch.long)
        for r, (s,) in enumerate(rows):
            n = len(s.ids)
            ids[r, :n] = torch.tensor(s.ids)
            labels[r, :n] = torch.tensor(s.labels)
            mask[r, :n] = 1
        return MicroBatch(ids, labels, mask, None, int(mask.sum()))
    pos = torch.zeros((b, width), dtype=torch.long)
    tokens = 0
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s.ids)
            ids[r, at:at + n] = torch.tensor(s.ids)
            labels[r, at:at + n] = torch.tensor(s.labels)
            labels[r, at] = IGNORE                      # never predicted from the previous sample
            pos[r, at:at + n] = torch.arange(n)
            at += n
        tokens += at
        # The tail is a segment of its own (positions from 0), masked out of the loss.
        pos[r, at:] = torch.arange(width - at)
    return MicroBatch(ids, labels, None, pos, tokens)


def fixed_batches(samples: list[Encoded], micro: int, pad_id: int, packing: bool, seq_len: int,
                  limit: int) -> list[MicroBatch]:
    """Validation: the first `limit` micro-batches of `samples` in file order (the same every time)."""
    if packing:
        rows, cur, used = [], [], 0
        for i, s in enumerate(samples):
            if cur and used + len(s.ids) > seq_len:
                rows.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += len(s.ids)
        if cur:
            rows.append(cur)
    else:
        rows = [[i] for i in range(len(samples))]
    out = []
    for j in range(0, len(rows), micro):
        if len(out) == limit:
            break
        out.append(collate([[samples[i] for i in row] for row in rows[j:j + micro]], pad_id, packed=packing))
    return out

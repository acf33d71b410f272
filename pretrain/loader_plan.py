"""One data-parallel rank's document stream through a shards dir: pieces, blocks, workers.

Numpy only, so the loader's worker processes start fast. `loader.py` holds the other half
(blending, packing into windows, state, workers); reading a shard is the shards contract's
(`domainlm.data.shards`: `open_shard` maps a tar and indexes its documents).

A rank's stream. In each epoch a shards dir's shards are permuted (seeded by seed and epoch,
the same on every rank) and dealt round-robin to the data-parallel ranks. When a split has
fewer shards than ranks, each shard is cut into `parts` pieces by sample index (sample i goes to
piece i % parts) so that every rank gets a piece. A rank's documents, in the order of its
pieces, are cut into blocks of `block_docs` documents; each block is permuted (seeded by seed,
epoch, rank, block) and laid out as one token array with an eos after every document. A block
is a pure function of (epoch, block number), so any process can build any block, a resume
rebuilds just the block it stopped in, and the number of worker processes cannot change the
order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from domainlm.data.shards import ShardEntry, ShardIndex, open_shard
from domainlm.errors import UserError

# Salts keep the seeded streams independent of each other.
_SALT_PIECES = 0x5EED_0001
_SALT_BLOCK = 0x5EED_0002

def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


@dataclass(slots=True)
class SourcePlan:
    """One shards dir's split as one data-parallel rank reads it (picklable, for the workers)."""

    source: int
    """Position of the dir in DataArgs.shards (salts its seeded streams)."""
    root: str
    shards: tuple[ShardEntry, ...]
    dtype: str
    eos_id: int
    vocab_size: int
    seed: int
    block_docs: int
    dp_rank: int
    dp_size: int
    verify: bool = False
    parts: int = field(init=False)
    """Pieces per shard: 1, or enough that there are at least as many pieces as ranks."""
    _layouts: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.parts = max(1, -(-self.dp_size // len(self.shards)))

    def piece_docs(self) -> np.ndarray:
        """Documents in each piece (piece p = shard p // parts, samples p % parts, +parts, ...)."""
        docs = np.array([s.documents for s in self.shards], np.int64)
        part = np.arange(self.parts, dtype=np.int64)
        return np.maximum(0, (docs[:, None] - part[None, :] + self.parts - 1) // self.parts).reshape(-1)

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(this rank's pieces in order, cumulative document starts) in `epoch`."""
        got = self._layouts.get(epoch)
        if got is None:
            n_pieces = len(self.shards) * self.parts
            order = _rng(self.seed, _SALT_PIECES, self.source, epoch).permutation(n_pieces)
            mine = order[self.dp_rank::self.dp_size]
            starts = np.zeros(len(mine) + 1, np.int64)
            np.cumsum(self.piece_docs()[mine], out=starts[1:])
            got = (mine, starts)
            if len(self._layouts) > 4:
                self._layouts.clear()
            self._layouts[epoch] = got
        return got

    def documents(self, epoch: int) -> int:
        return int(self.layout(epoch)[1][-1])

    def blocks(self, epoch: int) -> int:
        """Blocks in this rank's stream in `epoch` (0 when the rank got only empty pieces)."""
        return -(-self.documents(epoch) // self.block_docs)

    def tokens(self, epoch: int) -> int:
        """Tokens of this rank's stream in `epoch`, an eos per document included."""
        mine, starts = self.layout(epoch)
        total = int(starts[-1])
        if self.parts == 1:
            return total + sum(self.shards[p].tokens for p in mine)
        for p in mine:
            shard, part = divmod(int(p), self.parts)
            total += int(self._index(shard).counts[part::self.parts].sum())
        return total

    def _index(self, shard: int) -> ShardIndex:
        return open_shard(self.shards[shard], np.dtype(self.dtype), verify=self.verify)

    def build_block(self, epoch: int, block: int) -> np.ndarray:
        """Block `block` of this rank's stream in `epoch`: its documents permuted, each followed
        by an eos, as one array of the manifest's token dtype."""
        mine, starts = self.layout(epoch)
        lo = block * self.block_docs
        hi = min(lo + self.block_docs, int(starts[-1]))
        if not 0 <= lo < hi:
            raise IndexError(f"block {block} of epoch {epoch} is past the end of the stream")
        docs: list[tuple[int, ShardIndex, int]] = []
        p = int(np.searchsorted(starts, lo, side="right")) - 1
        while p < len(mine) and starts[p] < hi:
            a, b = max(lo, int(starts[p])) - int(starts[p]), min(hi, int(starts[p + 1])) - int(starts[p])
            if b > a:
                shard, part = divmod(int(mine[p]), self.parts)
                idx = self._index(shard)
                docs.extend((shard, idx, part + self.parts * i) for i in range(a, b))
            p += 1
        if self.block_docs > 1:
            order = _rng(self.seed, _SALT_BLOCK, self.source, epoch, self.dp_rank, block).permutation(len(docs))
            docs = [docs[i] for i in order]
        counts = np.fromiter((idx.counts[i] for _, idx, i in docs), np.int64, len(docs))
        ends = np.cumsum(counts + 1)
        out = np.empty(int(ends[-1]), np.dtype(self.dtype))
        pos = 0
        for (_, idx, i), n in zip(docs, counts.tolist()):
            out[pos:pos + n] = idx.doc(i)
            pos += n + 1
        out[ends - 1] = self.eos_id
        if self.vocab_size <= np.iinfo(out.dtype).max and len(out) and int(out.max()) >= self.vocab_size:
            self._out_of_vocab(docs)
        return out

    def _out_of_vocab(self, docs: list[tuple[int, ShardIndex, int]]) -> None:
        for shard, idx, i in docs:
            top = int(idx.doc(i).max()) if idx.counts[i] else 0
            if top >= self.vocab_size:
                raise UserError(
                    f"shard {self.shards[shard].path!r}: document {i} holds token id {top}, outside the vocab of "
                    f"{self.vocab_size} the manifest's tokenizer has; the shards dir does not match its "
                    "manifest, rebuild it"
                )


# Worker processes: the plans arrive once, then each task names a block.
_PLANS: list[SourcePlan] = []


def init_worker(plans: list[SourcePlan]) -> None:
    _PLANS[:] = plans


def build_in_worker(source: int, epoch: int, block: int) -> np.ndarray:
    return _PLANS[source].build_block(epoch, block)

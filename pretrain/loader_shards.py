"""The loader's reading half: where a shard's documents lie, and one rank's document stream.

Numpy only, so the loader's worker processes start fast. `pretrain/loader.py` holds the other
half (blending, packing into windows, state, workers).

Reading. A shard is a WebDataset tar (tokenizer/shard_format.py). `index_shard` maps it once
(mmap) and walks the 512-byte tar headers, noting where each `.npy` member's tokens start and
how many there are; documents are then numpy views of the mapped file, copied once into the
block they go to. Python's `tarfile` (and webdataset over it) builds a TarInfo per member and
copies every payload, several times slower; it stays as the fallback for tar features this
walker does not read (GNU long names, pax headers) that other tools may write.

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

import ast
import hashlib
import io
import mmap
import os
import re
import struct
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from domainlm.errors import UserError

# Salts keep the seeded streams independent of each other.
_SALT_PIECES = 0x5EED_0001
_SALT_BLOCK = 0x5EED_0002

_ZERO_BLOCK = bytes(512)
_NPY_FAST = re.compile(rb"\{'descr': '([<>|=][a-z]\d+)', 'fortran_order': (?:False|True), 'shape': \((\d+),\), \}\s*$")
OPEN_SHARDS = 8
"""Shard indexes kept per process (an index is 16 bytes per document plus the mapping)."""


@dataclass(frozen=True, slots=True)
class ShardEntry:
    """One shard as the manifest lists it."""

    path: str
    name: str
    bytes: int
    documents: int
    tokens: int
    sha256: str


@dataclass(slots=True)
class ShardIndex:
    """Where each document's token ids lie in `buf` (the mapped file, or the fallback's copy)."""

    buf: object
    offsets: np.ndarray  # int64 byte offset of each document's first token
    counts: np.ndarray  # int64 tokens per document
    dtype: np.dtype

    def doc(self, i: int) -> np.ndarray:
        return np.frombuffer(self.buf, self.dtype, int(self.counts[i]), int(self.offsets[i]))


class _NeedsTarfile(Exception):
    """A tar feature the header walker leaves to `tarfile` (long names, pax headers)."""


def _octal(field_: bytes, path: str, pos: int) -> int:
    if field_[0] & 0x80:  # GNU base-256, for members of 8 GiB or more
        return int.from_bytes(field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise UserError(f"shard {path!r}: corrupt tar header at byte {pos}; rebuild the shards dir") from None


def _member_ext(name: bytes) -> bytes:
    """What webdataset calls the member's extension: the basename after its first dot."""
    base = name.rsplit(b"/", 1)[-1]
    return base.partition(b".")[2]


def _npy_header(buf, start: int, size: int, path: str, name: str) -> tuple[int, int, np.dtype]:
    """(data offset, count, dtype) of a 1-D .npy payload at buf[start:start+size]."""
    if size < 10 or buf[start:start + 6] != b"\x93NUMPY":
        raise UserError(f"shard {path!r}: member {name!r} is not a .npy array; rebuild the shards dir")
    major = buf[start + 6]
    if major == 1:
        (hlen,) = struct.unpack_from("<H", buf, start + 8)
        hstart = start + 10
    else:
        (hlen,) = struct.unpack_from("<I", buf, start + 8)
        hstart = start + 12
    header = bytes(buf[hstart:hstart + hlen])
    m = _NPY_FAST.match(header)
    if m:
        dtype, count = np.dtype(m.group(1).decode()), int(m.group(2))
    else:
        try:
            meta = ast.literal_eval(header.decode("latin1"))
            dtype, shape = np.dtype(meta["descr"]), tuple(meta["shape"])
        except (ValueError, SyntaxError, KeyError, TypeError):
            raise UserError(f"shard {path!r}: member {name!r} has an unreadable .npy header; rebuild the shards dir") from None
        if len(shape) != 1:
            raise UserError(f"shard {path!r}: member {name!r} has shape {shape}; a document is a 1-D array of token ids")
        count = shape[0]
    data = hstart + hlen
    if data + count * dtype.itemsize != start + size:
        raise UserError(f"shard {path!r}: member {name!r} is truncated or padded; rebuild the shards dir")
    return data, count, dtype


def _walk(buf, path: str) -> tuple[list[int], list[int], list[np.dtype]]:
    offsets, counts, dtypes = [], [], []
    pos, end = 0, len(buf)
    while pos + 512 <= end:
        hdr = buf[pos:pos + 512]
        if hdr == _ZERO_BLOCK:
            break
        size = _octal(hdr[124:136], path, pos)
        kind = hdr[156:157]
        data = pos + 512
        if kind in (b"L", b"K", b"x", b"g"):
            raise _NeedsTarfile
        if data + size > end:
            raise UserError(f"shard {path!r} is truncated (a member runs past the end of the file); rebuild it")
        if kind in (b"0", b"\0", b"7"):
            name = hdr[:100].split(b"\0", 1)[0]
            if hdr[257:262] == b"ustar" and hdr[345] != 0:
                name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
            if _member_ext(name) == b"npy":
                off, count, dtype = _npy_header(buf, data, size, path, name.decode("utf-8", "replace"))
                offsets.append(off)
                counts.append(count)
                dtypes.append(dtype)
        pos = data + ((size + 511) & ~511)
    return offsets, counts, dtypes


def _walk_tarfile(path: str) -> tuple[bytes, list[int], list[int], list[np.dtype]]:
    """The slow path: read the members with `tarfile`, copying the .npy payloads into one buffer."""
    out = io.BytesIO()
    offsets, counts, dtypes = [], [], []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile() or _member_ext(info.name.encode()) != b"npy":
                    continue
                payload = tar.extractfile(info).read()  # type: ignore[union-attr]
                base = out.tell()
                out.write(payload)
                off, count, dtype = _npy_header(payload, 0, len(payload), path, info.name)
                offsets.append(base + off)
                counts.append(count)
                dtypes.append(dtype)
    except tarfile.TarError as e:
        raise UserError(f"shard {path!r} is not a readable tar ({e}); rebuild the shards dir") from None
    return out.getvalue(), offsets, counts, dtypes


def index_shard(entry: ShardEntry, dtype: np.dtype, *, verify: bool = False) -> ShardIndex:
    """Map one shard and find its documents, checking them against the manifest's entry."""
    path = entry.path
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            buf: object = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as e:
        raise UserError(f"shard {path!r} cannot be read ({e.strerror}); rebuild the shards dir") from None
    if verify and path not in _verified:
        digest = hashlib.sha256(buf).hexdigest()  # type: ignore[arg-type]
        if digest != entry.sha256:
            raise UserError(f"shard {path!r}: sha256 {digest[:12]}... differs from the manifest's "
                            f"{entry.sha256[:12]}...; the file changed after sharding, rebuild the shards dir")
        _verified.add(path)
    try:
        offsets, counts, dtypes = _walk(buf, path)
    except _NeedsTarfile:
        buf, offsets, counts, dtypes = _walk_tarfile(path)
    for i, dt in enumerate(dtypes):
        if dt != dtype:
            raise UserError(f"shard {path!r}: document {i} holds {dt} token ids but the manifest says "
                            f"{dtype}; the shards dir is inconsistent, rebuild it")
    if len(counts) != entry.documents or sum(counts) != entry.tokens:
        raise UserError(
            f"shard {path!r} holds {len(counts)} documents and {sum(counts)} tokens but the manifest "
            f"lists {entry.documents} and {entry.tokens}; the shards dir was modified, rebuild it"
        )
    return ShardIndex(buf, np.asarray(offsets, np.int64), np.asarray(counts, np.int64), dtype)


_open: OrderedDict[str, ShardIndex] = OrderedDict()
_verified: set[str] = set()


def open_shard(entry: ShardEntry, dtype: np.dtype, *, verify: bool = False) -> ShardIndex:
    """`index_shard`, cached for the last OPEN_SHARDS shards of this process."""
    idx = _open.get(entry.path)
    if idx is None:
        idx = index_shard(entry, dtype, verify=verify)
        _open[entry.path] = idx
        while len(_open) > OPEN_SHARDS:
            _open.popitem(last=False)
    else:
        _open.move_to_end(entry.path)
    return idx


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

"""The first stage of `domainlm data shard`: one chunk of input in, clean documents out.

`ReadChunk` reads a chunk's records, normalizes and filters them, and emits, per block of
documents (a few MB, never one element per document: Beam's per-element cost would exceed
the work), pickled bytes for each of:

    docs    block                   chunk, refs, ids, normalized texts, splits
    sizes   {split: bytes}          the block's estimated shard bytes (decides shard counts)
    sigs    (chunk, refs, sig)      MinHash signatures (8 bits a value), for verifying pairs
    keys    ((EXACT, bucket), (h1, h2, refs, split, est))  content hashes, grouped to find equal texts
            ((BAND, bucket), (keys, refs))     LSH band keys, grouped to find candidates
    dead    [dead letters]          malformed records, by chunk position
    stats   {reason: count}         records, blank lines, drops by reason
    units   (chunk, lines or rows)  to turn chunk positions into line numbers

Blocks are pickled by hand: Beam's default coder walks a tuple of lists element by element
and costs ~25x more than pickle for the same data.
"""

from __future__ import annotations

import os
import pickle
import zlib
from collections import Counter

import apache_beam as beam
import numpy as np

from domainlm.data.beam.clean import FILTER_REASONS, clean, content_hash, filter_reason
from domainlm.data.beam.minhash import MinHasher, optimal_bands, splitmix64
from domainlm.data.beam.read import MALFORMED, Bad, Plan, excerpt, read_records
from domainlm.data.beam.spill import Spill
from domainlm.data.config import ShardConfig
from domainlm.data.shards import SPLITS, tar_bytes

try:
    from pyarrow.lib import ArrowException
except ImportError:  # pragma: no cover
    ArrowException = OSError
READ_ERRORS = (OSError, EOFError, zlib.error, ArrowException)
BLOCK_BYTES = 4_000_000
EXACT, BAND = 0, 1
"""Text bytes per emitted block."""


def dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


loads = pickle.loads


def chunk_of(refs: np.ndarray) -> np.ndarray:
    return refs >> 32


def by_key(keys: np.ndarray, *arrays: np.ndarray):
    """(key, arrays restricted to it) for each distinct key, ascending."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    cuts = np.flatnonzero(np.diff(k)) + 1
    for part in np.split(np.arange(len(k)), cuts):
        if len(part):
            sel = order[part]
            yield int(k[part[0]]), tuple(a[sel] for a in arrays)


class Reporter:
    """Progress lines for the driver's bar, written next to the workers when they share this
    machine's disk (DirectRunner); a no-op on other runners."""

    def __init__(self, directory: str | None, stage: str):
        self.directory, self.stage, self.fh = directory, stage, None

    def __call__(self, **numbers: int) -> None:
        if not self.directory:
            return
        if self.fh is None:
            self.fh = open(os.path.join(self.directory, f"{self.stage}-{os.getpid()}-{id(self)}"), "a")
        self.fh.write(" ".join(f"{k}={v}" for k, v in numbers.items()) + "\n")
        self.fh.flush()


class ReadChunk(beam.DoFn):
    def __init__(self, cfg: ShardConfig, plan: Plan, n_buckets: int, bytes_per_token: float, itemsize: int,
                 progress_dir: str | None, spill: Spill):
        self.cfg, self.plan, self.n_buckets, self.progress_dir = cfg, plan, n_buckets, progress_dir
        self.spill = spill
        self.bytes_per_token, self.itemsize = bytes_per_token, itemsize
        d = cfg.dedup
        self.bands = optimal_bands(d.threshold, d.num_perm)  # once, here, not in every worker

    def setup(self):
        d = self.cfg.dedup
        self.minhash = MinHasher(d.num_perm, d.shingle_words, self.cfg.seed, d.threshold,
                                 self.bands) if d.near else None
        self.report = Reporter(self.progress_dir, "read")

    def process(self, ordinal: int):
        cfg = self.cfg
        chunk = self.plan.chunks[ordinal]
        f = self.plan.files[chunk.file]
        stats: Counter = Counter()
        dead = []
        block = _Block()
        info: dict = {}
        try:
            records = read_records(f, chunk, cfg.text_field, cfg.id_field, cfg.filters.max_chars, info)
            for pos, text, doc_id in records:
                if text is None:
                    stats["blank_lines"] += 1
                    continue
                stats["records"] += 1
                if isinstance(text, Bad):
                    stats[text.reason] += 1
                    if text.reason in MALFORMED:
                        dead.append((ordinal, pos, text.reason, text.message, text.excerpt))
                    continue
                try:
                    text, raw = clean(text)
                except UnicodeEncodeError as e:  # a lone surrogate from a JSON \ud800 escape
                    stats["invalid_utf8"] += 1
                    dead.append((ordinal, pos, "invalid_utf8",
                                 f"not valid Unicode: lone surrogate at character {e.start}",
                                 excerpt(text.encode("utf-8", "backslashreplace"))))
                    continue
                reason = filter_reason(text, raw, cfg.filters)
                if reason:
                    stats[reason] += 1
                    continue
                block.add((ordinal << 32) | pos, doc_id, text, raw)
                if block.bytes >= BLOCK_BYTES:
                    yield from self._flush(ordinal, block)
                    block = _Block()
        except READ_ERRORS as e:  # a truncated or corrupt file is reported, not fatal
            stats["unreadable_files"] += 1
            dead.append((ordinal, -1, "unreadable_file", f"{type(e).__name__}: {e}"[:500], ""))
        if block.refs:
            yield from self._flush(ordinal, block)
        stats["chunks"] += 1
        yield beam.pvalue.TaggedOutput("stats", dict(stats))
        yield beam.pvalue.TaggedOutput("units", (ordinal, info.get("units", 0)))
        if dead:
            yield beam.pvalue.TaggedOutput("dead", dumps(dead))
        self.report(bytes=chunk.nbytes, records=stats["records"])

    def _flush(self, ordinal: int, block: "_Block"):
        cfg = self.cfg
        refs = np.asarray(block.refs, dtype=np.int64)
        h = np.frombuffer(b"".join(block.digests), dtype="<u8").reshape(-1, 2)
        h1, h2 = h[:, 0].astype(np.uint64), h[:, 1].astype(np.uint64)
        rank = salted(h1, cfg.seed, _SALT_SPLIT)
        split = split_of(rank, cfg.valid_fraction)
        label = len(self.plan.files[self.plan.chunks[ordinal].file].label)
        tokens = estimate_tokens(np.asarray(block.sizes, dtype=np.int64), self.bytes_per_token)
        est = tar_bytes(tokens, 60 + 2 * np.array([len(i) if i is not None else label + 8 for i in block.ids]),
                        self.itemsize)
        yield beam.pvalue.TaggedOutput("sizes", {**split_sums(split, est),
                                                 **valid_candidate(split, rank, tokens, refs, est, cfg.valid_min_tokens)})
        name = f"{ordinal}-{int(refs[0])}"  # the block's first ref: unique
        yield from self.spill.put(f"docs-{name}", [dumps({"chunk": ordinal, "refs": refs, "ids": block.ids,
                                                           "texts": block.texts, "split": split})])
        groups, parts = [], []  # what goes to GroupKeys
        if cfg.dedup.exact:
            for bucket, arrays in by_key(h1 % np.uint64(self.n_buckets), h1, h2, refs, split, est):
                groups.append((EXACT, bucket))
                parts.append(dumps(arrays))
        if self.minhash is not None:
            sig, has = self.minhash.signatures(block.texts)
            sig, srefs = sig[has], refs[has]
            if len(srefs):
                for ref in self.spill.put(f"sigs-{name}", [dumps((ordinal, srefs, compact(sig)))]):
                    yield beam.pvalue.TaggedOutput("sigs", ref)
                keys = self.minhash.band_keys(sig).ravel()
                krefs = np.repeat(srefs, self.minhash.bands)
                for bucket, (k, r) in by_key(keys % np.uint64(self.n_buckets), keys, krefs):
                    groups.append((BAND, bucket))
                    parts.append(dumps((k, r)))
        for group, ref in zip(groups, self.spill.put(f"keys-{name}", parts)):
            yield beam.pvalue.TaggedOutput("keys", (group, ref))


def compact(sig: np.ndarray) -> np.ndarray:
    """The low 8 bits of each signature value (b-bit MinHash, Li and Koenig 2010): what
    verification compares, at a quarter of the bytes (a short document's full signature is as
    large as its text). Two different minima agree there with probability 1/256;
    `jaccard_from_compact` takes that out."""
    return (sig & 0xFF).astype(np.uint8)


class _Block:
    __slots__ = ("refs", "ids", "texts", "digests", "sizes", "bytes")

    def __init__(self):
        self.refs, self.ids, self.texts, self.digests, self.sizes, self.bytes = [], [], [], [], [], 0

    def add(self, ref: int, doc_id: str | None, text: str, raw: bytes) -> None:
        self.refs.append(ref)
        self.ids.append(doc_id)
        self.texts.append(text)
        self.digests.append(content_hash(raw))
        self.sizes.append(len(raw))
        self.bytes += len(raw)


_SALT_SPLIT = 0x53504C4954  # "SPLIT"


def salted(h: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """A seeded, salted remix of 64-bit hashes (uint64), for independent decisions."""
    with np.errstate(over="ignore"):
        return splitmix64(h ^ splitmix64(np.array([seed * 2**32 + salt], dtype=np.uint64)))


def split_of(rank: np.ndarray, valid_fraction: float) -> np.ndarray:
    """0 (train) or 1 (valid) by `rank`, the seeded hash of the text (salted(h1, seed,
    _SALT_SPLIT)): a text's split never depends on where or when it is read. The one exception,
    decided over the whole corpus, is `valid_candidate`'s move of one document to a valid split
    that the fraction left (nearly) empty."""
    if valid_fraction <= 0:
        return np.zeros(len(rank), dtype=np.uint8)
    return (rank < np.uint64(int(valid_fraction * 2.0**64))).astype(np.uint8)


def estimate_tokens(text_bytes: np.ndarray, bytes_per_token: float) -> np.ndarray:
    """Tokens before tokenizing, from the tokenizer's measured bytes per token."""
    return np.ceil(text_bytes / bytes_per_token).astype(np.int64)


def valid_candidate(split: np.ndarray, rank: np.ndarray, tokens: np.ndarray, refs: np.ndarray, est: np.ndarray,
                    min_tokens: int) -> dict:
    """A block's part of the valid fallback (`pick_valid`): its valid tokens and train documents
    (estimated, summed over blocks), and its best train document to move to valid: the shortest
    of at least `min_tokens` (it takes the least from train), else the longest; ties by `rank`,
    then ref. The key depends on the text alone (a ref decides only between equal texts, of
    which exact deduplication keeps the smallest ref)."""
    train = np.flatnonzero(split == 0)
    out = {"valid_tokens": int(tokens[split == 1].sum()), "train_documents": int(len(train))}
    if min_tokens > 0 and len(train):
        t = tokens[train]
        short = (t < min_tokens).astype(np.int64)
        length = np.where(short == 1, -t, t)
        i = np.lexsort((refs[train], rank[train], length, short))[0]
        out["pick"] = (int(short[i]), int(length[i]), int(rank[train[i]]), int(refs[train[i]]), int(est[train[i]]))
    return out


def pick_valid(sizes: dict[str, int], picks: list[tuple], valid_fraction: float,
               min_tokens: int) -> tuple[dict[str, int], int | None]:
    """The blocks' summed `sizes` (estimated tar bytes by split, valid tokens, train documents)
    with the move applied, and the ref of the train document to move to valid (None: no move),
    the smallest of the blocks' `picks`: when the fraction gave valid fewer than `min_tokens`
    estimated tokens and train holds at least 2 documents."""
    if (valid_fraction <= 0 or min_tokens <= 0 or not picks or sizes.get("valid_tokens", 0) >= min_tokens
            or sizes.get("train_documents", 0) < 2):
        return sizes, None
    *_, ref, est = min(picks)
    return {**sizes, "train": sizes.get("train", 0) - est, "valid": sizes.get("valid", 0) + est}, ref


def split_sums(split: np.ndarray, est: np.ndarray) -> dict[str, int]:
    return {name: int(est[split == s].sum()) for s, name in enumerate(SPLITS) if (split == s).any()}


STAT_REASONS = MALFORMED + FILTER_REASONS

"""Tokenizing and shard writing stages of `domainlm data shard`.

Tokenize: each document block looks up, in side inputs keyed by its chunk, the refs dropped as
exact duplicates and the near-duplicate candidates to verify; the survivors are encoded in one
batch call per block (`tokdir.DocumentEncoder.flat`: SentencePiece, through a cache of the segments
no BPE merge crosses for the models that allow it, or an HF tokenizer.json through the
`tokenizers` library; no bos/eos, the loader puts the eos between documents; the tokenizer's bytes
travel with the DoFn and it is loaded once per worker, in setup), and each
document gets its key, its .json member and its shard: hash(key) mod the split's number of
shards, which is the split's estimated bytes (summed by the read stage, less the exact
duplicates) over --shard-bytes. Estimated, from the tokenizer's bytes per token, rather than
counted after tokenizing: counting first would move every token through the runner once more
just to learn a number of shards. The manifest's byte and token counts are exact.

Write: each shard's documents are sorted by key and written with ShardWriter. Shard indexes are
ranked among the non-empty shards, so names are shard-000000, shard-000001, ... without gaps.
Nothing here depends on the worker count or the order elements arrive in.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from json.encoder import encode_basestring

import apache_beam as beam
import numpy as np

from domainlm.data.beam.dedup import near_drops
from domainlm.data.beam.docs import Reporter, dumps, loads, pick_valid, salted
from domainlm.data.beam.minhash import MinHasher, optimal_bands
from domainlm.data.beam.read import Plan
from domainlm.data.beam.spill import Spill
from domainlm.data.config import ShardConfig
from domainlm.data.shards import SHARD_PATTERN, SPLITS, ShardWriter, sample_keys
from domainlm.tokenizer.tokdir import DocumentEncoder

U64 = np.uint64
_SALT_SHARD = 0x5348415244  # "SHARD"
SUMMARY = ".summary.json"
DEAD_LETTER = "dead_letter.jsonl"


def first_positions(plan: Plan, units: list[tuple[int, int]]) -> dict[int, int]:
    """Chunk -> absolute line (from 1) or row (from 0) number of its first record, from the
    chunks' counts of lines or rows."""
    count = dict(units)
    out, next_in_group = {}, {}
    for chunk in plan.chunks:
        f = plan.files[chunk.file]
        start = next_in_group.get(f.group, plan.first_position(chunk.ordinal))
        out[chunk.ordinal] = start
        next_in_group[f.group] = start + count.get(chunk.ordinal, 0)
    return out


class Tokenize(beam.DoFn):
    """Document block -> ((split, shard), piece) of the documents that survive deduplication,
    'stats' on the side. Side inputs keyed by chunk: exact drops, near-duplicate candidates
    (a, b, signature of a); and the chunks' line counts, the estimated sizes."""

    def __init__(self, cfg: ShardConfig, plan: Plan, encoder: DocumentEncoder, dtype: str, progress_dir: str | None,
                 spill: Spill):
        self.cfg, self.plan, self.encoder, self.dtype = cfg, plan, encoder, np.dtype(dtype)
        self.progress_dir, self.spill = progress_dir, spill
        d = cfg.dedup
        self.bands = optimal_bands(d.threshold, d.num_perm)

    def setup(self):
        self.encoder([])                  # loads the tokenizer once per worker, before the first block
        d = self.cfg.dedup
        self.minhash = MinHasher(d.num_perm, d.shingle_words, self.cfg.seed, d.threshold, self.bands)
        self.report = Reporter(self.progress_dir, "tokenize")
        self.first = self.n_shards = None

    def process(self, blob, exact_side, cand_side, units: list[tuple[int, int]], sizes: list[dict],
                dropped: list[dict]):
        if self.first is None:  # the same side inputs for every bundle: computed once a worker
            self.first = first_positions(self.plan, units)
            merged, self.to_valid = pick_valid(merge_counts({k: v for k, v in d.items() if k != "pick"} for d in sizes),
                                               [d["pick"] for d in sizes if "pick" in d], self.cfg.valid_fraction,
                                               self.cfg.valid_min_tokens)
            self.n_shards = shard_counts(merged, merge_counts(dropped), self.cfg.shard_bytes)
        block = loads(self.spill.get(blob))
        chunk, refs = block["chunk"], block["refs"]
        exact = _refs([self.spill.get(r) for r in exact_side[chunk]])
        near, n_pairs, n_similar = near_drops([self.spill.get(r) for r in cand_side[chunk]], refs, block["texts"],
                                              self.minhash, self.cfg.dedup.threshold)
        is_exact = np.isin(refs, exact)
        is_near = np.isin(refs, near) & ~is_exact
        keep = ~(is_exact | is_near)
        yield beam.pvalue.TaggedOutput("stats", {
            "duplicate_exact": int(is_exact.sum()), "duplicate_near": int(is_near.sum()), "kept": int(keep.sum()),
            "near_candidate_pairs": n_pairs, "near_duplicate_pairs": n_similar})
        if not keep.any():
            return
        idx = np.flatnonzero(keep)
        tokens, lengths = self.encoder.flat([block["texts"][i] for i in idx], self.dtype)
        keys, keyhash, metas = self._describe(chunk, refs[idx], [block["ids"][i] for i in idx], lengths)
        self.report(documents=len(keys), tokens=int(lengths.sum()))
        shard_hash = salted(keyhash, self.cfg.seed, _SALT_SHARD)
        split = block["split"][idx]
        if self.to_valid is not None:
            moved = refs[idx] == self.to_valid
            if moved.any():
                split = np.where(moved, np.uint8(1), split)
                yield beam.pvalue.TaggedOutput("stats", {"moved_to_valid": 1,
                                                         "moved_to_valid_tokens": int(lengths[moved].sum())})
        shard_keys, pieces = [], []
        for s, name in enumerate(SPLITS):
            shard = (shard_hash % U64(self.n_shards[name])).astype(np.int64)
            for k in np.unique(shard[split == s]):
                sel = (split == s) & (shard == k)
                pick = np.flatnonzero(sel)
                shard_keys.append((name, int(k)))
                pieces.append(dumps({
                    "keys": [keys[i] for i in pick], "metas": [metas[i] for i in pick],
                    "refs": refs[idx][pick], "lengths": lengths[pick],
                    "tokens": tokens[np.repeat(sel, lengths)]}))
        yield from zip(shard_keys, self.spill.put(f"pieces-{chunk}-{int(refs[0])}", pieces))

    def _describe(self, chunk, refs, ids, lengths) -> tuple[list[str], np.ndarray, list[bytes]]:
        """(keys, their hashes, .json members) of a block's documents. Sources are built from
        the chunk's file name made printable once (printable() is per character, so it commutes
        with appending ASCII line numbers)."""
        positions = ((refs & 0xFFFFFFFF) + self.first[chunk]).tolist()
        input_file, sources = self.plan.sources(chunk, positions)
        if not (input_file.isascii() and all(s.isascii() for s in sources[:1])):
            input_file, sources = printable(input_file), [printable(s) for s in sources]
        doc_ids = [d if d is not None else s for d, s in zip(ids, sources)]
        keys, hashes = sample_keys(doc_ids, input_file)
        metas = [meta_json(d, s, n) for d, s, n in zip(doc_ids, sources, lengths.tolist())]
        return keys, hashes, metas


def printable(s: str) -> str:
    """`s` encodable as UTF-8: a file name with undecodable bytes (surrogate escapes) keeps them
    as backslash escapes rather than failing the run."""
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "backslashreplace").decode("utf-8")


def meta_json(doc_id: str, source: str, tokens: int) -> bytes:
    """meta_bytes({"id", "source", "tokens"}) without the json module's generic walk: the same
    string encoder json.dumps(ensure_ascii=False) calls, keys in sorted order (tests compare)."""
    return ('{"id": %s, "source": %s, "tokens": %d}' % (
        encode_basestring(doc_id), encode_basestring(source), tokens)).encode("utf-8")


def _refs(blobs) -> np.ndarray:
    parts = [loads(b) for b in blobs]
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def shard_counts(sizes: dict[str, int], dropped: dict[str, int], shard_bytes: int) -> dict[str, int]:
    """Shards per split: its estimated bytes over the target size, at least one."""
    return {name: max(1, -(-max(sizes.get(name, 0) - dropped.get(name, 0), 0) // shard_bytes)) for name in SPLITS}


def shard_ranks(keys: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """(split, shard) -> its index among the split's non-empty shards."""
    out = {}
    for name in SPLITS:
        for rank, k in enumerate(sorted(k for s, k in set(keys) if s == name)):
            out[(name, k)] = rank
    return out


class _Hashing:
    """A write-only file wrapper that hashes and counts what goes through it."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        self.f.write(data)
        return len(data)

    def tell(self) -> int:
        return self.bytes


class WriteShard(beam.DoFn):
    """((split, shard), pieces) -> the shard file, and its manifest record."""

    def __init__(self, output: str, progress_dir: str | None, spill: Spill):
        self.output, self.progress_dir, self.spill = output, progress_dir, spill

    def setup(self):
        self.report = Reporter(self.progress_dir, "write")
        self.ranks = None

    def process(self, item, shard_keys: list[tuple[str, int]]):
        from apache_beam.io.filesystems import FileSystems

        if self.ranks is None:
            self.ranks = shard_ranks(shard_keys)
        ranks = self.ranks
        (split, shard), blobs = item
        pieces = [loads(self.spill.get(b)) for b in blobs]
        keys = [k for p in pieces for k in p["keys"]]
        metas = [m for p in pieces for m in p["metas"]]
        refs = np.concatenate([p["refs"] for p in pieces])
        lengths = np.concatenate([p["lengths"] for p in pieces])
        tokens = np.concatenate([p["tokens"] for p in pieces])
        order = np.array([i for _, _, i in sorted(zip(keys, refs.tolist(), range(len(keys))))], dtype=np.int64)
        name = f"{split}/{SHARD_PATTERN.format(index=ranks[(split, shard)])}"
        names, renamed, previous, repeat = [], 0, None, 0
        for i in order.tolist():
            key = keys[i]
            # two documents with the same id in the same file: later ones get a suffix
            # (a key never ends in one otherwise: it ends in 16 hex digits)
            repeat = repeat + 1 if key == previous else 0
            previous = key
            if repeat:
                key, renamed = f"{key}-{repeat}", renamed + 1
            names.append(key)
        # the documents' ids in key order, gathered with one index array
        sorted_lengths = lengths[order]
        starts = np.cumsum(lengths) - lengths
        gather = np.repeat(starts[order] - (np.cumsum(sorted_lengths) - sorted_lengths), sorted_lengths)
        gather += np.arange(len(gather), dtype=np.int64)
        with FileSystems.create(f"{self.output}/{name}", mime_type="application/x-tar",
                                compression_type="uncompressed") as raw:
            out = _Hashing(raw)
            with ShardWriter(out) as w:
                w.write_samples(names, tokens[gather], sorted_lengths, [metas[i] for i in order.tolist()])
        self.report(shards=1)
        yield {"name": name, "sha256": out.sha.hexdigest(), "bytes": out.bytes,
               "documents": len(keys), "tokens": int(lengths.sum()), "renamed_keys": renamed}


def write_dead_letters(plan: Plan, path: str, blobs: list[bytes], first: dict[int, int]) -> int:
    """All dead letters -> dead_letter.jsonl, sorted by input position."""
    from apache_beam.io.filesystems import FileSystems

    rows = sorted(r for b in blobs for r in loads(b))
    with FileSystems.create(path, mime_type="application/json", compression_type="uncompressed") as f:
        for chunk, pos, reason, message, excerpt in rows:
            if pos >= 0:
                _, _, where = plan.source(chunk, first[chunk] + pos)
            else:  # a file that could not be read at all
                where = {"file": plan.files[plan.chunks[chunk].file].label}
            rec = {**where, "reason": reason, "message": message, "excerpt": excerpt}
            f.write((json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8"))
    return len(rows)


def merge_counts(dicts) -> dict[str, int]:
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return dict(total)


def write_summary(_, plan: Plan, root: str, stats: list[dict], shards: list[dict], dead: list[bytes],
                  units: list[tuple[int, int]]) -> None:
    """The last step, once: dead_letter.jsonl, and the summary the driver makes the manifest of."""
    from apache_beam.io.filesystems import FileSystems

    n_dead = write_dead_letters(plan, f"{root}/{DEAD_LETTER}", dead, first_positions(plan, units))
    summary = {"stats": merge_counts(stats), "shards": sorted(shards, key=lambda s: s["name"]),
               "dead_letters": n_dead}
    with FileSystems.create(f"{root}/{SUMMARY}", mime_type="application/json",
                            compression_type="uncompressed") as f:
        f.write(json.dumps(summary, sort_keys=True).encode("utf-8"))

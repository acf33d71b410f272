"""Deduplication stages of `domainlm data shard`, on Beam's own grouping.

Every document has a `ref` (chunk ordinal << 32 | position): smaller means read earlier.
The rule, the same for exact and near duplicates: a document is dropped when a document with
a smaller ref is its duplicate. So the copy read first survives, and the outcome depends on
the data alone, never on the runner, the number of workers or the order elements arrive in.

Exact: (h1, h2) content hashes are grouped by bucket (a hash range); inside a bucket equal
hashes are runs of a sort, and all but the smallest ref of a run are dropped.

Near: LSH band keys are grouped by bucket the same way; documents sharing a band key are
candidates. Each member of a run is paired with the run's smallest ref and with the member
just before it (not all pairs: a run of n copies would give n^2/2). A candidate pair (a, b),
a < b, is verified by the estimated Jaccard of the two signatures: the pairs reach a's
chunk's signatures as a side input keyed by chunk (AttachFirst), and b's signature is computed
again from b's text where b is tokenized (near_drops, called by Tokenize): only candidates
move, never every document's signature twice. A verified pair drops b.

Work travels as numpy arrays per bucket or chunk, never one element per document.
"""

from __future__ import annotations

import apache_beam as beam
import numpy as np

from domainlm.data.beam.docs import EXACT, by_key, chunk_of, compact, dumps, loads, split_sums
from domainlm.data.beam.spill import Spill


def _concat(parts: list[tuple[np.ndarray, ...]], n: int) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(n))


def _by_chunk(chunks: np.ndarray, *arrays: np.ndarray) -> tuple[list[int], list[bytes]]:
    """The arrays cut by chunk: (chunks, a pickled tuple of the arrays' parts for each). What
    dedup sends to the tokenize stage as side inputs keyed by chunk goes through `Spill.put`:
    there is one such element per (bucket or block, chunk) pair, tens of thousands on a few
    GB, and the DirectRunner's driver keeps every side input's elements in memory about three
    times over (its buffer of the PCollection, and each key's values twice in its state
    service) until the run ends, so on the DirectRunner only their names go there."""
    chunk_ids, blobs = [], []
    for chunk, parts in by_key(chunks, *arrays):
        chunk_ids.append(chunk)
        blobs.append(dumps(parts if len(parts) > 1 else parts[0]))
    return chunk_ids, blobs


def exact_drops(h1: np.ndarray, h2: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """Refs whose (h1, h2) equals that of a smaller ref."""
    order = np.lexsort((refs, h2, h1))
    a, b = h1[order], h2[order]
    same = np.zeros(len(order), dtype=bool)
    same[1:] = (a[1:] == a[:-1]) & (b[1:] == b[:-1])
    return refs[order][same]


def candidate_pairs(keys: np.ndarray, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) with a < b for documents sharing a key: each to its run's first and previous."""
    order = np.lexsort((refs, keys))
    k, r = keys[order], refs[order]
    n = len(k)
    if n < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    same = k[1:] == k[:-1]
    idx = np.arange(1, n)[same]
    new = np.ones(n, dtype=bool)
    new[1:] = ~same
    start = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    a = np.concatenate((r[start[idx]], r[idx - 1]))
    b = np.concatenate((r[idx], r[idx]))
    keep = a != b
    return unique_pairs(a[keep], b[keep])


def unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not len(a):
        return a, b
    pairs = np.unique(np.stack([a, b], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


class DedupGroups(beam.DoFn):
    """((EXACT, bucket), hash parts) -> (chunk, refs dropped as exact duplicates), and 'dropped'
    their estimated shard bytes;
    ((BAND, bucket), band key parts) -> 'pairs' (chunk of a, (a, b)) candidate pairs.
    The per-chunk values go through the spill (`_by_chunk`): their names on the DirectRunner."""

    def __init__(self, spill: Spill):
        self.spill = spill

    def process(self, item):
        (kind, bucket), refs = item
        parts = [self.spill.get(r) for r in refs]
        if kind == EXACT:
            h1, h2, refs, split, est = _concat([loads(p) for p in parts], 5)
            drops = exact_drops(h1, h2, refs)
            gone = np.isin(refs, drops)
            yield beam.pvalue.TaggedOutput("dropped", split_sums(split[gone], est[gone]))
            chunks, blobs = _by_chunk(chunk_of(drops), drops)
            yield from zip(chunks, self.spill.put(f"exact-{bucket}", blobs))
        else:
            keys, refs = _concat([loads(p) for p in parts], 2)
            a, b = candidate_pairs(keys, refs)
            chunks, blobs = _by_chunk(chunk_of(a), a, b)
            for chunk, blob in zip(chunks, self.spill.put(f"pairs-{bucket}", blobs)):
                yield beam.pvalue.TaggedOutput("pairs", (chunk, blob))


class AttachFirst(beam.DoFn):
    """A chunk's signatures -> (chunk of b, (a, b, signature of a)) for the candidate pairs
    whose a is in the chunk (pairs: a side input keyed by the chunk of a); the values through
    the spill, as DedupGroups'."""

    def __init__(self, spill: Spill):
        self.spill = spill

    def process(self, blob, pairs):
        chunk, refs, sig = loads(self.spill.get(blob))
        found = [self.spill.get(p) for p in pairs[chunk]]
        if not found:
            return
        a, b = unique_pairs(*_concat([loads(p) for p in found], 2))
        order = np.argsort(refs)
        sa = sig[order][np.searchsorted(refs[order], a)]
        chunks, blobs = _by_chunk(chunk_of(b), a, b, sa)
        yield from zip(chunks, self.spill.put(f"cands-{chunk}-{int(refs[0])}", blobs))


def jaccard_from_compact(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard from 8-bit signatures: agreement m = J + (1 - J) / 256."""
    m = (a == b).mean(axis=-1)
    return (m - 1 / 256) / (1 - 1 / 256)


def near_drops(cand_blobs: list[bytes], refs: np.ndarray, texts: list[str], minhash, threshold: float
               ) -> tuple[np.ndarray, int, int]:
    """(refs dropped as near duplicates, candidate pairs, verified pairs) among the documents
    (refs, texts) of a block, from the (a, b, signature of a) candidates: the signatures of
    the few b's are computed again here rather than shipped with every document."""
    if not cand_blobs:
        return np.zeros(0, np.int64), 0, 0
    a, b, sa = _concat([loads(p) for p in cand_blobs], 3)
    mine = np.isin(b, refs)
    a, b, sa = a[mine], b[mine], sa[mine]
    if not len(b):
        return np.zeros(0, np.int64), 0, 0
    need = np.unique(b)
    pos = np.searchsorted(refs, need)  # refs of a block are ascending
    sig, _ = minhash.signatures([texts[i] for i in pos])
    sb = compact(sig)[np.searchsorted(need, b)]
    similar = jaccard_from_compact(sa, sb) >= threshold
    return np.unique(b[similar]), int(len(a)), int(similar.sum())

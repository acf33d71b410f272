"""MinHash signatures and LSH band keys for near-duplicate detection, vectorized with numpy.

A document's shingles are its runs of `k` consecutive words (lower-cased, split at ASCII
whitespace); a document of fewer than `k` words is one shingle. Its signature holds, for each
of `num_perm` seeded hash permutations, the smallest permuted shingle hash, so the share of
equal positions in two signatures estimates the Jaccard similarity of their shingle sets.
Signatures are cut into `bands` bands of `rows` rows; documents that agree on a whole band
are candidates, which are then verified by their estimated Jaccard.

Everything is done on whole blocks of documents with numpy, because one Python call per word
would cost more than tokenizing: word hashes come from a polynomial prefix sum over the bytes
(mod 2^32), shingle hashes from a few shifted multiply-adds, permutations as
`(h ^ xor_p) * mul_p` in uint32 (a bijection, then the min), laid out (perm, shingle) so the
per-document minimum is a contiguous `minimum.reduceat`.
"""

from __future__ import annotations

import functools

import numpy as np

U64 = np.uint64
_PRIME = 0x01000193  # odd, so it has an inverse mod 2^32
_PRIME_INV = pow(_PRIME, -1, 2**32)
_WINDOW = 1 << 20  # bytes of text hashed per numpy pass (cache-sized work arrays)
_SLICE = 1 << 14  # shingles per (num_perm x slice) permutation matrix
EMPTY = np.iinfo(np.uint32).max


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: spreads every input bit over the output (uint64, wraps)."""
    x = x + U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> U64(30))) * U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> U64(27))) * U64(0x94D049BB133111EB)
    return x ^ (x >> U64(31))


@functools.lru_cache(maxsize=4)
def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """PRIME^j and PRIME^-j mod 2^32 for j < n (cached: every window reuses them)."""
    p = np.full(n, np.uint32(_PRIME))
    p[0] = 1
    q = np.full(n, np.uint32(_PRIME_INV))
    q[0] = 1
    with np.errstate(over="ignore"):
        return np.cumprod(p, dtype=np.uint32), np.cumprod(q, dtype=np.uint32)


@functools.lru_cache(maxsize=8)
def optimal_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimizing the false-positive plus false-negative probability mass of the
    LSH S-curve 1 - (1 - s^rows)^bands around `threshold` (as datasketch chooses them)."""
    s = np.linspace(0.0, 1.0, 2001)
    best = (float("inf"), 1, 1)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = 1.0 - (1.0 - s**r) ** b
            fp = np.trapezoid(np.where(s < threshold, p, 0.0), s)
            fn = np.trapezoid(np.where(s >= threshold, 1.0 - p, 0.0), s)
            err = 0.5 * fp + 0.5 * fn
            if err < best[0] - 1e-12:
                best = (err, b, r)
    return best[1], best[2]


class MinHasher:
    """Signatures and band keys for a list of texts; seeded, the same in every process."""

    def __init__(self, num_perm: int, shingle_words: int, seed: int, threshold: float,
                 bands: tuple[int, int] | None = None):
        rng = np.random.default_rng([seed, 0x4D696E48])
        self.num_perm = num_perm
        self.k = shingle_words
        self.mul = (rng.integers(0, 2**32, num_perm, dtype=np.uint64) | 1).astype(np.uint32)[:, None]
        self.xor = rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32)[:, None]
        # odd multipliers for the positions inside a shingle and the rows inside a band
        self.pos_mul = (rng.integers(0, 2**63, max(shingle_words, num_perm), dtype=np.uint64) * U64(2) + U64(1))
        self.bands, self.rows = bands or optimal_bands(threshold, num_perm)

    # -- words and shingles ----------------------------------------------------------------

    def _word_hashes(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """(start offset, 64-bit hash) of each whitespace-separated word of `data`, hashed in
        pieces of about _WINDOW bytes cut at whitespace (a word's hash does not depend on where
        it is). The polynomial is mod 2^32 (half the memory traffic of 2^64; a collision of two
        distinct words just merges them) and then spread to 64 bits."""
        b = np.frombuffer(data, dtype=np.uint8)
        # normalized text keeps no control character but \t and \n, so byte <= 32 is whitespace
        space = b <= 32
        pw, ipw = _powers(_WINDOW)
        out_s, out_h = [], []
        a = 0
        while a < len(b):
            e = min(a + _WINDOW, len(b))
            if e < len(b):
                cut = np.flatnonzero(space[a:e])
                if len(cut):
                    e = a + int(cut[-1]) + 1
                else:  # one word longer than the window
                    more = np.flatnonzero(space[e:])
                    e = e + int(more[0]) + 1 if len(more) else len(b)
            seg, word = b[a:e], ~space[a:e]
            n = len(seg)
            if n > len(pw):
                pw, ipw = _powers(1 << (n - 1).bit_length())
            edges = np.flatnonzero(np.diff(word, prepend=False, append=False))
            starts, ends = edges[0::2], edges[1::2]
            with np.errstate(over="ignore"):
                c = np.empty(n + 1, dtype=np.uint32)
                c[0] = 0
                np.cumsum(seg.astype(np.uint32) * pw[:n], out=c[1:], dtype=np.uint32)
                h = (c[ends] - c[starts]) * ipw[starts]
            out_h.append(splitmix64(h.astype(U64)))
            out_s.append(starts + a)
            a = e
        if not out_s:
            return np.zeros(0, np.int64), np.zeros(0, U64)
        return np.concatenate(out_s), np.concatenate(out_h)

    def shingles(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(document index, 32-bit shingle hash) of every shingle of `texts`, grouped by
        document in order. Documents with no word have no shingle."""
        docs_out, sh_out = [], []
        ends = np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)) + 1)
        i = 0
        while i < len(texts):
            # a window of whole documents (one document alone when it is longer), joined by NUL
            # (normalized text holds none) and lower-cased
            j = max(i + 1, int(np.searchsorted(ends, (ends[i - 1] if i else 0) + _WINDOW, side="right")))
            # str.lower() only for the non-ASCII texts (isascii() is O(1)): one of them makes
            # the joined str wide, and lowering a wide str costs ~7 ns a character. bytes.lower()
            # then lowers every ASCII letter; the result equals str.lower() of the whole, as
            # str.lower() of any character gives no ASCII capital and bytes.lower() changes
            # nothing but ASCII capitals
            data = "\x00".join([t if t.isascii() else t.lower() for t in texts[i:j]]).encode(
                "utf-8", "surrogatepass").lower()
            b = np.frombuffer(data, dtype=np.uint8)
            seps = np.flatnonzero(b == 0)
            if len(seps) != j - i - 1:  # a text with its own NUL: join it the slow way
                raw = [t.lower().encode("utf-8", "surrogatepass") for t in texts[i:j]]
                seps = np.cumsum([len(r) + 1 for r in raw])[:-1] - 1
                data = b" ".join(raw)
            doc_start = np.concatenate(([0], seps + 1))
            starts, wh = self._word_hashes(data)
            wdoc = np.searchsorted(doc_start, starts, side="right") - 1
            d, sh = self._shingle_hashes(wdoc, wh)
            docs_out.append(d + i)
            sh_out.append(sh)
            i = j
        if not docs_out:
            return np.zeros(0, np.int64), np.zeros(0, np.uint32)
        return np.concatenate(docs_out), np.concatenate(sh_out)

    def _shingle_hashes(self, wdoc: np.ndarray, wh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, k = len(wh), self.k
        if n == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.uint32)
        first = np.flatnonzero(np.concatenate(([True], wdoc[1:] != wdoc[:-1])))
        count = np.diff(np.append(first, n))
        with np.errstate(over="ignore"):
            # whole shingles: words i..i+k-1 all in one document (documents are contiguous)
            m = max(n - k + 1, 0)
            whole = wdoc[k - 1:] == wdoc[:m]
            acc = wh[:m] * self.pos_mul[0]
            for j in range(1, k):
                acc += wh[j:m + j] * self.pos_mul[j]
            keep = np.zeros(n, dtype=bool)
            keep[:m] = whole
            full = np.empty(n, dtype=U64)
            full[:m] = acc
            # a document shorter than k words is one shingle of all its words, at its first word
            short = np.flatnonzero(count < k)
            if len(short):
                f, c = first[short], count[short]
                part = np.zeros(len(short), dtype=U64)
                for j in range(k - 1):
                    sel = c > j
                    part[sel] += wh[f[sel] + j] * self.pos_mul[j]
                full[f] = part
                keep[f] = True
        h = (splitmix64(full[keep]) >> U64(32)).astype(np.uint32)
        return wdoc[keep].astype(np.int64), h

    # -- signatures and bands --------------------------------------------------------------

    def signatures(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures (n_texts, num_perm) uint32, mask of texts that have any word)."""
        doc, sh = self.shingles(texts)
        sig = np.full((self.num_perm, len(texts)), EMPTY, dtype=np.uint32)
        work = np.empty((self.num_perm, _SLICE), dtype=np.uint32)
        for a in range(0, len(sh), _SLICE):
            x = sh[a:a + _SLICE][None, :]
            d = doc[a:a + _SLICE]
            m = x.shape[1]
            h = work[:, :m]
            np.bitwise_xor(x, self.xor, out=h)
            np.multiply(h, self.mul, out=h)
            seg = np.flatnonzero(np.concatenate(([True], d[1:] != d[:-1])))
            part = np.minimum.reduceat(h, seg, axis=1)
            ids = d[seg]
            sig[:, ids] = np.minimum(sig[:, ids], part)
        has = np.zeros(len(texts), dtype=bool)
        has[doc] = True
        return np.ascontiguousarray(sig.T), has

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """(n, bands) uint64 keys; equal keys in the same column mean an equal band."""
        n = sig.shape[0]
        keys = np.empty((n, self.bands), dtype=U64)
        with np.errstate(over="ignore"):
            for band in range(self.bands):
                rows = sig[:, band * self.rows:(band + 1) * self.rows].astype(U64)
                acc = np.full(n, U64(band + 1) * U64(0x9E3779B97F4A7C15))
                for r in range(self.rows):
                    acc = (acc ^ rows[:, r]) * self.pos_mul[r]
                keys[:, band] = splitmix64(acc)
        return keys


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of equal signature positions, row by row."""
    return (a == b).mean(axis=-1)

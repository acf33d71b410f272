"""SentencePiece BPE encoding through a cache of segments, exact by construction (`data shard`).

SentencePiece encodes a document as one sequence; on the 2-core VM that costs ~0.5-1 us a token,
most of `data shard`'s CPU. Natural text repeats its words, and a BPE model splits a text at
points no merge ever crosses, so the text's encoding is the concatenation of its segments'
encodings: those are encoded once by SentencePiece itself and then looked up (the word cache
that Hugging Face `tokenizers` and tiktoken keep, here on SentencePiece's own boundaries).

Why the concatenation is exact, and when it applies (`segment_pattern` checks each condition on
the model and returns None, no cache, where one fails):
- Normalization is the identity and only escapes ' ' as '▁' (no charsmap, no dummy prefix, no
  squeezing of whitespace, '▁' a prefix not a suffix): a segment normalizes alone as it does in
  its text. `domainlm tokenizer train` writes such models; a text holding a literal '▁' is
  encoded whole (it would normalize like a space).
- BPE only merges two adjacent symbols into a piece of the vocabulary, so a symbol spanning the
  point between characters a and b contains "ab". Where no piece contains a non-'▁' character
  followed by '▁' (SentencePiece's split_by_whitespace), a run of spaces after another character
  starts a new segment that no symbol crosses; where the only piece holding '\n' is '\n' itself
  (our newline user-defined symbol), the newline is a segment of its own. User-defined symbols
  are pieces too, so the same check covers their matching.
- Inside a segment, BPE applies the same merges in the same order alone as in its text: the
  next merge is the best-scored pair, ties to the left, and pairs never cross segments.
  Byte fallback and the resegmentation of unused pieces act on one symbol at a time.
- Unigram models are not cached: Viterbi adds float scores along the whole text, so a tie
  within a segment could break differently in its text than alone.

The cache holds at most `capacity` segments (first seen, then it stops growing, as `tokenizers`'
BPE cache does; ~150 bytes each, ~75 MB full) of at most `MAX_KEY` characters; the rest are
encoded each time. 2^19 holds every segment of the 200 MB benchmark corpus (472,594 distinct);
2^18 would have found 96.3% of its segments instead of 97.9%.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from operator import contains, is_

import numpy as np

from domainlm.tokenizer.spm_proto import NORMALIZER_SPEC, TRAINER_SPEC, fields, last

SPACE = "\u2581"
CAPACITY = 1 << 19
MAX_KEY = 64

_chain = itertools.chain.from_iterable


def segment_pattern(model_proto: bytes, pieces: list[str]) -> str | None:
    """The regular expression that splits a text into segments SentencePiece encodes
    independently, or None where the model gives no such guarantee (module docstring)."""
    model = fields(model_proto)
    trainer = fields(last(model, TRAINER_SPEC, b""))
    normalizer = fields(last(model, NORMALIZER_SPEC, b""))
    if last(trainer, 3, 1) != 2:                        # model_type: UNIGRAM = 1 (default), BPE = 2
        return None
    if last(trainer, 24, 0):                            # treat_whitespace_as_suffix
        return None
    if (last(normalizer, 2, b"") or last(normalizer, 1, b"") not in (b"identity", b"")
            or last(normalizer, 3, 1) or last(normalizer, 4, 1) or not last(normalizer, 5, 1)):
        return None                                     # charsmap, dummy prefix, squeezing, no escaping
    if any(re.search(f"[^{SPACE}]{SPACE}", p) for p in pieces):
        return None
    # possessive quantifiers (Python 3.11): the same matches, a third faster than backtracking ones
    if all(p == "\n" for p in pieces if "\n" in p):
        return r" *+[^ \n]++|\n| ++"
    return r" *+[^ ]++| ++"


class SegmentCache:
    """`flat(texts, dtype)` -> (tokens, lengths): the texts' ids concatenated and each text's
    count, equal to `encode(texts)` (SentencePiece's batch encode, for a model `segment_pattern`
    accepts). The cache holds each segment's ids as the bytes of a `dtype` array, which one join
    concatenates. `segments` / `hits` / `encoded` count the segments looked up, those found, and
    those SentencePiece encoded (a block's repeats of a new segment are encoded once)."""

    def __init__(self, encode: Callable[[list[str]], list[list[int]]], pattern: str, capacity: int = CAPACITY):
        self.encode, self.capacity = encode, capacity
        self.split = re.compile(pattern).findall
        self.cache: dict[str, bytes] = {}
        self.dtype = None
        self.segments = self.hits = self.encoded = 0

    def flat(self, texts: list[str], dtype) -> tuple[np.ndarray, np.ndarray]:
        dtype = np.dtype(dtype)
        if dtype != self.dtype:                         # the bytes are of one dtype
            self.cache, self.dtype = {}, dtype
        cache = self.cache
        segs = list(map(self.split, texts))
        for i in itertools.compress(range(len(texts)), map(contains, texts, itertools.repeat(SPACE))):
            segs[i] = [texts[i]]                        # a literal '▁': the whole text, encoded alone
        flat = list(_chain(segs))
        got = list(map(cache.get, flat))
        self.segments += len(flat)
        if None in got:
            absent = list(map(is_, got, itertools.repeat(None)))
            missing = list(dict.fromkeys(itertools.compress(flat, absent)))
            fresh = dict(zip(missing, _as_bytes(self.encode(missing), dtype)))
            room = self.capacity - len(cache)
            for key, ids in fresh.items():
                if room <= 0:
                    break
                if len(key) <= MAX_KEY:
                    cache[key] = ids
                    room -= 1
            self.hits += len(flat) - sum(absent)
            self.encoded += len(missing)
            got = list(map(fresh.get, flat, got))     # the fresh ids where missing, else the cached
        else:
            self.hits += len(flat)
        ends = np.zeros(len(got) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, got), dtype=np.int64, count=len(got)), out=ends[1:])
        bounds = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, segs), dtype=np.int64, count=len(segs)), out=bounds[1:])
        lengths = np.diff(ends[bounds]) // dtype.itemsize
        return np.frombuffer(b"".join(got), dtype=dtype).copy(), lengths   # writable, as fromiter's


def concat(encoded: list[list[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (all of them in one `dtype` array, each list's count)."""
    counts = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    return np.fromiter(_chain(encoded), dtype=dtype, count=int(counts.sum())), counts


def _as_bytes(encoded: list[list[int]], dtype: np.dtype) -> list[bytes]:
    """Each list of ids as the bytes of a `dtype` array (one conversion for all of them)."""
    tokens, counts = concat(encoded, dtype)
    ends = np.cumsum(counts) * dtype.itemsize
    buf = tokens.tobytes()
    return [buf[a:b] for a, b in zip((ends - counts * dtype.itemsize).tolist(), ends.tolist())]

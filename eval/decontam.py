"""Decontamination: which test questions and answers share a 13-gram with a training source.

Words are the normalised tokens of `metrics.normalize`; a test item is contaminated by a source
when any 13 consecutive words of its question or its answer occur in the source. A question or
answer shorter than 13 words is looked up as a whole (a 5-word answer found verbatim is still a
leak). Sources are indexed as a set of 64-bit hashes of their n-grams (of every length a short
item needs), so a large source costs memory in proportion to its distinct n-grams.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from domainlm.qa import QA
from domainlm.eval.metrics import normalize

N = 13


def _h(words: tuple[str, ...]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest(), "big")


def item_grams(text: str, n: int = N) -> set[int]:
    words = tuple(normalize(text).split())
    if not words:
        return set()
    if len(words) < n:
        return {_h(words)}
    return {_h(words[i:i + n]) for i in range(len(words) - n + 1)}


@dataclass(slots=True)
class NgramIndex:
    """The n-grams of a source, for the lengths the test items need."""

    name: str
    lengths: set[int]
    grams: set[int]
    documents: int = 0

    def add(self, text: str) -> None:
        words = tuple(normalize(text).split())
        self.documents += 1
        for n in self.lengths:
            for i in range(len(words) - n + 1):
                self.grams.add(_h(words[i:i + n]))


def needed_lengths(items: Iterable[QA], n: int = N) -> set[int]:
    out = {n}
    for qa in items:
        for text in (qa.question, qa.answer):
            k = len(normalize(text).split())
            if 0 < k < n:
                out.add(k)
    return out


def build_index(name: str, texts: Iterable[str], items: list[QA], n: int = N) -> NgramIndex:
    idx = NgramIndex(name=name, lengths=needed_lengths(items, n), grams=set())
    for t in texts:
        idx.add(t)
    return idx


def contaminated(items: list[QA], index: NgramIndex, n: int = N) -> dict[str, dict[str, bool]]:
    """Per item id: whether its question, its answer, occur (by n-gram) in the source."""
    out = {}
    for qa in items:
        out[qa.id] = {"question": bool(item_grams(qa.question, n) & index.grams),
                      "answer": bool(item_grams(qa.answer, n) & index.grams)}
    return out


def summary(flags: dict[str, dict[str, bool]]) -> dict[str, float | int]:
    total = len(flags) or 1
    q = sum(f["question"] for f in flags.values())
    a = sum(f["answer"] for f in flags.values())
    both = sum(f["question"] or f["answer"] for f in flags.values())
    return {"items": len(flags), "question": q, "answer": a, "any": both, "any_share": both / total}

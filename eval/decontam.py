"""Decontamination: which test questions and answers share a 13-gram with a training source.

Words are the normalised tokens of `metrics.normalize`; a test item is contaminated by a source
when any 13 consecutive words of its question or its answer occur in the source. A question or
answer shorter than 13 words is looked up as a whole, on word boundaries (a 5-word answer found
verbatim is still a leak). A source keeps the set of its 13-grams (Python hashes of word tuples,
valid within the process that builds it) and its normalised text for the whole-item lookups.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from domainlm.eval.metrics import normalize
from domainlm.qa import QA

N = 13


@dataclass(slots=True)
class NgramIndex:
    """The 13-grams (and the normalised text) of a source."""

    name: str
    n: int = N
    grams: set[int] = field(default_factory=set)
    texts: list[str] = field(default_factory=list)
    documents: int = 0
    _joined: str | None = None

    def add(self, text: str) -> None:
        words = normalize(text).split()
        self.documents += 1
        n = self.n
        self.grams.update(hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1))
        self.texts.append(" ".join(words))
        self._joined = None

    def contains(self, text: str) -> bool:
        words = normalize(text).split()
        if not words:
            return False
        if len(words) >= self.n:
            return any(hash(tuple(words[i:i + self.n])) in self.grams for i in range(len(words) - self.n + 1))
        if self._joined is None:
            self._joined = " \n " + " \n ".join(self.texts) + " \n "
        return f" {' '.join(words)} " in self._joined


def build_index(name: str, texts: Iterable[str], n: int = N) -> NgramIndex:
    idx = NgramIndex(name=name, n=n)
    for t in texts:
        idx.add(t)
    return idx


def contaminated(items: list[QA], index: NgramIndex) -> dict[str, dict[str, bool]]:
    """Per item id: whether its question, its answer, occur (by 13-gram, or whole when shorter)."""
    return {qa.id: {"question": index.contains(qa.question), "answer": index.contains(qa.answer)} for qa in items}


def summary(flags: dict[str, dict[str, bool]]) -> dict[str, float | int]:
    total = len(flags) or 1
    q = sum(f["question"] for f in flags.values())
    a = sum(f["answer"] for f in flags.values())
    both = sum(f["question"] or f["answer"] for f in flags.values())
    return {"items": len(flags), "question": q, "answer": a, "any": both, "any_share": both / total}

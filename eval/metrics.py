"""Answer metrics: exact match and token F1 after the usual normalisation, `contains`, citations,
faithfulness, and agreement across phrasings and seeds.

The normalisation is SQuAD's (lower case, punctuation, the articles a/an/the and extra whitespace
removed), so the figures read as the field reads them. Code answers (pydoc signatures) survive it
as words: `abc.abstractclassmethod(callable)` becomes "abcabstractclassmethodcallable", which is
what both sides become.
"""

from __future__ import annotations

import re
from itertools import combinations

from domainlm.qa import exact_match, normalize, token_f1  # noqa: F401  (the metrics of this module's callers)

_CITATION = re.compile(r"\[(\d{1,2})\]")


def contains(prediction: str, answer: str) -> float:
    """1 when the normalised answer appears in the normalised prediction (a verbose but right answer)."""
    gold = normalize(answer)
    return float(bool(gold) and gold in normalize(prediction))


def answer_in(answer: str, texts: list[str]) -> bool:
    """The normalised answer is a substring of one of the normalised `texts`: with
    `source_texts(hits)`, of the sources the model was given (after fitting them into the sources
    budget), i.e. whether retrieval put the answer in front of the model at all."""
    gold = normalize(answer)
    return bool(gold) and any(gold in normalize(t) for t in texts)


def source_texts(hits) -> list[str]:
    """The texts of `hits` (chunks with ids 'DOC#n') as the answer check reads them: consecutive
    chunks of one document given in the same prompt are joined in document order, so an answer
    split across two chunks counts when both were given."""
    def number(h) -> int:
        tail = h.id.rpartition("#")[2]
        return int(tail) if tail.isdigit() else -1

    by_doc: dict[str, list] = {}
    for h in hits:
        by_doc.setdefault(h.doc_id, []).append(h)
    out: list[str] = []
    for chunks in by_doc.values():
        chunks.sort(key=number)
        run = [chunks[0]]
        for h in chunks[1:]:
            if number(h) == number(run[-1]) + 1 and number(h) >= 0:
                run.append(h)
            else:
                out.append("\n".join(x.text for x in run))
                run = [h]
        out.append("\n".join(x.text for x in run))
    return out


def strip_citations(text: str) -> str:
    """The answer without its [n] source markers (scored without them)."""
    return " ".join(_CITATION.sub(" ", text).split())


def citations(text: str) -> list[int]:
    """The source numbers an answer cites, [1] -> 1, in order of first mention."""
    seen: list[int] = []
    for m in _CITATION.finditer(text):
        n = int(m.group(1))
        if n not in seen:
            seen.append(n)
    return seen


def faithfulness(prediction: str, context: str) -> float:
    """Share of the answer's (normalised) tokens that occur in the retrieved text: 1.0 when every
    word of the answer is supported by the sources, lower the more it says from elsewhere."""
    pred = normalize(strip_citations(prediction)).split()
    if not pred:
        return 0.0
    ctx = set(normalize(context).split())
    return sum(t in ctx for t in pred) / len(pred)


def agreement(answers: list[str]) -> float:
    """Mean pairwise exact agreement (after normalisation) of several answers to one question:
    1.0 when all agree, 0.0 when all differ. One answer agrees with itself."""
    if len(answers) < 2:
        return 1.0
    pairs = list(combinations([normalize(a) for a in answers], 2))
    return sum(a == b for a, b in pairs) / len(pairs)


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation, as numpy's default."""
    if not values:
        return 0.0
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)

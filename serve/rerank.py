"""A cheap reranker of our own: the question's literal terms, found as written in the chunk.

BM25 tokenizes `--no-output` into `no` (a stopword) and `output`, drops `-c` (one character) and
splits `json.dumps` into two common words, and the embedder blurs them too; yet a question that
names such a term is about the one place that defines it. The reranker takes the first
`candidates` chunks of the ranked list and scores each

    1 / (rrf_k + rank) + weight * sum over the question's literal terms of
        (1 if the term is in the chunk as written, +1 more if it starts a line there)

so a chunk that holds the named term (a definition list's entry, a heading, an option's tag)
moves up; a term at the start of a line is where a reference defines it. Literal terms: what the
question quotes (`code`, "double" or 'single' quotes), and tokens with inner punctuation that
plain word tokenizers split (`--color`, `-x`, `os.path.join`, `max_tokens`, `ISO-8601`).
A question with no literal term keeps its order. Measured on the long-document dev sets (README,
bench/RESULTS.md): answer in 600 tokens of sources 0.73 -> 0.94 on man pages, 0.91 -> 0.94 on
the pydoc modules; no cross-encoder installs offline from a package (flashrank and the
sentence-transformers CrossEncoder fetch their weights from a model hub at first use).
"""

from __future__ import annotations

import re
from functools import lru_cache

QUOTED = re.compile(r"`([^`\n]+)`|\"([^\"\n]+)\"|(?<!\w)'([^'\n]+)'(?!\w)")
CODEY = re.compile(r"(?<![\w-])(?:-{1,2}\w[\w.-]*|\w+(?:[._:/-]\w+)+)")
MAX_TERMS = 8
NEAR = 24
"""A term within this many characters of a line's start (after its indent) "starts" the line: the
tag of a definition item often lists several names first (`-u, --unique`, `-o FILE, --output=FILE`)."""


def literals(question: str) -> list[str]:
    """The question's literal terms (see the module's doc), in order, each once."""
    out: list[str] = []
    for m in QUOTED.finditer(question):
        term = next(g for g in m.groups() if g).strip()
        if len(term) >= 2 and term not in out:
            out.append(term)
    for m in CODEY.finditer(question):
        term = m.group(0).rstrip(".-")
        if len(term) >= 2 and term not in out:
            out.append(term)
    return out[:MAX_TERMS]


@lru_cache(maxsize=4096)
def _patterns(term: str) -> tuple[re.Pattern, re.Pattern]:
    t = re.escape(term)
    return (re.compile(rf"(?<![\w-]){t}(?![\w-])"),
            re.compile(rf"(?:^|\n)[ \t]*(?:#+[ \t]+)?[^\n]{{0,{NEAR}}}?(?<![\w-]){t}(?![\w-])"))


def literal_score(terms: list[str], text: str) -> int:
    """Terms of `terms` found in `text` as written, plus those that start a line of it."""
    s = 0
    for term in terms:
        if term not in text:               # most chunks: no regex at all
            continue
        anywhere, line_start = _patterns(term)
        if anywhere.search(text):
            s += 1 + bool(line_start.search(text))
    return s


def rerank(question: str, ranked: list[tuple[int, float]], text_of, weight: float, rrf_k: int,
           more=()) -> list[tuple[int, float]]:
    """`ranked` (chunk number, score), best first, reordered by the score above; `text_of(n)` is
    the indexed text of chunk n; `more` are chunks outside the ranked list to consider too (the
    other chunks of the best documents: in a long page the chunk that defines the term may rank
    below the candidates on words alone), ranked after the list; a callable giving them is only
    called when the question names a literal term. Unchanged when it names none."""
    terms = literals(question)
    if not terms or weight <= 0:
        return ranked
    seen = {n for n, _ in ranked}
    ranked = list(ranked) + [(n, 0.0) for n in (more() if callable(more) else more) if n not in seen]
    scored = [(n, 1.0 / (rrf_k + rank) + weight * literal_score(terms, text_of(n)), rank)
              for rank, (n, _) in enumerate(ranked, 1)]
    scored.sort(key=lambda t: (-t[1], t[2]))
    return [(n, s) for n, s, _ in scored]

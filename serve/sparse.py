"""BM25 over chunk texts with bm25s (sparse CSC matrices of precomputed scores, numpy search).

Tokenization is bm25s's own: lower-cased word tokens of two or more word characters (so
`numpy.lib.nanstd` gives numpy, lib, nanstd and `safe_merge` stays one token), English
stopwords removed, no stemming (API names and parameter names are matched as written).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STOPWORDS = "en"


def _tokenizer():
    # bm25s imports scipy (a second): only where an index is built or loaded.
    from bm25s.tokenization import Tokenizer

    return Tokenizer(lower=True, stopwords=STOPWORDS)


def build_bm25(texts: list[str], out: Path) -> dict:
    """Index `texts` and save the index with its tokenizer under `out`; returns what the
    manifest records."""
    import bm25s

    tok = _tokenizer()
    tokens = tok.tokenize(texts, return_as="tuple", show_progress=False)
    retriever = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    retriever.index(tokens, show_progress=False)
    out.mkdir(parents=True, exist_ok=True)
    retriever.save(str(out), show_progress=False)
    tok.save_vocab(str(out))
    tok.save_stopwords(str(out))
    return {"bm25": "bm25s", "bm25_method": "lucene", "bm25_k1": 1.5, "bm25_b": 0.75,
            "bm25_vocab": len(tokens.vocab)}


class BM25Index:
    """A saved bm25s index, memory-mapped."""

    def __init__(self, path: Path, n_docs: int):
        import bm25s

        self.retriever = bm25s.BM25.load(str(path), mmap=True, show_progress=False)
        self.tokenizer = _tokenizer()
        self.tokenizer.load_vocab(str(path))
        self.tokenizer.load_stopwords(str(path))
        self.n_docs = n_docs

    def search(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        """Per query, (chunk number, BM25 score) of the best `k` chunks with a positive score, best
        first, equal scores in chunk order.

        bm25s scores the query (`get_scores_from_ids`, its CSC matrix); the best `k` are picked here
        among the chunks that hold a query term, not by `BM25.retrieve`: that one rebuilds the
        tokenizer's reverse vocabulary on every call and partitions every
        chunk's score, zeros included, and it leaves the order of equal scores (duplicate chunks)
        to the partition. The same scores, ~1.3 ms instead of ~2.5 ms per question at 100k chunks,
        p99 2.4 ms instead of 8, timed on bench/serve.py's 100k-chunk index."""
        k = min(k, self.n_docs)
        vocab = self.retriever.vocab_dict
        words = self.tokenizer.tokenize(queries, update_vocab=False, return_as="string", show_progress=False)
        out = []
        for terms in words:
            ids = [vocab[w] for w in terms if w in vocab]
            out.append(top_positive(self.retriever.get_scores_from_ids(ids), k) if ids else [])
        return out


def top_positive(scores: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(index, score) of the best `k` positive scores, best first, equal scores in index order."""
    hit = np.flatnonzero(scores > 0)
    if len(hit) > k:
        # the k-th best score may be shared with chunks the partition leaves out: take the
        # lowest-numbered of those, as a full sort would (`hit` is in index order)
        s = scores[hit]
        kth = s[np.argpartition(-s, k - 1)[k - 1]]
        above = hit[s > kth]
        hit = np.concatenate([above, hit[s == kth][: k - len(above)]])
    order = np.lexsort((hit, -scores[hit]))
    return [(int(i), float(scores[i])) for i in hit[order]]

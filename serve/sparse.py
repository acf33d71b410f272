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
        """Per query, (chunk number, BM25 score) of the best `k` chunks with a positive score."""
        k = min(k, self.n_docs)
        toks = self.tokenizer.tokenize(queries, update_vocab=False, return_as="tuple", show_progress=False)
        docs, scores = self.retriever.retrieve(toks, k=k, show_progress=False, n_threads=0)
        out = []
        for d_row, s_row in zip(np.asarray(docs), np.asarray(scores)):
            out.append([(int(d), float(s)) for d, s in zip(d_row, s_row) if s > 0])
        return out

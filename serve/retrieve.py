"""Retrieval over an index dir: BM25, dense, or both fused by reciprocal rank; one hit per document.

    r = open_retriever("runs/demo/index")
    hits = r.retrieve("What does json.dumps do?", top_k=4, mode="hybrid")
    # [Hit(id='json.dumps#0', doc_id='json.dumps', source='corpus.jsonl:812', score=0.0325, text=...), ...]

The server, `index query` and the evaluation stage (retrieval metrics, RAG prompting) all
retrieve through here. Scores: BM25 score in bm25 mode, cosine in dense mode, the fused
reciprocal-rank score in hybrid mode (higher is better in all three).

- dense: the question's unit vector against the faiss index; hits under `min_score` (cosine)
  are not used, in dense mode and in fusion.
- hybrid: reciprocal rank fusion (Cormack et al., 2009): a chunk scores sum(1 / (rrf_k + rank))
  over the two ranked lists (ranks from 1), so neither retriever's score scale matters.
- rerank (`literal`, the default): the first `candidates` chunks reordered by the question's
  literal terms found as written (serve/rerank.py).
- per_document: at most that many chunks of one document among the hits (0, the default: no
  limit; the answer to a question about a long document is often in its second or third best
  chunk, not in another document).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from domainlm.errors import UserError
from domainlm.serve.chunking import index_text
from domainlm.serve.config import RetrievalArgs
from domainlm.serve.index_dir import BM25, VECTORS, IndexDir, open_index_dir
from domainlm.serve.rerank import rerank

MODES = ("hybrid", "bm25", "dense")
RERANK_DOCUMENTS = 2
"""The literal rerank also reads every chunk of the best this many documents."""


@dataclass(frozen=True, slots=True)
class Hit:
    id: str
    """The chunk's id ('{doc_id}#{n}')."""
    doc_id: str
    """The document's id (as the corpus reader and the shards give it)."""
    source: str
    """file:line."""
    score: float
    text: str
    context: str = ""
    """The chunk's heading path in its document (structure chunking)."""

    def as_dict(self) -> dict:
        return {"id": self.id, "doc_id": self.doc_id, "source": self.source, "score": round(self.score, 6),
                "context": self.context, "text": self.text}


class Retriever:
    """An open index: chunks in memory, the faiss and bm25s indexes memory-mapped, the embedder."""

    def __init__(self, index: IndexDir, embedder=None, settings: RetrievalArgs | None = None,
                 device: str = "cpu"):
        from domainlm.serve.dense import DenseIndex
        from domainlm.serve.embedder import Embedder
        from domainlm.serve.sparse import BM25Index

        self.index = index
        self.settings = settings or RetrievalArgs()
        index.check_chunking(self.settings.chunking)
        self.embedder = embedder if embedder is not None else Embedder(index.embedder(), device)
        self.chunks = index.chunks()
        self.header = index.header
        # doc_id -> (first chunk, end chunk): a document's chunks are contiguous, in its order
        self.spans: dict[str, tuple[int, int]] = {}
        for i, c in enumerate(self.chunks):
            self.spans[c.doc_id] = (self.spans.get(c.doc_id, (i, i))[0], i + 1)
        self.dense = DenseIndex(index.path / VECTORS, self.settings.hnsw_ef_search) if index.has_vectors else None
        self.sparse = BM25Index(index.path / BM25, len(self.chunks))
        if self.dense is not None and (self.dense.dim != self.embedder.dim
                                       or self.dense.index.ntotal != len(self.chunks)):
            raise UserError(f"index {str(index.path)!r}: {self.dense.index.ntotal} vectors of dim {self.dense.dim} "
                            f"for {len(self.chunks)} chunks and a {self.embedder.dim}-d embedder; rebuild it")

    def retrieve(self, question: str, top_k: int | None = None, mode: str | None = None,
                 min_score: float | None = None) -> list[Hit]:
        """The best `top_k` chunks for `question`, one per document, best first."""
        return self.retrieve_many([question], top_k, mode, min_score)[0]

    def retrieve_many(self, questions: list[str], top_k: int | None = None, mode: str | None = None,
                      min_score: float | None = None) -> list[list[Hit]]:
        """`retrieve` for many questions at once (one embedder call, one search per index)."""
        s = self.settings
        top_k = s.top_k if top_k is None else top_k
        mode = mode or s.mode
        min_score = s.min_score if min_score is None else min_score
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if self.dense is None:
            if mode == "dense":
                raise UserError(f"index {str(self.index.path)!r} has no dense vectors (built with --dense.enabled "
                                "false); use mode bm25, or rebuild it with vectors")
            mode = "bm25"        # hybrid over a BM25-only index is its one retriever
        k = max(s.candidates, top_k)
        sparse = self.sparse.search(questions, k) if mode != "dense" else None
        dense = self.dense.search(self.embedder.encode(questions), k, min_score) if mode != "bm25" else None
        out = []
        for i, q in enumerate(questions):
            if mode == "bm25":
                ranked = sparse[i]
            elif mode == "dense":
                ranked = dense[i]
            else:
                ranked = fuse([sparse[i], dense[i]], s.rrf_k)
            if s.rerank == "literal":
                top = ranked[:k]
                ranked = rerank(q, top, self._text, s.rerank_weight, s.rrf_k,
                                lambda: self._document_chunks(top, RERANK_DOCUMENTS))
            out.append(self._hits(ranked, top_k, s.per_document, s.expand))
        return out

    def _document_chunks(self, ranked: list[tuple[int, float]], documents: int) -> list[int]:
        """Every chunk of the first `documents` documents of `ranked`, in document order."""
        docs: list[str] = []
        for n, _ in ranked:
            d = self.chunks[n].doc_id
            if d not in docs:
                docs.append(d)
                if len(docs) == documents:
                    break
        return [i for d in docs for i in range(*self.spans[d])]

    def _text(self, n: int) -> str:
        """Chunk n's text as it was indexed."""
        c = self.chunks[n]
        return index_text(c) if self.header else c.text

    def _hits(self, ranked: list[tuple[int, float]], top_k: int, per_document: int, expand: int = 0) -> list[Hit]:
        hits, docs, used = [], {}, set()
        for n, score in ranked:
            c = self.chunks[n]
            if n in used or (per_document and docs.get(c.doc_id, 0) >= per_document):
                continue
            docs[c.doc_id] = docs.get(c.doc_id, 0) + 1
            used.add(n)
            text = c.text
            for m in range(n + 1, min(n + 1 + expand, len(self.chunks))):     # the chunks that follow it
                if self.chunks[m].doc_id != c.doc_id or m in used:
                    break
                used.add(m)
                text += "\n\n" + self.chunks[m].text
            hits.append(Hit(id=c.id, doc_id=c.doc_id, source=c.source, score=score, text=text, context=c.context))
            if len(hits) == top_k:
                break
        return hits

    def with_settings(self, **changes) -> "Retriever":
        """The same open index with other default settings (shares the loaded indexes)."""
        other = object.__new__(Retriever)
        other.index, other.embedder, other.chunks = self.index, self.embedder, self.chunks
        other.dense, other.sparse, other.header = self.dense, self.sparse, self.header
        other.spans = self.spans
        other.settings = replace(self.settings, **changes)
        return other


def fuse(lists: list[list[tuple[int, float]]], rrf_k: int) -> list[tuple[int, float]]:
    """Reciprocal rank fusion of ranked (chunk, score) lists -> (chunk, fused score), best first."""
    fused: dict[int, float] = {}
    for ranked in lists:
        for rank, (n, _) in enumerate(ranked, 1):
            fused[n] = fused.get(n, 0.0) + 1.0 / (rrf_k + rank)
    return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))


def metrics(retriever: Retriever, questions: list[str], gold: list[str], mode: str, depth: int = 10) -> dict:
    """recall@1, recall@4 and MRR@depth of the gold document ids over `questions` (documents,
    not chunks: the hits are taken one per document)."""
    results = retriever.with_settings(per_document=1).retrieve_many(questions, top_k=depth, mode=mode)
    r1 = r4 = rr = 0.0
    for hits, want in zip(results, gold):
        ranks = [i for i, h in enumerate(hits, 1) if h.doc_id == want]
        if ranks:
            r1 += ranks[0] == 1
            r4 += ranks[0] <= 4
            rr += 1.0 / ranks[0]
    n = max(1, len(questions))
    return {"mode": mode, "questions": len(questions), "recall@1": r1 / n, "recall@4": r4 / n, f"mrr@{depth}": rr / n}


def open_retriever(index: str | Path, embedder: str | None = None, settings: RetrievalArgs | None = None,
                   device: str = "auto") -> Retriever:
    """Open the index at `index` with its embedder (refusing `embedder` if it is another)."""
    from domainlm.serve.embedder import Embedder

    idx = open_index_dir(index)
    return Retriever(idx, Embedder(idx.embedder(embedder), device), settings)

"""Retrieval quality on QA items with a gold document: recall@1, recall@k and MRR@k per retriever.

Hits are one per document (the retriever deduplicates chunks per document), so recall@k is "the
gold document is among the k documents the prompt would carry".
"""

from __future__ import annotations

import time
from typing import Any

from domainlm.errors import UserError
from domainlm.qa import QA


def retrieval_metrics(retriever, items: list[QA], modes: list[str], top_k: int) -> dict[str, dict[str, Any]]:
    gold = [qa.doc_id for qa in items]
    if any(g is None for g in gold):
        missing = next(qa for qa in items if qa.doc_id is None)
        raise UserError(f"QA item {missing.id!r} has no doc_id (or source); retrieval metrics need the gold document")
    out: dict[str, dict[str, Any]] = {}
    questions = [qa.question for qa in items]
    for mode in modes:
        t0 = time.perf_counter()
        hits = retriever.retrieve_many(questions, top_k, mode)
        seconds = time.perf_counter() - t0
        r1 = rk = rr = 0.0
        for g, h in zip(gold, hits):
            docs = [x.doc_id for x in h]
            if g in docs:
                rank = docs.index(g) + 1
                rk += 1
                rr += 1 / rank
                r1 += rank == 1
        n = len(items)
        out[mode] = {"recall@1": r1 / n, f"recall@{top_k}": rk / n, f"mrr@{top_k}": rr / n, "questions": n,
                     "ms_per_query": 1000 * seconds / n}
    return out

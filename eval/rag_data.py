"""SFT+RAG training data: QA train pairs as chats whose prompts carry retrieved sources.

The prompt is the server's RAG prompt (`domainlm.serve.prompt.rag_messages`) over what the index
retrieves for the question, fitted into the sources budget and the model's context as the server
fits them: exactly what the model sees when served and evaluated. The answer cites " [n]": the
first source that holds the answer's words, else the first of the gold document; when retrieval
missed the gold document, the answer is the plain answer, so the model learns to answer from what
it knows when the sources do not help.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from domainlm.qa import QA


def rag_samples(items: list[QA], retriever, top_k: int, mode: str, tok, room: int, budget: int = 0
                ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    from domainlm.eval.metrics import answer_in, source_texts
    from domainlm.eval.qa import fit_sources

    hits = retriever.retrieve_many([qa.question for qa in items], top_k, mode)
    out, counts = [], {"samples": 0, "gold_retrieved": 0, "gold_missed": 0, "no_doc_id": 0, "answer_in_sources": 0,
                       "cited_by_words": 0, "cited_by_gold": 0}
    for qa, h in zip(items, hits):
        messages, h = fit_sources([{"role": "user", "content": qa.question}], h, tok, room, budget)
        docs = [x.doc_id for x in h]
        counts["answer_in_sources"] += answer_in(qa.answer, source_texts(h))
        if qa.doc_id is None:
            counts["no_doc_id"] += 1
        elif qa.doc_id in docs:
            counts["gold_retrieved"] += 1
        else:
            counts["gold_missed"] += 1
        answer, cited = cited_answer(qa, h)
        if cited:
            counts[f"cited_by_{cited}"] += 1
        messages.append({"role": "assistant", "content": answer})
        out.append({"messages": messages, "id": qa.id, "doc_id": qa.doc_id})
        counts["samples"] += 1
    return out, counts


def cited_answer(qa: QA, hits: list[Any]) -> tuple[str, str | None]:
    """The answer as SFT+RAG learns it, and what its citation rests on: " [n]" for the first
    source that holds the answer's words ("words"), else for the first of the gold document
    ("gold"); plain (None) when neither is in the sources."""
    from domainlm.eval.metrics import answer_in

    holding = [i for i, x in enumerate(hits, 1) if answer_in(qa.answer, [x.text])]
    docs = [x.doc_id for x in hits]
    if holding:
        return f"{qa.answer} [{holding[0]}]", "words"
    if qa.doc_id is not None and qa.doc_id in docs:
        return f"{qa.answer} [{docs.index(qa.doc_id) + 1}]", "gold"
    return qa.answer, None


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

"""Answer QA items with one approach and score every answer (used by `eval qa` and `compare`).

The RAG prompt is the server's (`domainlm.serve.prompt`): the same numbered sources at training
(`eval rag-data`), evaluation and serving.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from domainlm.eval import metrics
from domainlm.eval.generate import Generator, warn_cut
from domainlm.eval.prompts import PromptLibrary, pick_examples
from domainlm.qa import QA


@dataclass(slots=True)
class Approach:
    """How questions are put to the model."""

    mode: str
    """zero-shot | few-shot | rag"""
    template: str
    shots: int = 0
    top_k: int = 8
    retrieval_mode: str = "hybrid"
    max_source_tokens: int = 0
    """The sources budget (0: what the context leaves)."""


def fit_sources(messages: list[dict[str, str]], hits: list[Any], tok, room: int, budget: int = 0
                ) -> tuple[list[dict], list[Any]]:
    """The RAG messages with the hits that fit: the prompt (chat template applied) stays within
    `room` tokens and the sources within `budget` tokens (0: no budget), sources cut and then
    dropped from the last, as the server fits them (`serve.prompt.fit_hits`): what a model is
    trained on, evaluated on and served is the same."""
    from dataclasses import replace

    from domainlm.serve.prompt import fit_hits, rag_messages, token_counter

    if not hits:
        return messages, hits

    def n_tokens(msgs) -> int:
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        return len(ids["input_ids"] if hasattr(ids, "keys") else ids)

    frame = n_tokens(rag_messages(messages, [replace(hits[0], text="")]))
    count, cut = token_counter(tok)
    kept = fit_hits(hits, min(room - frame, budget) if budget else room - frame, count, cut)
    return rag_messages(messages, kept), kept


def build_prompts(items: list[QA], approach: Approach, library: PromptLibrary, *, pool: list[QA] = (),
                  retriever=None, seed: int = 0, tok=None, room: int = 0) -> tuple[list[list[dict[str, str]]], list[list[Any]]]:
    """The chat messages for every item, and (mode rag) the hits each prompt carries.

    The template phrases the question in every mode; few-shot prepends worked examples; rag puts
    the retrieved sources into the conversation the way the server does."""
    hits: list[list[Any]] = [[] for _ in items]
    if approach.mode == "rag":
        hits = retriever.retrieve_many([qa.question for qa in items], approach.top_k, approach.retrieval_mode)
    prompts = []
    for i, qa in enumerate(items):
        shots = pick_examples(list(pool), approach.shots, seed * 1_000_003 + i, avoid=qa.doc_id) \
            if approach.mode == "few-shot" else []
        messages = library.messages(approach.template, qa.question, shots)
        if approach.mode == "rag":
            messages, hits[i] = fit_sources(messages, hits[i], tok, room, approach.max_source_tokens)
        prompts.append(messages)
    return prompts, hits


def score(qa: QA, answer: str, hits: list[Any], rag: bool = False) -> dict[str, Any]:
    """EM, F1, contains; with retrieval also: gold document in the prompt's sources, the first
    cited source is the gold document, share of the answer supported by the sources."""
    plain = metrics.strip_citations(answer)
    out: dict[str, Any] = {
        "exact_match": metrics.exact_match(plain, qa.answer),
        "f1": metrics.token_f1(plain, qa.answer),
        "contains": metrics.contains(plain, qa.answer),
    }
    if rag:
        cited = metrics.citations(answer)
        docs = [h.doc_id for h in hits]
        out["gold_retrieved"] = float(qa.doc_id in docs) if qa.doc_id else None
        # the first source the answer cites is the gold document (0 when it cites none)
        valid = [n for n in cited if 1 <= n <= len(hits)]
        out["cited"] = bool(valid)
        out["citation_correct"] = (float(bool(valid) and docs[valid[0] - 1] == qa.doc_id) if qa.doc_id else None)
        out["faithfulness"] = metrics.faithfulness(answer, "\n".join(h.text for h in hits))
        # the gold answer (SQuAD-normalised) is in the text the model was given: retrieval's ceiling
        out["answer_in_sources"] = float(metrics.answer_in(qa.answer, metrics.source_texts(hits)))
    return out


def answer_and_score(gen: Generator, items: list[QA], approach: Approach, library: PromptLibrary, *,
                     pool: list[QA] = (), retriever=None, seed: int = 0, max_new_tokens: int = 48,
                     batch_size: int = 16, temperature: float = 0.0,
                     top_p: float = 1.0) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per-question records and the cost of producing them (wall and process CPU seconds). Greedy
    unless `temperature` > 0; sampling then starts from `seed`, so a rerun gives the same answers."""
    t0, c0 = time.perf_counter(), time.process_time()
    prompts, hits = build_prompts(items, approach, library, pool=pool, retriever=retriever, seed=seed,
                                  tok=gen.tok, room=gen.room(max_new_tokens))
    outs = gen.generate(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature,
                        top_p=top_p, seed=seed)
    cost = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    warn_cut(outs, gen.max_positions, max_new_tokens, approach.mode)
    records = []
    for qa, prompt, h, o in zip(items, prompts, hits, outs):
        rec = {"id": qa.id, "question": qa.question, "gold": qa.answer, "doc_id": qa.doc_id, "answer": o.text,
               **score(qa, o.text, h, approach.mode == "rag"), "tokens_in": o.tokens_in, "tokens_out": o.tokens_out,
               "truncated": o.truncated, "prompt": prompt}
        if approach.mode == "rag":
            rec["sources"] = [{"n": i + 1, "id": x.id, "doc_id": x.doc_id, "context": getattr(x, "context", ""),
                               "source": x.source, "score": round(x.score, 5), "text": x.text}
                              for i, x in enumerate(h)]
        records.append(rec)
    return records, cost


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over questions (None-valued scores left out of their mean)."""
    out: dict[str, Any] = {"questions": len(records)}
    for key in ("exact_match", "f1", "contains", "gold_retrieved", "citation_correct", "faithfulness"):
        vals = [r[key] for r in records if r.get(key) is not None]
        if vals:
            out[key] = metrics.mean(vals)
    present = [r for r in records if r.get("answer_in_sources") == 1.0]
    absent = [r for r in records if r.get("answer_in_sources") == 0.0]
    if present or absent:
        out["answer_in_sources"] = {
            name: {"share": len(part) / len(records), "questions": len(part),
                   "f1": metrics.mean(r["f1"] for r in part) if part else None,
                   "exact_match": metrics.mean(r["exact_match"] for r in part) if part else None}
            for name, part in (("present", present), ("absent", absent))}
    out["tokens_in"] = metrics.mean(r["tokens_in"] for r in records)
    out["tokens_out"] = metrics.mean(r["tokens_out"] for r in records)
    out["truncated"] = sum(bool(r.get("truncated")) for r in records)
    return out


def latency(gen: Generator, items: list[QA], approach: Approach, library: PromptLibrary, *, pool=(),
            retriever=None, max_new_tokens: int = 48, temperature: float = 0.0,
            top_p: float = 1.0) -> dict[str, float]:
    """p50/p95 seconds of answering one question at a time (retrieval included), as a user waits."""
    times = []
    for i, qa in enumerate(items):
        t0 = time.perf_counter()
        prompts, _ = build_prompts([qa], approach, library, pool=pool, retriever=retriever, seed=i, tok=gen.tok,
                                   room=gen.room(max_new_tokens))
        gen.generate(prompts, max_new_tokens=max_new_tokens, batch_size=1, temperature=temperature, top_p=top_p, seed=i)
        times.append(time.perf_counter() - t0)
    return {"p50_s": metrics.percentile(times, 50), "p95_s": metrics.percentile(times, 95), "n": len(times)}

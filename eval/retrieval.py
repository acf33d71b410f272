"""Retrieval quality on QA items with a gold document and answer, per retriever:

- document level: recall@1, recall@k and MRR@k of the gold document (hits taken one per
  document, so recall@k is "the gold document is among the k best documents");
- answer level: answer_in_sources, the share of questions whose gold answer (SQuAD-normalised)
  is in the text of the sources a prompt would carry, after fitting them into the sources budget
  (`max_source_tokens` of the model's tokenizer, as compare, eval rag-data and serve fit them);
  and answer_in@k, the same for the first k chunks before the budget (how deep the answer sits).

A QA item whose doc_id is not in the index is counted and named, and left out.
"""

from __future__ import annotations

import time
from typing import Any

from domainlm.errors import UserError
from domainlm.progress import log
from domainlm.qa import QA

ANSWER_KS = (1, 2, 4, 8)


def path_matches(wanted: list[str], ids) -> dict[str, str]:
    """For each id of `wanted` that is not in `ids`, the one document of `ids` that is a file (an
    id that is a .txt/.md/.rst/.html/.pdf/... path) whose path it names another way: one ends with
    the other after a '/' ('guide.md' or 'docs/guide.md' for '/data/docs/guide.md', or the other
    way round; './' and '..' folded), or, for an id with no file ending, the same without the
    file's ending ('guide' or 'docs/guide' for '/data/docs/guide.md'). A file document's id is its
    path as the stages were given it, so QA written with a relative path or a page's name still
    finds a corpus given as an absolute one. Ambiguous ends (two 'ref.md', or 'guide.md' beside
    'guide.html' for 'guide') map to nothing. `ids`: a set or a dict keyed by id (the retriever's
    `spans`)."""
    import posixpath

    from domainlm.corpus import CORPUS_KINDS, FILE_KINDS, corpus_suffix

    missing = {w for w in wanted if w and w not in ids}
    suffixes = {i: corpus_suffix(i) for i in ids if "/" in i} if missing else {}
    files = {i: suf for i, suf in suffixes.items() if suf and CORPUS_KINDS[suf] in FILE_KINDS}
    if not files:
        return {}
    by_name: dict[str, list[tuple[str, str]]] = {}     # last part -> [(path form, id)]
    for i, suf in files.items():
        stem = i[: -len(suf)]
        for form in (i, stem):
            by_name.setdefault(posixpath.basename(form), []).append((form, i))
    out = {}
    for w in missing:
        norm_w = posixpath.normpath(w)
        found = {i for form, i in by_name.get(posixpath.basename(norm_w), [])
                 if (n := posixpath.normpath(form)) == norm_w or n.endswith("/" + norm_w) or norm_w.endswith("/" + n)}
        if len(found) == 1:
            out[w] = found.pop()
    return out


def with_index_ids(items: list[QA], retriever, say: bool = True) -> list[QA]:
    """`items` with each doc_id that names an index document's path another way (`path_matches`)
    replaced by the index's id, said in one line (`say`)."""
    from dataclasses import replace

    same = path_matches([qa.doc_id for qa in items if qa.doc_id is not None], retriever.spans)
    if not same:
        return items
    out = [replace(qa, doc_id=same[qa.doc_id]) if qa.doc_id in same else qa for qa in items]
    if say:
        log.info("%d QA item(s) name their document's path another way than the index (%d path(s), e.g. %r for %r) "
                 "and take the index's id", sum(qa.doc_id in same for qa in items), len(same), *min(same.items()))
    return out


def known_documents(items: list[QA], retriever, data: list[str] = (), index: str = "",
                    fate: str = "left out") -> tuple[list[QA], list[QA]]:
    """(items whose doc_id is in the index or absent, items naming a doc_id the index lacks); the
    second are logged with their ids and `fate`. A doc_id that names the path of an index
    document another way (`path_matches`) takes the index's id, said in one line. None kept of
    some items is a user's mistake (the QA files of `data` are about another corpus than
    `index`'s): refused."""
    items = with_index_ids(items, retriever)
    ids = retriever.spans                           # the index's documents, keyed by id
    unknown = [qa for qa in items if qa.doc_id is not None and qa.doc_id not in ids]
    if unknown:
        names = ", ".join(f"{qa.id or qa.question[:40]!r} (doc_id {qa.doc_id!r})" for qa in unknown[:5])
        log.warning("%d QA item(s) name a doc_id the index does not hold, %s: %s%s", len(unknown), fate, names,
                    f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
    kept = [qa for qa in items if qa.doc_id is None or qa.doc_id in ids]
    if items and not kept:
        some = ", ".join(repr(i) for i in sorted(ids, key=str)[:3])
        raise UserError(f"none of the QA items of {', '.join(data) or 'the data'} names a document of the index "
                        f"{index!r} ({len(unknown)} name others, e.g. {unknown[0].doc_id!r}; the index holds e.g. "
                        f"{some}): doc_id must be the id of the corpus document that holds the answer; check that "
                        "the index was built from the corpus these questions are about")
    return kept, unknown


def retrieval_metrics(retriever, items: list[QA], modes: list[str], top_k: int, *, count_tokens=None,
                      cut_tokens=None, budget: int = 0, sources_top_k: int = 8) -> dict[str, dict[str, Any]]:
    """Per mode, the document-level and answer-level figures of the module's doc. Without
    `count_tokens` (the model's tokenizer) no budget is applied."""
    from domainlm.eval.metrics import answer_in, source_texts
    from domainlm.serve.prompt import fit_hits

    gold = [qa.doc_id for qa in items]
    if any(g is None for g in gold):
        missing = next(qa for qa in items if qa.doc_id is None)
        raise UserError(f"QA item {missing.id!r} has no doc_id (or source); retrieval metrics need the gold document")
    out: dict[str, dict[str, Any]] = {}
    questions = [qa.question for qa in items]
    per_doc = retriever.with_settings(per_document=1)
    deep = max(sources_top_k, *ANSWER_KS)
    for mode in modes:
        t0 = time.perf_counter()
        hits = retriever.retrieve_many(questions, deep, mode)
        seconds = time.perf_counter() - t0
        docs_hits = per_doc.retrieve_many(questions, top_k, mode)
        r1 = rk = rr = 0.0
        for g, h in zip(gold, docs_hits):
            docs = [x.doc_id for x in h]
            if g in docs:
                rank = docs.index(g) + 1
                rk += 1
                rr += 1 / rank
                r1 += rank == 1
        n = len(items)
        at_k = {k: 0 for k in ANSWER_KS}
        in_budget = given = tokens = 0
        for qa, h in zip(items, hits):
            for k in ANSWER_KS:
                at_k[k] += answer_in(qa.answer, source_texts(h[:k]))
            kept = h[:sources_top_k]
            if count_tokens is not None and budget:
                kept = fit_hits(kept, budget, count_tokens, cut_tokens)
                tokens += sum(count_tokens(x.text) for x in kept)
            given += len(kept)
            in_budget += answer_in(qa.answer, source_texts(kept))
        out[mode] = {"recall@1": r1 / n, f"recall@{top_k}": rk / n, f"mrr@{top_k}": rr / n,
                     "answer_in_sources": in_budget / n, **{f"answer_in@{k}": v / n for k, v in at_k.items()},
                     "sources_per_question": given / n, "source_tokens_per_question": tokens / n if tokens else None,
                     "budget": budget or None, "questions": n, "ms_per_query": 1000 * seconds / n}
    return out

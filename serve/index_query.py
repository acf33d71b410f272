"""`domainlm index query --index DIR "question" ...`: print what retrieval finds, with sources."""

from __future__ import annotations

import argparse
import json
import textwrap

from domainlm.config import add_config_arguments, config_from_args, dump_yaml
from domainlm.errors import UserError
from domainlm.serve.config import IndexQueryConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The config's flags plus the questions as positional arguments."""
    parser.add_argument("questions", nargs="*", metavar="QUESTION", help="question(s) to ask the index")
    add_config_arguments(parser, IndexQueryConfig)


def query_command(ns: argparse.Namespace) -> int:
    """Ask an index questions and print the chunks it retrieves, best first, with their document
    ids, sources (file:line) and scores (BM25 score, cosine, or fused reciprocal-rank score).

    domainlm index query --index runs/demo/index "What does json.dumps do?" [--retrieval.top-k 4]
        [--retrieval.mode hybrid|bm25|dense] [--json]
    """
    cfg: IndexQueryConfig = config_from_args(IndexQueryConfig, ns)
    cfg.question = list(cfg.question) + list(ns.questions or [])
    if ns.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    return query(cfg)


def query(cfg: IndexQueryConfig) -> int:
    from domainlm.serve.retrieve import open_retriever

    if not cfg.question:
        raise UserError("give a question: domainlm index query --index DIR \"What does json.dumps do?\"")
    r = cfg.retrieval
    retriever = open_retriever(cfg.index, cfg.embedder, r)
    results = retriever.retrieve_many(cfg.question, r.top_k, r.mode, r.min_score)
    for question, hits in zip(cfg.question, results):
        if cfg.json:
            print(json.dumps({"question": question, "mode": r.mode, "hits": [h.as_dict() for h in hits]},
                             ensure_ascii=False))
            continue
        print(f"── {question}  ({r.mode}, top {r.top_k})")
        if not hits:
            print("   no chunk found" + (f" (no dense hit reached cosine {r.min_score})" if r.mode == "dense" else ""))
        for i, h in enumerate(hits, 1):
            excerpt = textwrap.shorten(" ".join(h.text.split()), 160, placeholder=" ...")
            print(f"[{i}] {h.score:.4f}  {h.doc_id}{' > ' + h.context if h.context else ''}  ({h.source})\n    {excerpt}")
    return 0

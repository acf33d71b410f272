"""Does retrieval put the answer in front of the model? Chunking, header, rerank, per-document limit
and the sources budget, measured on a short-document and a long-document dev set.

Dev sets, never a test split:
  short   the pydoc corpus as it is (one document per API symbol, a few hundred characters), and
          --questions questions drawn (seeded) from its QA train split;
  long    the same corpus regrouped into one Markdown page per module (`data.pydoc.long_documents`:
          `# module`, then `## symbol` and its text for every member), questions drawn from the
          train split about pages of at least --min-page-kb KB, doc_ids mapped to the page;
  --extra NAME=CORPUS,QA   any other corpus and QA file (e.g. the man pages of
          bench/domain_manpages.py, its qa_train.jsonl).

For each index configuration (`--indexes`: chunking:chunk_tokens[:noheader]) the index is built
with `domainlm index build` (BM25 only, or BM25 + dense with --dense) and each retrieval setting
(`--settings`) is scored with `eval retrieval`'s own function: recall@1/@4 of the gold document,
answer_in_sources within the sources budget (the model's tokenizer, --model), answer_in@k, sources
per question, ms per query; plus the index build time. Results: a Markdown table on stdout and
JSON (--output).

    .venv/bin/python bench/retrieval.py --corpus runs/demo/corpus --model runs/demo/base \\
        --extra manpages=/tmp/manpages/corpus.jsonl,/tmp/manpages/qa_train.jsonl --output bench/results/retrieval.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name -> (top_k, per_document, rerank, budget, expand): the previous default first
SETTINGS = {
    "top2/doc1/none/ctx": (2, 1, "none", 0, 0),
    "top8/doc1/none/600": (8, 1, "none", 600, 0),
    "top8/any/none/600": (8, 0, "none", 600, 0),
    "top8/any/literal/600": (8, 0, "literal", 600, 0),
    "top8/any/literal/600/expand1": (8, 0, "literal", 600, 1),
    "top8/any/literal/300": (8, 0, "literal", 300, 0),
    "top8/any/literal/900": (8, 0, "literal", 900, 0),
}
INDEXES = ["window:256:noheader", "window:256", "window:128", "structure:64", "structure:128", "structure:200"]


def dev_sets(corpus_dir: Path, n: int, min_kb: float, seed: int, work: Path) -> dict[str, tuple[Path, list]]:
    from domainlm.data.pydoc import long_documents
    from domainlm.qa import QA

    docs = [json.loads(line) for line in open(corpus_dir / "corpus.jsonl", encoding="utf-8")]
    qa = [json.loads(line) for line in open(corpus_dir / "qa.jsonl", encoding="utf-8")]
    train = [q for q in qa if q.get("split") == "train"]
    pages, page_of = long_documents(docs)
    size = {p["id"]: len(p["text"]) for p in pages}
    long_path = work / "long.jsonl"
    with open(long_path, "w", encoding="utf-8") as f:
        for p in pages:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")

    def draw(items, doc_of):
        items = list(items)
        random.Random(seed).shuffle(items)
        return [QA(id=q["id"], question=q["question"], answer=q["answer"], doc_id=doc_of(q)) for q in items[:n]]

    short_q = draw(train, lambda q: q["source"])
    long_q = draw([q for q in train if size[page_of[q["source"]]] >= min_kb * 1000], lambda q: page_of[q["source"]])
    print(f"dev sets: short {len(docs):,} documents (median {sorted(len(d['text']) for d in docs)[len(docs) // 2]:,} "
          f"chars), long {len(pages):,} pages (median {sorted(size.values())[len(size) // 2]:,} chars, "
          f"{sum(v >= min_kb * 1000 for v in size.values())} of >= {min_kb:g} KB); {len(short_q)} / {len(long_q)} "
          "questions from the train split", flush=True)
    return {"short": (corpus_dir / "corpus.jsonl", short_q), "long": (long_path, long_q)}


def extra_set(spec: str, n: int, seed: int) -> tuple[str, tuple[Path, list]]:
    from domainlm.qa import read_qa

    name, _, files = spec.partition("=")
    corpus, qa = files.split(",")
    items = read_qa([qa])
    random.Random(seed).shuffle(items)
    return name, (Path(corpus), items[:n])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("runs/demo/corpus"),
                    help="the pydoc corpus dir (corpus.jsonl, qa.jsonl) of `domainlm corpus pydoc`")
    ap.add_argument("--model", default="runs/demo/base", help="HF dir whose tokenizer counts the sources budget")
    ap.add_argument("--questions", type=int, default=400)
    ap.add_argument("--min-page-kb", type=float, default=5.0)
    ap.add_argument("--extra", action="append", default=[], help="NAME=CORPUS,QA: another dev set")
    ap.add_argument("--indexes", nargs="*", default=INDEXES)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS))
    ap.add_argument("--dense", action="store_true", help="also embed (hybrid and dense modes); minutes on a CPU")
    ap.add_argument("--sets", nargs="*", default=None, help="only these dev sets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()

    from domainlm.eval.retrieval import retrieval_metrics
    from domainlm.pretrain.convert.hfdir import open_hf_dir
    from domainlm.serve.config import DenseArgs, IndexBuildConfig, RetrievalArgs
    from domainlm.serve.index_build import build
    from domainlm.serve.prompt import token_counter
    from domainlm.serve.retrieve import open_retriever

    tok = open_hf_dir(args.model).tokenizer()
    count, cut = token_counter(tok)
    work = Path(tempfile.mkdtemp(prefix="bench_retrieval_"))
    sets = dev_sets(args.corpus, args.questions, args.min_page_kb, args.seed, work)
    for spec in args.extra:
        name, s = extra_set(spec, args.questions, args.seed)
        sets[name] = s
    if args.sets:
        sets = {k: v for k, v in sets.items() if k in args.sets}
    modes = ["bm25", "hybrid"] if args.dense else ["bm25"]
    rows, results = [], []
    for set_name, (corpus, items) in sets.items():
        for spec in args.indexes:
            method, tokens, *flags = spec.split(":")
            out = work / f"{set_name}_{spec.replace(':', '_')}"
            cfg = IndexBuildConfig(input=[str(corpus)], output=str(out), chunking=method, chunk_tokens=int(tokens),
                                   header="noheader" not in flags, dense=DenseArgs(enabled=args.dense))
            t0 = time.perf_counter()
            manifest = build(cfg)
            build_s = time.perf_counter() - t0
            base = open_retriever(out, device="cpu")
            for name in args.settings:
                top_k, per_doc, rr, budget, expand = SETTINGS[name]
                r = base.with_settings(per_document=per_doc, rerank=rr, expand=expand)
                res = retrieval_metrics(r, items, modes, 4, count_tokens=count, cut_tokens=cut, budget=budget,
                                        sources_top_k=top_k)
                for mode, m in res.items():
                    row = {"set": set_name, "index": spec, "setting": name, "mode": mode,
                           "chunks": manifest["counts"]["chunks"], "build_s": round(build_s, 1), **m}
                    results.append(row)
                    rows.append(f"| {set_name} | {spec} | {name} | {mode} | {m['answer_in_sources']:.3f} | "
                                f"{m['recall@1']:.3f} | {m['recall@4']:.3f} | {m['sources_per_question']:.1f} | "
                                f"{m['source_tokens_per_question'] or 0:.0f} | {m['ms_per_query']:.1f} | "
                                f"{manifest['counts']['chunks']:,} | {build_s:.1f} |")
                    print(rows[-1], flush=True)
    head = ("| dev set | index | top_k/per doc/rerank/budget | mode | answer in sources | recall@1 | recall@4 | "
            "sources | source tokens | ms/query | chunks | build s |\n|" + "---|" * 12)
    print("\n" + head + "\n" + "\n".join(rows))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "python": platform.python_version()}
        args.output.write_text(json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()},
                                           "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

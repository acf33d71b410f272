"""SFT+RAG on long documents against short ones: the same questions, the same base, the same
template, only the shape of the corpus differs.

  short  the pydoc corpus as it is: one document per API symbol, a few hundred characters;
  long   the same text regrouped into one Markdown page per module (`data.pydoc.long_documents`),
         the questions' doc_ids mapped to their page.

Questions: --test questions (seeded) of the pydoc *test* split whose page is at least
--min-page-kb KB (so the long shape is really long for them), asked in both shapes; --train
questions (seeded) of the train split for the SFT+RAG data. Each shape runs the stages of
`configs/pipelines/domain.yaml` that SFT+RAG needs (index, base, base_rag_data,
base_finetune_rag) with nothing changed but the vars, then `domainlm compare` with the rows rag
and sft+rag. Prints both rows' F1 and answer in sources; raw output under --work.

    .venv/bin/python bench/long_pages.py --corpus runs/demo/corpus --work /tmp/long_pages
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("runs/demo/corpus"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/long_pages"))
    ap.add_argument("--train", type=int, default=320)
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--min-page-kb", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shapes", nargs="*", default=["short", "long"])
    args = ap.parse_args()

    from domainlm.data.pydoc import long_documents
    from domainlm.eval.rag_data import write_jsonl as write

    args.work.mkdir(parents=True, exist_ok=True)
    docs = [json.loads(x) for x in open(args.corpus / "corpus.jsonl", encoding="utf-8")]
    qa = [json.loads(x) for x in open(args.corpus / "qa.jsonl", encoding="utf-8")]
    pages, page_of = long_documents(docs)
    size = {p["id"]: len(p["text"]) for p in pages}
    write(args.work / "corpus_long.jsonl", pages)
    rng = random.Random(args.seed)
    test = [q for q in qa if q["split"] == "test" and size[page_of[q["source"]]] >= args.min_page_kb * 1000]
    train = [q for q in qa if q["split"] == "train"]
    test, train = rng.sample(test, min(args.test, len(test))), rng.sample(train, min(args.train, len(train)))
    for shape in ("short", "long"):
        doc = (lambda q: q["source"]) if shape == "short" else (lambda q: page_of[q["source"]])
        for name, items in (("train", train), ("test", test)):
            write(args.work / f"qa_{name}_{shape}.jsonl",
                  [{"id": q["id"], "question": q["question"], "answer": q["answer"], "doc_id": doc(q)} for q in items])
    print(f"long pages: {len(pages)} (median {sorted(size.values())[len(size) // 2]:,} chars); {len(test)} test "
          f"questions on pages >= {args.min_page_kb:g} KB, {len(train)} train questions", flush=True)
    dl = [sys.executable, "-m", "domainlm.cli"]
    out = {}
    for shape in args.shapes:
        corpus = args.corpus / "corpus.jsonl" if shape == "short" else args.work / "corpus_long.jsonl"
        wd = args.work / f"run_{shape}"
        t0 = time.perf_counter()
        subprocess.run(dl + ["run", "configs/pipelines/domain.yaml", "--var", f"corpus={corpus}",
                             "--var", f"qa_train={args.work / f'qa_train_{shape}.jsonl'}",
                             "--var", f"qa_test={args.work / f'qa_test_{shape}.jsonl'}", "--var", f"workdir={wd}",
                             "--only", "index", "base", "base_rag_data", "base_finetune_rag"], check=True)
        subprocess.run(dl + ["compare", "--config", "configs/compare/domain.yaml", "--approaches", "rag", "sft+rag",
                             "--output", str(wd / "compare"), "--inputs.model", str(wd / "base"),
                             "--inputs.index", str(wd / "index"), "--inputs.sft-rag", str(wd / "base_adapter_rag"),
                             "--inputs.sft-data", str(args.work / f"qa_train_{shape}.jsonl"),
                             "--qa.train", str(args.work / f"qa_train_{shape}.jsonl"),
                             "--qa.test", str(args.work / f"qa_test_{shape}.jsonl"), "--overwrite"], check=True)
        res = json.loads((wd / "compare" / "compare.json").read_text())
        out[shape] = {name: {"f1": a["f1"], "exact_match": a["exact_match"], "f1_interval": a["intervals"]["f1"],
                             "answer_in_sources": a["answer_in_sources"]["present"]["share"]}
                      for name, a in res["approaches"].items()}
        out[shape]["minutes"] = round((time.perf_counter() - t0) / 60, 1)
        print(f"{shape}: {json.dumps(out[shape])}", flush=True)
    (args.work / "result.json").write_text(json.dumps(out, indent=1) + "\n")
    if "short" in out and "long" in out:
        gap = out["short"]["sft+rag"]["f1"] - out["long"]["sft+rag"]["f1"]
        print(f"sft+rag F1: short {out['short']['sft+rag']['f1']:.3f}, long {out['long']['sft+rag']['f1']:.3f} "
              f"(gap {gap:+.3f}; goal <= 0.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

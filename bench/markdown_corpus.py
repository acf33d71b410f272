"""A domain's corpus as a folder of Markdown manuals, for checking the template on that input shape.

    python bench/markdown_corpus.py --corpus /tmp/manpages/corpus.jsonl --qa /tmp/manpages/qa_train.jsonl \\
        /tmp/manpages/qa_test.jsonl --output /tmp/manpages_md

writes OUTPUT/manual/<id>.md, one file a document of the JSON-lines corpus (`{"id", "text"}`), and
OUTPUT/<name of each QA file> with every `doc_id` rewritten to the file's path relative to OUTPUT
(`manual/<id>.md`). The corpus is then given as a directory (`--var corpus=OUTPUT/manual`, any
form of the path): the stages name each document by its path as given, and the QA's relative
`doc_id`s resolve to it (README, "A corpus as a folder of manuals").

Made for `bench/domain_manpages.py`'s rendered man pages: the page's header line becomes a `# id`
title, section lines (upper case at column 0: NAME, OPTIONS, ...) become `## ` headings, and the
body's 7-column indent is removed (so Markdown does not read it as a code block). Every QA answer
must still be found in its document with whitespace collapsed, as `domain_manpages.py` checked it
in the source: a document where one is not stops the conversion.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SECTION = re.compile(r"^[A-Z][A-Z0-9 ,/&()'_:.-]*$")
INDENT = 7


def to_markdown(doc_id: str, text: str) -> str:
    lines = text.splitlines()
    if lines and "(" in lines[0] and lines[0].rstrip().endswith(")"):   # the page's header line
        lines = lines[1:]
    out = [f"# {doc_id}", ""]
    for line in lines:
        if SECTION.match(line):
            out.append(f"## {line.strip()}")
        else:
            pad = len(line) - len(line.lstrip(" "))
            out.append(line[min(pad, INDENT):])
    return "\n".join(out).rstrip() + "\n"


def collapsed(text: str) -> str:
    return " ".join(text.split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="JSON lines {\"id\", \"text\"}")
    ap.add_argument("--qa", nargs="+", required=True, help="QA files whose doc_id names a corpus id")
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    out = Path(args.output)
    manual = out / "manual"
    manual.mkdir(parents=True, exist_ok=False)
    texts: dict[str, str] = {}
    with open(args.corpus, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            doc_id = str(rec["id"])
            if "/" in doc_id or doc_id.startswith("."):
                raise SystemExit(f"{args.corpus}: id {doc_id!r} cannot be a file name")
            texts[doc_id] = to_markdown(doc_id, rec["text"])
            (manual / f"{doc_id}.md").write_text(texts[doc_id], encoding="utf-8")
    n_qa = 0
    for qa_file in args.qa:
        rows = [json.loads(x) for x in Path(qa_file).read_text(encoding="utf-8").splitlines() if x.strip()]
        for r in rows:
            text = texts.get(r["doc_id"])
            if text is None or collapsed(r["answer"]) not in collapsed(text):
                raise SystemExit(f"{qa_file}: the answer of {r['question']!r} is not in {r['doc_id']}.md")
            r["doc_id"] = f"manual/{r['doc_id']}.md"
        (out / Path(qa_file).name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                              encoding="utf-8")
        n_qa += len(rows)
    print(f"{len(texts)} documents -> {manual}/*.md; {n_qa} QA items with doc_id manual/<id>.md -> {out}")


if __name__ == "__main__":
    main()

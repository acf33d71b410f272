"""A domain's corpus as a folder of Markdown manuals, or as a built documentation site of HTML pages
(`--html`), for checking the template on those input shapes.

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

`--html`: each Markdown page is rendered by Python-Markdown (the renderer MkDocs builds sites with;
`pip install markdown`) into a documentation site's page: a `<head>` with a script and styles, a
site header, a `<nav>` sidebar that links every page (the site's furniture, as large as a real
sidebar), the page in `<main>`, a footer. Written as OUTPUT/site/<id>.html with the QA `doc_id`
`site/<id>.html`, plus a site `index.html` (a list of links only). The script then reads every
page back as the stages do (`domainlm.html_text`) and prints how many QA answers are still found
in their page's text: the measure of what the conversion keeps.
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


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - Manual</title>
<link rel="stylesheet" href="assets/site.css"><style>.md-nav {{ width: 12rem }}</style>
<script>window.SITE = {{"search": "assets/search_index.json", "title": "<p>{title}</p>"}};</script>
</head><body>
<header class="md-header"><span class="md-header__title">Manual</span>
<form class="md-search" role="search"><input type="text" placeholder="Search"></form></header>
<div class="md-container">
<nav class="md-nav" aria-label="Navigation"><ul>{nav}</ul></nav>
<main class="md-main"><article class="md-content">
{body}
</article></main>
</div>
<footer class="md-footer"><p>Made with a static site generator. Copyright the authors.</p></footer>
<script src="assets/search.js"></script>
</body></html>
"""


def write_site(out: Path, texts: dict[str, str]) -> Path:
    import markdown

    site = out / "site"
    site.mkdir()
    nav = "".join(f'<li><a href="{i}.html">{i}</a></li>' for i in sorted(texts))
    for doc_id, text in texts.items():
        body = markdown.markdown(text, extensions=["tables", "fenced_code"])
        (site / f"{doc_id}.html").write_text(PAGE.format(title=doc_id, nav=nav, body=body), encoding="utf-8")
    (site / "index.html").write_text(PAGE.format(title="Manual", nav=nav, body=f"<ul>{nav}</ul>"), encoding="utf-8")
    return site


def collapsed(text: str) -> str:
    return " ".join(text.split())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="JSON lines {\"id\", \"text\"}")
    ap.add_argument("--qa", nargs="+", required=True, help="QA files whose doc_id names a corpus id")
    ap.add_argument("--output", required=True)
    ap.add_argument("--html", action="store_true", help="write a documentation site of HTML pages (see above)")
    args = ap.parse_args()
    out = Path(args.output)
    manual = out / "manual"
    out.mkdir(parents=True, exist_ok=True)
    if not args.html:
        manual.mkdir()                # (write_site makes OUTPUT/site the same way: never over an old one)
    texts: dict[str, str] = {}
    with open(args.corpus, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            doc_id = str(rec["id"])
            if "/" in doc_id or doc_id.startswith("."):
                raise SystemExit(f"{args.corpus}: id {doc_id!r} cannot be a file name")
            texts[doc_id] = to_markdown(doc_id, rec["text"])
            if not args.html:
                (manual / f"{doc_id}.md").write_text(texts[doc_id], encoding="utf-8")
    folder, ext = ("site", "html") if args.html else ("manual", "md")
    if args.html:
        from domainlm.html_text import html_to_text

        site = write_site(out, texts)
        read_back = {i: html_to_text((site / f"{i}.html").read_bytes()) for i in texts}
    n_qa, kept = 0, 0
    for qa_file in args.qa:
        rows = [json.loads(x) for x in Path(qa_file).read_text(encoding="utf-8").splitlines() if x.strip()]
        for r in rows:
            text = texts.get(r["doc_id"])
            if text is None or collapsed(r["answer"]) not in collapsed(text):
                raise SystemExit(f"{qa_file}: the answer of {r['question']!r} is not in {r['doc_id']}.md")
            if args.html:
                kept += collapsed(r["answer"]) in collapsed(read_back[r["doc_id"]])
            r["doc_id"] = f"{folder}/{r['doc_id']}.{ext}"
        (out / Path(qa_file).name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                              encoding="utf-8")
        n_qa += len(rows)
    print(f"{len(texts)} documents -> {out / folder}/*.{ext}; {n_qa} QA items with doc_id {folder}/<id>.{ext} -> {out}")
    if args.html:
        chars = sum(map(len, read_back.values())), sum(map(len, texts.values()))
        print(f"read back as the stages read HTML: {kept} of {n_qa} QA answers found in their page's text "
              f"(whitespace collapsed); {chars[0]:,} characters of text from {chars[1]:,} of Markdown")


if __name__ == "__main__":
    main()

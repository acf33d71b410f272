"""How the corpus reader reads documents that are files of markup: HTML pages and PDF files.

    python bench/file_documents.py --input ~/.rustup/toolchains/*/share/doc/rust/html/book \\
        /usr/share/doc/libtasn1-doc/libtasn1.pdf /usr/share/doc/shared-mime-info/shared-mime-info-spec.pdf

reads every HTML and PDF file of the inputs (files, globs or directories, as `--input` of every
stage takes them) through `domainlm.corpus.read_file`, the reader the tokenizer, the index and
Beam's conversion share, one file at a time on one thread, and prints for each kind: files, input
bytes, text characters kept, Markdown headings found (`#` lines), seconds and MB/s of input; for
PDF files also each file's pages and headings. Nothing is compared against: this is what the
conversion costs and keeps on real manuals, for the README's figures.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", required=True, help="files, globs or directories")
    ap.add_argument("--limit", type=int, default=0, help="read at most this many files of each kind (0: all)")
    args = ap.parse_args()

    from domainlm.corpus import corpus_files, kind_of, read_file

    files = [f for f in corpus_files(args.input) if f.is_file() and kind_of(f) in ("html", "pdf")]
    seen: dict[str, int] = defaultdict(int)
    rows: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    per_pdf = []
    for f in files:
        kind = kind_of(f)
        if args.limit and seen[kind] >= args.limit:
            continue
        seen[kind] += 1
        t = time.perf_counter()
        (doc,) = read_file(f)
        dt = time.perf_counter() - t
        heads = sum(line.startswith("#") for line in doc.text.splitlines())
        r = rows[kind]
        r["files"] += 1
        r["bytes"] += f.stat().st_size
        r["chars"] += len(doc.text)
        r["headings"] += heads
        r["seconds"] += dt
        r["empty"] += not doc.text.strip()
        if kind == "pdf":
            from pypdf import PdfReader

            per_pdf.append((f, len(PdfReader(f).pages), f.stat().st_size, len(doc.text), heads, dt))
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}, one thread")
    print("| kind | files | input MB | text characters | headings | empty | seconds | MB/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, r in sorted(rows.items()):
        print(f"| {kind} | {int(r['files']):,} | {r['bytes'] / 1e6:.2f} | {int(r['chars']):,} | {int(r['headings']):,} "
              f"| {int(r['empty'])} | {r['seconds']:.2f} | {r['bytes'] / 1e6 / max(r['seconds'], 1e-9):.2f} |")
    if per_pdf:
        print("\n| PDF | pages | KB | text characters | headings | seconds |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for f, pages, size, chars, heads, dt in per_pdf:
            print(f"| {Path(f).name} | {pages} | {size / 1e3:.0f} | {chars:,} | {heads} | {dt:.2f} |")


if __name__ == "__main__":
    main()

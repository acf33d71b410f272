"""A man-pages domain's corpus as a folder of typeset PDF manuals, for checking the template on PDFs.

    python bench/pdf_corpus.py --corpus /tmp/manpages/corpus.jsonl --qa /tmp/manpages/qa_train.jsonl \\
        /tmp/manpages/qa_test.jsonl --output /tmp/manpages_pdf

For each page of the JSON-lines corpus `bench/domain_manpages.py` wrote (`{"id", "text"}`), the
page's troff source under /usr/share/man/man1 is typeset as a PDF, as a printed manual is:
`groff -man -Tps` (hyphenation off, as the text rendering had it) then Ghostscript's `ps2pdf`,
into OUTPUT/pdf/<id>.pdf; each QA file is written to OUTPUT with every `doc_id` rewritten to
`pdf/<id>.pdf`. The PDFs have no outline (man pages carry none), and typesetting changes some
characters: quotes become typographic (' -> ’), so a QA answer with a straight quote is no longer
found word for word in its page. The script reads every PDF back as the stages do
(`domainlm.pdf_text`) and prints how many QA answers are found in their page's text (whitespace
collapsed), and how many once typographic quotes are read as straight ones: what the PDF path
keeps.

Needs groff with its PostScript device (Debian's groff-base has it) and ghostscript (`ps2pdf`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from domain_manpages import MAN_DIR, PRELUDE, page_ids  # noqa: E402
from markdown_corpus import collapsed  # noqa: E402

STRAIGHT = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


def typeset(source: Path, out: Path) -> None:
    import gzip

    src = gzip.decompress(source.read_bytes()).decode("utf-8", "replace")
    ps = subprocess.run(["groff", "-man", "-k", "-Kutf-8", "-t", "-Tps", "-rHY=0"], input=(PRELUDE + src).encode(),
                        capture_output=True, check=True, env={**os.environ, "LC_ALL": "C.UTF-8"}).stdout
    subprocess.run(["ps2pdf", "-", str(out)], input=ps, capture_output=True, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, help="JSON lines {\"id\", \"text\"} of bench/domain_manpages.py")
    ap.add_argument("--qa", nargs="+", required=True, help="QA files whose doc_id names a corpus id")
    ap.add_argument("--output", required=True)
    ap.add_argument("--man-dir", default=str(MAN_DIR))
    args = ap.parse_args()

    from domainlm.pdf_text import pdf_to_text

    out = Path(args.output)
    pdf = out / "pdf"
    pdf.mkdir(parents=True, exist_ok=False)
    sources = {i: p for p, i in page_ids(sorted(Path(args.man_dir).glob("*.gz"))).items()}
    ids = [str(json.loads(line)["id"]) for line in Path(args.corpus).read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = {}
    for doc_id in ids:
        if doc_id not in sources:
            raise SystemExit(f"{args.corpus}: no man page source for {doc_id!r} under {args.man_dir}")
        typeset(sources[doc_id], pdf / f"{doc_id}.pdf")
        texts[doc_id] = collapsed(pdf_to_text((pdf / f"{doc_id}.pdf").read_bytes()))
    n = found = straight = 0
    for qa_file in args.qa:
        rows = [json.loads(x) for x in Path(qa_file).read_text(encoding="utf-8").splitlines() if x.strip()]
        for r in rows:
            answer = collapsed(r["answer"])
            n += 1
            found += answer in texts[r["doc_id"]]
            straight += answer in texts[r["doc_id"]].translate(STRAIGHT)
            r["doc_id"] = f"pdf/{r['doc_id']}.pdf"
        (out / Path(qa_file).name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                              encoding="utf-8")
    size = sum(p.stat().st_size for p in pdf.glob("*.pdf"))
    print(f"{len(ids)} pages typeset -> {pdf}/*.pdf ({size / 1e3:,.0f} KB); {n} QA items with doc_id pdf/<id>.pdf -> {out}")
    print(f"read back as the stages read PDF: {found} of {n} QA answers found in their page's text (whitespace "
          f"collapsed), {straight} of {n} with typographic quotes read as straight ones")


if __name__ == "__main__":
    main()

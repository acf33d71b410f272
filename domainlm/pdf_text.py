"""PDF files as corpus documents: their text layer, through pdfminer.six and pypdf.

A manual, a regulation, a guideline or a datasheet is often a PDF; each file is one document to
every stage, as a Markdown or HTML file is. pdfminer.six lays out each page's characters into
words and lines (it places the spaces from the gaps between characters, where pypdf's text
extraction runs words together in PDFs that position each word instead of writing spaces:
groff's, for one), in reading order top to bottom; pypdf reads the outline and tells an
encrypted file. Ours is only what follows:

- the Latin ligatures of typesetting (U+FB00-FB06: "ﬁ", "ﬂ", ...) are written as their letters,
  the minus sign (U+2212, what troff and TeX set for a `-` in an option or a number) as `-`,
  runs of spaces (justified lines) as one, and no line ends in spaces;
- running heads and feet are dropped: a line among the first or last three of a page that recurs,
  its digits aside ("Page 3 of 40", "Chapter 2  Installation  17"), at the same end of at least
  half the pages (of four or more), the book's title repeated over every page among them;
- the document's outline (its bookmarks) marks the headings: a line of the outline entry's page
  that reads as its title becomes a Markdown heading of the entry's depth (`# 1 Introduction`,
  `## 1.1 Scope`), so the index's structure chunker cuts by the document's own sections;
- pages are joined by a blank line.

A PDF with no text layer (scanned pages) reads as an empty document, counted as empty where
every stage counts them: run OCR on it first (e.g. `ocrmypdf`). An encrypted PDF that does not
open with an empty password, or a damaged one, raises `PdfUnreadable`, an OSError naming the fix,
which the readers report as they report any unreadable file.
"""

from __future__ import annotations

import io
import re
from collections import Counter

PDF_SUFFIXES = (".pdf",)

EDGE_LINES = 3
"""How many lines at each end of a page may be a running head or foot (a head laid out as three
boxes, "JOIN(1)", "User Commands", "JOIN(1)", is three lines)."""
MIN_PAGES = 4
_DIGITS = re.compile(r"\d+")
_NUMBER = re.compile(r"(?:\d+|[A-Z])(?:\.\d+)*\.?")
_SPACES = re.compile(r"[ \t\xa0]{2,}")
_TYPESET = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
                            "\ufb05": "st", "\ufb06": "st", "\u2212": "-"})
_LINE_END = re.compile(r"[ \t]+\n")


class PdfUnreadable(OSError):
    """A PDF that cannot be read: encrypted, damaged, or not a PDF; the message names the fix."""


def _outline(reader) -> list[tuple[int, str, int]]:
    """(depth, title, page index) of every outline entry, in order."""
    out: list[tuple[int, str, int]] = []

    def walk(items, depth: int) -> None:
        for item in items:
            if isinstance(item, list):
                walk(item, depth + 1)
                continue
            try:
                page = reader.get_destination_page_number(item)
            except Exception:   # an entry without a page (an action, a broken destination)
                continue
            title = " ".join(str(getattr(item, "title", "") or "").split())
            if title and page is not None and page >= 0:
                out.append((depth, title, page))

    try:
        walk(reader.outline, 0)
    except Exception:           # a damaged outline: the text is still read, without headings
        return []
    return out


def _key(line: str) -> str:
    return _DIGITS.sub("#", " ".join(line.split()))


def _edges(lines: list[str]) -> list[tuple[str, int]]:
    """(end, index) of the lines that may be running heads ("head") or feet ("foot")."""
    filled = [i for i, line in enumerate(lines) if line.strip()]
    return [("head", i) for i in filled[:EDGE_LINES]] + [("foot", i) for i in filled[-EDGE_LINES:]]


def drop_running_lines(pages: list[str]) -> list[str]:
    """The pages without their running heads and feet (see the module's doc)."""
    if len(pages) < MIN_PAGES:
        return pages
    split = [p.splitlines() for p in pages]
    seen: Counter = Counter()
    for lines in split:
        seen.update({(end, _key(lines[i])) for end, i in _edges(lines)})
    need = max(3, (len(pages) + 1) // 2)
    running = {k for k, n in seen.items() if n >= need}
    out = []
    for lines in split:
        drop = {i for end, i in _edges(lines) if (end, _key(lines[i])) in running}
        out.append("\n".join(line for i, line in enumerate(lines) if i not in drop))
    return out


def mark_headings(pages: list[str], outline: list[tuple[int, str, int]]) -> list[str]:
    """The pages with each outline entry's line made a Markdown heading of the entry's depth: the
    first line at or after the page's last marked heading that reads as the title, or as the title
    after a section number (`2.1 Naming` for the entry `Naming`)."""
    split = [p.splitlines() for p in pages]
    after = [0] * len(split)
    for depth, title, page in outline:
        if page >= len(split):
            continue
        lines, want = split[page], " ".join(title.split())
        for i in range(after[page], len(lines)):
            line = " ".join(lines[i].split())
            if line == want or (line.endswith(" " + want) and _NUMBER.fullmatch(line[: -len(want) - 1])):
                lines[i] = "#" * min(depth + 1, 6) + " " + line
                after[page] = i + 1
                break
    return ["\n".join(lines) for lines in split]


def _pages(raw: bytes) -> list[str]:
    """Each page's text, laid out by pdfminer.six: its text boxes top to bottom, lines in order."""
    from pdfminer.high_level import extract_pages
    from pdfminer.layout import LAParams, LTTextContainer

    out = []
    for page in extract_pages(io.BytesIO(raw), laparams=LAParams(boxes_flow=None)):
        text = "".join(el.get_text() for el in page if isinstance(el, LTTextContainer))
        out.append(_LINE_END.sub("\n", _SPACES.sub(" ", text.translate(_TYPESET))))
    return out


def pdf_to_text(raw: bytes) -> str:
    """The text of one PDF file (see the module's doc); '' for one with no text layer."""
    from pypdf import PdfReader

    try:
        reader = PdfReader(io.BytesIO(raw))
        if reader.is_encrypted and not _opens(reader):
            raise PdfUnreadable("an encrypted PDF that needs a password; decrypt it first "
                                "(e.g. `qpdf --decrypt --password=PASSWORD in.pdf out.pdf`)")
        outline = _outline(reader)
        pages = _pages(raw)
    except PdfUnreadable:
        raise
    except Exception as e:      # pypdf's many errors of a damaged file, or one that is not a PDF
        raise PdfUnreadable(f"not a readable PDF ({type(e).__name__}: {e}); check the file is complete, "
                            "or convert it to text") from None
    pages = mark_headings(drop_running_lines(pages), outline)
    text = "\n\n".join(p.strip() for p in pages if p.strip())
    return text + "\n" if text else ""


def _opens(reader) -> bool:
    """Whether an encrypted PDF opens with the empty user password (most "protected" PDFs do:
    they restrict printing or copying, not reading)."""
    try:
        return bool(reader.decrypt(""))
    except Exception:           # e.g. AES without the `cryptography` package
        return False

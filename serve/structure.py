"""A document's own structure: headings and the units between them (paragraphs, list and
definition items), found from the plain text with no markup parser.

`units(text)` -> [Unit(start, end, path)]: character spans that a chunk should never cut, in
order, each with its heading path (the titles of the headings it sits under, outermost first).

Headings:
- Markdown ATX: `# Title` ... `###### Title`;
- underlined (Markdown setext, reStructuredText): a short line of text followed by a line of one
  repeated punctuation character at least 3 long (`=====`, `-----`, `~~~~`), optionally overlined;
- man-page sections: a line at column 0 in capitals (`OPTIONS`, `SEE ALSO`) followed by
  indented text.
Heading levels are assigned in the order their styles first appear in the document (as docutils
does for reStructuredText), Markdown's `#` levels kept in their own order.

Units: a unit starts at a line and runs on through
- lines indented deeper than its first line (a definition item's description, a nested block,
  code), blank lines included when deeper lines follow;
- lines at its first line's indent directly after one (a paragraph's next line), unless the line
  starts a list item (`-`, `*`, `+`, `1.`, `a)`, ...).
It ends at a blank line followed by a line no deeper than its start, at a line less indented than
its start, or at a heading. A fenced code block (a line of ``` or ~~~ up to the next such line of
the same character, at least as long, or the document's end) is never cut and holds no heading:
a `# comment` in a shell or Python example is code. It joins the unit it is indented under, or is
a unit of its own. So `-x, --extract` followed by its indented description is one unit,
and so is `axis : int` followed by its description in a numpy-style parameter list.
A heading's own lines belong to the unit after it (a chunk starts with its heading).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$")
_RULE = re.compile(r"^([=\-~^*+#\"'`:.])\1{2,}[ \t]*$")
_LIST = re.compile(r"^[ \t]*(?:[-*+\u2022\u2023\u25e6]|\d{1,3}[.)]|\(?[A-Za-z]\)|\(\d{1,3}\)|[ivxIVX]{1,5}\.)[ \t]+\S")
_CAPS_OK = re.compile(r"^[A-Z0-9][A-Z0-9 ,/&()'_:.-]*$")
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
MAX_TITLE = 80


@dataclass(frozen=True, slots=True)
class Unit:
    start: int
    """First character (of the heading above it when it opens a section)."""
    end: int
    """One past its last non-blank character."""
    path: tuple[str, ...]
    """Titles of the headings it sits under, outermost first."""


def _indent(line: str) -> int:
    lead = line[: len(line) - len(line.lstrip(" \t"))]
    return len(lead.expandtabs(8))


def _fences(lines: list[str]) -> dict[int, int]:
    """First line -> last line of each fenced code block (the closing fence, or the last line)."""
    out: dict[int, int] = {}
    i, n = 0, len(lines)
    while i < n:
        m = _FENCE.match(lines[i])
        if m and not (m.group(1)[0] == "`" and "`" in lines[i][m.end():]):   # ```x``` is inline code
            mark = m.group(1)
            j = i + 1
            while j < n:
                c = _FENCE.match(lines[j])
                if c and c.group(1)[0] == mark[0] and len(c.group(1)) >= len(mark) and not lines[j][c.end():].strip():
                    break
                j += 1
            out[i] = min(j, n - 1)
            i = j + 1
            continue
        i += 1
    return out


def _headings(lines: list[str], fences: dict[int, int]) -> dict[int, tuple[int, tuple, str]]:
    """line number -> (lines the heading takes, its style, its title)."""
    out: dict[int, tuple[int, tuple, str]] = {}
    n = len(lines)
    i = 0
    while i < n:
        if i in fences:
            i = fences[i] + 1
            continue
        line = lines[i].rstrip("\r\n")
        s = line.strip()
        m = _ATX.match(line)
        if m and m.group(2):
            out[i] = (1, ("#", len(m.group(1))), m.group(2))
            i += 1
            continue
        nxt = lines[i + 1].rstrip("\r\n") if i + 1 < n else ""
        if (s and len(s) <= MAX_TITLE and _indent(line) <= 3 and not _RULE.match(line)
                and _RULE.match(nxt) and len(nxt.strip()) >= max(3, int(len(s) * 0.6))
                and (i == 0 or not lines[i - 1].strip() or _RULE.match(lines[i - 1].rstrip("\r\n")))):
            over = i > 0 and _RULE.match(lines[i - 1].rstrip("\r\n")) and lines[i - 1].strip()[0] == nxt.strip()[0]
            out[i - 1 if over else i] = (3 if over else 2, ("rule", nxt.strip()[0], bool(over)), s)
            i += 2
            continue
        if (s and line == line.lstrip() and len(s) <= 60 and _CAPS_OK.match(s) and sum(c.isalpha() for c in s) >= 2
                and (i == 0 or not lines[i - 1].strip()) and nxt.strip() and _indent(nxt) > 0):
            out[i] = (1, ("caps",), s)
        i += 1
    return out


def units(text: str) -> list[Unit]:
    """The document's units in order (see the module's doc); none for a blank document."""
    lines = text.splitlines(keepends=True)
    starts, pos = [], 0
    for line in lines:
        starts.append(pos)
        pos += len(line)
    fences = _fences(lines)
    heads = _headings(lines, fences)
    styles: list[tuple] = []           # heading styles in order of first appearance
    path: list[tuple[int, str]] = []   # (level, title)
    out: list[Unit] = []
    pending: int | None = None         # start of heading lines waiting for their unit
    cur: list | None = None            # [start line, base indent, last non-blank line, prev line deeper?]

    def level(style: tuple) -> int:
        if style not in styles:
            styles.append(style)
            if style[0] == "#":            # keep # above ## wherever they first appear
                atx = sorted((s for s in styles if s[0] == "#"), key=lambda s: s[1])
                slots = sorted(k for k, s in enumerate(styles) if s[0] == "#")
                for k, s in zip(slots, atx):
                    styles[k] = s
        return styles.index(style)

    def close() -> None:
        nonlocal cur, pending
        if cur is None:
            return
        first = pending if pending is not None else starts[cur[0]]
        last = cur[2]
        end = starts[last] + len(lines[last].rstrip())
        out.append(Unit(first, end, tuple(t for _, t in path)))
        cur, pending = None, None

    i = 0
    while i < len(lines):
        line = lines[i]
        if i in heads:
            close()
            span, style, title = heads[i]
            lv = level(style)
            while path and path[-1][0] >= lv:
                path.pop()
            path.append((lv, title))
            if pending is None:
                pending = starts[i]
            i += span
            continue
        if not line.strip():
            i += 1
            continue
        ind = _indent(line)
        if i in fences:                # a code block: whole, in the unit it is indented under or alone
            last = fences[i]
            while last > i and not lines[last].strip():
                last -= 1
            if cur is not None and ind > cur[1]:
                cur[2], cur[3] = last, True
            else:
                close()
                cur = [i, ind, last, True]
            i = fences[i] + 1
            continue
        if cur is not None:
            base, last = cur[1], cur[2]
            blank_before = last < i - 1
            deeper = ind > base
            same_para = ind == base and not blank_before and not cur[3] and not _LIST.match(line)
            if deeper or same_para:
                cur[2], cur[3] = i, deeper
                i += 1
                continue
            close()
        cur = [i, ind, i, False]
        i += 1
    close()
    if pending is not None:           # a heading with nothing under it
        out.append(Unit(pending, len(text.rstrip()), tuple(t for _, t in path)))
    return out

"""HTML pages as corpus documents: the page's content as Markdown text.

A documentation site (Sphinx, MkDocs, mdBook, rustdoc, Javadoc, a saved wiki page) is a folder of
HTML pages; each page is one document to every stage, as a Markdown or text file is. The page is
parsed by Beautiful Soup (with lxml's parser, which honours the page's declared charset) and
written as Markdown by markdownify, so headings become `#` lines (the index's structure chunker
cuts by them), code blocks become fenced blocks kept verbatim, lists `- ` items and tables rows of
cells. What is not the page's content is dropped before that:

- elements that hold no text of the page: scripts, styles, `<template>`, `<svg>`, forms, iframes;
- the site's furniture: `<nav>`, `<aside>`, `<footer>`, elements whose ARIA role is navigation,
  search, complementary or contentinfo (Sphinx's sidebars and related-links bars are such), and
  the permalink marks beside headings (`a.headerlink`, the "¶" of Sphinx and MkDocs);
- everything outside the page's main content when it marks exactly one (`<main>` or
  `role="main"`, else one `<article>`); otherwise the whole `<body>`.

Links and images keep their text only (the link's words, an image's alt text is dropped), and
emphasis marks are not written (`<b>-x</b>` is `-x`): they would stand between a reader's words
and the words the model learns. Inline code keeps its backticks, as in a Markdown manual. When the
content has no `<h1>`, the page's `<title>` is its first heading.
"""

from __future__ import annotations

import re
import warnings

HTML_SUFFIXES = (".html", ".htm", ".xhtml")

_DROP = ("script", "style", "noscript", "template", "svg", "canvas", "iframe", "object", "embed",
         "form", "button", "select", "nav", "aside", "footer", "head")
_DROP_ROLES = ("navigation", "search", "complementary", "contentinfo")
_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_TRAILING = re.compile(r"[ \t]+\n")


def _converter():
    from markdownify import MarkdownConverter

    class _Converter(MarkdownConverter):
        def convert_br(self, el, text, parent_tags):  # a line break, not Markdown's two spaces
            return " " if "_inline" in parent_tags else "\n"

    return _Converter(heading_style="ATX", bullets="-", strip=["a", "img", "b", "strong", "i", "em"],
                      escape_asterisks=False, escape_underscores=False, escape_misc=False)


_CONVERTER = None


def _content(soup):
    """The element that holds the page's content (see the module's doc)."""
    for find in (lambda: soup.find_all("main") + soup.find_all(attrs={"role": "main"}),
                 lambda: soup.find_all("article")):
        found = []
        for el in find():
            if el not in found and not any(p in found for p in el.parents):
                found.append(el)
        if len(found) == 1:
            return found[0]
    return soup.body or soup


def html_to_text(raw: bytes | str) -> str:
    """The text of one HTML page as Markdown (see the module's doc); '' for a page with none."""
    global _CONVERTER
    from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning, XMLParsedAsHTMLWarning

    if _CONVERTER is None:
        _CONVERTER = _converter()
    with warnings.catch_warnings():   # a page that is only a word reads as that word, XHTML as HTML
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        warnings.simplefilter("ignore", XMLParsedAsHTMLWarning)
        soup = BeautifulSoup(raw, "lxml")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for el in soup.find_all(_DROP):
        el.decompose()
    for el in soup.find_all(attrs={"role": _DROP_ROLES}):
        el.decompose()
    for el in soup.select("a.headerlink"):
        el.decompose()
    content = _content(soup)
    text = _CONVERTER.convert_soup(content)
    if title and content.find("h1") is None:
        text = f"# {' '.join(title.split())}\n\n{text}"
    text = _TRAILING.sub("\n", text.replace("\r\n", "\n").replace("\xa0", " "))
    return _BLANK_LINES.sub("\n\n", text).strip() + ("\n" if text.strip() else "")

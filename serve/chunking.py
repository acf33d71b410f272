"""Cut documents into chunks of at most N tokens: by the document's own structure (`structure`,
the default) or in windows with overlap cut at paragraph or line boundaries (`window`).

`structure` (serve/structure.py): a chunk is one or more whole units (paragraphs, list and
definition items, each with the heading it opens) under one heading path, packed up to N
tokens; a unit longer than N is cut as `window` cuts. Every chunk carries its heading path
(`context`), and the text that is indexed (BM25 and the embedder) is `index_text(chunk)`: the
document's id and the heading path on a first line, then the chunk's text.

Tokens are the embedder's (its fast tokenizer's offsets map them back to characters), so a chunk
is exactly what one dense vector covers. A chunk's text is a slice of the document's text as it
is, never re-joined tokens, so what a user sees in `sources` is the corpus text.

`window`: where to cut, in order of preference, within the second half of the window: after a blank line
(paragraph), after a newline, else at the token boundary where the window ends. The next chunk
starts `overlap` tokens back, moved forward to the first line start in that span when there is
one, so chunks rarely begin mid-line.

A token that spans more than LONG_TOKEN_CHARS characters (a WordPiece tokenizer gives one [UNK]
for a word longer than 100 characters: a 2 MB run without spaces is one token) counts as one
token per CHARS_PER_TOKEN characters, so such a run is cut by characters like any long text and
no chunk exceeds its budget (`split_long_tokens`).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from domainlm.corpus import Document

_PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n")
LONG_TOKEN_CHARS = 100
"""A token longer than this (WordPiece's max_input_chars_per_word) is a run the tokenizer could not
cut; no real subword token is that long."""
CHARS_PER_TOKEN = 4
"""Characters counted as one token inside such a run (an embedder tokenizer cuts a run of letters
into pieces of 2 to 4 characters)."""


@dataclass(slots=True)
class Chunk:
    id: str
    """'{doc_id}#{n}': n counts the document's chunks from 0."""
    doc_id: str
    """The document's id, as the corpus reader and the shards give it."""
    source: str
    """file:line of the record (JSONL, Parquet, datasets), or file:line of the chunk's first line
    in a .txt document."""
    text: str
    tokens: int
    context: str = ""
    """The heading path of the chunk inside its document ('OPTIONS', 'Guide > Install'); empty
    for window chunks and text before the first heading."""


def _strength(gap: str) -> int:
    """2 for a paragraph break in the text between two tokens, 1 for a line break, else 0."""
    if "\n" not in gap:
        return 0
    return 2 if _PARAGRAPH.search(gap) else 1


def split_long_tokens(offsets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """`offsets` with every token longer than LONG_TOKEN_CHARS characters cut into pieces of
    CHARS_PER_TOKEN characters, each counted as a token; the same list when there is none."""
    if all(e - s <= LONG_TOKEN_CHARS for s, e in offsets):
        return offsets
    out: list[tuple[int, int]] = []
    for s, e in offsets:
        if e - s <= LONG_TOKEN_CHARS:
            out.append((s, e))
        else:
            out.extend((a, min(a + CHARS_PER_TOKEN, e)) for a in range(s, e, CHARS_PER_TOKEN))
    return out


def spans(text: str, offsets: list[tuple[int, int]], chunk_tokens: int, overlap: int) -> Iterator[tuple[int, int, int]]:
    """(first token, end token, start char) of each chunk of a document whose tokens have the
    character `offsets`; nothing for a document without tokens."""
    n = len(offsets)
    if n == 0:
        return
    # cut[i]: how good a place the gap before token i is to cut (i = 1..n-1).
    cut = [0] * n
    for i in range(1, n):
        cut[i] = _strength(text[offsets[i - 1][1]:offsets[i][0]])
    s = 0
    while True:
        end = min(n, s + chunk_tokens)
        if end == n:
            yield s, n, offsets[s][0]
            return
        best, e = 0, end
        for i in range(end, s + chunk_tokens // 2, -1):
            if cut[i] > best:
                best, e = cut[i], i
                if best == 2:
                    break
        yield s, e, offsets[s][0]
        nxt = e - overlap if overlap else e
        for i in range(max(nxt, s + 1), e):
            if cut[i]:
                nxt = i
                break
        s = max(nxt, s + 1)


SEP = " > "
"""Between the titles of a heading path."""


def header(doc_id: str, context: str) -> str:
    """The chunk's first line in the index and in the prompt: its document and heading path."""
    return f"{doc_id}{SEP}{context}" if context else doc_id


def index_text(chunk) -> str:
    """What BM25 and the embedder index for a chunk: its header line, then its text."""
    return f"{header(chunk.doc_id, chunk.context)}\n{chunk.text}"


def structured(text: str, offsets: list[tuple[int, int]], chunk_tokens: int, overlap: int
               ) -> Iterator[tuple[int, int, int, int, str]]:
    """(first token, end token, start char, end char, heading path) of each chunk of a document
    cut by its structure: whole units under one heading path, packed up to `chunk_tokens`."""
    from domainlm.serve.structure import units

    if not offsets:
        return
    first = [o[0] for o in offsets]
    cur = None                                  # [a, b, start, end, path]
    for u in units(text):
        a, b = bisect_left(first, u.start), bisect_left(first, u.end)
        if a >= b:
            continue
        path = SEP.join(u.path)
        if cur is not None and (cur[4] != path or b - cur[0] > chunk_tokens):
            yield tuple(cur)
            cur = None
        if b - a > chunk_tokens:                 # a unit too long for one chunk: windows inside it
            sub = offsets[a:b]
            for sa, se, _ in spans(text, sub, chunk_tokens, overlap):
                start = u.start if sa == 0 else sub[sa][0]
                yield a + sa, a + se, start, sub[se - 1][1], path
            continue
        if cur is None:
            cur = [a, b, u.start, u.end, path]
        else:
            cur[1], cur[3] = b, u.end
    if cur is not None:
        yield tuple(cur)


def chunk_documents(docs: Iterable[Document], tokenizer, chunk_tokens: int, overlap: int,
                    batch: int = 256, method: str = "structure") -> Iterator[Chunk | Document]:
    """Chunks of every document, in order; a document with no tokens (empty or whitespace) is
    yielded itself so the caller can count it."""
    pending: list[Document] = []

    def flush() -> Iterator[Chunk | Document]:
        enc = tokenizer([d.text for d in pending], add_special_tokens=False, return_offsets_mapping=True,
                        return_attention_mask=False, return_token_type_ids=False, verbose=False)
        for doc, offs in zip(pending, enc["offset_mapping"]):
            offs = split_long_tokens([tuple(o) for o in offs])
            found = False
            txt_file = ":" not in Path(doc.source).name      # a .txt document: its own file
            if method == "structure":
                cuts = structured(doc.text, offs, chunk_tokens, overlap)
            else:
                cuts = ((a, b, start, offs[b - 1][1], "") for a, b, start in spans(doc.text, offs, chunk_tokens, overlap))
            for n, (a, b, start, end, context) in enumerate(cuts):
                found = True
                source = f"{doc.source}:{doc.text.count(chr(10), 0, start) + 1}" if txt_file else doc.source
                yield Chunk(id=f"{doc.key}#{n}", doc_id=doc.key, source=source,
                            text=doc.text[start:end], tokens=b - a, context=context)
            if not found:
                yield doc
        pending.clear()

    for doc in docs:
        pending.append(doc)
        if len(pending) >= batch:
            yield from flush()
    if pending:
        yield from flush()

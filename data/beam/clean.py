"""Text normalization and quality filters of `domainlm data shard` (pure functions, no Beam).

Normalization makes equal texts equal bytes before hashing and tokenizing: line endings become
"\\n" (CRLF and lone CR), control characters other than "\\n" and "\\t" go, and the text is put
in Unicode NFC. Filters then drop documents by rule, each drop counted under its reason.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from domainlm.data.config import FilterArgs

# C0 and C1 control characters except \t (09) and \n (0a); \r is turned into \n first.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]+")
# \w is letters, digits and "_" in every script; what remains after removing [\W_] is what
# str.isalnum() accepts, counted at regex speed instead of one Python call per character.
_NOT_ALNUM = re.compile(r"[\W_]+")
_C0_BYTES = bytes(range(0, 9)) + bytes(range(11, 32)) + b"\x7f"  # \r included; C1 starts with \xc2
_ASCII_ALNUM = bytes(range(48, 58)) + bytes(range(65, 91)) + bytes(range(97, 123))

FILTER_REASONS = ("empty", "too_short", "too_long", "low_alnum", "repeated_lines")


def normalize(text: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    return unicodedata.normalize("NFC", text)


def clean(text: str) -> tuple[str, bytes]:
    """(normalize(text), its UTF-8), checking on the bytes first: most texts need no change,
    and byte scans run at memory speed where a regex over the str is ~20 ns a character.
    UnicodeEncodeError for a text holding a lone surrogate (a JSON "\\ud800" escape)."""
    raw = text.encode("utf-8")
    ascii_only = len(raw) == len(text)
    dirty = len(raw.translate(None, _C0_BYTES)) != len(raw) or (not ascii_only and b"\xc2" in raw)
    if dirty or not (ascii_only or unicodedata.is_normalized("NFC", text)):
        text = normalize(text)
        raw = text.encode("utf-8")
    return text, raw


def alnum_count(text: str, raw: bytes) -> int:
    """Letters and digits in `text` (`raw` is its UTF-8), as str.isalnum counts them."""
    if len(raw) == len(text):  # ASCII: count bytes in C
        return len(raw) - len(raw.translate(None, _ASCII_ALNUM))
    return len(_NOT_ALNUM.sub("", text))


def repeated_line_fraction(text: str) -> float:
    """Share of the non-blank lines that repeat an earlier line exactly."""
    lines = text.split("\n")
    if len(lines) < 2:
        return 0.0
    distinct = set(lines)
    empty = lines.count("")
    if len(lines) - len(distinct) == max(empty - 1, 0):
        return 0.0  # the only repeats are empty lines (the common case, decided in C)
    blank = [line for line in distinct if not line.strip()]
    n_blank = sum(lines.count(line) for line in blank)
    nonblank = len(lines) - n_blank
    if nonblank < 2:
        return 0.0
    return 1.0 - (len(distinct) - len(blank)) / nonblank


def filter_reason(text: str, raw: bytes, f: FilterArgs) -> str | None:
    """The first filter rule the normalized `text` fails, or None to keep it."""
    n = len(text)
    if not text.strip():
        return "empty"
    if n < f.min_chars:
        return "too_short"
    if f.max_chars and n > f.max_chars:
        return "too_long"
    if f.min_alnum_fraction and alnum_count(text, raw) < f.min_alnum_fraction * n:
        return "low_alnum"
    if f.max_repeated_line_fraction and repeated_line_fraction(text) > f.max_repeated_line_fraction:
        return "repeated_lines"
    return None


def content_hash(raw: bytes) -> bytes:
    """128 bits of the normalized text's UTF-8: the exact-duplicate key (64 bits alone collide
    with a few percent probability in a billion documents). Read as two little-endian uint64."""
    return hashlib.blake2b(raw, digest_size=16).digest()

"""Read corpus documents from JSONL, Parquet, plain text and saved `datasets` directories.

This is the streaming reader used where the whole corpus must be read strictly, in one
process: tokenizer training and reports. Any bad record stops the run with the file, the line
and the fix, since a tokenizer trained on part of a corpus is a silent loss. (The Beam shard
pipeline has its own readers that send bad records to a dead-letter file and go on.)
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import orjson

from domainlm.errors import UserError
from domainlm.html_text import HTML_SUFFIXES, html_to_text
from domainlm.manifest import expand_inputs
from domainlm.pdf_text import PDF_SUFFIXES, PdfUnreadable, pdf_to_text

# File name endings of corpus files (case-insensitive), and how each is read: JSON lines, Parquet,
# or one document a file: plain text (Markdown and reStructuredText manuals are plain text too,
# whose headings the index's structure chunker follows), an HTML page (its content as Markdown,
# `html_text`) or a PDF (its text layer, `pdf_text`). The Beam shard pipeline reads the same set.
TEXT_SUFFIXES = (".txt", ".text", ".md", ".markdown", ".rst")
CORPUS_KINDS = {
    ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "jsonl", ".json.gz": "jsonl", ".parquet": "parquet",
    **{s: "txt" for s in TEXT_SUFFIXES}, **{s + ".gz": "txt" for s in TEXT_SUFFIXES},
    **{s: "html" for s in HTML_SUFFIXES}, **{s + ".gz": "html" for s in HTML_SUFFIXES},
    **{s: "pdf" for s in PDF_SUFFIXES}, **{s + ".gz": "pdf" for s in PDF_SUFFIXES},
}
FILE_KINDS = ("txt", "html", "pdf")
"""The kinds whose file is one document, named by its path."""
CONVERTERS = {"html": html_to_text, "pdf": pdf_to_text}
"""The text of a file of these kinds, from its bytes (the strict reader and Beam's both call it)."""
CORPUS_SUFFIXES = tuple(CORPUS_KINDS)
FORMATS = ("use .jsonl/.json (JSON lines, optionally .gz), .parquet, .txt/.md/.rst/.html/.pdf (one document "
           "per file, optionally .gz) or a saved `datasets` directory")


@dataclass(slots=True)
class Document:
    key: str
    """Stable id: the record's `id` field when present, else 'file:line' (or the .txt path)."""
    text: str
    source: str
    """Where it came from, 'file:line' or 'file:row', for messages and provenance."""


def corpus_files(patterns: list[str]) -> list[Path]:
    """Expand the --input paths, globs and directories into corpus files, sorted."""
    if not patterns:
        raise UserError("no input given; pass --input with corpus files, globs or directories")
    return expand_inputs(patterns, CORPUS_SUFFIXES)


_BY_LENGTH = sorted(CORPUS_KINDS, key=len, reverse=True)   # '.jsonl.gz' before '.gz'-less endings


def corpus_suffix(name: str) -> str | None:
    """The corpus file ending `name` has ('.md', '.html.gz', ...; lower case), None for none."""
    name = name.lower()
    for suffix in _BY_LENGTH:
        if name.endswith(suffix):
            return suffix
    return None


def corpus_kind(name: str) -> str | None:
    """How a file named `name` is read (jsonl, parquet, txt, html, pdf), by its ending; None: not a corpus file."""
    suffix = corpus_suffix(name)
    return CORPUS_KINDS[suffix] if suffix else None


def kind_of(path: Path) -> str:
    if path.is_dir():
        return "datasets"
    kind = corpus_kind(path.name)
    if kind is None:
        raise UserError(f"{str(path)!r}: unknown corpus format; {FORMATS}")
    return kind


BOM = b"\xef\xbb\xbf"
"""The UTF-8 byte order mark some editors write at the start of a file: dropped there (utf-8-sig)."""
GZIP_MAGIC = b"\x1f\x8b"


def without_bom(raw: bytes, line_no: int) -> bytes:
    """A JSON-lines file's line `line_no` (from 1) without a BOM at the start of the file."""
    return raw[len(BOM):] if line_no == 1 and raw.startswith(BOM) else raw


def gzip_misnamed(path: Path, gz_read: bool = True) -> str | None:
    """The error for a file not named .gz that holds gzip data (it starts with 1f 8b), else None.
    `gz_read`: whether the reader reads .gz files (then renaming is the fix)."""
    if path.name.lower().endswith(".gz") or not path.is_file():
        return None
    with open(path, "rb") as f:
        if f.read(2) != GZIP_MAGIC:
            return None
    if gz_read:
        name = path.name + ".gz" if corpus_kind(path.name) in FILE_KINDS else (
            path.name.removesuffix(".jsonl").removesuffix(".json") + ".jsonl.gz")
        fix = f"rename it to {name} (read as gzip) or gunzip it"
    else:
        fix = "gunzip it"
    return f"{path}: gzip-compressed data (it starts with the gzip bytes 1f 8b) in a file not named .gz; {fix}"


def json_array_file(path: Path) -> str | None:
    """The error for a .json/.jsonl file that holds one JSON array (`[{...}, {...}]`, what many
    tools write) where JSON lines are read, else None: read line by line, every line of it would
    be refused or dead-lettered with no word of the cause."""
    try:
        with _open_raw(path) as f:
            head = f.read(4096)
    except (OSError, EOFError):
        return None
    head = head[len(BOM):] if head.startswith(BOM) else head
    head = head.lstrip()
    if not (head.startswith(b"[") and head[1:].lstrip().startswith(b"{")):   # an array of objects
        return None
    stem = path.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
    out = stem + ".jsonl" if stem + ".jsonl" != path.name else stem + ".lines.jsonl"
    return (f"{path}: one JSON array, not JSON lines; write one object per line (e.g. "
            f"`jq -c '.[]' {path.name} > {out}`, or pandas `to_json(..., orient='records', lines=True)`)")


def encoding_error(path: Path, where: str, raw: bytes, gz_read: bool = True) -> str | None:
    """The error for a JSON line that does not parse because of its bytes (gzip data in a file
    not named .gz, bytes that are not UTF-8), else None."""
    misnamed = gzip_misnamed(path, gz_read)
    if misnamed:
        return misnamed
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"{where}: not valid UTF-8 at byte {e.start} ({e.reason}){_FIX['invalid_utf8']}"
    return None


def _open_raw(path: Path):
    """The file's bytes, through gzip when it is named .gz (any case)."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _open_text(path: Path) -> io.TextIOBase:
    return io.TextIOWrapper(_open_raw(path), encoding="utf-8", errors="strict", newline="")


def read_documents(patterns: list[str], text_field: str = "text", id_field: str = "id") -> Iterator[Document]:
    """Yield every document of the inputs in a fixed order (files sorted, records in order)."""
    for path in corpus_files(patterns):
        yield from read_file(path, text_field, id_field)


def read_file(path: Path, text_field: str = "text", id_field: str = "id",
              byte_range: tuple[int, int] | None = None) -> Iterator[Document]:
    """Every document of one corpus file, in order. `byte_range` (start, end), for an
    uncompressed JSON-lines file only: the lines that start in [start, end), with their line
    numbers in the whole file (see `jsonl_ranges`)."""
    try:
        kind = kind_of(path)
        if byte_range is not None and (kind != "jsonl" or path.name.lower().endswith(".gz")):
            raise ValueError(f"{path}: a byte range is only read from an uncompressed JSON-lines file")
        if kind == "jsonl":
            yield from _read_jsonl(path, text_field, id_field, byte_range)
        elif kind == "parquet":
            yield from _read_parquet(path, text_field, id_field)
        elif kind == "txt":
            with _open_text(path) as f:
                yield Document(str(path), f.read(), str(path))
        elif kind in CONVERTERS:
            misnamed = gzip_misnamed(path)
            if misnamed:
                raise UserError(misnamed)
            with _open_raw(path) as f:
                raw = f.read()
            try:
                text = CONVERTERS[kind](raw)
            except PdfUnreadable as e:
                raise UserError(f"{str(path)!r}: {e}") from None
            yield Document(str(path), text, str(path))
        else:
            yield from _read_datasets(path, text_field, id_field)
    except UnicodeDecodeError as e:
        misnamed = gzip_misnamed(path)
        if misnamed:
            raise UserError(misnamed) from None
        raise UserError(
            f"{str(path)!r}: not valid UTF-8 (byte {e.start} of the text being read: {e.reason}); "
            "re-encode the file as UTF-8"
        ) from None
    except PermissionError:
        raise UserError(f"{str(path)!r}: permission denied; make the file readable") from None
    except IsADirectoryError:
        raise UserError(f"{str(path)!r} is a directory but not a saved `datasets` directory") from None
    except (OSError, EOFError) as e:  # unreadable file, truncated or corrupt gzip
        raise UserError(f"{str(path)!r}: cannot be read ({e}); check the file is complete and readable") from None


def splittable(path: Path) -> bool:
    """Whether `read_file` can read the file in byte ranges (an uncompressed JSON-lines file)."""
    return path.is_file() and kind_of(path) == "jsonl" and not path.name.lower().endswith(".gz")


def jsonl_ranges(path: Path, parts: int) -> list[tuple[int, int]]:
    """`parts` byte ranges of about equal size covering the file, each starting at a line start
    (fewer when lines are long); read each with `read_file(..., byte_range=r)`."""
    size = path.stat().st_size
    starts = [0]
    with open(path, "rb") as f:
        for k in range(1, parts):
            f.seek(max(size * k // parts - 1, starts[-1]))
            f.readline()  # to the start of the next line
            if f.tell() >= size:
                break
            if f.tell() > starts[-1]:
                starts.append(f.tell())
    return list(zip(starts, starts[1:] + [size]))


def _read_jsonl(path: Path, text_field: str, id_field: str,
                byte_range: tuple[int, int] | None = None) -> Iterator[Document]:
    start, end = byte_range or (0, None)
    with _open_raw(path) as f:
        line_no = 0
        if start:  # the line numbers of the lines before the range
            remaining = start
            while remaining:
                block = f.read(min(remaining, 1 << 22))
                if not block:
                    break
                line_no += block.count(b"\n")
                remaining -= len(block)
        pos = start
        for raw in f:
            if end is not None and pos >= end:
                break
            pos += len(raw)
            line_no += 1
            if not raw.strip():
                continue
            try:
                text, key = parse_json_line(without_bom(raw, line_no), text_field, id_field)
            except Bad as bad:
                misnamed = bad.reason in ("invalid_utf8", "invalid_json") and gzip_misnamed(path)
                if misnamed:
                    raise UserError(misnamed) from None
                array = bad.reason in ("invalid_json", "not_an_object") and json_array_file(path)
                if array:
                    raise UserError(array) from None
                raise UserError(f"{path}:{line_no}: {bad.message}{_FIX[bad.reason].format(field=text_field)}") from None
            where = f"{path}:{line_no}"
            yield Document(key if key is not None else where, text, where)


# ---------------------------------------------------------------------------------------------
# One JSON record: shared by this strict reader and the shard pipeline (which dead-letters).

MALFORMED = ("invalid_utf8", "invalid_json", "not_an_object", "missing_field", "not_a_string", "invalid_id")
EXCERPT_CHARS = 200
_FIX = {
    "invalid_utf8": "; re-encode the file as UTF-8",
    "invalid_json": "; each line must be one JSON object",
    "not_an_object": "; each line must be a JSON object with a {field!r} field",
    "missing_field": "; pass --text-field NAME to read another",
    "not_a_string": "",
    "invalid_id": "; give each document a string (or integer) id, or leave the field out or null to name it "
                  "by file and line",
}


class Bad(Exception):
    """A malformed record: reason (one of MALFORMED), message, excerpt."""

    def __init__(self, reason: str, message: str, excerpt: str = ""):
        super().__init__(message)
        self.reason, self.message, self.excerpt = reason, message, excerpt


def excerpt(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw[: EXCERPT_CHARS * 4].decode("utf-8", "backslashreplace")
    return raw[:EXCERPT_CHARS]


def id_str(value, field: str = "id") -> str | None:
    """A document id as text: a string as it is, an integer as str(); None for no id. Anything
    else (a bool, float, list, object) is Bad (invalid_id): turned into text it would be an id
    nobody wrote ("True", "1.5")."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        what = {dict: "an object", list: "a list", bool: "a boolean", float: "a float"}.get(
            type(value), f"of type {type(value).__name__}")
        shown = excerpt(json.dumps(value, ensure_ascii=False, default=repr))
        raise Bad("invalid_id", f"field {field!r} is {what} ({shown[:60]}), not a string or an integer", shown)
    value = str(value)
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape: kept visible, escaped
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def load_json_object(raw: bytes) -> dict:
    """One JSON-lines record as a dict; Bad (invalid_utf8, invalid_json, not_an_object) otherwise.

    orjson parses (3x the stdlib's speed, which is most of a record's cost); a line it refuses
    is parsed again by the stdlib json module, whose rules decide (it also accepts NaN, big
    integers and lone surrogate escapes) and whose messages name the column. Every JSON-lines
    reader (the corpus, the shard pipeline, fine-tuning data) parses records through here.
    """
    try:
        rec = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Bad("invalid_utf8", f"not valid UTF-8 at byte {e.start} ({e.reason})", excerpt(raw)) from None
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise Bad("invalid_json", f"not valid JSON ({e.msg} at column {e.colno})", excerpt(line)) from None
    if not isinstance(rec, dict):
        raise Bad("not_an_object", f"a JSON {type(rec).__name__}, not an object", excerpt(raw))
    return rec


def parse_json_line(raw: bytes, text_field: str, id_field: str) -> tuple[str, str | None]:
    """(text, id) of one JSONL line; Bad for a malformed one."""
    rec = load_json_object(raw)
    if text_field not in rec:
        fields = ", ".join(sorted(map(str, rec))) or "none"
        raise Bad("missing_field", f"no {text_field!r} field (fields: {fields})", excerpt(raw))
    text = rec[text_field]
    if not isinstance(text, str):
        raise Bad("not_a_string", f"field {text_field!r} is {type(text).__name__}, not a string", excerpt(raw))
    try:
        return text, id_str(rec.get(id_field), id_field)
    except Bad as bad:
        bad.excerpt = excerpt(raw)
        raise


def _check_column(path: Path, columns: list[str], text_field: str) -> None:
    if text_field not in columns:
        raise UserError(
            f"{str(path)!r}: no {text_field!r} column (columns: {', '.join(columns)}); "
            "pass --text-field NAME to read another"
        )


def _table_id(value, id_field: str, where: str) -> str | None:
    try:
        return id_str(value, id_field)
    except Bad as bad:
        raise UserError(f"{where}: {bad.message}{_FIX[bad.reason]}") from None


def _read_parquet(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{str(path)!r}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    _check_column(path, names, text_field)
    cols = [text_field] + ([id_field] if id_field in names else [])
    row = 0
    for batch in pf.iter_batches(columns=cols, batch_size=4096):
        texts = batch.column(text_field).to_pylist()
        ids = batch.column(id_field).to_pylist() if id_field in names else [None] * len(texts)
        for text, key in zip(texts, ids):
            where = f"{path}:row {row}"
            if not isinstance(text, str):
                raise UserError(f"{where}: column {text_field!r} is {type(text).__name__}, expected a string")
            key = _table_id(key, id_field, where)
            yield Document(key if key is not None else where, text, where)
            row += 1


def _read_datasets(path: Path, text_field: str, id_field: str) -> Iterator[Document]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"{str(path)!r}: not a saved `datasets` directory ({e})") from None
    splits = [(name, ds[name]) for name in sorted(ds)] if isinstance(ds, datasets.DatasetDict) else [("", ds)]
    for split, d in splits:
        _check_column(path, d.column_names, text_field)
        has_id = id_field in d.column_names
        for i, rec in enumerate(d.select_columns([text_field] + ([id_field] if has_id else []))):
            where = f"{path}:{split + ':' if split else ''}row {i}"
            text = rec[text_field]
            if not isinstance(text, str):
                raise UserError(f"{where}: column {text_field!r} is {type(text).__name__}, expected a string")
            key = _table_id(rec.get(id_field), id_field, where) if has_id else None
            yield Document(key if key is not None else where, text, where)

"""Reading the corpus in `domainlm data shard`: the input plan (driver) and the record readers
(Beam workers), all through `apache_beam.io.filesystems.FileSystems`, so local paths and
gs://, s3://, hdfs:// paths read the same way.

The driver lists the input files and cuts them into chunks, each one unit of parallel work:
byte ranges of `beam.chunk_bytes` for plain JSONL (a chunk owns the lines that start inside
it), ranges of row groups for Parquet, and whole files otherwise (gzip, .txt, the Arrow files
of a saved `datasets` directory). Listing in the driver rather than with fileio.MatchFiles
inside the pipeline is deliberate: the manifest, the up-to-date check of `domainlm run` and
the "no such input" errors all need the file list before a job is launched, and a global
chunk order gives every record a sortable id, `ref = chunk ordinal << 32 | record index`,
that decides which duplicate survives.

Line and row numbers are counted per chunk and made absolute later from the chunks' counts
(a side input), so no worker reads a file from its start. A malformed record becomes a
dead letter (file, line, reason, excerpt) and the reading goes on.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from domainlm.errors import UserError
# The record-level JSON rules are the strict reader's: one parser, two ways to report.
from domainlm.corpus import MALFORMED, Bad, excerpt, gzip_misnamed, id_str, parse_json_line, without_bom  # noqa: F401
from domainlm.corpus import CONVERTERS, CORPUS_SUFFIXES, FILE_KINDS, FORMATS, corpus_kind, json_array_file
from domainlm.manifest import hidden_below, left_out

DATASET_MARKERS = ("dataset_dict.json", "state.json")
_READ_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class InputFile:
    path: str
    """What FileSystems opens."""
    kind: str
    """jsonl | parquet | txt | arrow (one Arrow file of a saved `datasets` directory)."""
    size: int
    label: str
    """How sources name it: the path, or 'DIR' / 'DIR:SPLIT' for a datasets directory."""
    origin: str
    """The input it belongs to: the file itself, or the datasets directory (keys name it)."""
    group: int
    """Numbering group: lines of a JSONL file, rows of a Parquet file or of a datasets split."""

    @property
    def compressed(self) -> bool:
        return self.path.lower().endswith(".gz")


@dataclass(frozen=True, slots=True)
class Chunk:
    ordinal: int
    file: int
    start: int
    """Byte offset (plain JSONL) or first row group (Parquet); 0 otherwise."""
    end: int
    """Byte end (plain JSONL) or row group end (Parquet); -1 for the whole file."""
    nbytes: int
    """About how many input bytes it holds (for progress)."""


@dataclass(frozen=True, slots=True)
class Plan:
    files: tuple[InputFile, ...]
    chunks: tuple[Chunk, ...]

    def source(self, chunk: int, position: int) -> tuple[str, str, dict]:
        """(input file as keys name it, 'file:line' source, dead-letter location fields) of the
        record at absolute `position` (line for JSONL/txt, row for tables) of `chunk`."""
        f = self.files[self.chunks[chunk].file]
        input_file, (src,) = self.sources(chunk, [position])
        if f.kind in ("jsonl", *FILE_KINDS):
            return input_file, src, {"file": f.path, "line": position}
        return input_file, src, {"file": f.label, "row": position}

    def sources(self, chunk: int, positions: list[int]) -> tuple[str, list[str]]:
        """(input file as keys name it, the 'file:line' source of each absolute position) of
        records of `chunk`: `source` for a whole block at once."""
        f = self.files[self.chunks[chunk].file]
        if f.kind == "jsonl":
            return f.path, [f"{f.path}:{p}" for p in positions]
        if f.kind in FILE_KINDS:
            return f.path, [f.path] * len(positions)
        return f.origin, [f"{f.label}:row {p}" for p in positions]

    def first_position(self, chunk: int) -> int:
        return 1 if self.files[self.chunks[chunk].file].kind in ("jsonl", *FILE_KINDS) else 0


# ---------------------------------------------------------------------------------------------
# Driver: list and plan.


def _is_remote(path: str) -> bool:
    return "://" in path


_kind = corpus_kind     # how a path is read (jsonl, parquet, txt, html, pdf), None: not a corpus file


def list_inputs(patterns: list[str]) -> list[tuple[str, int]]:
    """(path, size) of every corpus file named by the patterns, sorted, unique; a saved
    `datasets` directory is listed as (dir, -1). Names nothing -> UserError."""

    if not patterns:
        raise UserError("no input given; pass --input with corpus files, globs or directories")
    out: list[tuple[str, int]] = []
    for pat in patterns:
        found: list[tuple[str, int]] = []
        base = pat.rstrip("/")
        if _is_dataset_dir(base):
            found.append((base, -1))
        else:
            for p in _match(pat):
                found.append(p)
            if not found and not any(c in pat for c in "*?["):
                # a directory: everything under it with a corpus suffix, and the saved
                # `datasets` directories in it (whose .json files are not corpus files)
                found = _directory(base)
                if not found and _exists_dir(base):
                    raise UserError(
                        f"input {pat!r} is a directory with no {'/'.join(CORPUS_SUFFIXES)} files "
                        "and no saved `datasets` directory; check the path"
                    )
        if not found:
            what = "matches no file" if any(c in pat for c in "*?[") else "does not exist"
            raise UserError(f"input {pat!r} {what}; give a file, a glob or a directory of corpus files")
        out.extend(found)
    seen, unique = set(), []
    for path, size in sorted(out):
        if path not in seen:
            seen.add(path)
            unique.append((path, size))
    for path, size in unique:
        if size >= 0 and _kind(path) is None:
            raise UserError(f"{path!r}: unknown corpus format; {FORMATS}")
    return unique


def _directory(base: str) -> list[tuple[str, int]]:
    files = _match(base + "/**")
    names = {path for path, _ in files}
    roots = sorted({path.rsplit("/", 1)[0] for path in names
                    if path.endswith("/dataset_dict.json") or path.endswith("/state.json")})
    # a DatasetDict's split folders hold state.json too: its root (with dataset_dict.json) wins
    roots = [r for r in roots if not any(r.startswith(o + "/") for o in roots if o != r)]
    inside = lambda path: any(path.startswith(r + "/") for r in roots)  # noqa: E731
    root = base if _is_remote(base) else os.path.expanduser(base)
    files = [p for p in files if not inside(p[0]) and not hidden_below(p[0], root)]
    left_out(base, [p for p, _ in files if not _kind(p)], "corpus files", CORPUS_SUFFIXES)
    return [(r, -1) for r in roots] + [p for p in files if _kind(p[0])]


def _match(pattern: str) -> list[tuple[str, int]]:
    from apache_beam.io.filesystems import FileSystems

    if not _is_remote(pattern):
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            return []
    try:
        result = FileSystems.match([pattern])[0]
    except Exception:  # BeamIOError for a pattern that matches nothing on some filesystems
        return []
    return [(m.path, m.size_in_bytes) for m in result.metadata_list
            if not os.path.basename(m.path.rstrip("/")).startswith(".")]


def _exists_dir(path: str) -> bool:
    return os.path.isdir(os.path.expanduser(path)) if not _is_remote(path) else True


def _is_dataset_dir(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    if not _is_remote(path) and not os.path.isdir(os.path.expanduser(path)):
        return False
    return any(FileSystems.exists(f"{path}/{m}") for m in DATASET_MARKERS)


def _read_json(path: str) -> dict:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as f:
        try:
            return json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path!r}: not valid JSON ({e}); is this a saved `datasets` directory?") from None


def _dataset_files(path: str) -> list[tuple[str, str]]:
    """(arrow file, label 'DIR' or 'DIR:SPLIT') of a saved `datasets` directory, in order."""
    from apache_beam.io.filesystems import FileSystems

    splits = [""]
    if FileSystems.exists(f"{path}/dataset_dict.json"):
        splits = sorted(_read_json(f"{path}/dataset_dict.json").get("splits", []))
    out = []
    for split in splits:
        d = f"{path}/{split}" if split else path
        state = _read_json(f"{d}/state.json")
        files = [e["filename"] for e in state.get("_data_files", [])]
        if not files:
            raise UserError(f"{d!r}: state.json lists no data files; re-save the dataset with save_to_disk")
        for name in files:
            if not FileSystems.exists(f"{d}/{name}"):
                raise UserError(f"{d}/{name!s}: listed in state.json but missing; re-save the dataset")
            out.append((f"{d}/{name}", f"{path}:{split}" if split else path))
    return out


def make_plan(patterns: list[str], chunk_bytes: int, workers: int = 0) -> Plan:
    """The input files and their chunks, in a fixed order (files sorted, then offsets). With
    `workers` known, chunks shrink (to 1 MB at least) so each worker gets about four: the
    DirectRunner hands out a stage's elements in equal numbers, once. Chunking never changes
    the output."""
    files: list[InputFile] = []
    for path, size in list_inputs(patterns):
        if size < 0:
            groups: dict[str, int] = {}
            for arrow, label in _dataset_files(path):
                group = groups.setdefault(label, len(files))
                files.append(InputFile(arrow, "arrow", _size(arrow), label, path, group))
        else:
            files.append(InputFile(path, _kind(path) or "", size, path, path, len(files)))
            _refuse_misnamed_gzip(files[-1])
    if workers:
        total = sum(f.size for f in files)
        chunk_bytes = min(chunk_bytes, max(1 << 20, total // (4 * workers)))
    chunks: list[Chunk] = []
    for i, f in enumerate(files):
        if f.kind == "jsonl" and not f.compressed:
            for start in range(0, max(f.size, 1), chunk_bytes):
                end = min(start + chunk_bytes, f.size)
                chunks.append(Chunk(len(chunks), i, start, end, end - start))
        elif f.kind == "parquet":
            ranges = _row_group_ranges(f.path, chunk_bytes)
            for a, b in ranges:
                chunks.append(Chunk(len(chunks), i, a, b, f.size // len(ranges)))
        else:
            chunks.append(Chunk(len(chunks), i, 0, -1, f.size))
    if len(chunks) >= 2**31:
        raise UserError(f"{len(chunks):,} input chunks; raise --beam.chunk-bytes")
    return Plan(tuple(files), tuple(chunks))


def _refuse_misnamed_gzip(f: InputFile) -> None:
    """UserError for a local JSON-lines or one-document file (text, HTML, PDF) not named .gz that holds gzip data, or a
    JSON-lines file that holds one JSON array: read line by line, each of its lines would be
    dead-lettered (invalid UTF-8, invalid JSON) with no word of the cause."""
    if f.kind in ("jsonl", *FILE_KINDS) and not f.compressed and not _is_remote(f.path):
        err = gzip_misnamed(Path(f.path))
        if err:
            raise UserError(err)
    if f.kind == "jsonl" and not _is_remote(f.path):
        err = json_array_file(Path(f.path))
        if err:
            raise UserError(err)


def _size(path: str) -> int:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.match([path])[0].metadata_list[0].size_in_bytes


def _row_group_ranges(path: str, chunk_bytes: int) -> list[tuple[int, int]]:
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    try:
        with FileSystems.open(path, compression_type="uncompressed") as f:
            meta = pq.ParquetFile(f).metadata
    except UserError:
        raise
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise UserError(f"{path!r}: not a readable Parquet file ({e}); check the file is complete") from None
    ranges, start, size = [], 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= chunk_bytes:
            ranges.append((start, g + 1))
            start, size = g + 1, 0
    if start < meta.num_row_groups or not ranges:
        ranges.append((start, meta.num_row_groups))
    return ranges


# ---------------------------------------------------------------------------------------------
# Workers: records of one chunk.


def iter_lines(f, start: int, end: int) -> Iterator[bytes]:
    """Each line (without its newline) that starts at a byte offset in [start, end) of the
    open file `f`; end -1 reads to the end of the file. The last line may run past `end`."""
    if start > 0:
        f.seek(start - 1)
        skip = f.read(1) != b"\n"  # inside a line that the previous chunk owns
    else:
        skip = False
    pos = start  # file offset of the next byte read
    pending: list[bytes] = []  # the current line so far
    # a gzip stream gives what it has decompressed (read1): a truncated file then loses only
    # its last partial line before the EOFError, not a whole block of good lines
    read = f.read1 if isinstance(f, gzip.GzipFile) else f.read
    while True:
        want = min(_READ_BLOCK, end - pos) if 0 <= pos < end else _READ_BLOCK
        block = read(want)
        if not block:
            if pending and not skip:
                yield b"".join(pending)
            return
        base = pos
        pos += len(block)
        i = 0
        while True:
            q = block.find(b"\n", i)
            if q < 0:
                if i < len(block):
                    pending.append(block[i:])
                break
            if not skip:
                yield b"".join(pending) + block[i:q] if pending else block[i:q]
            pending, skip = [], False
            i = q + 1
            if end >= 0 and base + i >= end:
                return


def read_records(f: InputFile, chunk: Chunk, text_field: str, id_field: str, max_chars: int,
                 counts: dict) -> Iterator[tuple[int, str | Bad | None, str | None]]:
    """(position in the chunk, text or Bad or None for a blank line, id) of each record of a
    chunk; counts["units"] ends as the chunk's number of lines or rows."""
    if f.kind == "jsonl":
        yield from _jsonl(f, chunk, text_field, id_field, counts)
    elif f.kind in FILE_KINDS:
        yield from _txt(f, max_chars, counts)
    elif f.kind == "parquet":
        yield from _table(_parquet_batches(f, chunk, text_field, id_field), f, text_field, id_field, counts)
    else:
        yield from _table(_arrow_batches(f, text_field, id_field), f, text_field, id_field, counts)


@contextlib.contextmanager
def _open(f: InputFile):
    """The file as bytes. Gzip through Python's gzip module over the raw stream: Beam's own
    decompression stops quietly at a truncated member, which would lose records unseen;
    gzip raises EOFError, and the file is reported as unreadable."""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(f.path, compression_type="uncompressed") as raw:
        if f.compressed:
            with gzip.GzipFile(fileobj=raw, mode="rb") as g:
                yield g
        else:
            yield raw


def _jsonl(f: InputFile, chunk: Chunk, text_field: str, id_field: str, counts: dict):
    n = 0
    with _open(f) as fh:
        for n, raw in enumerate(iter_lines(fh, chunk.start, chunk.end), 1):
            if not raw.strip():
                yield n - 1, None, None
                continue
            if chunk.start == 0 and n == 1:  # the file's first line: a BOM there is dropped
                raw = without_bom(raw, 1)
            try:
                text, doc_id = parse_json_line(raw, text_field, id_field)
            except Bad as bad:
                yield n - 1, bad, None
                continue
            yield n - 1, text, doc_id
    counts["units"] = n


def _txt(f: InputFile, max_chars: int, counts: dict):
    counts["units"] = 0
    if max_chars and f.kind == "txt" and not f.compressed and f.size > 4 * max_chars:
        # more than max_chars characters for sure (UTF-8 has at most 4 bytes a character):
        # counted as too long without reading it
        yield 0, Bad("too_long", f"{f.size:,} bytes", ""), None
        return
    with _open(f) as fh:
        raw = fh.read()
    if f.kind in CONVERTERS:    # HTML, PDF; PdfUnreadable (an OSError) reports the file as unreadable
        yield 0, CONVERTERS[f.kind](raw), None
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start)
        yield line, Bad("invalid_utf8", f"not valid UTF-8 at byte {e.start} ({e.reason})",
                        excerpt(raw[raw.rfind(b'\n', 0, e.start) + 1:])), None
        return
    yield 0, text, None


def _parquet_batches(f: InputFile, chunk: Chunk, text_field: str, id_field: str):
    import pyarrow.parquet as pq

    with _open(f) as fh:
        pf = pq.ParquetFile(fh)
        names = pf.schema_arrow.names
        cols = [c for c in (text_field, id_field) if c in names] or names[:1]
        for batch in pf.iter_batches(row_groups=list(range(chunk.start, chunk.end)), columns=cols,
                                     batch_size=8192):
            yield names, batch


def _arrow_batches(f: InputFile, text_field: str, id_field: str):
    import pyarrow as pa

    with _open(f) as fh:
        try:
            reader = pa.ipc.open_stream(fh)  # what `datasets` save_to_disk writes
        except pa.ArrowInvalid:
            reader = None
        if reader is not None:
            for batch in reader:
                yield reader.schema.names, batch
            return
    with _open(f) as fh:  # not Arrow either: ArrowInvalid, reported as an unreadable file
        reader = pa.ipc.open_file(fh)
        for i in range(reader.num_record_batches):
            yield reader.schema.names, reader.get_batch(i)


def _table(batches, f: InputFile, text_field: str, id_field: str, counts: dict):
    row = 0
    for names, batch in batches:
        n = batch.num_rows
        if text_field not in names:
            msg = f"no {text_field!r} column (columns: {', '.join(names)})"
            for i in range(n):
                yield row + i, Bad("missing_field", msg, ""), None
            row += n
            continue
        texts = batch.column(text_field).to_pylist()
        ids = batch.column(id_field).to_pylist() if id_field in names else [None] * n
        for i, (text, doc_id) in enumerate(zip(texts, ids)):
            if isinstance(text, str):
                try:
                    key = id_str(doc_id, id_field)
                except Bad as bad:  # invalid_id
                    yield row + i, bad, None
                    continue
                yield row + i, text, key
            else:
                what = "null" if text is None else type(text).__name__
                yield row + i, Bad("not_a_string", f"column {text_field!r} is {what}, not a string",
                                   excerpt(repr(text))), None
        row += n
    counts["units"] = row

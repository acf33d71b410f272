"""The shards contract (ARCHITECTURE.md, "Contracts"): one place that says how a sample is stored.

A shards directory holds `train/` and `valid/` WebDataset tar shards and a manifest.json:

    shards/
      manifest.json
      train/shard-000000.tar, shard-000001.tar, ...
      valid/shard-000000.tar, ...
      dead_letter.jsonl            malformed input records: file, line, reason

Each sample is one document, two tar members sharing a key:
    {key}.npy    its token ids, a 1-D numpy array (uint16 when the vocab fits, else uint32)
    {key}.json   {"id": document id, "source": "file:line", "tokens": n}
The key is derived from the document id and its input file (readable prefix + hash), holds no
dots (WebDataset splits the member name at the first dot) and is unique in the directory.
Stock `webdataset.WebDataset(urls).decode()` yields {"__key__", "npy", "json"}.

manifest.json (stage "data shard") holds, besides the common fields (fingerprint, config, inputs,
versions):
    "tokenizer": {"kind", "sha256", "vocab_size", "eos_id", "bos_id", "pad_id", "unk_id", "path"}
                 (`TokenizerDir.entry()`: kind "sentencepiece" or "hf", sha256 the identity),
    "token_dtype": "uint16" | "uint32",
    "splits": {"train": {"documents", "tokens", "shards": [{"name": "train/shard-000000.tar",
                "sha256", "bytes", "documents", "tokens"}, ...]}, "valid": {...}},
    "dropped": {reason: count, ...}      every input record not in a shard, by reason
    "counts": {"records", "kept", ...}   records read = kept + sum(dropped)
The loader trusts "splits" for the shard list and token counts, "tokenizer" to refuse a model
of another tokenizer, and its eos_id as the separator it puts after each document (the shards
hold the documents' ids without bos/eos).

Reading. `open_shards_dir(path)` checks a shards dir against its manifest and lists each split's
shards; `open_shard` maps one shard (mmap) and walks the 512-byte tar headers, noting where each
`.npy` member's tokens start and how many there are; documents are then numpy views of the
mapped file, copied once into whatever block they go to. Python's `tarfile` (and webdataset over
it) builds a TarInfo per member and copies every payload, several times slower; it stays as the
fallback for tar features this walker does not read (GNU long names, pax headers) that other
tools may write. `read_shard` is the simple reader (keys and metas too) for tests and tools.

Tar members are written with fixed metadata (mtime 0, uid/gid 0, mode 0644, USTAR), so the
same samples give byte-identical shards on any machine.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import math
import mmap
import os
import re
import struct
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import read_manifest
from domainlm.tokenizer.tokdir import TokenizerId

SPLITS = ("train", "valid")
SHARD_PATTERN = "shard-{index:06d}.tar"
MAX_KEY_PREFIX = 60
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def no_valid_document(valid_fraction: float, documents: int) -> tuple[str, str]:
    """(cause, fix) for a shards dir built with valid_fraction > 0 whose valid split is empty: the
    split compares each text's hash with the fraction, so a corpus of fewer than about
    1/fraction documents often gets none. The fix reads after 'rerun' or 'rebuild it'."""
    suggest = min(0.5, math.ceil(max(3 / documents, 2 * valid_fraction) * 100) / 100)
    cause = (f"--valid-fraction {valid_fraction:g} gave none of the {documents:,} documents to validation "
             f"({valid_fraction * documents:.2g} expected: each text's hash decides), too few documents for "
             "that fraction")
    fix = (f"with --valid-fraction {suggest:g} or more ({suggest * documents:.2g} expected), or with more documents"
           if suggest > valid_fraction else "with more documents")
    return cause, fix


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def sample_key(doc_id: str, input_file: str) -> str:
    """A tar-safe, unique key: readable prefix of the id + 16 hex digits of (file, id)."""
    digest = hashlib.blake2b(f"{input_file}\0{doc_id}".encode(), digest_size=8).hexdigest()
    prefix = _UNSAFE.sub("_", doc_id).strip("_")[:MAX_KEY_PREFIX]
    return f"{prefix}-{digest}" if prefix else digest


def sample_keys(doc_ids: list[str], input_file: str) -> tuple[list[str], np.ndarray]:
    """`sample_key` of many ids of one input file, and each key's 16 hex digits as a uint64
    (the hash is streamed from a copy of the file's state: the same digest, less work)."""
    base = hashlib.blake2b(f"{input_file}\0".encode(), digest_size=8)
    sub, keys, digests = _UNSAFE.sub, [], []
    for doc_id in doc_ids:
        h = base.copy()
        h.update(doc_id.encode())
        digest = h.digest()
        digests.append(digest)
        prefix = sub("_", doc_id).strip("_")[:MAX_KEY_PREFIX]
        keys.append(f"{prefix}-{digest.hex()}" if prefix else digest.hex())
    return keys, np.frombuffer(b"".join(digests), dtype=">u8").astype(np.uint64)


def meta_bytes(meta: dict[str, Any]) -> bytes:
    """A sample's `.json` member."""
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


def npy_bytes(ids: np.ndarray) -> bytes:
    """The `.npy` file of a 1-D array, byte for byte what `np.save` writes (header from a
    template for 1-D arrays: `np.save` costs ~15 us, a real share of a short document's time)."""
    ids = np.ascontiguousarray(ids)
    header = _npy_header(ids.dtype, ids.shape[0]) if ids.ndim == 1 else None
    if header is None:
        buf = io.BytesIO()
        np.save(buf, ids, allow_pickle=False)
        return buf.getvalue()
    return header + ids.tobytes()


_NPY_ALIGN = 64
_NPY_GROWTH_DIGITS = 21  # numpy pads 1-D headers so the length can grow in place
_npy_templates: dict[np.dtype, tuple[str, bool]] = {}
_npy_cache: dict[tuple[str, int], bytes] = {}  # document lengths repeat


def _npy_header(dtype: np.dtype, n: int) -> bytes | None:
    """numpy's format-1.0 header for a C-ordered 1-D array, or None where the template does not
    hold (checked once per dtype against np.save, so a numpy that changes its header falls back)."""
    entry = _npy_templates.get(dtype)
    if entry is None:
        descr = np.lib.format.dtype_to_descr(dtype) if dtype.fields is None and not dtype.hasobject else None
        ok = isinstance(descr, str)
        if ok:
            _npy_templates[dtype] = (descr, True)
            for probe in (0, 7, 123_456):
                buf = io.BytesIO()
                np.save(buf, np.zeros(probe, dtype), allow_pickle=False)
                if buf.getvalue()[: -probe * dtype.itemsize or None] != _npy_header(dtype, probe):
                    ok = False
                    break
        entry = _npy_templates[dtype] = (descr or "", ok)
    descr, ok = entry
    if not ok:
        return None
    cached = _npy_cache.get((descr, n))
    if cached is not None:
        return cached
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': ({n},), }}"
    text += " " * (_NPY_GROWTH_DIGITS - len(repr(n)))
    hlen = len(text) + 1
    pad = _NPY_ALIGN - ((8 + 2 + hlen) % _NPY_ALIGN)
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", hlen + pad) + text.encode("latin1") + b" " * pad + b"\n"
    if len(_npy_cache) < 1 << 16:
        _npy_cache[(descr, n)] = header
    return header


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A tar member with the fixed metadata every shard uses (the reference for ShardWriter)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def _reference_header(name: str, size: int) -> bytes:
    info, _ = _member(name, b"")
    info.size = size
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def _tar_header(name: str, size: int) -> bytes:
    """The 512-byte USTAR header `tarfile` writes for `_member(name, ...)`, from a template.

    tarfile builds a TarInfo, formats a dozen fields and copies it per member (~50 us); only
    the name, the size and the checksum change between our members, so they are patched in.
    Names over 100 bytes (never a sample_key) take tarfile's own path.
    """
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or not _TEMPLATE_OK:
        return _reference_header(name, size)
    size_field = b"%011o\0" % size
    chksum = _TEMPLATE_SUM + sum(raw) + sum(size_field)
    return b"".join((raw.ljust(100, b"\0"), _T_MODE_IDS, size_field, _T_MTIME, b"%06o\0 " % chksum, _T_REST))


def _make_template() -> tuple[bytes, int]:
    info, _ = _member("", b"")
    buf = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    # checksum of the fixed fields: the name (empty) and size fields are added per member and
    # the checksum field counts as eight spaces (POSIX)
    fixed = buf[100:124] + buf[136:148] + b" " * 8 + buf[156:]
    return buf, sum(fixed)


_TEMPLATE, _TEMPLATE_SUM = _make_template()
_T_MODE_IDS, _T_MTIME, _T_REST = _TEMPLATE[100:124], _TEMPLATE[136:148], _TEMPLATE[156:]
_TEMPLATE_OK = True
# A Python whose tarfile formats headers differently falls back to tarfile's own path.
_TEMPLATE_OK = all(_tar_header(n, s) == _reference_header(n, s)
                   for n, s in (("a-0123456789abcdef.npy", 0), ("x" * 100, 123_456_789)))


_ZEROS = bytes(tarfile.BLOCKSIZE)
_FLUSH_BYTES = 1 << 20
_TEMPLATE_ROW = np.frombuffer(_TEMPLATE, dtype=np.uint8)


def _octal(values: np.ndarray, digits: int) -> np.ndarray:
    """(n, digits) ASCII octal digits, zero-padded: b"%0{digits}o" % v, row by row."""
    shifts = 3 * np.arange(digits - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] >> shifts) & 7).astype(np.uint8) + np.uint8(48)


def _layout(keys: list[str], ids: np.ndarray, lengths: np.ndarray, metas: list[bytes],
            npy_head: int) -> np.ndarray:
    """The bytes `write_encoded` writes for these samples, one after another, as one uint8
    array (`write_samples` checked that every member fits the template). Every member starts
    on a 512-byte block, so the buffer is handled as rows of 512: headers are whole rows, data
    starts a row."""
    n = len(keys)
    B = tarfile.BLOCKSIZE
    item = ids.dtype.itemsize
    npy_size = npy_head + lengths * item
    json_len = np.fromiter(map(len, metas), dtype=np.int64, count=n)
    npy_blocks = -(-npy_size // B)
    json_blocks = -(-json_len // B)
    per_sample = 2 + npy_blocks + json_blocks
    first = np.zeros(n, dtype=np.int64)  # row of each sample's .npy header
    np.cumsum(per_sample[:-1], out=first[1:])
    out = np.zeros((int(per_sample.sum()), B), dtype=np.uint8)
    flat = out.reshape(-1)

    # headers, rows 2i (.npy) and 2i + 1 (.json) of `head`: name, size, checksum into the template
    klen = np.fromiter(map(len, keys), dtype=np.int64, count=n)
    key_chars = np.frombuffer(b"".join(k.encode("ascii").ljust(100, b"\0") for k in keys),
                              dtype=np.uint8).reshape(n, 100)
    head = np.empty((2 * n, B), dtype=np.uint8)
    head[:] = _TEMPLATE_ROW
    names = head[:, :100]
    names[0::2] = key_chars
    names[1::2] = key_chars
    rows_n = np.arange(n)
    for j, c in enumerate(b".npy"):
        names[2 * rows_n, klen + j] = c
    for j, c in enumerate(b".json"):
        names[2 * rows_n + 1, klen + j] = c
    key_sum = key_chars.sum(axis=1, dtype=np.int64)
    name_sum = np.empty(2 * n, dtype=np.int64)
    name_sum[0::2], name_sum[1::2] = key_sum + sum(b".npy"), key_sum + sum(b".json")
    sizes = np.empty(2 * n, dtype=np.int64)
    sizes[0::2], sizes[1::2] = npy_size, json_len
    size_field = _octal(sizes, 11)
    head[:, 124:135] = size_field
    head[:, 135] = 0
    chksum = _TEMPLATE_SUM + name_sum + size_field.sum(axis=1, dtype=np.int64)
    head[:, 148:154] = _octal(chksum, 6)
    head[:, 154], head[:, 155] = 0, ord(" ")
    rows = np.empty(2 * n, dtype=np.int64)
    rows[0::2], rows[1::2] = first, first + 1 + npy_blocks
    out[rows] = head

    # .npy members: numpy's header (one per distinct length), then the ids; .json members
    uniq, inv = np.unique(lengths, return_inverse=True)
    table = np.frombuffer(b"".join(_npy_header(ids.dtype, int(u)) for u in uniq), dtype=np.uint8)
    out[first + 1, :npy_head] = table.reshape(len(uniq), npy_head)[inv]
    starts = np.cumsum(lengths) - lengths
    dest = np.repeat(((first + 1) * B + npy_head) // item - starts, lengths)
    dest += np.arange(len(ids), dtype=np.int64)
    flat.view(ids.dtype)[dest] = ids
    data = np.frombuffer(b"".join(metas), dtype=np.uint8)
    dest = np.repeat((first + 2 + npy_blocks) * B - (np.cumsum(json_len) - json_len), json_len)
    dest += np.arange(len(data), dtype=np.int64)
    flat[dest] = data
    return flat


class ShardWriter:
    """Write samples into one tar, deterministically. Use as a context manager.

    The bytes are exactly those of `tarfile.open(fileobj, "w", format=USTAR)` with `_member`'s
    metadata (tests compare the two); headers come from a template because tarfile's per-member
    cost exceeds the cost of tokenizing a short document.
    """

    def __init__(self, fileobj: BinaryIO):
        self.fileobj = fileobj
        try:
            self.offset = fileobj.tell()  # tarfile pads the archive from where the file stood
        except (AttributeError, OSError, ValueError):
            self.offset = 0
        self.samples = 0
        self.tokens = 0
        self.closed = False
        self._parts: list[bytes] = []  # written in blocks of ~1 MB, not three writes a member
        self._pending = 0

    def write(self, key: str, ids: np.ndarray, meta: dict[str, Any]) -> None:
        self.write_encoded(key, ids, meta_bytes(meta))

    def write_encoded(self, key: str, ids: np.ndarray, meta_json: bytes) -> None:
        """`write` with the .json member already made by `meta_bytes` (where that work can be
        done elsewhere, e.g. in parallel before the samples reach the writer)."""
        self.add(f"{key}.npy", npy_bytes(ids))
        self.add(f"{key}.json", meta_json)
        self.samples += 1
        self.tokens += int(ids.shape[0])

    def write_samples(self, keys: list[str], ids: np.ndarray, lengths: np.ndarray, metas: list[bytes]) -> None:
        """`write_encoded` for many samples at once, the same bytes: sample i is key `keys[i]`,
        token ids `ids[sum(lengths[:i]):][:lengths[i]]` and .json member `metas[i]`.

        The whole run of members is laid out in one zeroed buffer with numpy (headers from
        the template with names, sizes and checksums filled in column-wise, ids and .json
        bytes scattered to their offsets), since per member Python costs more than tokenizing
        a short document. Keys that the template cannot hold take `write_encoded`.
        """
        ids = np.ascontiguousarray(ids)
        lengths = np.asarray(lengths, dtype=np.int64)
        head = _npy_header(ids.dtype, 0) if ids.ndim == 1 else None
        limit = 8**11  # USTAR's 11 octal digits of size
        fast = (_TEMPLATE_OK and head is not None and len(head) <= tarfile.BLOCKSIZE
                and len(head) % ids.dtype.itemsize == 0 and len(head) + ids.nbytes < limit
                and "".join(keys).isascii() and max(map(len, keys), default=0) <= 95  # name.json in 100 bytes
                and max(map(len, metas), default=0) < limit)
        if not fast:
            starts = np.concatenate(([0], np.cumsum(lengths)))
            for i, key in enumerate(keys):
                self.write_encoded(key, ids[starts[i]:starts[i + 1]], metas[i])
            return
        step = 2048  # samples per buffer: its index arrays stay in cache
        a = t = 0
        while a < len(keys):
            b = min(a + step, len(keys))
            n_tok = int(lengths[a:b].sum())
            self._flush()
            buf = _layout(keys[a:b], ids[t:t + n_tok], lengths[a:b], metas[a:b], len(head))
            self.fileobj.write(buf.data)
            self.offset += len(buf)
            self.samples += b - a
            self.tokens += n_tok
            a, t = b, t + n_tok

    def add(self, name: str, data: bytes) -> None:
        """One member (a raw file in the tar); `write` adds a sample's two."""
        pad = -len(data) % tarfile.BLOCKSIZE
        self._parts += (_tar_header(name, len(data)), data, _ZEROS[:pad])
        size = tarfile.BLOCKSIZE + len(data) + pad
        self.offset += size
        self._pending += size
        if self._pending >= _FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._parts:
            self.fileobj.write(b"".join(self._parts))
            self._parts, self._pending = [], 0

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # what TarFile.close writes: two zero blocks, then zeros up to a full record
        end = 2 * tarfile.BLOCKSIZE
        self.offset += end
        rest = self.offset % tarfile.RECORDSIZE
        self._parts.append(bytes(end + (tarfile.RECORDSIZE - rest if rest else 0)))
        self._flush()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_shard(path: str) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """(key, ids, meta) of each sample of one shard, in order, without webdataset's machinery
    (the loader's fast path; tests check it agrees with stock webdataset)."""
    with tarfile.open(path, mode="r:") as tar:
        pending: dict[str, dict[str, bytes]] = {}
        for info in tar:
            if not info.isfile():
                continue
            key, _, ext = info.name.partition(".")
            data = tar.extractfile(info).read()  # type: ignore[union-attr]
            slot = pending.setdefault(key, {})
            slot[ext] = data
            if "npy" in slot and "json" in slot:
                del pending[key]
                yield key, np.load(io.BytesIO(slot["npy"]), allow_pickle=False), json.loads(slot["json"])


# -- reading -----------------------------------------------------------------------------------

_ZERO_BLOCK = bytes(512)
_NPY_FAST = re.compile(rb"\{'descr': '([<>|=][a-z]\d+)', 'fortran_order': (?:False|True), 'shape': \((\d+),\), \}\s*$")
OPEN_SHARDS = 8
"""Shard indexes kept per process (an index is 16 bytes per document plus the mapping)."""


@dataclass(frozen=True, slots=True)
class ShardEntry:
    """One shard as the manifest lists it."""

    path: str
    name: str
    bytes: int
    documents: int
    tokens: int
    sha256: str


@dataclass(slots=True)
class ShardIndex:
    """Where each document's token ids lie in `buf` (the mapped file, or the fallback's copy)."""

    buf: object
    offsets: np.ndarray  # int64 byte offset of each document's first token
    counts: np.ndarray  # int64 tokens per document
    dtype: np.dtype

    def doc(self, i: int) -> np.ndarray:
        return np.frombuffer(self.buf, self.dtype, int(self.counts[i]), int(self.offsets[i]))


class _NeedsTarfile(Exception):
    """A tar feature the header walker leaves to `tarfile` (long names, pax headers)."""


def _parse_octal(field_: bytes, path: str, pos: int) -> int:
    if field_[0] & 0x80:  # GNU base-256, for members of 8 GiB or more
        return int.from_bytes(field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise UserError(f"shard {path!r}: corrupt tar header at byte {pos}; rebuild the shards dir") from None


def _member_ext(name: bytes) -> bytes:
    """What webdataset calls the member's extension: the basename after its first dot."""
    base = name.rsplit(b"/", 1)[-1]
    return base.partition(b".")[2]


def _parse_npy_header(buf, start: int, size: int, path: str, name: str) -> tuple[int, int, np.dtype]:
    """(data offset, count, dtype) of a 1-D .npy payload at buf[start:start+size]."""
    if size < 10 or buf[start:start + 6] != b"\x93NUMPY":
        raise UserError(f"shard {path!r}: member {name!r} is not a .npy array; rebuild the shards dir")
    major = buf[start + 6]
    if major == 1:
        (hlen,) = struct.unpack_from("<H", buf, start + 8)
        hstart = start + 10
    else:
        (hlen,) = struct.unpack_from("<I", buf, start + 8)
        hstart = start + 12
    header = bytes(buf[hstart:hstart + hlen])
    m = _NPY_FAST.match(header)
    if m:
        dtype, count = np.dtype(m.group(1).decode()), int(m.group(2))
    else:
        try:
            meta = ast.literal_eval(header.decode("latin1"))
            dtype, shape = np.dtype(meta["descr"]), tuple(meta["shape"])
        except (ValueError, SyntaxError, KeyError, TypeError):
            raise UserError(f"shard {path!r}: member {name!r} has an unreadable .npy header; rebuild the shards dir") from None
        if len(shape) != 1:
            raise UserError(f"shard {path!r}: member {name!r} has shape {shape}; a document is a 1-D array of token ids")
        count = shape[0]
    data = hstart + hlen
    if data + count * dtype.itemsize != start + size:
        raise UserError(f"shard {path!r}: member {name!r} is truncated or padded; rebuild the shards dir")
    return data, count, dtype


def _walk(buf, path: str) -> tuple[list[int], list[int], list[np.dtype]]:
    offsets, counts, dtypes = [], [], []
    pos, end = 0, len(buf)
    while pos + 512 <= end:
        hdr = buf[pos:pos + 512]
        if hdr == _ZERO_BLOCK:
            break
        size = _parse_octal(hdr[124:136], path, pos)
        kind = hdr[156:157]
        data = pos + 512
        if kind in (b"L", b"K", b"x", b"g"):
            raise _NeedsTarfile
        if data + size > end:
            raise UserError(f"shard {path!r} is truncated (a member runs past the end of the file); rebuild it")
        if kind in (b"0", b"\0", b"7"):
            name = hdr[:100].split(b"\0", 1)[0]
            if hdr[257:262] == b"ustar" and hdr[345] != 0:
                name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
            if _member_ext(name) == b"npy":
                off, count, dtype = _parse_npy_header(buf, data, size, path, name.decode("utf-8", "replace"))
                offsets.append(off)
                counts.append(count)
                dtypes.append(dtype)
        pos = data + ((size + 511) & ~511)
    return offsets, counts, dtypes


def _walk_tarfile(path: str) -> tuple[bytes, list[int], list[int], list[np.dtype]]:
    """The slow path: read the members with `tarfile`, copying the .npy payloads into one buffer."""
    out = io.BytesIO()
    offsets, counts, dtypes = [], [], []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile() or _member_ext(info.name.encode()) != b"npy":
                    continue
                payload = tar.extractfile(info).read()  # type: ignore[union-attr]
                base = out.tell()
                out.write(payload)
                off, count, dtype = _parse_npy_header(payload, 0, len(payload), path, info.name)
                offsets.append(base + off)
                counts.append(count)
                dtypes.append(dtype)
    except tarfile.TarError as e:
        raise UserError(f"shard {path!r} is not a readable tar ({e}); rebuild the shards dir") from None
    return out.getvalue(), offsets, counts, dtypes


def index_shard(entry: ShardEntry, dtype: np.dtype, *, verify: bool = False) -> ShardIndex:
    """Map one shard and find its documents, checking them against the manifest's entry."""
    path = entry.path
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            buf: object = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as e:
        raise UserError(f"shard {path!r} cannot be read ({e.strerror}); rebuild the shards dir") from None
    if verify and path not in _verified:
        digest = hashlib.sha256(buf).hexdigest()  # type: ignore[arg-type]
        if digest != entry.sha256:
            raise UserError(f"shard {path!r}: sha256 {digest[:12]}... differs from the manifest's "
                            f"{entry.sha256[:12]}...; the file changed after sharding, rebuild the shards dir")
        _verified.add(path)
    try:
        offsets, counts, dtypes = _walk(buf, path)
    except _NeedsTarfile:
        buf, offsets, counts, dtypes = _walk_tarfile(path)
    for i, dt in enumerate(dtypes):
        if dt != dtype:
            raise UserError(f"shard {path!r}: document {i} holds {dt} token ids but the manifest says "
                            f"{dtype}; the shards dir is inconsistent, rebuild it")
    if len(counts) != entry.documents or sum(counts) != entry.tokens:
        raise UserError(
            f"shard {path!r} holds {len(counts)} documents and {sum(counts)} tokens but the manifest "
            f"lists {entry.documents} and {entry.tokens}; the shards dir was modified, rebuild it"
        )
    return ShardIndex(buf, np.asarray(offsets, np.int64), np.asarray(counts, np.int64), dtype)


_open: OrderedDict[str, ShardIndex] = OrderedDict()
_verified: set[str] = set()


def open_shard(entry: ShardEntry, dtype: np.dtype, *, verify: bool = False) -> ShardIndex:
    """`index_shard`, cached for the last OPEN_SHARDS shards of this process."""
    idx = _open.get(entry.path)
    if idx is None:
        idx = index_shard(entry, dtype, verify=verify)
        _open[entry.path] = idx
        while len(_open) > OPEN_SHARDS:
            _open.popitem(last=False)
    else:
        _open.move_to_end(entry.path)
    return idx




# -- the directory -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Split:
    """One split of a checked shards dir: what the loader reads."""

    path: str
    """The shards dir."""
    name: str
    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    dtype: str
    """Token dtype of every .npy member: 'uint16' or 'uint32'."""
    tokens: int
    documents: int
    split_id: str
    """Identity of the split's contents (shard names and checksums), not of where the dir lives."""
    shards: tuple[ShardEntry, ...]


@dataclass(slots=True)
class ShardsDir:
    """A shards dir as `domainlm data shard` wrote it, its manifest checked."""

    path: str
    manifest: dict[str, Any]
    tokenizer_sha256: str
    vocab_size: int
    eos_id: int
    dtype: str

    @property
    def tokenizer_id(self) -> TokenizerId:
        return TokenizerId(self.tokenizer_sha256, self.vocab_size)

    def split(self, name: str) -> Split:
        """The split's shards, each checked to exist with the manifest's size."""
        info = self.manifest["splits"].get(name)
        if not info or not info.get("shards") or not int(info.get("tokens", 0)):
            if name == "valid":
                raise UserError(f"shards dir {self.path!r} has no 'valid' tokens: {self._why_no_valid()}; "
                                "or, in pretraining, turn validation off (--eval.every 0)")
            raise UserError(f"shards dir {self.path!r} has no {name!r} tokens; rebuild it or leave it out")
        root = Path(self.path)
        entries = []
        for s in info["shards"]:
            f = root / s["name"]
            if not f.is_file():
                raise UserError(f"shard {str(f)!r} listed in {self.path}/manifest.json is missing; copy the whole "
                                "shards dir or rebuild it")
            if f.stat().st_size != int(s["bytes"]):
                raise UserError(f"shard {str(f)!r} has {f.stat().st_size} bytes, the manifest says {s['bytes']}; "
                                "it is truncated or was replaced, rebuild the shards dir")
            entries.append(ShardEntry(str(f), s["name"], int(s["bytes"]), int(s["documents"]),
                                      int(s["tokens"]), str(s.get("sha256", ""))))
        listing = [[s.get("name"), s.get("sha256"), s.get("documents"), s.get("tokens")] for s in info["shards"]]
        return Split(path=self.path, name=name, tokenizer_sha256=self.tokenizer_sha256, vocab_size=self.vocab_size,
                     eos_id=self.eos_id, dtype=self.dtype, tokens=int(info["tokens"]),
                     documents=int(info["documents"]),
                     split_id=hashlib.sha256(json.dumps(listing).encode()).hexdigest(), shards=tuple(entries))

    def _why_no_valid(self) -> str:
        fraction = (self.manifest.get("config") or {}).get("valid_fraction")
        docs = sum(int((self.manifest["splits"].get(s) or {}).get("documents", 0)) for s in SPLITS)
        if fraction == 0:
            return "it was built with --valid-fraction 0; rebuild it with --valid-fraction above 0 (e.g. 0.01)"
        if isinstance(fraction, (int, float)) and docs:
            cause, fix = no_valid_document(fraction, docs)
            return f"{cause}; rebuild it {fix}"
        return ("it was built with --valid-fraction 0, or its corpus is too small for its fraction to pick a "
                "validation document; rebuild it with a larger --valid-fraction (about 3/N for N documents) "
                "or more documents")

    def documents(self, split: str) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
        """(key, token ids, meta) of every document of `split`, shard by shard."""
        for entry in self.split(split).shards:
            yield from read_shard(entry.path)


def open_shards_dir(path: str | Path) -> ShardsDir:
    """Check `path` is a complete `domainlm data shard` output; UserError naming what is wrong."""
    path = str(path)
    m = read_manifest(path, stages.DATA_SHARD, what="a shards directory (from `domainlm data shard`)")
    tok = m.get("tokenizer") or {}
    missing = [k for k in ("sha256", "vocab_size", "eos_id") if k not in tok]
    if missing or "splits" not in m or "token_dtype" not in m:
        raise UserError(f"{path}/manifest.json lacks {', '.join(missing or ['splits/token_dtype'])}; "
                        "it is not a complete `domainlm data shard` output, rebuild it")
    dtype = str(m["token_dtype"])
    if dtype not in ("uint16", "uint32"):
        raise UserError(f"{path}/manifest.json: token_dtype {dtype!r} is not uint16 or uint32; rebuild it")
    return ShardsDir(path=path, manifest=m, tokenizer_sha256=str(tok["sha256"]), vocab_size=int(tok["vocab_size"]),
                     eos_id=int(tok["eos_id"]), dtype=dtype)


# -- sizes -----------------------------------------------------------------------------------------

TAR_BLOCK = tarfile.BLOCKSIZE
NPY_HEADER = 128
"""Bytes of numpy's 1-D .npy header (format 1.0, padded to 64-byte alignment)."""


def _padded(n: np.ndarray) -> np.ndarray:
    return (n + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK


def tar_bytes(tokens: np.ndarray, json_len: np.ndarray, itemsize: int) -> np.ndarray:
    """Bytes a sample takes in a shard: two headers, the .npy and .json members padded."""
    return 2 * TAR_BLOCK + _padded(NPY_HEADER + tokens * itemsize) + _padded(json_len)

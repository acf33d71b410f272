"""The shards contract (DESIGN.md, "Shards dir"): one place that says how a sample is stored.

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
    "tokenizer": {"sha256", "vocab_size", "eos_id", "bos_id", "pad_id", "path"},
    "token_dtype": "uint16" | "uint32",
    "splits": {"train": {"documents", "tokens", "shards": [{"name": "train/shard-000000.tar",
                "sha256", "bytes", "documents", "tokens"}, ...]}, "valid": {...}},
    "dropped": {reason: count, ...}      every input record not in a shard, by reason
    "counts": {"records", "kept", ...}   records read = kept + sum(dropped)
The loader trusts "splits" for the shard list and token counts, and "tokenizer" to refuse a
model whose vocab differs.

Tar members are written with fixed metadata (mtime 0, uid/gid 0, mode 0644, USTAR), so the
same samples give byte-identical shards on any machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from typing import Any, BinaryIO, Iterator

import numpy as np

SPLITS = ("train", "valid")
SHARD_PATTERN = "shard-{index:06d}.tar"
MAX_KEY_PREFIX = 60
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def sample_key(doc_id: str, input_file: str) -> str:
    """A tar-safe, unique key: readable prefix of the id + 16 hex digits of (file, id)."""
    digest = hashlib.blake2b(f"{input_file}\0{doc_id}".encode(), digest_size=8).hexdigest()
    prefix = _UNSAFE.sub("_", doc_id).strip("_")[:MAX_KEY_PREFIX]
    return f"{prefix}-{digest}" if prefix else digest


def npy_bytes(ids: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(ids), allow_pickle=False)
    return buf.getvalue()


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


class ShardWriter:
    """Write samples into one tar, deterministically. Use as a context manager."""

    def __init__(self, fileobj: BinaryIO):
        self.tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0
        self.tokens = 0

    def write(self, key: str, ids: np.ndarray, meta: dict[str, Any]) -> None:
        meta_bytes = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        self.tar.addfile(*_member(f"{key}.npy", npy_bytes(ids)))
        self.tar.addfile(*_member(f"{key}.json", meta_bytes))
        self.samples += 1
        self.tokens += int(ids.shape[0])

    def close(self) -> None:
        self.tar.close()

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

"""The index dir contract (ARCHITECTURE.md, "Contracts"): what `domainlm index build` writes and
`index query`, `serve` and the evaluation stage read.

    INDEX_DIR/
      manifest.json   stage 'index build'; config; inputs (corpus files with sha256); embedder
                      {name, path, sha256, dim, window}; counts {documents, chunks, tokens,
                      empty_documents, duplicate_ids}; index {dense, metric, bm25, ...}
      chunks.jsonl    one chunk per line, in vector order: {"id", "doc_id", "source", "text", "tokens",
                      "context"} (context: the heading path; absent from indexes before it)
      vectors.faiss   faiss index of unit-length vectors (inner product = cosine): IndexFlatIP, or
                      IndexHNSWFlat above `dense.hnsw_above` chunks; absent from a BM25-only index
                      (index.dense "none")
      bm25/           bm25s index (params, CSC arrays, vocab) and its tokenizer's vocab and stopwords

`open_index_dir(path)` checks the directory; `IndexDir.embedder(requested)` returns the embedder
to embed queries with, refusing one other than the index was built with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import orjson

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import read_manifest
from domainlm.serve.chunking import Chunk
from domainlm.serve.embedder import PACKAGED, EmbedderRef, resolve_embedder

STAGE = stages.INDEX_BUILD
CHUNKS = "chunks.jsonl"
VECTORS = "vectors.faiss"
BM25 = "bm25"
FILES = (CHUNKS, VECTORS, BM25)


@dataclass(slots=True)
class IndexDir:
    path: Path
    manifest: dict[str, Any]

    @property
    def embedder_info(self) -> dict[str, Any]:
        return self.manifest.get("embedder", {})

    @property
    def counts(self) -> dict[str, int]:
        return self.manifest.get("counts", {})

    @property
    def dense_type(self) -> str:
        """'flat-ip', 'hnsw', or 'none' for a BM25-only index (built with --dense.enabled false)."""
        return str(self.manifest.get("index", {}).get("dense", "flat-ip"))

    @property
    def has_vectors(self) -> bool:
        return self.dense_type != "none"

    def embedder(self, requested: str | None = None) -> EmbedderRef:
        """The embedder for this index's queries: `requested` if given (refused unless it is the
        one the index was built with), else the recorded one."""
        want = self.embedder_info
        if requested:
            ref = resolve_embedder(requested)
        else:
            path = Path(want.get("path", ""))
            if want.get("name") in PACKAGED:
                ref = resolve_embedder(want["name"])       # the package may live elsewhere on this machine
            elif path.is_dir():
                ref = resolve_embedder(str(path))
            else:
                raise UserError(f"index {str(self.path)!r} was built with embedder {want.get('name')!r} at "
                                f"{str(path)!r}, which is not there; give --embedder DIR with that model")
        if ref.sha256 != want.get("sha256"):
            raise UserError(
                f"index {str(self.path)!r} was built with embedder {want.get('name')!r} (sha256 "
                f"{str(want.get('sha256'))[:12]}...), not {ref.name!r} (sha256 {ref.sha256[:12]}...): its vectors "
                "would not match; rebuild the index with this embedder (domainlm index build --embedder ...) "
                "or use the one it was built with")
        return ref

    @property
    def chunking(self) -> str:
        """'structure' or 'window' (indexes from before structure chunking: 'window')."""
        return str(self.manifest.get("chunking", {}).get("method", "window"))

    @property
    def header(self) -> bool:
        """Whether chunks were indexed with their header line (document id and heading path)."""
        return bool(self.manifest.get("chunking", {}).get("header", False))

    def check_chunking(self, requested: str | None) -> None:
        """Refuse this index when `requested` names another chunking than it was built with."""
        if requested and requested != self.chunking:
            raise UserError(f"index {str(self.path)!r} was built with {self.chunking} chunking, not {requested}: "
                            f"rebuild it (domainlm index build --chunking {requested}) or ask for "
                            f"--retrieval.chunking {self.chunking}")

    def iter_chunks(self) -> Iterator[Chunk]:
        with open(self.path / CHUNKS, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    r = orjson.loads(raw)
                    yield Chunk(id=r["id"], doc_id=r["doc_id"], source=r["source"], text=r["text"],
                                tokens=int(r["tokens"]), context=r.get("context") or "")
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                    raise UserError(f"{self.path / CHUNKS}:{line_no}: not a chunk record; the index is damaged, "
                                    "rebuild it") from None

    def chunks(self) -> list[Chunk]:
        out = list(self.iter_chunks())
        if len(out) != self.counts.get("chunks"):
            raise UserError(f"{self.path / CHUNKS} holds {len(out)} chunks but the manifest says "
                            f"{self.counts.get('chunks')}; the index is damaged, rebuild it")
        return out


def write_chunks(path: Path, chunks: list[Chunk]) -> None:
    with open(path, "wb") as f:
        for c in chunks:
            f.write(orjson.dumps({"id": c.id, "doc_id": c.doc_id, "source": c.source, "text": c.text,
                                  "tokens": c.tokens, "context": c.context}) + b"\n")


def open_index_dir(path: str | Path) -> IndexDir:
    """Check `path` is an index built by `domainlm index build`; UserError naming what is wrong."""
    p = Path(path)
    manifest = read_manifest(p, STAGE, what="an index directory (from `domainlm index build`)")
    bm25_only = manifest.get("index", {}).get("dense") == "none"
    missing = [f for f in FILES if not (p / f).exists() and not (bm25_only and f == VECTORS)]
    if missing:
        raise UserError(f"index {str(p)!r} lacks {', '.join(missing)}; rebuild it with `domainlm index build`")
    if not manifest.get("embedder", {}).get("sha256"):
        raise UserError(f"{p / 'manifest.json'} names no embedder sha256; rebuild the index")
    return IndexDir(path=p, manifest=manifest)

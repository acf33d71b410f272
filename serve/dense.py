"""Dense vectors: resumable block embedding and the faiss index.

Embedding is nearly all of an index build's time on CPU (all-MiniLM-L6-v2 embeds ~30-60
chunks/s on 2 cores), so vectors are embedded in blocks, each saved to a hidden `.NAME.partial`
directory beside the output as soon as it is done; a later build of the same chunks with the
same embedder (checked by a key over both) picks up the saved blocks and embeds only the rest.

Vectors are unit length, so the inner product is the cosine. Up to `hnsw_above` chunks they go
into `IndexFlatIP` (exact), above into `IndexHNSWFlat` (approximate, logarithmic search).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from domainlm.errors import UserError
from domainlm.manifest import write_json


def embed_resumable(encode: Callable[[list[str]], np.ndarray], texts: list[str], partial: Path, key: str,
                    block: int, on_block: Callable[[int], None] | None = None) -> tuple[np.ndarray, int]:
    """Vectors of `texts` (float32 [n, dim]); returns them and the number of chunks whose
    vectors were reused from an interrupted earlier build."""
    import orjson

    state = partial / "state.json"
    if partial.is_dir():
        try:
            same = orjson.loads(state.read_bytes()).get("key") == key
        except (OSError, orjson.JSONDecodeError):
            same = False
        if not same:
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    write_json(state, {"key": key, "block": block, "chunks": len(texts)})
    parts, reused = [], 0
    for b, start in enumerate(range(0, len(texts), block)):
        f = partial / f"block-{b:06d}.npy"
        want = min(block, len(texts) - start)
        vecs = None
        if f.is_file():
            try:
                vecs = np.load(f, allow_pickle=False)
            except (OSError, ValueError):
                vecs = None
            if vecs is not None and vecs.shape[0] != want:
                vecs = None
            if vecs is not None:
                reused += want
        if vecs is None:
            vecs = encode(texts[start:start + want])
            tmp = f.with_suffix(".tmp.npy")
            np.save(tmp, vecs, allow_pickle=False)
            tmp.rename(f)                       # a block is either whole or absent
        parts.append(vecs)
        if on_block:
            on_block(want)
    if not parts:
        return np.zeros((0, 0), np.float32), 0
    return np.concatenate(parts).astype(np.float32, copy=False), reused


def build_faiss(vecs: np.ndarray, hnsw_above: int, m: int, ef_construction: int) -> tuple[object, dict]:
    """The faiss index of `vecs` and what the manifest records about it."""
    # faiss loads its SIMD library (a second): only where an index is built or loaded.
    import faiss

    dim = int(vecs.shape[1])
    if len(vecs) > hnsw_above:
        index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = ef_construction
        info = {"dense": "hnsw", "hnsw_m": m, "hnsw_ef_construction": ef_construction}
    else:
        index = faiss.IndexFlatIP(dim)
        info = {"dense": "flat-ip"}
    index.add(vecs)
    return index, {**info, "metric": "cosine (inner product of unit vectors)", "dim": dim,
                   "faiss": faiss.__version__}


def save_faiss(index, path: Path) -> None:
    import faiss

    faiss.write_index(index, str(path))


class DenseIndex:
    """A saved faiss index, memory-mapped."""

    def __init__(self, path: Path, ef_search: int = 128):
        import faiss

        try:
            self.index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as e:  # faiss raises RuntimeError for a file it cannot read
            why = next((line.split(": ", 1)[-1] for line in str(e).splitlines() if line.strip()), "")
            raise UserError(f"{path}: not a faiss index ({why}); the index is damaged, rebuild it") from None
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = ef_search
        self.dim = self.index.d
        self.threads = faiss.omp_get_max_threads()

    def search(self, qvecs: np.ndarray, k: int, min_score: float) -> list[list[tuple[int, float]]]:
        """Per query, (chunk number, cosine) of the best `k` chunks at or above `min_score`."""
        k = min(k, self.index.ntotal)
        if k <= 0:
            return [[] for _ in range(len(qvecs))]
        import faiss

        # One query is too small to split: its OpenMP team would wait on each other (measured 34 ms
        # with 2 threads against 16 ms with 1 for exact search over 100k vectors on 2 cores).
        faiss.omp_set_num_threads(1 if len(qvecs) < 8 else self.threads)
        scores, ids = self.index.search(np.ascontiguousarray(qvecs, dtype=np.float32), k)
        return [[(int(i), float(s)) for i, s in zip(i_row, s_row) if i >= 0 and s >= min_score]
                for i_row, s_row in zip(ids, scores)]

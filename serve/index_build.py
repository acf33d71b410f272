"""`domainlm index build`: corpus -> chunks -> BM25 (bm25s) + dense vectors (faiss) -> index dir.

Read (domainlm.corpus, the reader every stage uses) -> chunk by embedder tokens (chunking) ->
embed in resumable blocks (dense) -> faiss + bm25s indexes -> manifest -> commit (StageOutput:
nothing is left half-written; the embedded blocks of an interrupted build are kept beside it).
"""

from __future__ import annotations

import time

from domainlm.corpus import Document, corpus_files, read_documents
from domainlm.errors import UserError
from domainlm.manifest import StageOutput, describe_inputs, make_manifest, sha256_json
from domainlm.progress import human_count, log, progress, summary
from domainlm.serve.config import IndexBuildConfig, resolve_device
from domainlm.serve.index_dir import BM25, CHUNKS, STAGE, VECTORS, write_chunks

HEADER_TOKENS = 32
"""Embedder tokens kept for a chunk's header line (document id and heading path)."""


REPEATED_MIN_TOKENS = 16
"""Chunks shorter than this ("Example:", a lone fence) may repeat without meaning a copied page."""
REPEATED_WARN = 0.1
"""Warn when this share of the chunks repeats an earlier chunk's text."""


def repeated_chunks(chunks) -> "Counter[str]":
    """Document id -> how many of its chunks (of at least REPEATED_MIN_TOKENS) repeat, whitespace
    aside, the text of an earlier chunk (in corpus order): the copies a page that gathers others or
    a second copy of the sources puts in the index."""
    import hashlib
    from collections import Counter

    seen: set[bytes] = set()
    out: Counter[str] = Counter()
    for c in chunks:
        if c.tokens < REPEATED_MIN_TOKENS:
            continue
        h = hashlib.blake2b(" ".join(c.text.split()).encode("utf-8"), digest_size=16).digest()
        if h in seen:
            out[c.doc_id] += 1
        else:
            seen.add(h)
    return out


def inputs(cfg: IndexBuildConfig) -> list[dict]:
    """The corpus files with their sha256 (what `domainlm run` compares)."""
    return describe_inputs(corpus_files(cfg.input))


def build(cfg: IndexBuildConfig) -> dict:
    """Entry point of `domainlm index build`."""
    from domainlm.serve import dense, sparse
    from domainlm.serve.chunking import chunk_documents, index_text
    from domainlm.serve.embedder import Embedder, resolve_embedder

    t0 = time.perf_counter()
    described = inputs(cfg)
    ref = resolve_embedder(cfg.embedder)
    device = resolve_device(cfg.dense.device, "--dense.device")
    with StageOutput(cfg.output, STAGE, overwrite=cfg.overwrite, inputs=described) as out:
        log.info("index: loading embedder %s (%s)", ref.name, ref.path)
        emb = Embedder(ref, device)
        window = min(cfg.chunk_tokens, emb.window - HEADER_TOKENS)
        chunks, empty, dup_ids = [], 0, 0
        per_doc: dict[str, int] = {}        # chunks so far per document id
        with progress(desc="chunking", unit="doc") as bar:
            for item in chunk_documents(read_documents(cfg.input, cfg.text_field, cfg.id_field), emb.tokenizer,
                                        window, min(cfg.overlap, window // 2 - 1), method=cfg.chunking):
                if isinstance(item, Document):
                    empty += 1
                    bar.update(1)
                    continue
                if item.id.endswith("#0"):
                    bar.update(1)
                    dup_ids += item.doc_id in per_doc
                # Two documents with one id (another file, a repeated record) keep distinct chunk ids.
                n = per_doc.get(item.doc_id, 0)
                item.id = f"{item.doc_id}#{n}"
                per_doc[item.doc_id] = n + 1
                chunks.append(item)
        if not chunks:
            raise UserError(f"the corpus ({', '.join(cfg.input)}) has no text to index ({empty} empty documents); "
                            f"check --input and --text-field {cfg.text_field!r}")
        t_chunk = time.perf_counter() - t0
        repeated = repeated_chunks(chunks)
        n_repeated = sum(repeated.values())
        if n_repeated >= REPEATED_WARN * len(chunks):
            top = ", ".join(f"{d} ({n:,})" for d, n in repeated.most_common(3))
            log.warning("index: %s of %s chunks repeat an earlier chunk's text word for word, most in %s: a page that "
                        "gathers others (a site's all-in-one or print page) or a second copy of the sources "
                        "(Sphinx's _sources/); leave such files out of --input, or retrieval spends its hits on copies",
                        f"{n_repeated:,}", f"{len(chunks):,}", top)
        texts = [index_text(c) if cfg.header else c.text for c in chunks]
        t1 = time.perf_counter()
        reused = 0
        partial = out.path.parent / f".{out.path.name}.partial"
        if cfg.dense.enabled:
            key = sha256_json({"embedder": ref.sha256, "block": cfg.block_chunks,
                               "chunks": sha256_json([[c.id, t] for c, t in zip(chunks, texts)])})
            with progress(total=len(texts), desc="embedding", unit="chunk") as bar:
                vecs, reused = dense.embed_resumable(lambda t: emb.encode(t, cfg.dense.batch_size), texts, partial,
                                                     key, cfg.block_chunks, bar.update)
        t_embed = time.perf_counter() - t1
        t2 = time.perf_counter()
        if cfg.dense.enabled:
            index, dense_info = dense.build_faiss(vecs, cfg.dense.hnsw_above, cfg.dense.hnsw_m,
                                                  cfg.dense.hnsw_ef_construction)
            dense.save_faiss(index, out.tmp / VECTORS)
        else:
            dense_info = {"dense": "none", "dim": emb.dim}
        bm25_info = sparse.build_bm25(texts, out.tmp / BM25)
        write_chunks(out.tmp / CHUNKS, chunks)
        t_index = time.perf_counter() - t2
        counts = {"documents": len(per_doc) + dup_ids, "chunks": len(chunks), "tokens": sum(c.tokens for c in chunks),
                  "empty_documents": empty, "duplicate_ids": dup_ids, "repeated_chunks": n_repeated}
        timing = {"chunk_s": round(t_chunk, 2), "embed_s": round(t_embed, 2), "index_s": round(t_index, 2),
                  "reused_chunks": reused,
                  "chunks_per_s": round((len(chunks) - reused) / t_embed, 1) if t_embed > 0.01 else None}
        manifest = make_manifest(
            STAGE, cfg, described,
            embedder={"name": ref.name, "path": str(ref.path.resolve()), "sha256": ref.sha256, "dim": emb.dim,
                      "window": emb.window, "max_seq_length": emb.max_seq_length},
            chunking={"method": cfg.chunking, "chunk_tokens": window, "overlap": min(cfg.overlap, window // 2 - 1),
                      "unit": "embedder tokens", "header": cfg.header,
                      "indexed": "document id and heading path, then the text" if cfg.header else "the text"},
            counts=counts, index={**dense_info, **bm25_info}, timing=timing)
        out.commit(manifest)
    import shutil

    shutil.rmtree(partial, ignore_errors=True)
    total = time.perf_counter() - t0
    rows = [("output", cfg.output), ("embedder", f"{ref.name} (sha256 {ref.sha256[:12]}..., dim {emb.dim})"),
            ("documents", f"{human_count(counts['documents'])} ({empty} empty skipped"
                          + (f", {dup_ids} with a repeated id" if dup_ids else "") + ")"),
            ("chunks", f"{human_count(len(chunks))} by {cfg.chunking}, <= {window} tokens"
                       + (f", overlap {manifest['chunking']['overlap']}" if cfg.chunking == "window" else "")
                       + (" (capped at the embedder's window)" if window < cfg.chunk_tokens else "")
                       + (f"; {human_count(n_repeated)} repeat an earlier chunk's text, most in "
                          f"{repeated.most_common(1)[0][0]}" if n_repeated else "")),
            ("dense", f"{dense_info['dense']} ({dense_info['dim']}-d, cosine)" if cfg.dense.enabled
             else "none (--dense.enabled false: BM25 only)"),
            ("bm25", f"bm25s, {bm25_info['bm25_vocab']:,} terms"),
            ("time", f"{total:.1f}s: chunking {t_chunk:.1f}s, "
                     + (f"embedding {t_embed:.1f}s ({timing['chunks_per_s']} chunks/s"
                        + (f", {reused} reused" if reused else "") + "), " if cfg.dense.enabled else "")
                     + f"indexes {t_index:.1f}s")]
    summary("domainlm index build", rows)
    return manifest

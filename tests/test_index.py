"""`domainlm index build` / `index query` and retrieval: real embedder, real faiss and bm25s.

Chunking against the corpus reader and the embedder's own tokenizer; the manifest; resuming an
interrupted build; BM25 against rank_bm25's scoring; reciprocal rank fusion by hand; retrieval
quality on the pydoc QA test split (gold document in the top 4 for >= 90% of questions,
hybrid); one-line refusals.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from domainlm.errors import UserError
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def embedder():
    from domainlm.serve.embedder import Embedder, resolve_embedder

    return Embedder(resolve_embedder("all-MiniLM-L6-v2"), "cpu")


def _doc(text: str, key: str = "d", source: str = "c.jsonl:1"):
    from domainlm.corpus import Document

    return Document(key, text, source)


def test_chunks_are_exact_slices_with_overlap_at_line_starts(embedder):
    from domainlm.serve.chunking import chunk_documents

    # lines of ~15 tokens, paragraphs of 4 lines: a window of 120 holds 1-2 paragraphs
    paragraphs = ["\n".join(" ".join(f"w{p}x{line}x{i}" for i in range(4)) for line in range(4)) for p in range(12)]
    text = "\n\n".join(paragraphs)
    chunks = list(chunk_documents([_doc(text)], embedder.tokenizer, chunk_tokens=120, overlap=24, method="window"))
    assert len(chunks) > 3
    tok = embedder.tokenizer
    for n, c in enumerate(chunks):
        assert c.id == f"d#{n}" and c.doc_id == "d" and c.source == "c.jsonl:1"
        assert c.text in text                                   # a slice of the document, never re-joined
        assert len(tok(c.text, add_special_tokens=False)["input_ids"]) == c.tokens <= 120
    for a, b in zip(chunks, chunks[1:]):
        # every chunk but the last ends at a paragraph or line end; the next starts at a line start
        end = text.index(a.text) + len(a.text)
        assert text[end] == "\n"
        start = text.index(b.text)
        assert text[start - 1] == "\n"
        assert start < end                                      # overlap
        overlap = len(tok(text[start:end], add_special_tokens=False)["input_ids"])
        assert 0 < overlap <= 24
    covered = "".join(c.text for c in chunks)
    assert all(line in covered for p in paragraphs for line in p.split("\n"))  # nothing lost
    ends = [text.index(c.text) + len(c.text) for c in chunks[:-1]]
    assert sum(text[e:e + 2] == "\n\n" for e in ends) >= len(ends) - 1       # paragraph ends preferred


def test_chunking_without_line_breaks_cuts_at_token_boundaries(embedder):
    from domainlm.serve.chunking import chunk_documents

    text = " ".join(f"tok{i}" for i in range(600))
    chunks = list(chunk_documents([_doc(text)], embedder.tokenizer, chunk_tokens=64, overlap=8, method="window"))
    ids = embedder.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert all(c.tokens == 64 for c in chunks[:-1])
    # windows of 64 tokens advancing by 56: the token count covered is the whole document
    assert (len(chunks) - 1) * 56 + chunks[-1].tokens == len(ids)
    empty = list(chunk_documents([_doc("  \n\n ")], embedder.tokenizer, 64, 8))
    assert len(empty) == 1 and empty[0].__class__.__name__ == "Document"


def test_a_run_without_spaces_is_cut_by_characters(embedder):
    """The embedder's tokenizer makes a word over 100 characters one [UNK] token: a 200,000-
    character run must still give chunks within the budget, counted as 4 characters a token."""
    from domainlm.serve.chunking import CHARS_PER_TOKEN, chunk_documents

    run = "x" * 200_000
    text = "# Title\n\nA short first paragraph.\n\n" + run + "\n\nA last paragraph after the run."
    for method in ("structure", "window"):
        chunks = list(chunk_documents([_doc(text)], embedder.tokenizer, chunk_tokens=64, overlap=8, method=method))
        assert all(0 < c.tokens <= 64 and len(c.text) <= 64 * CHARS_PER_TOKEN + 40 and c.text in text
                   for c in chunks), method
        in_run = [c for c in chunks if set(c.text) == {"x"}]
        assert all(c.tokens * CHARS_PER_TOKEN == len(c.text) for c in in_run)
        assert len(in_run) >= 200_000 // (64 * CHARS_PER_TOKEN)            # the whole run, in pieces
        assert chunks[0].text.startswith("# Title") and chunks[-1].text.endswith("after the run.")
    # ordinary text is untouched: a 100-character word is still its own subword tokens
    word = "abcdefghij" * 10
    (c,) = chunk_documents([_doc(word)], embedder.tokenizer, 64, 8)
    assert c.tokens == len(embedder.tokenizer(word, add_special_tokens=False)["input_ids"])


def test_txt_documents_get_file_line_sources(embedder, tmp_path):
    from domainlm.corpus import read_documents
    from domainlm.serve.chunking import chunk_documents

    f = tmp_path / "manual.txt"
    f.write_text("\n".join(f"line {i} " + "alpha beta gamma " * 6 for i in range(1, 61)), encoding="utf-8")
    chunks = list(chunk_documents(read_documents([str(f)]), embedder.tokenizer, 100, 30, method="window"))
    assert len(chunks) > 2
    for c in chunks:
        line = int(c.source.rsplit(":", 1)[1])
        assert c.source == f"{f}:{line}" and c.text.startswith(f"line {line} ")


def test_chunks_that_repeat_another_pages_text_are_counted_and_named(tmp_path, capsys):
    """A page that gathers others (a site's all-in-one page) puts every chunk in the index twice:
    the build counts the chunks that repeat an earlier chunk's text word for word (whitespace
    aside, short ones not), names the document most of them are in, and warns past 10%."""
    d = tmp_path / "site"
    d.mkdir()
    pages = {f"ch{i}.md": f"# Chapter {i}\n\n" + "\n\n".join(
        f"Paragraph {p} of chapter {i} tells how the widget number {p} is set up and cleaned after use."
        for p in range(3)) + "\n\nExample:\n" for i in range(2)}
    for name, text in pages.items():
        (d / name).write_text(text)
    (d / "print.md").write_text("\n\n".join(pages.values()).replace("tells how", "tells\n  how"))
    code, out, err = run_cli(["index", "build", "--input", d, "--output", tmp_path / "idx", "--dense.enabled", "false",
                              "--chunk-tokens", "40", "--overlap", "0"], capsys)
    assert code == 0, err
    chunks = [json.loads(x) for x in (tmp_path / "idx" / "chunks.jsonl").read_text().splitlines()]
    long_in_print = [c for c in chunks if c["doc_id"].endswith("print.md") and c["tokens"] >= 16]
    assert len(long_in_print) >= 4
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert m["counts"]["repeated_chunks"] == len(long_in_print)
    flat = " ".join(err.split())
    assert f"index: {len(long_in_print)} of {len(chunks)} chunks repeat an earlier chunk's text word for word, " \
           f"most in {d / 'print.md'} ({len(long_in_print)})" in flat
    assert f"{len(long_in_print)} repeat an earlier chunk's text, most in {d / 'print.md'}" in " ".join((out + err).split())


def test_index_build_manifest_and_query(pydoc_index, pydoc_corpus, capsys):
    from domainlm.corpus import read_documents
    from domainlm.manifest import sha256_file
    from domainlm.serve.embedder import dir_sha256, packaged_dir
    from domainlm.serve.index_dir import open_index_dir

    index, qas = pydoc_index
    idx = open_index_dir(index)
    m = idx.manifest
    corpus = Path(m["inputs"][0]["path"])
    assert m["stage"] == "index build" and m["inputs"][0]["sha256"] == sha256_file(corpus)
    assert m["embedder"]["name"] == "all-MiniLM-L6-v2" and m["embedder"]["sha256"] == dir_sha256(packaged_dir())
    assert m["index"]["dense"] == "flat-ip" and m["index"]["bm25"] == "bm25s" and m["embedder"]["dim"] == 384
    docs = {d.key: d for d in read_documents([str(corpus)])}
    chunks = idx.chunks()
    assert m["counts"]["documents"] == len(docs) and m["counts"]["chunks"] == len(chunks) >= len(docs)
    for c in chunks:                                             # the corpus reader's ids and file:line
        assert c.doc_id in docs and c.source == docs[c.doc_id].source and c.text in docs[c.doc_id].text
    q = qas[0]
    code, out, _ = run_cli(["index", "query", "--index", index, q.question, "--json"], capsys)
    assert code == 0
    hits = json.loads(out)["hits"]
    assert len(hits) == 8 and len({h["doc_id"] for h in hits}) >= 2       # top_k 8, no per-document limit
    assert all(h["context"] == next(c.context for c in chunks if c.id == h["id"]) for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    code, out, _ = run_cli(["index", "query", "--index", index, q.question, "--retrieval.mode", "bm25",
                            "--retrieval.top-k", "2"], capsys)
    assert code == 0 and "[1]" in out and "[2]" in out and "[3]" not in out and q.question in out


def test_retrieval_quality_on_the_pydoc_test_split(pydoc_index):
    """Gold document in the top 4 for >= 90% of test questions with hybrid retrieval."""
    from domainlm.serve.retrieve import metrics, open_retriever

    index, qas = pydoc_index
    r = open_retriever(index, device="cpu")
    questions, gold = [q.question for q in qas], [q.doc_id for q in qas]
    table = {mode: metrics(r, questions, gold, mode) for mode in ("bm25", "dense", "hybrid")}
    print(f"\nretrieval on {len(questions)} pydoc test questions, {len(r.chunks)} chunks:")
    for mode, t in table.items():
        print(f"  {mode:6s}  recall@1 {t['recall@1']:.3f}  recall@4 {t['recall@4']:.3f}  MRR@10 {t['mrr@10']:.3f}")
    assert len(questions) >= 150
    assert table["hybrid"]["recall@4"] >= 0.90
    assert table["hybrid"]["mrr@10"] >= max(table["dense"]["mrr@10"], 0.5)


def test_bm25_scores_match_the_lucene_formula(pydoc_index):
    """bm25s's scores against BM25 (Lucene's variant, as bm25s documents it) computed here from
    the same tokens: the same best chunks with the same scores for real questions."""
    from domainlm.serve.index_dir import open_index_dir
    from domainlm.serve.sparse import BM25Index

    index, qas = pydoc_index
    idx = open_index_dir(index)
    from domainlm.serve.chunking import index_text

    texts = [index_text(c) for c in idx.chunks()]     # what was indexed: the header line, then the text
    bm = BM25Index(index / "bm25", len(texts))
    tok = bm.tokenizer
    vocab_inv = {v: k for k, v in tok.get_vocab_dict().items()}
    docs = [[vocab_inv[i] for i in ids] for ids in tok.tokenize(texts, update_vocab=False, return_as="ids",
                                                                 show_progress=False)]
    n, avg = len(docs), sum(map(len, docs)) / len(docs)
    df: dict[str, int] = {}
    for d in docs:
        for w in set(d):
            df[w] = df.get(w, 0) + 1
    k1, b = 1.5, 0.75
    for q in qas[:20]:
        terms = [vocab_inv[i] for i in tok.tokenize([q.question], update_vocab=False, return_as="ids",
                                                     show_progress=False)[0] if i in vocab_inv and vocab_inv[i]]
        ref = np.zeros(n)
        for j, d in enumerate(docs):
            for w in terms:
                tf = d.count(w)
                if tf:   # Lucene: idf log(1 + (N - df + 0.5) / (df + 0.5)), tf / (tf + k1 (1 - b + b |d| / avg))
                    idf = np.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
                    ref[j] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avg))
        got = bm.search([q.question], 5)[0]
        want = np.argsort(-ref, kind="stable")[:5]
        assert [s for _, s in got] == pytest.approx(list(ref[want][:len(got)]), rel=1e-4)
        assert got[0][0] in set(np.flatnonzero(np.isclose(ref, ref.max())))


def test_bm25_search_picks_what_bm25s_retrieve_picks(pydoc_index):
    """Our top-k over bm25s's scores against bm25s's own `retrieve` on the same index: the same
    scores in the same order for every test question, the same chunks wherever the k-th score is
    not shared (where it is, ours takes the lowest chunk numbers, as a full sort does)."""
    from domainlm.serve.sparse import BM25Index

    index, qas = pydoc_index
    bm = BM25Index(index / "bm25", len(open_index_dir_chunks(index)))
    k, checked, untied = 10, 0, 0
    for q in qas:
        got = bm.search([q.question], k)[0]
        toks = bm.tokenizer.tokenize([q.question], update_vocab=False, return_as="tuple", show_progress=False)
        if not toks.ids[0]:
            assert got == []
            continue
        docs, scores = bm.retriever.retrieve(toks, k=k, show_progress=False, n_threads=0)
        theirs = [(int(d), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]
        assert [s for _, s in got] == [s for _, s in theirs]
        words = bm.tokenizer.tokenize([q.question], update_vocab=False, return_as="string", show_progress=False)[0]
        full = bm.retriever.get_scores(words)
        assert [n for n, _ in got] == [int(i) for i in np.lexsort((np.arange(len(full)), -full))[:len(got)]]
        if len(got) < k or got[-1][1] != full[np.argsort(-full)[k]]:
            untied += 1
            assert {n for n, _ in got} == {n for n, _ in theirs}
        checked += 1
    assert checked >= 150 and untied >= checked // 2


def open_index_dir_chunks(index):
    from domainlm.serve.index_dir import open_index_dir

    return open_index_dir(index).chunks()


def test_embedder_gives_sentence_transformers_encode_vectors(pydoc_index):
    """The embedder's one-batch path (the model's modules called directly) against
    SentenceTransformer.encode: bit-identical vectors for one question, within 1e-6 for a padded
    batch, and more than a batch through encode itself."""
    from domainlm.serve.embedder import Embedder, resolve_embedder

    _, qas = pydoc_index
    texts = [q.question for q in qas[:40]] + ["", "x " * 600]              # empty, and over the window
    emb = Embedder(resolve_embedder("all-MiniLM-L6-v2"), "cpu")

    def st(batch):
        return emb.model.encode(batch, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False)

    for t in texts[:5] + texts[-2:]:
        assert np.array_equal(emb.encode([t]), st([t]))
    ours = emb.encode(texts)
    assert ours.dtype == np.float32 and ours.shape == (len(texts), emb.dim) and ours.flags.c_contiguous
    np.testing.assert_allclose(ours, st(texts), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb.encode(texts, batch_size=8), ours, atol=1e-6)      # 6 batches through encode


def test_top_positive_is_a_full_sort_with_ties_in_index_order():
    from domainlm.serve.sparse import top_positive

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 400))
        scores = rng.integers(-2, 6, n).astype(np.float32)      # few values: ties everywhere, the cut too
        k = int(rng.integers(1, 60))
        order = np.lexsort((np.arange(n), -scores))
        want = [(int(i), float(scores[i])) for i in order if scores[i] > 0][:k]
        assert top_positive(scores, k) == want, trial


def test_fusion_and_per_document_dedup():
    from domainlm.serve.chunking import Chunk
    from domainlm.serve.retrieve import Retriever, fuse

    fused = fuse([[(1, 9.0), (2, 5.0), (3, 1.0)], [(3, 0.9), (1, 0.8)]], rrf_k=60)
    want = {1: 1 / 61 + 1 / 62, 2: 1 / 62, 3: 1 / 63 + 1 / 61}
    assert [n for n, _ in fused] == [1, 3, 2]
    assert dict(fused) == pytest.approx(want)
    r = object.__new__(Retriever)
    r.chunks = [Chunk(f"d{i // 2}#{i % 2}", f"d{i // 2}", "c:1", f"t{i}", 1) for i in range(6)]
    ranked = [(1, 0.9), (0, 0.8), (3, 0.7), (5, 0.6), (4, 0.5)]
    hits = r._hits(ranked, top_k=3, per_document=1)
    assert [(h.id, h.doc_id) for h in hits] == [("d0#1", "d0"), ("d1#1", "d1"), ("d2#1", "d2")]
    hits = r._hits(ranked, top_k=3, per_document=0)                   # no limit: the ranked order
    assert [h.id for h in hits] == ["d0#1", "d0#0", "d1#1"]


def test_hnsw_above_the_size_limit_agrees_with_exact(pydoc_index, tmp_path):
    from domainlm.serve.dense import DenseIndex, build_faiss, save_faiss
    from domainlm.serve.retrieve import open_retriever

    index, qas = pydoc_index
    r = open_retriever(index, device="cpu")
    vecs = np.stack([r.dense.index.reconstruct(i) for i in range(r.dense.index.ntotal)])
    hnsw, info = build_faiss(vecs, hnsw_above=10, m=32, ef_construction=80)
    assert info["dense"] == "hnsw"
    save_faiss(hnsw, tmp_path / "v.faiss")
    q = r.embedder.encode([x.question for x in qas[:50]])
    exact = r.dense.search(q, 4, -1.0)
    approx = DenseIndex(tmp_path / "v.faiss", ef_search=128).search(q, 4, -1.0)
    agree = np.mean([a[0][0] == e[0][0] for a, e in zip(approx, exact)])
    assert agree >= 0.95
    high = r.dense.search(q, 50, 0.5)
    assert all(s >= 0.5 for hits in high for _, s in hits)      # the cosine threshold


def test_interrupted_build_resumes_from_saved_blocks(tmp_path):
    from domainlm.serve.dense import embed_resumable

    texts = [f"text {i}" for i in range(10)]
    calls = []

    def encode(batch, fail_at=None):
        calls.append(len(batch))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt
        return np.array([[float(t.split()[1]), 1.0] for t in batch], np.float32)

    partial = tmp_path / ".index.partial"
    with pytest.raises(KeyboardInterrupt):
        embed_resumable(lambda b: encode(b, fail_at=3), texts, partial, "k1", block=4)
    assert sorted(p.name for p in partial.glob("block-*.npy")) == ["block-000000.npy", "block-000001.npy"]
    calls.clear()
    vecs, reused = embed_resumable(encode, texts, partial, "k1", block=4)
    assert calls == [2] and reused == 8 and vecs[:, 0].tolist() == list(range(10))
    calls.clear()
    vecs, reused = embed_resumable(encode, texts, partial, "other chunks", block=4)
    assert calls == [4, 4, 2] and reused == 0                   # another key: nothing reused


@pytest.fixture(scope="module")
def other_embedder(tmp_path_factory):
    """A second, real sentence-transformers model (a small random BERT with MiniLM's tokenizer)."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    from domainlm.serve.embedder import packaged_dir

    root = tmp_path_factory.mktemp("emb")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(root / "bert")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(packaged_dir() / f, root / "bert" / f)
    st = SentenceTransformer(modules=[models.Transformer(str(root / "bert"), max_seq_length=128),
                                      models.Pooling(32)], device="cpu")
    st.save(str(root / "small"))
    return root / "small"


def test_bad_input_is_one_line(pydoc_index, other_embedder, tmp_path, capsys):
    index, qas = pydoc_index
    code, _, err = run_cli(["index", "query", "--index", index, "--embedder", other_embedder, "q"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "was built with embedder 'all-MiniLM-L6-v2'" in err and "rebuild the index" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"id": "a", "text": "   "}\n{"id": "b", "text": ""}\n', encoding="utf-8")
    code, _, err = run_cli(["index", "build", "--input", empty, "--output", tmp_path / "i",
                            "--embedder", other_embedder], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and "no text to index (2 empty documents)" in errors[0]
    assert not (tmp_path / "i").exists()
    code, _, err = run_cli(["index", "build", "--input", tmp_path / "nothing.jsonl", "--output", tmp_path / "i"],
                           capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(["index", "query", "--index", tmp_path, "q"], capsys)
    assert code == 2 and "has no manifest.json" in err
    code, _, err = run_cli(["index", "build", "--input", empty, "--output", tmp_path / "i", "--overlap", "200"],
                           capsys)
    assert code == 2 and "overlap must be in" in err


def test_index_with_another_embedder(other_embedder, pydoc_corpus, tmp_path, capsys):
    """--embedder DIR builds with any sentence-transformers dir; queries then use it."""
    lines = (pydoc_corpus / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, _ = run_cli(["index", "build", "--input", tmp_path / "c.jsonl", "--output", tmp_path / "idx",
                            "--embedder", other_embedder, "--chunk-tokens", "500"], capsys)
    assert code == 0 and "capped at the embedder's window" in out
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert m["embedder"]["name"] == "small" and m["embedder"]["dim"] == 32 and m["chunking"]["chunk_tokens"] == 126 - 32  # less the header line
    code, out, _ = run_cli(["index", "query", "--index", tmp_path / "idx", "--retrieval.mode", "dense",
                            "--retrieval.min-score", "-1", "anything"], capsys)
    assert code == 0 and "[4]" in out


def test_bm25_only_index_retrieves_as_the_full_index_bm25_mode(pydoc_index, tmp_path, capsys):
    """--dense.enabled false: no embedding, no vectors; BM25 results equal the full index's bm25
    mode, hybrid falls back to BM25, dense is refused with one line."""
    from domainlm.serve.retrieve import open_retriever

    index, qas = pydoc_index
    corpus = json.loads((index / "manifest.json").read_text())["inputs"][0]["path"]
    code, out, err = run_cli(["index", "build", "--input", corpus, "--output", tmp_path / "bm25",
                              "--dense.enabled", "false"], capsys)
    assert code == 0, err
    assert "none (--dense.enabled false: BM25 only)" in out and not (tmp_path / "bm25" / "vectors.faiss").exists()
    full, only = open_retriever(index), open_retriever(tmp_path / "bm25")
    questions = [q.question for q in qas[:40]]
    want = [[(h.id, round(h.score, 5)) for h in hs] for hs in full.retrieve_many(questions, 4, "bm25")]
    for mode in ("bm25", "hybrid"):
        got = [[(h.id, round(h.score, 5)) for h in hs] for hs in only.retrieve_many(questions, 4, mode)]
        assert got == want
    with pytest.raises(UserError, match="has no dense vectors"):
        only.retrieve("what?", 4, "dense")


def test_bad_device_and_a_causal_lm_as_embedder_are_refused(tiny_hf_model, tmp_path, capsys, monkeypatch):
    """--dense.device must be a device that is here (not an embedder failing to load); a causal LM
    dir is no embedder (its 'index' would be noise) and is refused before anything is written."""
    import torch

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "json.dumps serializes an object to a JSON string."}\n', encoding="utf-8")
    build = ["index", "build", "--input", corpus, "--output", tmp_path / "i"]
    code, _, err = run_cli([*build, "--dense.device", "gpu"], capsys)
    assert code == 2 and "--dense.device 'gpu': use auto, cpu, cuda or cuda:N" in err
    assert "does not load in sentence-transformers" not in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli([*build, "--dense.device", "cuda"], capsys)
    assert code == 2 and "--dense.device cuda: no CUDA device here; use --dense.device cpu" in err
    code, _, err = run_cli([*build, "--embedder", tiny_hf_model], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1 and str(tiny_hf_model) in errors[0]
    assert "is a causal language model (LlamaForCausalLM), not an embedder" in errors[0]
    assert "sentence-transformers" in errors[0]
    assert not (tmp_path / "i").exists()


def test_a_damaged_vectors_file_is_one_line(tmp_path, capsys):
    """vectors.faiss that faiss cannot read: 'the index is damaged, rebuild it', as for chunks.jsonl."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"Function f{i} returns the number {i}."}) + "\n"
                              for i in range(3)), encoding="utf-8")
    code, _, err = run_cli(["index", "build", "--input", corpus, "--output", tmp_path / "i"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["index", "query", "--index", tmp_path / "i", "What does f1 return?"], capsys)
    assert code == 0 and "d1" in out, err
    for damage in (b"garbage!" * 8, b""):
        (tmp_path / "i" / "vectors.faiss").write_bytes(damage)
        code, _, err = run_cli(["index", "query", "--index", tmp_path / "i", "What does f1 return?"], capsys)
        errors = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err
        assert "vectors.faiss: not a faiss index" in errors[0] and "the index is damaged, rebuild it" in errors[0]

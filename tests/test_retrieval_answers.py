"""Retrieval that finds the answer, not only the document: the structure-aware chunker on small
documents of each kind, answer_in_sources on a hand-made index (present, split across two chunks,
absent), the sources budget against the model's context, the literal reranker, the long-document
shape of the pydoc corpus, and the bad inputs (one line each)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from domainlm.corpus import Document
from domainlm.serve.prompt import token_counter
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def emb_tok():
    from transformers import AutoTokenizer

    from domainlm.serve.embedder import resolve_embedder

    return AutoTokenizer.from_pretrained(str(resolve_embedder("all-MiniLM-L6-v2").path))


def _chunks(text: str, tok, chunk_tokens: int):
    from domainlm.serve.chunking import chunk_documents

    return list(chunk_documents([Document(key="d", text=text, source="c.jsonl:1")], tok, chunk_tokens, 8))


def _whole_in_one(chunks, piece: str) -> bool:
    return sum(piece in c.text for c in chunks) == 1


MARKDOWN = """# Guide

This guide explains how the tool is installed and used on a workstation.

## Install

1. Download the package from the mirror closest to you.
2. Run the installer with the prefix option set
   to the directory the tool should live in.
3. Check the installed version against the release notes.

## Usage

Start the tool from a terminal and pass the input file as the first argument; it writes its report
next to the input.
"""

RST = """Reference
=========

Options
-------

alpha : int
    How many passes the optimizer makes over the data before it stops.
beta : float
    The step size of each pass, between zero and one.

Notes
-----

The options are read once at start-up.
"""

MAN = """TOOL(1)                          User Commands                          TOOL(1)

NAME
       tool - count and list things

OPTIONS
       -a, --all
              Show all entries, including the hidden ones that start with a dot.

       -c     Count the entries instead of listing them; the count goes to standard
              output.

       --color[=WHEN]
              Colorize the output; WHEN is always, never or auto.
"""

PLAIN = "\n\n".join(
    " ".join(f"paragraph{p} sentence{s} has a few plain words in it." for s in range(3)) for p in range(5))


@pytest.mark.parametrize("kind", ["markdown", "rst", "man", "plain"])
def test_structure_chunker_keeps_headings_and_items_whole(kind, emb_tok):
    from domainlm.serve.structure import units

    text = {"markdown": MARKDOWN, "rst": RST, "man": MAN, "plain": PLAIN}[kind]
    chunks = _chunks(text, emb_tok, 40)
    assert len(chunks) >= 3
    for c in chunks:                                              # exact slices, within the budget
        assert c.text in text and c.tokens <= 40
        assert len(emb_tok(c.text, add_special_tokens=False)["input_ids"]) == c.tokens
    for u in units(text):                                         # every unit short enough stays whole
        piece = text[u.start:u.end]
        if len(emb_tok(piece, add_special_tokens=False)["input_ids"]) <= 40:
            assert _whole_in_one(chunks, piece), piece
    context = {c.text.strip().splitlines()[0].strip(): c.context for c in chunks}
    if kind == "markdown":
        for item in ("1. Download the package", "2. Run the installer", "3. Check the installed"):
            assert any(c.text.lstrip().startswith("## Install") or item in c.text for c in chunks)
            assert next(c.context for c in chunks if item in c.text) == "Guide > Install"
        usage = next(c for c in chunks if "Start the tool" in c.text)
        assert usage.text.startswith("## Usage") and usage.context == "Guide > Usage"
        assert not any("release notes" in c.text and "Start the tool" in c.text for c in chunks)  # sections apart
    elif kind == "rst":
        alpha = next(c for c in chunks if "alpha : int" in c.text)
        assert "How many passes" in alpha.text and alpha.context == "Reference > Options"
        assert next(c for c in chunks if "read once" in c.text).context == "Reference > Notes"
    elif kind == "man":
        c = next(c for c in chunks if "-c     Count" in c.text)
        assert "goes to standard\n              output." in c.text and c.context == "OPTIONS"
        assert next(c for c in chunks if "--color[=WHEN]" in c.text).context == "OPTIONS"
        assert next(c for c in chunks if "tool - count" in c.text).context == "NAME"
    else:
        assert all(c.context == "" for c in chunks)
        for c in chunks:                                          # cut at paragraph ends only
            assert c.text.startswith("paragraph") and c.text.endswith("in it.")
    assert context                                                # (the first lines were readable)


def test_a_fenced_code_block_is_one_unit_and_holds_no_heading():
    """A `# comment` in a shell or Python example is code, not a heading, and a blank line inside
    the block does not cut it; a block indented under a list item belongs to that item."""
    from domainlm.serve.structure import units

    text = ("# Guide\n\nInstall it:\n\n```bash\n# install it\npip install widget\n\n# then check\n"
            "widget --version\n```\n\n## Use\n\n- `-x` extract\n  ~~~\n  # inside the item\n  ~~~\n"
            "- `-v` verbose\n\nText after.\n\n```\n# never closed\nlast line\n")
    got = [(text[u.start:u.end], u.path) for u in units(text)]
    assert got == [
        ("# Guide\n\nInstall it:", ("Guide",)),
        ("```bash\n# install it\npip install widget\n\n# then check\nwidget --version\n```", ("Guide",)),
        ("## Use\n\n- `-x` extract\n  ~~~\n  # inside the item\n  ~~~", ("Guide", "Use")),
        ("- `-v` verbose", ("Guide", "Use")),
        ("Text after.", ("Guide", "Use")),
        ("```\n# never closed\nlast line", ("Guide", "Use")),
    ]


def test_a_unit_longer_than_the_chunk_is_cut_in_windows(emb_tok):
    long_item = "term\n    " + " ".join(f"w{i}" for i in range(300))
    chunks = _chunks("# T\n\n" + long_item + "\n\nnext paragraph here.\n", emb_tok, 48)
    assert all(c.tokens <= 48 for c in chunks) and len(chunks) >= 4
    assert chunks[0].text.startswith("# T") and chunks[-1].text == "next paragraph here."


def _hand_index(tmp_path: Path, capsys) -> Path:
    filler = " ".join(["river stone"] * 25)                     # 50 tokens
    docs = [
        {"id": "alpha", "text": f"# Alpha\n\nThe gateway opens at dawn. {filler}\n\n"
                                f"The secret code of the vault is\n\nblue falcon seven, spoken twice. {filler}"},
        {"id": "beta", "text": "# Beta\n\nThe harbour closes at dusk when the tide is low."},
        {"id": "gamma", "text": "# Gamma\n\nNothing here mentions the harbour or the vault."},
    ]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    code, _, err = run_cli(["index", "build", "--input", corpus, "--output", tmp_path / "idx", "--dense.enabled",
                            "false", "--chunk-tokens", "80"], capsys)
    assert code == 0, err
    return tmp_path / "idx"


def test_answer_in_sources_present_split_and_absent(tmp_path, capsys):
    from domainlm.eval.metrics import answer_in, source_texts
    from domainlm.eval.retrieval import retrieval_metrics
    from domainlm.qa import QA
    from domainlm.serve.retrieve import open_retriever

    r = open_retriever(_hand_index(tmp_path, capsys), device="cpu")
    alpha = [c for c in r.chunks if c.doc_id == "alpha"]
    split = "The secret code of the vault is blue falcon seven"
    assert len(alpha) == 2 and not any(answer_in(split, [c.text]) for c in alpha)   # across the boundary
    items = {
        "present": QA(id="p", question="When does the harbour close?", answer="at dusk", doc_id="beta"),
        "split": QA(id="s", question="In alpha, what is the secret code of the vault?", answer=split, doc_id="alpha"),
        "absent": QA(id="a", question="When does the harbour close?", answer="at midnight", doc_id="beta"),
    }
    got = {k: retrieval_metrics(r, [qa], ["bm25"], 4)["bm25"] for k, qa in items.items()}
    assert got["present"]["answer_in_sources"] == 1.0 and got["present"]["recall@1"] == 1.0
    assert got["split"]["answer_in_sources"] == 1.0 and got["split"]["answer_in@1"] == 0.0   # needs both chunks
    assert got["absent"]["answer_in_sources"] == 0.0 and got["absent"]["recall@1"] == 1.0    # right doc, no answer
    # the two chunks joined in document order whatever order they were retrieved in; not across a gap
    hits = r.retrieve("secret code vault falcon", top_k=8, mode="bm25")
    assert answer_in(split, source_texts(list(reversed(hits))))
    assert not answer_in(split, source_texts([h for h in hits if h.id == "alpha#1"]))


def test_the_budget_never_lets_the_prompt_exceed_the_context(tiny_hf_model):
    from domainlm.eval.qa import fit_sources
    from domainlm.pretrain.convert.hfdir import open_hf_dir
    from domainlm.serve.retrieve import Hit

    hf = open_hf_dir(tiny_hf_model)
    tok, ctx = hf.tokenizer(), hf.max_positions
    rng = random.Random(0)
    hits = [Hit(f"d{i}#0", f"d{i}", "c:1", 1.0, " ".join(rng.choice(["alpha", "beta", "gamma", "delta"])
                                                          for _ in range(rng.randint(10, 400))), "A > B")
            for i in range(12)]
    messages = [{"role": "user", "content": "What does the gamma option do?"}]
    count, _ = token_counter(tok)
    for room, budget in ((ctx - 48 - 8, 0), (ctx - 48 - 8, 120), (ctx - 48 - 8, 10_000), (200, 600)):
        msgs, kept = fit_sources(messages, hits, tok, room, budget)
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert len(ids) <= room <= ctx
        if budget:
            used = sum(count(f"[{i}] {h.doc_id} > A > B\n") + 2 + count(h.text.strip()) for i, h in enumerate(kept, 1))
            assert used <= budget + 2 * len(kept)                 # cut text re-encodes within a token or so
        assert kept and all(k.text.strip() for k in kept)


def test_literal_terms_move_the_defining_chunk_up():
    from domainlm.serve.rerank import literal_score, literals, rerank

    assert literals("In `tar`, what does the `--no-output` option do?") == ["tar", "--no-output"]
    assert literals('What does "max_tokens" mean for os.path.join and -c?') == ["max_tokens", "os.path.join", "-c"]
    assert literals("What is a compiler?") == []
    assert literal_score(["-c"], "       -c     Count the entries") == 2           # defined at a line start
    assert literal_score(["--unique"], "       -u, --unique\n   output only the first") == 2   # after -u,
    assert literal_score(["-c"], "the entries are counted when you pass -c, as above") == 1
    assert literal_score(["-c"], "the --color option and -cx") == 0                # not inside other terms
    texts = {0: "tar > OPTIONS\n  --overwrite  replace files", 1: "tar > OPTIONS\n  --no-output\n     Print nothing."}
    ranked = rerank("In `tar`, what does the `--no-output` option do?", [(0, 9.0), (1, 8.0)], texts.get, 0.1, 5)
    assert [n for n, _ in ranked] == [1, 0]
    texts[2] = "tar > OPTIONS\n  --no-output  (a chunk the ranking missed)"
    ranked = rerank("In `tar`, what does the `--no-output` option do?", [(0, 9.0)], texts.get, 0.1, 5, more=[0, 2])
    assert [n for n, _ in ranked] == [2, 0]                                          # read from the best documents
    assert rerank("What is a compiler?", [(0, 9.0), (1, 8.0)], texts.get, 0.1, 5) == [(0, 9.0), (1, 8.0)]


@pytest.fixture(scope="module")
def long_shape(tmp_path_factory, pydoc_corpus):
    """40 module pages of >= 5 KB (data.pydoc.long_documents of the session corpus, seeded) and
    150 train-split questions about them, doc_ids mapped to the page."""
    from domainlm.data.pydoc import long_documents
    from domainlm.qa import QA

    docs = [json.loads(x) for x in (pydoc_corpus / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    pages, page_of = long_documents(docs)
    big = sorted(p["id"] for p in pages if 5_000 <= len(p["text"]) <= 60_000)
    chosen = set(random.Random(0).sample(big, 40))
    root = tmp_path_factory.mktemp("long")
    corpus = root / "pages.jsonl"
    corpus.write_text("".join(json.dumps(p) + "\n" for p in pages if p["id"] in chosen), encoding="utf-8")
    qa = [json.loads(x) for x in (pydoc_corpus / "qa.jsonl").read_text(encoding="utf-8").splitlines()]
    items = [QA(id=q["id"], question=q["question"], answer=q["answer"], doc_id=page_of[q["source"]])
             for q in qa if q["split"] == "train" and page_of[q["source"]] in chosen]
    random.Random(1).shuffle(items)
    return corpus, items[:150]


def test_long_documents_put_the_answer_in_the_sources(long_shape, tmp_path, capsys):
    """The long-document shape: structure chunks + header + literal rerank put the answer into 600
    tokens of sources for >= 0.85 of questions, well above windows without a header."""
    from domainlm.eval.retrieval import retrieval_metrics
    from domainlm.serve.retrieve import open_retriever

    corpus, items = long_shape
    assert len(items) >= 100
    got = {}
    for name, extra in (("structure", []), ("window", ["--chunking", "window", "--chunk-tokens", "256",
                                                      "--header", "false"])):
        code, _, err = run_cli(["index", "build", "--input", corpus, "--output", tmp_path / name,
                                "--dense.enabled", "false", *extra], capsys)
        assert code == 0, err
        r = open_retriever(tmp_path / name, device="cpu")
        if name == "window":
            r = r.with_settings(rerank="none", per_document=1)
        tok = r.embedder.tokenizer
        count, cut = token_counter(tok)
        got[name] = retrieval_metrics(r, items, ["bm25"], 4, count_tokens=count, cut_tokens=cut, budget=600,
                                      sources_top_k=8 if name == "structure" else 2)["bm25"]
    print(f"\nlong pages, {len(items)} questions: answer in sources {got['structure']['answer_in_sources']:.3f} "
          f"(structure) against {got['window']['answer_in_sources']:.3f} (windows, top 2 documents)")
    assert got["structure"]["answer_in_sources"] >= 0.85
    assert got["structure"]["answer_in_sources"] >= got["window"]["answer_in_sources"] + 0.10
    assert got["structure"]["source_tokens_per_question"] <= 600


def test_short_documents_keep_their_answers(pydoc_index):
    """The short shape (the session's pydoc index, hybrid): the answer is in the sources for >= 0.9
    of the test questions within 600 tokens."""
    from domainlm.eval.retrieval import retrieval_metrics
    from domainlm.serve.retrieve import open_retriever

    index, qas = pydoc_index
    r = open_retriever(index, device="cpu")
    tok = r.embedder.tokenizer
    count, cut = token_counter(tok)
    m = retrieval_metrics(r, qas, ["hybrid"], 4, count_tokens=count, cut_tokens=cut, budget=600)["hybrid"]
    assert m["answer_in_sources"] >= 0.9 and m["recall@4"] >= 0.9


# -- bad input ----------------------------------------------------------------------------------------

def test_an_index_built_with_another_chunker_is_refused(tmp_path, capsys):
    idx = _hand_index(tmp_path, capsys)
    code, out, err = run_cli(["index", "query", "--index", idx, "--retrieval.chunking", "window", "vault"], capsys)
    assert code == 2 and "was built with structure chunking, not window" in err and len(err.strip().splitlines()) == 1


def test_qa_items_about_unknown_documents_are_counted_and_named(tmp_path, capsys):
    idx = _hand_index(tmp_path, capsys)
    qa = tmp_path / "qa.jsonl"
    rows = [{"id": "ok", "question": "When does the harbour close?", "answer": "at dusk", "doc_id": "beta"},
            {"id": "lost", "question": "Where is delta?", "answer": "far", "doc_id": "delta"}]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli(["eval", "retrieval", "--index", idx, "--data", qa, "--modes", "bm25",
                              "--output", tmp_path / "r.json"], capsys)
    assert code == 0, err
    assert "'lost' (doc_id 'delta')" in err and "left out" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["questions"] == 1 and res["doc_id_not_in_index"] == 1 and res["modes"]["bm25"]["answer_in_sources"] == 1
    qa.write_text(json.dumps(rows[1]) + "\n")
    code, out, err = run_cli(["eval", "retrieval", "--index", idx, "--data", qa, "--modes", "bm25",
                              "--output", tmp_path / "r2.json"], capsys)
    assert code == 2 and "names a document of the index" in err and not (tmp_path / "r2.json").exists()
    code, _, err = run_cli(["eval", "retrieval", "--index", idx, "--data", qa, "--modes", "bm25", "--output", qa],
                           capsys)
    assert code == 2 and "is the input" in err and qa.read_text() == json.dumps(rows[1]) + "\n"


def test_a_budget_larger_than_the_context_is_refused(tmp_path, capsys, tiny_hf_model, pydoc_corpus):
    idx = _hand_index(tmp_path, capsys)
    code, out, err = run_cli(["eval", "rag-data", "--index", idx, "--model", tiny_hf_model, "--data",
                              f"{pydoc_corpus / 'qa.jsonl'}:train", "--limit", "4", "--output", tmp_path / "rd",
                              "--rag.max-source-tokens", "600"], capsys)
    assert code == 2 and "rag.max_source_tokens is 600 tokens, but the model's context is 512" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "rd").exists()


def test_rag_data_cites_the_source_that_holds_the_answer(tmp_path, capsys, tiny_hf_model):
    idx = _hand_index(tmp_path, capsys)
    qa = tmp_path / "qa.jsonl"
    rows = [{"id": "h", "question": "In beta, when does the harbour close?", "answer": "at dusk", "doc_id": "beta"},
            {"id": "g", "question": "When does the gateway open?", "answer": "at dawn", "doc_id": "alpha"},
            {"id": "x", "question": "What colour is the sky?", "answer": "a deep violet", "doc_id": "gamma"}]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run_cli(["eval", "rag-data", "--index", idx, "--model", tiny_hf_model, "--data", qa,
                              "--output", tmp_path / "rd", "--rag.max-source-tokens", "200", "--rag.mode", "bm25",
                              "--device", "cpu"], capsys)
    assert code == 0, err
    if not torch.cuda.is_available():   # the embedder's device is checked before anything is written
        code, _, err = run_cli(["eval", "rag-data", "--index", idx, "--model", tiny_hf_model, "--data", qa,
                                "--output", tmp_path / "rd_gpu", "--device", "cuda"], capsys)
        assert code == 2 and "--device cuda: no CUDA device here" in err, err
        assert not (tmp_path / "rd_gpu").exists()
    m = json.loads((tmp_path / "rd" / "manifest.json").read_text())["counts"]
    assert m["samples"] == 3 and m["answer_in_sources"] == 2 and "answer in the sources" in out
    # h and g cite the source holding their words; x's words are nowhere and its gold document
    # gamma is not among its sources: no citation
    assert (m["cited_by_words"], m["cited_by_gold"]) == (2, 0)
    assert "2 answers cite a source as [n]: 2 the first holding the answer's words, 0 the gold" in " ".join(out.split())
    assert "no doc_id" not in out and "not in the index" not in out
    # items without a doc_id, or naming one the index lacks, are named in the summary ...
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in [{**rows[0], "doc_id": None}, {**rows[1], "doc_id": "nope"}]))
    code, out, err = run_cli(["eval", "rag-data", "--index", idx, "--model", tiny_hf_model, "--data", other,
                              "--output", tmp_path / "rd2", "--rag.max-source-tokens", "200", "--rag.mode", "bm25"],
                             capsys)
    assert code == 0, err
    flat = " ".join(out.split())
    assert "no doc_id 1 (no gold document: only a source holding the answer's words is cited" in flat, out
    assert "doc_id not in the index 1 (left out)" in flat and "1 answers cite a source as [n]: 1 the first" in flat
    # ... and when no item names a document of the index, nothing is written (it was 0 samples, exit 0)
    other.write_text(json.dumps({**rows[1], "doc_id": "nope"}) + "\n")
    code, out, err = run_cli(["eval", "rag-data", "--index", idx, "--model", tiny_hf_model, "--data", other,
                              "--output", tmp_path / "rd3", "--rag.max-source-tokens", "200", "--rag.mode", "bm25"],
                             capsys)
    assert code == 2 and "names a document of the index" in err and "the index holds e.g. 'alpha'" in err, err
    assert not (tmp_path / "rd3").exists()
    samples = [json.loads(x) for x in (tmp_path / "rd" / "train.jsonl").read_text().splitlines()]
    for s in samples:
        user, answer = s["messages"][-2]["content"], s["messages"][-1]["content"]
        if s["id"] == "x":
            assert answer == "a deep violet"                       # nothing holds it, gold doc not retrieved
            continue
        n = int(answer.rsplit("[", 1)[1].rstrip("]"))
        block = user.split(f"[{n}] ", 1)[1].split("\n\n[", 1)[0]
        assert rows[[r["id"] for r in rows].index(s["id"])]["answer"] in block
        assert block.splitlines()[0] in ("beta > Beta", "alpha > Alpha")    # the header: document > heading


def test_rag_data_leaves_long_answers_the_room_compare_leaves(tmp_path, capsys, tiny_hf_model):
    """max_new_tokens 0: the prompts leave the answer what compare's gen.max_new_tokens 0 leaves
    (ceil(1.2 x the answers' 99th percentile) + 8 tokens), so a sample whose sources fill the
    512-token context still fits it with its long answer; the fixed 48 does not."""
    import math

    from domainlm.pretrain.convert.hfdir import open_hf_dir

    rng = random.Random(3)
    words = ["river", "stone", "lantern", "copper", "meadow", "signal", "harbour", "vault"]
    docs, rows = [], []
    for i in range(10):
        answer = " ".join(rng.choice(words) for _ in range(40 + 3 * i))        # long answers, known words
        body = " ".join(rng.choice(words) for _ in range(400))
        docs.append({"id": f"d{i}", "text": f"# Doc {i}\n\nThe rule of item {i} is: {answer}.\n\n{body}"})
        rows.append({"id": f"q{i}", "question": f"What is the rule of item {i}?", "answer": answer, "doc_id": f"d{i}"})
    corpus, qa = tmp_path / "corpus.jsonl", tmp_path / "qa.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_cli(["index", "build", "--input", corpus, "--output", tmp_path / "idx", "--dense.enabled",
                            "false", "--chunk-tokens", "120"], capsys)
    assert code == 0, err
    hf = open_hf_dir(tiny_hf_model)
    tok, ctx = hf.tokenizer(), hf.max_positions
    lengths = sorted(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows)
    budget = math.ceil(1.2 * lengths[math.ceil(0.99 * len(lengths)) - 1]) + 8
    assert 48 < lengths[-1] + 8 and budget < ctx // 2

    def sample_lengths(out: Path, *extra: str) -> tuple[list[int], dict, str]:
        code, text, err = run_cli(["eval", "rag-data", "--index", tmp_path / "idx", "--model", tiny_hf_model,
                                   "--data", qa, "--output", out, "--rag.max-source-tokens", "0", "--rag.mode",
                                   "bm25", *extra], capsys)
        assert code == 0, err
        got = []
        for line in (out / "train.jsonl").read_text().splitlines():
            ids = tok.apply_chat_template(json.loads(line)["messages"], tokenize=True)
            got.append(len(ids["input_ids"] if hasattr(ids, "keys") else ids))
        return got, json.loads((out / "manifest.json").read_text()), text

    fixed, m48, _ = sample_lengths(tmp_path / "rd48")
    auto, m0, text = sample_lengths(tmp_path / "rd0", "--max-new-tokens", "0")
    assert m48["answer_budget"]["max_new_tokens"] == 48 and m48["prompt_room"] == ctx - 48 - 8
    assert sum(n > ctx for n in fixed) >= 5                     # these would be dropped as too_long
    assert m0["answer_budget"]["max_new_tokens"] == budget and m0["answer_budget"]["auto"]
    assert m0["prompt_room"] == ctx - budget - 8 and max(auto) <= ctx
    assert f"answer room {budget} tokens left for the answer (from the answers: p99" in " ".join(text.split())


def test_qa_doc_ids_may_name_a_text_file_document_by_another_path(tmp_path, capsys, tiny_hf_model):
    """A folder of manuals given as an absolute path: its documents' ids are absolute paths, the
    QA names them relative ('guide.md', 'docs/a/ref.md') or by the page's name without its ending
    ('join' for site/join.html); each resolves to the one document whose path ends so, an
    ambiguous end ('ref.md', two of them; 'ls' for ls.html and ls.md) resolves to none, and ids
    that are not file paths are never guessed."""
    from domainlm.eval.retrieval import path_matches

    ids = {"/data/docs/guide.md", "/data/docs/a/ref.md", "/data/docs/b/ref.md", "corpus.jsonl:7", "sec/12"}
    got = path_matches(["guide.md", "docs/a/ref.md", "./docs/guide.md", "ref.md", "12", "sec/12", "x.md"], ids)
    assert got == {"guide.md": "/data/docs/guide.md", "docs/a/ref.md": "/data/docs/a/ref.md",
                   "./docs/guide.md": "/data/docs/guide.md"}
    assert path_matches(["/elsewhere/data/docs/guide.md"], ids) == {}      # another absolute path: another file
    assert path_matches(["guide.md"], {"guide.md"}) == {}
    pages = ids | {"/data/site/join.html", "/data/site/api/Join.PDF", "/data/site/ls.html", "/data/site/ls.md"}
    got = path_matches(["join", "site/join", "api/Join", "ls", "guide", "docs/a/ref", "ref", "join.md", "sec"], pages)
    assert got == {"join": "/data/site/join.html", "site/join": "/data/site/join.html",      # a page by its name
                   "api/Join": "/data/site/api/Join.PDF", "guide": "/data/docs/guide.md",
                   "docs/a/ref": "/data/docs/a/ref.md"}        # 'ls': .html and .md; 'ref': two; 'join.md': none

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "harbour.md").write_text("# Harbour\n\nThe harbour closes at dusk when the tide is low.\n")
    (docs / "gate.md").write_text("# Gate\n\nThe gateway opens at dawn for the carts.\n")
    code, _, err = run_cli(["index", "build", "--input", str(docs.resolve()), "--output", tmp_path / "idx",
                            "--dense.enabled", "false"], capsys)
    assert code == 0, err
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "h", "question": "When does the harbour close?", "answer": "at dusk", "doc_id": "harbour.md"},
        {"id": "g", "question": "When does the gateway open?", "answer": "at dawn", "doc_id": "docs/gate.md"}]))
    code, out, err = run_cli(["eval", "rag-data", "--index", tmp_path / "idx", "--model", tiny_hf_model, "--data", qa,
                              "--output", tmp_path / "rd", "--rag.max-source-tokens", "200", "--rag.mode", "bm25"],
                             capsys)
    assert code == 0, err
    assert "2 QA item(s) name their document's path another way than the index (2 path(s), e.g. 'docs/gate.md' for" in err
    m = json.loads((tmp_path / "rd" / "manifest.json").read_text())["counts"]
    assert (m["samples"], m["gold_retrieved"], m["doc_id_not_in_index"]) == (2, 2, 0)
    rows = [json.loads(x) for x in (tmp_path / "rd" / "train.jsonl").read_text().splitlines()]
    assert {r["doc_id"] for r in rows} == {str(docs.resolve() / "harbour.md"), str(docs.resolve() / "gate.md")}

"""Tokenizer training on the pydoc corpus: the HF export against raw SentencePiece."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from domainlm.tokenizer.config import TokenizerConfig
from domainlm.tokenizer.report import is_heldout
from domainlm.tokenizer.spm_proto import with_model_prefix
from domainlm.tokenizer.train import Sampler, train
from tests.conftest import run_cli

# Text a domain tokenizer meets beyond prose: unicode, runs of spaces, tabs, newlines, code, digits.
HARD_TEXTS = [
    "naïve café — Zürich, Ελληνικά, русский, 中文字符, 日本語のテキスト, 🙂👍🏽 and \u200b zero width",
    "def f(x):\n\tif x  >  10:\n\t\treturn x ** 2   # three spaces\n\n\n    return -1\r\n",
    "    leading spaces, trailing spaces    ",
    "1234567890 3.14159 1e-10 0xDEADBEEF 2026-11-23T14:11:00Z",
    "| col a | col b |\n|-------|------:|\n| 1     |  2.50 |",
    "", " ", "\n", "\t\t", "a" * 300, "<s> </s> [INST] {{ template }} <unk> <|not_a_token|>",
]


def _heldout(tokenizer_dir: Path, corpus: Path) -> list[str]:
    m = json.loads((tokenizer_dir / "manifest.json").read_text())
    frac, seed = m["config"]["heldout_fraction"], m["config"]["seed"]
    texts = []
    for line in (corpus / "corpus.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if is_heldout(r["id"], frac, seed):
            texts.append(r["text"])
    return texts


def test_hf_tokenizer_encodes_exactly_like_sentencepiece(tokenizer_dir, pydoc_corpus):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = _heldout(tokenizer_dir, pydoc_corpus) + HARD_TEXTS
    assert sum(len(t.encode()) for t in texts) >= 1_000_000  # at least 1 MB of held-out text
    expected = sp.encode(texts)
    got = hf(texts, add_special_tokens=False)["input_ids"]
    mismatched = [i for i, (a, b) in enumerate(zip(expected, got)) if a != b]
    assert not mismatched, f"first mismatch: {texts[mismatched[0]][:200]!r}"
    for t, ids in zip(texts, got):
        assert hf.decode(ids) == t
        assert sp.decode(ids) == t
    # The training run's own check on held-out text agrees.
    report = json.loads((tokenizer_dir / "report.json").read_text())
    assert report["hf_parity"]["id_mismatches"] == 0 and report["hf_parity"]["decode_mismatches"] == 0


def test_special_token_strings_in_text(tokenizer_dir):
    """The one documented difference: HF reads a control token's text (bos/eos/pad/unk) as that
    token, as every HF tokenizer does; SentencePiece reads it as plain text. Chat tokens are
    user-defined symbols, a single id in both."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = "a<|im_start|>b<|im_end|>"
    assert sp.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert hf("<|end_of_text|>", add_special_tokens=False)["input_ids"] == [2]
    assert 2 not in sp.encode("<|end_of_text|>") and len(sp.encode("<|end_of_text|>")) > 1


def test_held_out_documents_were_not_trained_on(tokenizer_dir, pydoc_corpus):
    m = json.loads((tokenizer_dir / "manifest.json").read_text())
    c = m["counts"]
    assert c["heldout_documents"] == len(_heldout(tokenizer_dir, pydoc_corpus))
    assert c["sample_documents"] + c["heldout_documents"] + c["empty"] == c["documents"]
    assert m["inputs"][0]["sha256"] and m["inputs"][0]["bytes"] == (pydoc_corpus / "corpus.jsonl").stat().st_size


def test_special_tokens_chat_template_and_vocab(tokenizer_dir):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert sp.get_piece_size() == 4096 and len(hf) == 4096  # 4000 padded to a multiple of 128
    assert [sp.id_to_piece(i) for i in range(6)] == [
        "<|unk|>", "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2, 3)
    assert sp.piece_to_id("<|reserved_15|>") == 21 and hf.convert_tokens_to_ids("<|reserved_15|>") == 21
    assert sp.piece_to_id("\n") == 22
    assert sum(sp.is_byte(i) for i in range(sp.get_piece_size())) == 256  # byte fallback
    assert sp.encode("2026") == [sp.piece_to_id(d) for d in "2026"]  # digits split
    msgs = [{"role": "user", "content": "What does `json.dumps` do?"},
            {"role": "assistant", "content": "Serialize obj to a JSON formatted str."}]
    text = hf.apply_chat_template(msgs, tokenize=False)
    assert text == ("<|im_start|>user\nWhat does `json.dumps` do?<|im_end|>\n"
                    "<|im_start|>assistant\nSerialize obj to a JSON formatted str.<|im_end|>\n")
    assert hf.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n")
    out = hf.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    answer = [i for i, m in zip(ids, mask) if m]
    assert hf.decode(answer) == "Serialize obj to a JSON formatted str.<|im_end|>"
    assert ids.count(4) == 2 and ids.count(5) == 2  # chat tokens are single special ids
    cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" in cfg


def test_sampler_is_order_independent_and_bounded():
    rng = random.Random(0)
    docs = [(rng.getrandbits(64), f"d{i}", "x" * rng.randint(1, 500)) for i in range(2000)]
    picks = []
    for order in range(3):
        rng.shuffle(docs)
        s = Sampler(50_000)
        for h, k, t in docs:
            s.offer(h, k, t, len(t))
        picks.append(sorted(s.texts()))
        assert 50_000 - 500 <= s.bytes < 50_000 + 500
    assert picks[0] == picks[1] == picks[2]
    kept = sorted(docs)[: len(picks[0])]  # exactly the smallest hashes
    assert sorted(t for _, _, t in kept) == picks[0]


def _mixed_corpus(d: Path, pydoc_corpus: Path) -> Path:
    """The pydoc corpus as two JSON-lines files (some records without an id, so their key is
    'file:line'; blank lines; CRLF endings; an empty text) and a .txt document."""
    d.mkdir()
    lines = (pydoc_corpus / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    half = len(lines) // 2
    for name, part in (("a.jsonl", lines[:half]), ("b.jsonl", lines[half:])):
        out = []
        for i, line in enumerate(part):
            r = json.loads(line)
            if i % 7 == 0:
                del r["id"]
            out.append(json.dumps(r, ensure_ascii=False) + ("\r\n" if i % 5 == 0 else "\n"))
            if i % 11 == 0:
                out.append("\n")
        out.append(json.dumps({"id": f"empty-{name}", "text": ""}))  # no final newline
        (d / name).write_text("".join(out), encoding="utf-8")
    (d / "notes.txt").write_text("A plain text document.\nIt has two lines.\n", encoding="utf-8")
    return d


def test_jsonl_byte_ranges_read_every_line_once(tmp_path, pydoc_corpus):
    from domainlm.corpus import jsonl_ranges, read_file

    path = _mixed_corpus(tmp_path / "c", pydoc_corpus) / "a.jsonl"
    whole = [(d.key, d.text, d.source) for d in read_file(path)]
    assert any(k.startswith(str(path) + ":") for k, _, _ in whole)  # keys from line numbers
    for parts in (1, 2, 3, 8, 50):
        ranges = jsonl_ranges(path, parts)
        assert ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size and len(ranges) <= parts
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        data = path.read_bytes()
        assert all(data[start - 1:start] == b"\n" for start, _ in ranges[1:])  # at line starts
        assert [(d.key, d.text, d.source) for r in ranges for d in read_file(path, byte_range=r)] == whole


def test_reading_in_processes_gives_the_one_pass_sample(tmp_path, pydoc_corpus, monkeypatch):
    """Forked readers, each over byte ranges of the JSON-lines files (and other files whole),
    merge to exactly the one-pass sample: the same training texts in the same order, the same
    held-out texts and counts; and a bad line is reported as one pass reports it."""
    from domainlm.corpus import corpus_files
    from domainlm.errors import UserError
    from domainlm.tokenizer import train as tr

    d = _mixed_corpus(tmp_path / "c", pydoc_corpus)
    monkeypatch.setattr(tr, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(tr, "MIN_SPLIT_BYTES", 0)
    results = {}
    for readers in (1, 2, 3):
        cfg = TokenizerConfig(input=[str(d)], output=str(tmp_path / "t"), sample_bytes=150_000,
                              heldout_fraction=0.1, heldout_max_bytes=20_000, threads=readers)
        files = corpus_files(cfg.input)
        assert len(tr.reading_parts(files, tr.reading_processes(cfg, files))) == readers
        results[readers] = tr.sample_corpus(cfg, files)
    one = results[1]
    assert 150_000 <= one["sample_bytes"] < 200_000 and one["counts"]["empty"] == 2 and one["heldout"]
    assert results[2] == one and results[3] == one

    bad = d / "b.jsonl"
    lines = bad.read_text(encoding="utf-8").split("\n")
    lines[len(lines) * 3 // 4] = '{"id": "broken", "text": "no end'
    bad.write_text("\n".join(lines), encoding="utf-8")
    errors = []
    for readers in (1, 3):
        cfg = TokenizerConfig(input=[str(d)], output=str(tmp_path / "t"), threads=readers)
        with pytest.raises(UserError) as e:
            tr.sample_corpus(cfg, corpus_files(cfg.input))
        errors.append(str(e.value))
    assert errors[0] == errors[1] and f"b.jsonl:{len(lines) * 3 // 4 + 1}: not valid JSON" in errors[0]


@pytest.mark.parametrize("case", ["bpe", "bpe_with_a_tab", "unigram"])
def test_sentences_reach_sentencepiece_as_the_sample_file_would(tmp_path, pydoc_corpus, case):
    """`tokenizer train` hands SentencePiece the sample through sentence_iterator (no file): for
    BPE each distinct line once with its count (the "tsv" input format), else (a tab in the
    sample, unigram) every line as itself. Either way, the same vocabulary and scores as
    SentencePiece trained on the sample written as a file, one line per line."""
    from domainlm.corpus import corpus_files
    from domainlm.tokenizer.train import check_vocab, sample_corpus, spm_options, write_sample

    corpus = pydoc_corpus / "corpus.jsonl"
    if case == "bpe_with_a_tab":
        corpus = tmp_path / "tabbed.jsonl"
        with open(corpus, "w", encoding="utf-8") as f:
            for i, line in enumerate((pydoc_corpus / "corpus.jsonl").read_text(encoding="utf-8").splitlines()):
                r = json.loads(line)
                if i % 50 == 0:  # some of these are in the sample
                    r["text"] = "\tindented\twith tabs\n" + r["text"]
                f.write(json.dumps(r) + "\n")
    vocab = 1024 if case != "unigram" else 512
    cfg = TokenizerConfig(input=[str(corpus)], output=str(tmp_path / "t"), vocab_size=vocab,
                          sample_bytes=300_000 if case != "unigram" else 100_000,
                          model_type="unigram" if case == "unigram" else "bpe")
    m = train(cfg)
    sample = tmp_path / "sample.txt"
    lines = write_sample(sample_corpus(cfg, corpus_files(cfg.input))["train"], sample)
    c = m["counts"]
    assert lines == c["sample_lines"]
    if case == "bpe":  # the pydoc sample repeats lines: counted, each once
        assert c["sample_distinct_lines"] < lines
    else:
        assert c["sample_distinct_lines"] == lines
    spm.SentencePieceTrainer.train(**spm_options(cfg, sample, tmp_path / "from_file", check_vocab(cfg)))
    a, b = (spm.SentencePieceProcessor(model_file=str(f)) for f in (tmp_path / "t" / "tokenizer.model",
                                                                     tmp_path / "from_file.model"))
    assert a.get_piece_size() == b.get_piece_size() == vocab
    assert [(a.id_to_piece(i), a.get_score(i)) for i in range(vocab)] == [(b.id_to_piece(i), b.get_score(i)) for i in range(vocab)]


def test_sample_budget_bounds_training_text(tmp_path, pydoc_corpus):
    m = train(TokenizerConfig(input=[str(pydoc_corpus / "corpus.jsonl")], output=str(tmp_path / "t"),
                              vocab_size=1024, sample_bytes=300_000, heldout_fraction=0.05,
                              heldout_max_bytes=100_000))
    c = m["counts"]
    assert 300_000 <= c["sample_bytes"] < 300_000 + 60_000 and c["sample_documents"] < c["documents"] / 5
    assert c["report_bytes"] <= 100_000 + 60_000
    again = train(TokenizerConfig(input=[str(pydoc_corpus / "corpus.jsonl")], output=str(tmp_path / "t2"),
                                  vocab_size=1024, sample_bytes=300_000, heldout_fraction=0.05,
                                  heldout_max_bytes=100_000))
    # Same sample, same model: byte for byte (the temporary path SentencePiece wrote to is not
    # recorded in it), so the same sha256 in both manifests.
    a, b = ((tmp_path / d / "tokenizer.model").read_bytes() for d in ("t", "t2"))
    assert a == b and m["tokenizer"]["sha256"] == again["tokenizer"]["sha256"] == hashlib.sha256(a).hexdigest()
    assert again["fingerprint"] != m["fingerprint"]  # output path is part of the config
    # The rewrite against sentencepiece's own protobuf module: the recorded prefix, every other
    # field as trained, serialized as protobuf itself serializes it.
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.ParseFromString(a)
    assert model.trainer_spec.model_prefix == "tokenizer"
    assert model.trainer_spec.vocab_size == 1024 and model.trainer_spec.model_type == pb.TrainerSpec.BPE
    model.trainer_spec.model_prefix = "/some/where/else/tokenizer"
    assert with_model_prefix(a, "/some/where/else/tokenizer") == model.SerializeToString()
    model.trainer_spec.ClearField("model_prefix")   # none recorded: one is added
    again_model = pb.ModelProto()
    again_model.ParseFromString(with_model_prefix(model.SerializeToString(), "tokenizer"))
    model.trainer_spec.model_prefix = "tokenizer"
    assert again_model == model


def test_unigram_export_differs_at_most_in_tie_order(tmp_path, pydoc_corpus):
    m = train(TokenizerConfig(input=[str(pydoc_corpus / "corpus.jsonl")], output=str(tmp_path / "u"),
                              vocab_size=2048, model_type="unigram", sample_bytes=1_000_000,
                              heldout_fraction=0.1))
    p = m["report"]["hf_parity"]
    assert p["documents"] > 100 and p["decode_mismatches"] == 0
    # Unigram ties (the same pieces in another order, equal total score) are the only difference.
    assert p["id_mismatches"] == p["tie_order_only"]
    assert p["id_mismatches"] <= 0.02 * p["documents"]


def test_report_matches_direct_measurement(tokenizer_dir, pydoc_corpus, capsys, tmp_path):
    out = tmp_path / "r.json"
    hf_only = tmp_path / "hf_only"  # what a general HF tokenizer dir looks like: no manifest, no .model
    hf_only.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (hf_only / name).write_bytes((tokenizer_dir / name).read_bytes())
    code, text, _ = run_cli(["tokenizer", "report", "--tokenizer", tokenizer_dir, "--input",
                             pydoc_corpus / "corpus.jsonl", "--split", "heldout", "--compare", hf_only,
                             "--output", out], capsys)
    assert code == 0 and "bytes/token" in text
    rows = json.loads(out.read_text())["results"]
    texts = _heldout(tokenizer_dir, pydoc_corpus)
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    ids = sp.encode(texts)
    n_tok = sum(map(len, ids))
    n_bytes = sum(len(t.encode()) for t in texts)
    assert rows[0]["kind"] == "sentencepiece" and rows[0]["tokens"] == n_tok
    assert rows[0]["bytes_per_token"] == pytest.approx(n_bytes / n_tok, abs=1e-4)
    assert rows[0]["tokens_per_word"] == pytest.approx(n_tok / sum(len(t.split()) for t in texts), abs=1e-4)
    fallback = sum(sp.is_byte(i) for seq in ids for i in seq) / n_tok
    assert rows[0]["byte_fallback_rate"] == pytest.approx(fallback, abs=1e-6)
    # The HF files alone, measured through transformers, give the same counts.
    assert rows[1]["kind"] == "transformers" and rows[1]["tokens"] == n_tok
    assert rows[1]["byte_fallback_rate"] == rows[0]["byte_fallback_rate"]


def test_a_corpus_too_small_to_hold_a_document_out_checks_the_export_on_training_text(tmp_path, pydoc_corpus,
                                                                                       capsys):
    """12 documents at --heldout-fraction 0.001 hold none out: the HF parity check and the
    measures run on the training text instead, under `train_sample` (not `heldout`), and what
    reads the measured bytes per token (shard sizes, the converted model's card; the card used to
    fail on the missing held-out report) takes it from there."""
    import shutil
    from types import SimpleNamespace

    from domainlm.data.beam.manifest import bytes_per_token
    from domainlm.pretrain.convert.card import training_summary
    from domainlm.tokenizer.tokdir import load_tokenizer_dir, measured_bytes_per_token

    docs = [json.loads(line) for line in (pydoc_corpus / "corpus.jsonl").read_text().splitlines()[:12]]
    corpus = tmp_path / "small.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    out = tmp_path / "tok"
    code, text, err = run_cli(["tokenizer", "train", "--input", corpus, "--output", out, "--vocab-size", 512,
                               "--heldout-fraction", 0.001], capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["heldout_documents"] == 0 and m["report"]["heldout"] is None
    parity, measured = m["report"]["hf_parity"], m["report"]["train_sample"]
    assert parity["on"] == "train" and parity["documents"] == 12 and parity["id_mismatches"] == 0
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    texts = [d["text"] for d in docs]
    expected = sum(len(t.encode()) for t in texts) / sum(map(len, sp.encode(texts)))
    assert measured["bytes_per_token"] == pytest.approx(expected, abs=1e-3)
    assert "train sample" in text and "(training documents: none held out)" in text
    assert measured_bytes_per_token(m) == bytes_per_token(load_tokenizer_dir(out)) == measured["bytes_per_token"]
    # the model card of a checkpoint holding this tokenizer
    root = tmp_path / "ckpt"
    shutil.copytree(out, root / "tokenizer")
    info = SimpleNamespace(manifest={"stage": "pretrain", "config": {}}, step=0, root=root)
    assert training_summary(info)["tokenizer"]["bytes_per_token"] == measured["bytes_per_token"]

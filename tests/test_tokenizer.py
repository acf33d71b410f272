"""Tokenizer training on the pydoc corpus: the HF export against raw SentencePiece."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from domainlm.tokenizer.config import TokenizerConfig
from domainlm.tokenizer.report import is_heldout
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
    # Same sample, same vocabulary and scores (the .model file also records its training paths).
    a, b = (spm.SentencePieceProcessor(model_file=str(tmp_path / d / "tokenizer.model")) for d in ("t", "t2"))
    assert [(a.id_to_piece(i), a.get_score(i)) for i in range(1024)] == [(b.id_to_piece(i), b.get_score(i)) for i in range(1024)]
    assert again["fingerprint"] != m["fingerprint"]  # output path is part of the config


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

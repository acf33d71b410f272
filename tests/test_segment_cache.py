"""The segment cache of `data shard`'s encoder (tokenizer/segment_cache.py) against SentencePiece
itself: the same ids for every text, and no cache for a model where that would not hold."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from domainlm.tokenizer.segment_cache import MAX_KEY, SPACE, segment_pattern
from domainlm.tokenizer.spm_proto import fields as _fields
from domainlm.tokenizer.tokdir import SENTENCEPIECE, DocumentEncoder
from tests.test_tokenizer import HARD_TEXTS

# Where a segment boundary could go wrong: spaces and newlines around words and at the ends, a
# literal '▁' (normalized like a space), combining marks and no-break spaces after a space,
# characters only byte fallback encodes, user-defined symbols, long segments, digits.
EDGE_TEXTS = [
    "a\u2581b", "\u2581", "\u2581 x", "x \u2581", "x   ", "   ", "  \n  y", "\n\n\nz\n", "a \u0301b", "a \u00a0 b",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "x<|im_end|>y  <|im_start|> z",
    "call_" * 30 + " tail " + "α" * 80, "\t \t\n \n\t", "12 345 6789 0.5e-3", "🙂 🙂🙂 a🙂b 🙂", "a" * 70 + " " + "a" * 70,
    "    def f(self):\n        return self.x  # done\n", " leading", "trailing ", "",
]


def _texts(tokenizer_dir: Path, corpus: Path, n: int = 1500) -> list[str]:
    lines = (corpus / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    texts = [json.loads(line)["text"] for line in lines]
    rng = random.Random(0)  # the same words in other orders and indents: new segments, cached words
    for t in texts[:200]:
        words = t.split(" ")
        rng.shuffle(words)
        texts.append(" ".join(words))
    return texts + HARD_TEXTS + EDGE_TEXTS


def _reference(sp, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    ids = sp.encode(texts)
    return np.asarray([i for x in ids for i in x], np.uint16), np.asarray([len(x) for x in ids], np.int64)


def _blocks(enc: DocumentEncoder, texts: list[str], size: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [enc.flat(texts[i:i + size], np.uint16) for i in range(0, len(texts), size)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_cached_encoding_equals_sentencepiece_cold_warm_and_full(tokenizer_dir, pydoc_corpus):
    blob = (tokenizer_dir / "tokenizer.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=blob)
    texts = _texts(tokenizer_dir, pydoc_corpus)
    tokens, lengths = _reference(sp, texts)
    assert len(tokens) > 200_000

    enc = DocumentEncoder(SENTENCEPIECE, blob)
    cache = enc.segment_cache
    assert cache is not None and cache.split("a  b\n c") == ["a", "  b", "\n", " c"]
    for rnd in range(2):  # cold, then warm: the second pass finds every cacheable segment
        got = _blocks(enc, texts, 97)
        assert np.array_equal(got[0], tokens) and np.array_equal(got[1], lengths)
        if rnd == 0:
            first = (cache.hits, cache.segments)
            assert 0.5 < first[0] / first[1] < 1
            # a block's repeats of a new segment go to SentencePiece once; the cache holds each once
            assert len(cache.cache) < cache.encoded < cache.segments - cache.hits
    hits, segments = cache.hits - first[0], cache.segments - first[1]
    too_long = sum(len(s) > MAX_KEY for t in texts for s in ([t] if SPACE in t else cache.split(t)))
    assert segments == first[1] and too_long > 0 and hits == segments - too_long
    assert max(map(len, cache.cache)) <= MAX_KEY and any(SPACE in k for k in cache.cache)  # '▁' texts, whole

    # A full cache stops growing; what it does not hold is encoded each time, the same ids.
    small = DocumentEncoder(SENTENCEPIECE, blob)
    small.segment_cache.capacity = 500
    got = _blocks(small, texts, 64)
    assert np.array_equal(got[0], tokens) and np.array_equal(got[1], lengths)
    assert len(small.segment_cache.cache) == 500
    got[0][0] += 1  # writable, like the arrays of the whole-text path
    # another dtype starts a cache of its own (the cached bytes are of one dtype)
    wide = small.flat(texts[:300], np.uint32)
    assert wide[0].dtype == np.uint32 and np.array_equal(wide[0], tokens[:int(lengths[:300].sum())])
    assert len(small.segment_cache.cache) <= 500 and small.segment_cache.dtype == np.uint32
    # and the list interface stays SentencePiece's own
    assert enc(texts[:50]) == sp.encode(texts[:50])


def test_several_threads_or_cache_false_encode_whole_texts(tokenizer_dir, pydoc_corpus, monkeypatch):
    blob = (tokenizer_dir / "tokenizer.model").read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=blob)
    texts = _texts(tokenizer_dir, pydoc_corpus, 300)
    tokens, lengths = _reference(sp, texts)
    monkeypatch.setenv("DOMAINLM_SEGMENT_CACHE", "0")
    off = DocumentEncoder(SENTENCEPIECE, blob)  # the switch bench/shard.py --cache-ab compares with
    monkeypatch.delenv("DOMAINLM_SEGMENT_CACHE")
    assert DocumentEncoder(SENTENCEPIECE, blob).segment_cache is not None
    for enc in (DocumentEncoder(SENTENCEPIECE, blob, threads=2), DocumentEncoder(SENTENCEPIECE, blob, cache=False), off):
        assert enc.segment_cache is None
        got = _blocks(enc, texts, 64)
        assert np.array_equal(got[0], tokens) and np.array_equal(got[1], lengths)


def _train(tmp_path: Path, sample: Path, name: str, **options) -> bytes:
    spm.SentencePieceTrainer.train(input=str(sample), model_prefix=str(tmp_path / name), vocab_size=1500,
                                   byte_fallback=True, minloglevel=2, **options)
    return (tmp_path / f"{name}.model").read_bytes()


IDENTITY = dict(normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False)


@pytest.mark.parametrize("case", ["nmt_nfkc", "dummy_prefix", "squeezed", "unigram", "across_spaces",
                                  "newline_piece", "suffix"])
def test_no_cache_where_a_segment_would_not_encode_alone_as_in_its_text(tmp_path, pydoc_corpus, case):
    """Each model breaks one condition of segment_pattern; it gets no cache (and whole texts
    encode as SentencePiece does). "newline_piece": a piece joins a newline to other text, so
    the cache keeps only the space boundaries."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    texts = [json.loads(x)["text"] for x in (pydoc_corpus / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
    sample = tmp_path / "sample.txt"
    sample.write_text("\n".join(t.replace("\n", " ") for t in texts[:400]), encoding="utf-8")
    options = {
        "nmt_nfkc": dict(model_type="bpe"),
        "dummy_prefix": dict(IDENTITY, model_type="bpe", add_dummy_prefix=True),
        "squeezed": dict(IDENTITY, model_type="bpe", remove_extra_whitespaces=True),
        "unigram": dict(IDENTITY, model_type="unigram"),
        "across_spaces": dict(IDENTITY, model_type="bpe", split_by_whitespace=False),
        "newline_piece": dict(IDENTITY, model_type="bpe", user_defined_symbols=["\n", "):\n"]),
        "suffix": dict(IDENTITY, model_type="bpe", treat_whitespace_as_suffix=True),
    }[case]
    blob = _train(tmp_path, sample, case, **options)
    sp = spm.SentencePieceProcessor(model_proto=blob)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    if case == "across_spaces":  # the premise: merges that cross a space
        assert any(SPACE in p.lstrip(SPACE) for p in pieces)
    expected = None if case != "newline_piece" else r" *+[^ ]++| ++"
    assert segment_pattern(blob, pieces) == expected
    # the few fields read by hand agree with sentencepiece's own protobuf module
    m = pb.ModelProto()
    m.ParseFromString(blob)
    top = _fields(blob)
    trainer, norm = _fields(top[2][-1]), _fields(top[3][-1])
    assert trainer.get(3, [1])[-1] == m.trainer_spec.model_type
    assert bool(trainer.get(24, [0])[-1]) == m.trainer_spec.treat_whitespace_as_suffix
    assert (norm.get(1, [b""])[-1].decode(), norm.get(2, [b""])[-1]) == (m.normalizer_spec.name,
                                                                          m.normalizer_spec.precompiled_charsmap)
    assert [bool(norm.get(f, [1])[-1]) for f in (3, 4, 5)] == [m.normalizer_spec.add_dummy_prefix,
                                                              m.normalizer_spec.remove_extra_whitespaces,
                                                              m.normalizer_spec.escape_whitespaces]
    enc = DocumentEncoder(SENTENCEPIECE, blob)
    assert (enc.segment_cache is None) == (expected is None)
    check = texts[400:700] + HARD_TEXTS + EDGE_TEXTS
    got = _blocks(enc, check, 50)
    tokens, lengths = _reference(sp, check)
    assert np.array_equal(got[0], tokens) and np.array_equal(got[1], lengths)

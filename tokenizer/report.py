"""How well a tokenizer compresses text: bytes per token, tokens per word, byte-fallback rate.

Bytes per token is the headline (higher is better: fewer tokens for the same text means longer
effective context and cheaper training); tokens per word is the same seen from the words;
the byte-fallback rate is the share of tokens that are raw UTF-8 bytes, i.e. characters the
vocabulary does not cover. A domain tokenizer should beat a general one on domain text.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import describe_inputs, read_manifest
from domainlm.progress import human_bytes, progress, summary
from domainlm.tokenizer.config import ReportConfig
from domainlm.corpus import corpus_files, read_file

_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def key_hashes(seed: int, key: str) -> tuple[int, int]:
    """Two independent 64-bit hashes of a document key, from one digest: the first decides the
    held-out split (everywhere: training, reports), the second the document's sampling rank."""
    d = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=16).digest()
    return int.from_bytes(d[:8], "big"), int.from_bytes(d[8:], "big")


def is_heldout(key: str, fraction: float, seed: int) -> bool:
    return key_hashes(seed, key)[0] < fraction * 2**64


def measure(texts: list[str], encode: Callable[[list[str]], list[list[int]]], byte_ids: set[int],
            unk_id: int | None) -> dict:
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    words = sum(len(t.split()) for t in texts)
    tokens = byte_tokens = unk = 0
    for ids in encode(texts):
        tokens += len(ids)
        byte_tokens += sum(1 for i in ids if i in byte_ids)
        if unk_id is not None:
            unk += sum(1 for i in ids if i == unk_id)
    return {
        "documents": len(texts), "bytes": n_bytes, "words": words, "tokens": tokens,
        "bytes_per_token": round(n_bytes / max(tokens, 1), 4),
        "tokens_per_word": round(tokens / max(words, 1), 4),
        "byte_fallback_rate": round(byte_tokens / max(tokens, 1), 6),
        "unk_rate": round(unk / max(tokens, 1), 6),
    }


class Measurer:
    """Encodes with SentencePiece for a domainlm tokenizer dir, else with AutoTokenizer."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"tokenizer {str(self.path)!r} is not a directory")
        if (self.path / "tokenizer.model").is_file() and (self.path / "manifest.json").is_file():
            import sentencepiece as spm

            read_manifest(self.path, stages.TOKENIZER_DIRS, what="a tokenizer directory")
            self._use_sentencepiece(spm.SentencePieceProcessor(model_file=str(self.path / "tokenizer.model")))
        else:
            from transformers import AutoTokenizer

            try:
                tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
            except Exception as e:
                raise UserError(
                    f"{str(self.path)!r} is neither a domainlm tokenizer dir nor one that "
                    f"transformers.AutoTokenizer loads ({e.__class__.__name__}: {str(e).splitlines()[0][:200]})"
                ) from None
            vocab = tok.get_vocab()
            self.vocab_size = len(vocab)
            self.byte_ids = {i for p, i in vocab.items() if _BYTE_PIECE.match(p)}
            self.unk_id = tok.unk_token_id
            self.encode = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]
            self.kind = "transformers"

    @classmethod
    def for_processor(cls, sp, name: str) -> "Measurer":
        """Measure a loaded SentencePiece processor (a tokenizer dir still being written)."""
        self = cls.__new__(cls)
        self.path = Path(name)
        self._use_sentencepiece(sp)
        return self

    def _use_sentencepiece(self, sp) -> None:
        self.vocab_size = sp.get_piece_size()
        self.byte_ids = {i for i in range(self.vocab_size) if sp.is_byte(i)}
        self.unk_id = sp.unk_id()
        self.encode = lambda texts: sp.encode(texts, num_threads=-1)
        self.kind = "sentencepiece"

    def measure(self, texts: list[str], ids: list[list[int]] | None = None) -> dict:
        """Metrics of `texts`; `ids`, when given, are their encodings by this tokenizer."""
        out = measure(texts, (lambda _: ids) if ids is not None else self.encode, self.byte_ids, self.unk_id)
        return {"tokenizer": str(self.path), "kind": self.kind, "vocab_size": self.vocab_size, **out}


def read_texts(cfg: ReportConfig) -> list[str]:
    rule = None
    if cfg.split == "heldout":
        m = read_manifest(cfg.tokenizer, stages.TOKENIZER_DIRS, what="a tokenizer directory")
        c = m.get("config", {})
        if "heldout_fraction" not in c:
            raise UserError(f"tokenizer {cfg.tokenizer!r} was not trained here, so it held nothing out; "
                            "use --split all")
        rule = (c["heldout_fraction"], c["seed"])
    texts, total = [], 0
    files = corpus_files(cfg.input)
    bar = progress(total=cfg.max_bytes, desc="reading", unit="B", unit_scale=True)
    for path in files:
        for doc in read_file(path, cfg.text_field, cfg.id_field):
            if not doc.text or (rule and not is_heldout(doc.key, *rule)):
                continue
            texts.append(doc.text)
            size = len(doc.text.encode("utf-8"))
            total += size
            bar.update(size)
            if total >= cfg.max_bytes:
                break
        if total >= cfg.max_bytes:
            break
    bar.close()
    if not texts:
        what = "held-out documents (the tokenizer held none of these out?)" if rule else "documents"
        raise UserError(f"no {what} with text in {', '.join(cfg.input)}; try --split all")
    return texts


def report(cfg: ReportConfig) -> dict:
    from domainlm.manifest import check_output_file, is_json_object

    if cfg.output:          # checked before any work: not a directory, not an input, not a foreign file
        check_output_file(cfg.output, inputs=[*corpus_files(cfg.input), cfg.tokenizer, *cfg.compare],
                          ours=is_json_object)
    texts = read_texts(cfg)
    rows = [Measurer(cfg.tokenizer).measure(texts)] + [Measurer(p).measure(texts) for p in cfg.compare]
    result = {"split": cfg.split, "inputs": describe_inputs(corpus_files(cfg.input)), "results": rows}
    if cfg.output:
        from domainlm.manifest import write_json

        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        write_json(cfg.output, result)
    print_table(rows, f"{len(texts):,} documents, {human_bytes(rows[0]['bytes'])} ({cfg.split})")
    return result


def print_table(rows: list[dict], what: str) -> None:
    lines = [("text", what)]
    base = rows[0]["bytes_per_token"]
    for r in rows:
        rel = "" if r is rows[0] else f"  ({r['bytes_per_token'] / base:.2f}x of the first)"
        lines.append((Path(r["tokenizer"]).name or r["tokenizer"],
                      f"{r['bytes_per_token']:.3f} bytes/token  {r['tokens_per_word']:.3f} tokens/word  "
                      f"{100 * r['byte_fallback_rate']:.3f}% byte fallback  vocab {r['vocab_size']:,}{rel}"))
    summary("domainlm tokenizer report", lines)

"""Configs of the tokenizer commands (light: imported by `domainlm --help`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from domainlm.config import INPUT, OUTPUT, RUNTIME
from domainlm.errors import UserError


@dataclass(kw_only=True, slots=True)
class SpecialTokens:
    """Names of the special tokens (ids 0-3, then the chat and reserved tokens)."""

    unk: str = "<|unk|>"
    """Unknown token (id 0); with byte fallback it is never produced for text."""
    bos: str = "<|begin_of_text|>"
    """Beginning of sequence (id 1)."""
    eos: str = "<|end_of_text|>"
    """End of document (id 2); pretraining puts it between packed documents."""
    pad: str = "<|pad|>"
    """Padding (id 3)."""
    reserved: int = 16
    """Extra reserved tokens <|reserved_N|> kept for later use (new roles, tools)."""


@dataclass(kw_only=True, slots=True)
class TokenizerConfig:
    """Train a SentencePiece tokenizer on a domain corpus and export it for Hugging Face.

    Streams the corpus once, samples documents deterministically (by a seeded hash of their
    ids) up to --sample-bytes so any corpus size trains in bounded memory, holds out a share of
    documents for the report, trains SentencePiece (byte fallback, digits split, whitespace
    kept as is), and writes tokenizer.model, an HF fast tokenizer that encodes identically,
    report.json and manifest.json.
    """

    input: list[str] = field(metadata=INPUT)
    """Corpus files, globs or directories: JSONL, Parquet, .txt/.md/.rst/.html/.pdf (one document per file), or a
    saved `datasets` directory."""
    output: str = field(metadata=OUTPUT)
    """Tokenizer directory to write."""
    vocab_size: int = 32000
    """Vocabulary size, special tokens included; rounded up to a multiple of 128."""
    model_type: Literal["bpe", "unigram"] = "bpe"
    """SentencePiece algorithm. The HF export of 'bpe' encodes identically to SentencePiece;
    'unigram' may order the pieces of an equal-score tie differently (see README)."""
    text_field: str = "text"
    """JSON / Parquet / datasets field holding the document text."""
    id_field: str = "id"
    """Field holding a document id; documents without one are keyed by file and line."""
    sample_bytes: int = 200_000_000
    """Most bytes of text given to SentencePiece; documents are chosen by seeded hash."""
    heldout_fraction: float = 0.01
    """Share of documents (by hash) held out of training for the report."""
    heldout_max_bytes: int = 2_000_000
    """Most held-out bytes used for the report and the HF parity check."""
    seed: int = 0
    """Salt of the sampling and held-out hashes."""
    character_coverage: float = 0.9999
    """Share of characters covered by pieces; the rarest fall back to UTF-8 bytes."""
    max_piece_length: int = 16
    """Longest piece, in characters."""
    special: SpecialTokens = field(default_factory=SpecialTokens)
    """Special tokens."""
    threads: int = field(default=0, metadata=RUNTIME)
    """SentencePiece training threads, and the processes reading a corpus of 16 MB or more (at most
    4); 0 uses every core."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Replace an output directory that holds something else."""

    def validate(self) -> None:
        if self.vocab_size <= 0:
            raise UserError(f"vocab_size must be positive, got {self.vocab_size}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise UserError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if self.sample_bytes < 1000:
            raise UserError(f"sample_bytes is {self.sample_bytes}; give at least 1000 bytes of text to train on")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise UserError(f"character_coverage must be in [0.9, 1], got {self.character_coverage}")
        if self.special.reserved < 0:
            raise UserError("special.reserved must be >= 0")
        names = {k: getattr(self.special, k) for k in ("unk", "bos", "eos", "pad")}
        for k, v in names.items():
            if not v.strip():
                raise UserError(f"special.{k} is empty; give the token's text, e.g. <|{k}|>")
            same = [o for o in names if o != k and names[o] == v]
            if same:
                raise UserError(f"special.{k} and special.{same[0]} are both {v!r}; each special token needs its own "
                                "text (its own id)")


@dataclass(kw_only=True, slots=True)
class ReportConfig:
    """Measure a tokenizer on text: bytes per token, tokens per word, byte-fallback rate.

    With --compare, measures other tokenizers (domainlm tokenizer dirs or any directory that
    transformers.AutoTokenizer loads) on the same text, side by side.
    """

    tokenizer: str = field(metadata=INPUT)
    """Tokenizer directory (from `domainlm tokenizer train`)."""
    input: list[str] = field(metadata=INPUT)
    """Corpus files, globs or directories to measure on."""
    compare: list[str] = field(default_factory=list, metadata=INPUT)
    """Other tokenizer directories to measure on the same text."""
    split: Literal["heldout", "all"] = "all"
    """'heldout' keeps only the documents the tokenizer held out of training (same corpus);
    'all' measures every document."""
    text_field: str = "text"
    """JSON / Parquet / datasets field holding the document text."""
    id_field: str = "id"
    """Field holding a document id (decides the held-out split)."""
    max_bytes: int = 10_000_000
    """Stop reading after this many bytes of text."""
    output: str | None = None
    """Also write the report as JSON to this file."""

"""The tokenizer dir contract (ARCHITECTURE.md, "Contracts"): a tokenizer directory as later stages use it.

`load_tokenizer_dir(path)` checks the directory is the output of `domainlm tokenizer train` and
returns the SentencePiece processor with what the shard pipeline, the loader and pretraining
check against each other: the vocab size, the special ids and the model's sha256.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import read_manifest, sha256_file

# A tokenizer trained here, or one `domainlm convert from-hf` imported with an HF model.
STAGE = stages.TOKENIZER_DIRS


@dataclass(frozen=True, slots=True)
class TokenizerId:
    """A tokenizer's identity across stages: the sha256 of tokenizer.model and the vocab size.
    Every stage output made with a tokenizer records it (shards, checkpoints, HF dirs)."""

    sha256: str | None
    vocab_size: int | None

    @classmethod
    def of(cls, entry: dict[str, Any] | None) -> "TokenizerId":
        """From a manifest's "tokenizer" entry."""
        entry = entry or {}
        v = entry.get("vocab_size")
        return cls(entry.get("sha256"), None if v is None else int(v))

    def __str__(self) -> str:
        return f"sha256 {str(self.sha256)[:12]}..., vocab size {self.vocab_size}"


def check_same(theirs: TokenizerId, mine: TokenizerId, *, what: str, mine_label: str, fix: str) -> None:
    """UserError unless `what` (made with `theirs`) was made with the tokenizer `mine_label` is.
    One message for every stage: what differs, both identities, and the fix."""
    if theirs != mine:
        raise UserError(f"{what}: built with another tokenizer ({theirs}) than {mine_label} ({mine}); {fix}")


@dataclass(slots=True)
class TokenizerDir:
    path: Path
    model_file: Path
    sha256: str
    """sha256 of tokenizer.model: the tokenizer's identity across stages."""
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    manifest: dict[str, Any]

    @property
    def identity(self) -> TokenizerId:
        return TokenizerId(self.sha256, self.vocab_size)

    def processor(self):
        """A fresh SentencePieceProcessor (one per worker: it is not picklable)."""
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(self.model_file))


def load_tokenizer_dir(path: str | Path) -> TokenizerDir:
    p = Path(path)
    manifest = read_manifest(p, STAGE, what="a tokenizer directory (from `domainlm tokenizer train`)")
    model = p / "tokenizer.model"
    if not model.is_file():
        raise UserError(f"tokenizer directory {str(p)!r} has no tokenizer.model; retrain it")
    digest = sha256_file(model)
    tok = manifest.get("tokenizer", {})
    if tok.get("sha256") and tok["sha256"] != digest:
        raise UserError(
            f"{str(model)!r} does not match its manifest (sha256 differs); it was changed after "
            "training, retrain the tokenizer"
        )
    return TokenizerDir(
        path=p, model_file=model, sha256=digest, vocab_size=int(tok["vocab_size"]),
        bos_id=int(tok["bos_id"]), eos_id=int(tok["eos_id"]), pad_id=int(tok["pad_id"]),
        unk_id=int(tok["unk_id"]), manifest=manifest,
    )

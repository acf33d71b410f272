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

    `domainlm data shard` and `domainlm pretrain` tokenize with SentencePiece. When the model has
    a SentencePiece tokenizer.model that covers the whole HF vocabulary, `dst` also gets a
    tokenizer-dir manifest (the fields `load_tokenizer_dir` reads), so shards can be made with it
    and pretraining continued. Otherwise (e.g. Llama 3's tiktoken-style BPE) the dir holds only
    the HF files: the checkpoint still converts back to HF, and pretraining refuses it clearly.
    """
    from domainlm.pretrain.convert.verify import tokenizer_parity

    names = copy_tokenizer(model_dir, dst)
    if not names:
        raise UserError(f"model {str(model_dir)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}); "
                        "a converted checkpoint needs the model's tokenizer")
    hf = load_tokenizer(dst, f"model {str(model_dir)!r}")
    entry: dict[str, Any] = {"vocab_size": len(hf), "bos_id": _or(hf.bos_token_id), "eos_id": _or(hf.eos_token_id),
                             "pad_id": _or(hf.pad_token_id), "sha256": None, "sentencepiece": False,
                             "files": names, "source": str(model_dir)}
    spm_file = dst / "tokenizer.model"
    if not spm_file.is_file():
        entry["why_not_sentencepiece"] = "no tokenizer.model"
        return entry
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(spm_file))
    except Exception as e:  # noqa: BLE001
        entry["why_not_sentencepiece"] = f"tokenizer.model does not load in SentencePiece ({e})"
        return entry
    if sp.get_piece_size() != len(hf):
        entry["why_not_sentencepiece"] = (f"tokenizer.model has {sp.get_piece_size()} pieces, the HF tokenizer "
                                          f"{len(hf)} tokens")
        return entry
    digest = sha256_file(spm_file)
    entry.update(sha256=digest, sentencepiece=True, vocab_size=sp.get_piece_size(), bos_id=sp.bos_id(),
                 eos_id=sp.eos_id(), pad_id=sp.pad_id(), unk_id=sp.unk_id(), hf_parity=tokenizer_parity(sp, hf))
    # The tokenizer-dir contract (ARCHITECTURE.md) as `load_tokenizer_dir` reads it; the manifest says
    # this dir was imported, not trained.
    write_json(dst / "manifest.json", {
        "stage": stages.TOKENIZER_IMPORT,
        "imported_by": "domainlm convert from-hf",
        "fingerprint": sha256_json({"imported": digest, "files": {n: sha256_file(dst / n) for n in names}}),
        "config": {},
        "inputs": [{"path": str(model_dir), "files": names}],
        "tokenizer": {"model_type": "imported", "vocab_size": sp.get_piece_size(), "sha256": digest,
                      "unk_id": sp.unk_id(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id()},
    })
    return entry


def _or(i: int | None) -> int:
    return -1 if i is None else int(i)

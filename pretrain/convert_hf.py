"""The Hugging Face side of conversion: safetensors in and out, tokenizer files, generation config.

Weights are read from safetensors only: a pickled `pytorch_model.bin` can run code when loaded,
so such a model is refused with the one-line way to re-save it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from domainlm.errors import UserError
from domainlm.manifest import sha256_file, sha256_json, write_json
from domainlm.pretrain.config import ModelArgs

# Tokenizer files an HF model dir may hold (AutoTokenizer reads them; llama.cpp's converter reads
# tokenizer.model or tokenizer.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX = "model.safetensors.index.json"
CHAT_END = "<|im_end|>"


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files of `src` into `dst`; returns their names."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def load_tokenizer(path: Path, where: str):
    """transformers.AutoTokenizer of `path`, or UserError saying why it does not load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any failure to load is the user's tokenizer files
        raise UserError(f"{where}: the tokenizer files do not load in transformers.AutoTokenizer "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def stop_ids(tok) -> list[int]:
    """Ids that end a generation: eos, and the chat template's end-of-turn token when it has one."""
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    end = tok.convert_tokens_to_ids(CHAT_END) if CHAT_END in tok.get_vocab() else None
    if end is not None and end not in ids:
        ids.append(end)
    return ids


def generation_config(tok) -> dict[str, Any]:
    import transformers

    stops = stop_ids(tok)
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": stops if len(stops) > 1 else (stops or [None])[0],
            "pad_token_id": tok.pad_token_id, "transformers_version": transformers.__version__}


# -- safetensors out ----------------------------------------------------------------------------


def write_safetensors(weights: dict[str, torch.Tensor], out: Path, dtype: torch.dtype, max_shard: int) -> list[dict]:
    """Write `weights` (in order) as model.safetensors, or as shards no larger than `max_shard`
    bytes (a single larger tensor gets a shard of its own) with model.safetensors.index.json."""
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    groups: list[list[str]] = [[]]
    size = 0
    for name, t in weights.items():
        nbytes = t.numel() * itemsize
        if groups[-1] and size + nbytes > max_shard:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    n = len(groups)
    files = []
    weight_map = {}
    for i, names in enumerate(groups, 1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        # A fresh contiguous tensor each: the q/k/v and gate/up views share the fused storage,
        # which safetensors refuses.
        tensors = {k: torch.empty(weights[k].shape, dtype=dtype).copy_(weights[k]) for k in names}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        (out / fname).chmod(0o644)          # safetensors creates it owner-only; serve it like the rest
        files.append({"name": fname, "bytes": (out / fname).stat().st_size, "tensors": len(names)})
        weight_map.update({k: fname for k in names})
        del tensors
    if n > 1:
        total = sum(weights[k].numel() for k in weight_map) * itemsize
        write_json(out / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


# -- safetensors in -----------------------------------------------------------------------------


def read_config(model_dir: Path) -> dict[str, Any]:
    if not model_dir.is_dir():
        raise UserError(f"model {str(model_dir)!r} is not a directory; give a Hugging Face model directory")
    cfg = model_dir / "config.json"
    if not cfg.is_file():
        shown = ", ".join(sorted(p.name for p in model_dir.iterdir())[:5]) or "nothing"
        raise UserError(f"model {str(model_dir)!r} has no config.json (it holds {shown}), so it is not a "
                        "Hugging Face model directory")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{cfg}: not valid JSON ({e})") from None


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of an HF model dir; UserError for pickle-only or missing weights."""
    index = model_dir / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise UserError(f"{index}: not a safetensors index ({e})") from None
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise UserError(f"{index} lists {', '.join(missing[:3])}, which {'is' if len(missing) == 1 else 'are'} "
                            "missing; download the whole model")
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(
            f"model {str(model_dir)!r} has its weights only as pickle files ({', '.join(pickles[:3])}); domainlm "
            "reads safetensors only, as unpickling can run code: re-save it once where you trust the files, "
            "e.g. AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) (writes safetensors)")
    raise UserError(f"model {str(model_dir)!r} has no *.safetensors weights")


def expected_shapes(m: ModelArgs, vocab: int) -> dict[str, tuple[int, ...]]:
    from domainlm.pretrain.convert_mapping import hf_names

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

    from domainlm.pretrain.convert_mapping import IGNORED_HF_SUFFIXES

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
    from domainlm.pretrain.convert_verify import tokenizer_parity

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
    # The tokenizer-dir contract (DESIGN.md) as `load_tokenizer_dir` reads it; the manifest says
    # this dir was imported, not trained.
    write_json(dst / "manifest.json", {
        "stage": "tokenizer import",
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

"""`domainlm convert to-gguf`: the HF dir contract -> one GGUF file for llama.cpp, Ollama, LM Studio.

HF dir (checked through `hfdir.open_hf_dir`) -> the refusals, one line each, before any weight is
read: an output file that exists (without --overwrite), an architecture llama.cpp's `llama` graph
does not run as transformers does (RoPE scaling, biases, sliding windows, another activation), an
outtype a weight cannot take (q8_0 needs rows of whole 32-value blocks), a tokenizer with no
llama.cpp equivalent -> metadata, vocabulary and tensors written with gguf-py's GGUFWriter into a
hidden folder beside the output -> read back there by a reader that is not ours (transformers'
own GGUF loader: the model dequantized, the tokenizer rebuilt from the vocabulary) and compared
with the HF dir: logits within the outtype's bound, the same ids on held-out text, the same
special tokens and chat template -> renamed into place. A refused, failed or interrupted export
leaves nothing behind. (--adapter is merged first by `domainlm.finetune.to_gguf`, the command's
entry point: pretrain does not import finetune.)

Learned from llama.cpp's `convert_hf_to_gguf.py` (LlamaModel, TextModel) and done the same way:
the tensor names (`token_embd`, `blk.N.attn_q` ... `ffn_down`, `output_norm`, `output`, left out
when the embeddings are tied), q and k rows permuted into llama.cpp's rotary layout (`permute`,
k by the key/value heads), the `llama.*` hyperparameters, `general.file_type`, 1-D tensors and
norms kept F32, every other weight stored as the outtype (token_embd and output too); the
vocabulary padded with `[PADn]` UNUSED tokens to the embedding's rows; token types (CONTROL for
special added tokens, USER_DEFINED for other added tokens, BYTE for `<0xNN>`, UNKNOWN for unk).
Ours: the tokenizer kind and the BPE pre-tokenizer are read from `tokenizer.json`'s structure
(llama.cpp hashes the encoding of a test string against a table of known models, which a model
with a tokenizer of its own is not in); a q8_0 weight that is not whole blocks is refused, not
silently stored as F16; SentencePiece scores come from `tokenizer.model` when the dir has it,
else from the merge ranks; merges are written for the `llama` kind too (llama.cpp ignores them
there; readers that rebuild a BPE from the file, as transformers does, get the exact merge order).

Bounds (relative to the largest |logit| of the HF model, at least 1), measured on a tiny random
Llama (2 layers, width 64) and on SmolLM2-135M-Instruct and set with margin (README, "Export to
GGUF"): f32 1e-5 (measured 0: the same weights), f16 1e-2, bf16 5e-2, q8_0 1e-1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainlm import stages
from domainlm.errors import UserError
from domainlm.progress import log, summary
from domainlm.pretrain.convert.config import ToGGUFConfig

STAGE = stages.CONVERT_TO_GGUF
ARCH = "llama"
BOUNDS = {"f32": 1e-5, "f16": 1e-2, "bf16": 5e-2, "q8_0": 1e-1}
"""Largest logit difference allowed between the HF model and the GGUF read back, relative to
the largest |logit| (at least 1), per outtype."""
Q8_BLOCK = 32
F16_MAX = 65504.0
LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
"""HF Llama module names inside a layer -> llama.cpp's tensor names (gguf-py's TensorNameMap)."""
SKIPPED = ("rotary_emb.inv_freq",)
# llama.cpp's BPE pre-tokenizers (llama-vocab.cpp) that transformers' GGUF reader rebuilds, by the
# HF pre-tokenizer that splits text the same way.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _types():
    import gguf

    q = gguf.GGMLQuantizationType
    f = gguf.LlamaFileType
    return {"f32": (q.F32, f.ALL_F32), "f16": (q.F16, f.MOSTLY_F16), "bf16": (q.BF16, f.MOSTLY_BF16),
            "q8_0": (q.Q8_0, f.MOSTLY_Q8_0)}


# -- the refusals, before any weight is read ---------------------------------------------------------


def check_output(cfg: ToGGUFConfig) -> Path:
    """The output path: a .gguf file name whose file does not exist (unless --overwrite)."""
    out = Path(cfg.output).expanduser()
    if out.is_dir():
        raise UserError(f"--output {cfg.output!r} is a directory; give a file name ending in .gguf")
    if out.exists() and not cfg.overwrite:
        raise UserError(f"--output {cfg.output!r} exists; pass --overwrite to replace it (the new file is "
                        "written and verified beside it first)")
    if out.parent.exists() and not out.parent.is_dir():
        raise UserError(f"--output {cfg.output!r}: {str(out.parent)!r} is not a directory")
    return out


def check_model(path: str):
    """The HF dir, checked for what the `llama` GGUF graph runs exactly as transformers does."""
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    hf = open_hf_dir(path)
    hf.require_llama_family("convert to-gguf")
    c = hf.config
    where = f"model {str(hf.path)!r}"
    rope = c.get("rope_scaling") or {}
    params = c.get("rope_parameters") or {}
    kind = rope.get("rope_type") or rope.get("type") or params.get("rope_type") or "default"
    if kind != "default":
        raise UserError(f"{where} uses RoPE scaling ({kind!r}); convert to-gguf writes plain RoPE only, so "
                        "llama.cpp would run another model")
    if c.get("sliding_window") not in (None, 0) and hf.model_type == "mistral":
        raise UserError(f"{where} uses sliding-window attention ({c['sliding_window']}); llama.cpp's `llama` "
                        "graph has none")
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise UserError(f"{where} has {key} true; the `llama` GGUF this writes has no bias tensors")
    act = c.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where} uses activation {act!r}; llama.cpp's `llama` graph is SwiGLU (silu)")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        if not isinstance(c.get(key), int) or c[key] <= 0:
            raise UserError(f"{where}: config.json has no valid {key}")
    return hf


def head_dim(c: dict[str, Any]) -> int:
    return int(c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])


def check_outtype(c: dict[str, Any], outtype: str, where: str) -> None:
    """q8_0 stores each weight row in blocks of 32 values: every row length must be a whole number
    of blocks (llama.cpp would store such a tensor as F16 instead; we refuse, so the file is the
    type asked for)."""
    if outtype != "q8_0":
        return
    rows = {"hidden_size (token_embd, attn_q/k/v, ffn_gate/up, output)": c["hidden_size"],
            "attention width heads x head_dim (attn_output)": c["num_attention_heads"] * head_dim(c),
            "intermediate_size (ffn_down)": c["intermediate_size"]}
    bad = [f"{k} = {v}" for k, v in rows.items() if v % Q8_BLOCK]
    if bad:
        raise UserError(f"--outtype q8_0: {where} has weight rows that are not whole blocks of {Q8_BLOCK} values "
                        f"({'; '.join(bad)}); use --outtype f16, bf16 or f32")


# -- the vocabulary ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Vocab:
    """The tokenizer as llama.cpp reads it (tokenizer.ggml.*)."""

    model: str
    """'llama' (SentencePiece-style: scores, '▁' for spaces, byte fallback) or 'gpt2' (byte-level BPE)."""
    pre: str | None
    """The BPE pre-tokenizer llama.cpp splits text with ('gpt2' kind only)."""
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str]
    special: dict[str, int | None]
    """bos, eos, unk, pad, eot ids."""
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str | None
    scores_from: str = ""
    padded: int = 0
    """[PADn] tokens added up to the embedding's rows."""
    counts: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        kind = (f"llama (SentencePiece-style BPE, scores from {self.scores_from}, space prefix "
                f"{'yes' if self.add_space_prefix else 'no'})" if self.model == "llama"
                else f"gpt2 (byte-level BPE, pre-tokenizer {self.pre!r})")
        extra = f", {self.padded} [PAD] rows" if self.padded else ""
        return f"{kind}, {len(self.tokens):,} tokens, {len(self.merges):,} merges{extra}"


def _merge_text(m) -> str:
    a, b = (m.split(" ", 1) if isinstance(m, str) else m)
    if " " in a or " " in b:
        raise UserError(f"the tokenizer has a merge of a piece holding a space ({a!r} + {b!r}); GGUF merges are "
                        "written 'A B', so it cannot be stored")
    return f"{a} {b}"


def _pre_tokenizer(pre: dict | None, where: str) -> str:
    """llama.cpp's name for the HF pre-tokenizer of a byte-level BPE (refused when it has none)."""

    def level(p, regex: bool) -> bool:
        return p.get("type") == "ByteLevel" and bool(p.get("use_regex", True)) == regex and \
            not p.get("add_prefix_space", False)

    def split(p, pattern: str) -> bool:
        return p.get("type") == "Split" and (p.get("pattern") or {}).get("Regex") == pattern and \
            str(p.get("behavior", "")).lower() == "isolated" and not p.get("invert", False)

    parts = (pre or {}).get("pretokenizers") if (pre or {}).get("type") == "Sequence" else [pre] if pre else []
    if len(parts) == 1 and level(parts[0], True):
        return "gpt-2"
    if len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits") and \
            level(parts[1], True):
        return "smollm"
    if len(parts) == 2 and level(parts[1], False):
        if split(parts[0], LLAMA3_SPLIT):
            return "llama-bpe"
        if split(parts[0], QWEN2_SPLIT):
            return "qwen2"
    shown = json.dumps(pre, separators=(",", ":"))[:160] if pre else "none"
    raise UserError(f"{where}: its byte-level BPE pre-tokenizer ({shown}) is none of those domainlm maps to "
                    "llama.cpp's (ByteLevel: gpt-2; Digits + ByteLevel: smollm; the Llama 3 split: llama-bpe; "
                    "the Qwen2 split: qwen2), so llama.cpp would split text otherwise")


def _sentencepiece_style(data: dict) -> tuple[bool, bool]:
    """(whether tokenizer.json is a SentencePiece-style BPE, whether it prepends '▁' to the text)."""
    norm = data.get("normalizer") or {}
    pre = data.get("pre_tokenizer") or {}
    norms = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
    replace = any(n.get("type") == "Replace" and (n.get("pattern") or {}).get("String") == " " and
                  n.get("content") == "▁" for n in norms)
    prepend = any(n.get("type") == "Prepend" and n.get("prepend") == "▁" for n in norms)
    if pre.get("type") == "Metaspace" and pre.get("replacement", "▁") == "▁":
        return not norms, pre.get("prepend_scheme", "always") != "never"
    return replace and not pre, prepend


def build_vocab(hf, tok, rows: int) -> Vocab:
    """The HF dir's tokenizer as tokenizer.ggml.* (UserError for one llama.cpp cannot hold)."""
    from domainlm.pretrain.convert.hfdir import CHAT_END

    import gguf

    T = gguf.TokenType
    where = f"model {str(hf.path)!r}"
    if not getattr(tok, "is_fast", False):
        raise UserError(f"{where}: its tokenizer has no tokenizer.json (a fast tokenizer); convert to-gguf reads "
                        "the vocabulary from it")
    data = json.loads(tok.backend_tokenizer.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        why = (" (a unigram SentencePiece model: llama.cpp's `llama` tokenizer merges pieces by score, which is "
               "not unigram's segmentation; train the tokenizer with --model-type bpe)"
               if model.get("type") == "Unigram" else "")
        raise UserError(f"{where}: its tokenizer is a {model.get('type') or '?'} model{why}; convert to-gguf "
                        "writes BPE vocabularies (SentencePiece-style as `llama`, byte-level as `gpt2`)")
    vocab = tok.get_vocab()
    if len(vocab) > rows:
        raise UserError(f"{where}: its tokenizer has {len(vocab)} tokens but the model {rows} embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in data.get("added_tokens", [])}
    pre = data.get("pre_tokenizer")
    byte_level = any(p.get("type") == "ByteLevel" for p in
                     ((pre or {}).get("pretokenizers") or [pre] if pre else []))
    sp_style, prefix = _sentencepiece_style(data)
    if byte_level:
        kind, pre_name = "gpt2", _pre_tokenizer(pre, where)
    elif sp_style and model.get("byte_fallback"):
        kind, pre_name = "llama", "default"
    else:
        raise UserError(f"{where}: its BPE tokenizer is neither byte-level (GPT-2 style) nor SentencePiece-style "
                        "(spaces as '▁' with byte fallback); llama.cpp has no tokenizer that splits text as it does")
    merges = [_merge_text(m) for m in model.get("merges", [])]
    unk = tok.unk_token_id
    tokens, types = [], []
    for i in range(rows):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(t)
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        elif kind == "llama" and BYTE_PIECE.fullmatch(t):
            tokens.append(t)
            types.append(T.BYTE)
        else:
            tokens.append(t)
            types.append(T.UNKNOWN if i == unk else T.NORMAL)
    scores, scores_from = None, ""
    if kind == "llama":                 # added and padding tokens: -1000, as llama.cpp's converter gives them
        scores, scores_from = _scores(hf.path, tokens, merges)
        scores = [-1000.0 if t in (T.CONTROL, T.USER_DEFINED, T.UNUSED) else s for s, t in zip(scores, types)]
    ids = tok("a")["input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    end = tok.convert_tokens_to_ids(CHAT_END) if CHAT_END in vocab else None
    counts = {T(t).name: n for t, n in sorted(_count(types).items())}
    return Vocab(model=kind, pre=pre_name, tokens=tokens, types=[int(t) for t in types], scores=scores,
                 merges=merges, special={"bos": bos, "eos": eos, "unk": unk, "pad": tok.pad_token_id,
                                         "eot": end if end is not None and end != eos else None},
                 add_bos=bos is not None and ids[:1] == [bos], add_eos=eos is not None and ids[-1:] == [eos],
                 add_space_prefix=prefix if kind == "llama" else None, chat_template=hf.chat_template,
                 scores_from=scores_from, padded=rows - len(vocab), counts=counts)


def _count(xs) -> dict:
    out: dict = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def _scores(path: Path, tokens: list[str], merges: list[str]) -> tuple[list[float], str]:
    """SentencePiece scores: the model's own (tokenizer.model, when its pieces are the vocabulary),
    else from the merges (a piece's score falls with the rank of the first merge that makes it;
    pieces no merge makes score below all of them, bytes and specials 0)."""
    spm = path / "tokenizer.model"
    if spm.is_file():
        try:
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=str(spm))
            n = sp.get_piece_size()
            if n <= len(tokens) and all(sp.id_to_piece(i) == tokens[i] for i in range(n)):
                return [float(sp.get_score(i)) if i < n else 0.0 for i in range(len(tokens))], "tokenizer.model"
        except (ImportError, OSError, RuntimeError):
            pass
    rank: dict[str, int] = {}
    for r, m in enumerate(merges):
        rank.setdefault(m.replace(" ", "", 1), r)
    low = -float(len(merges) + 1)
    return [(-float(rank[t]) if t in rank else low if len(t) > 1 and not BYTE_PIECE.fullmatch(t) else 0.0)
            for t in tokens], "the merge ranks"


# -- the tensors ------------------------------------------------------------------------------------


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name of an HF Llama weight (None: not written); UserError for one it has none for."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    if hf_name.endswith(SKIPPED):
        return None
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight)", hf_name)
    if m and m.group(2) in LAYER:
        return f"blk.{m.group(1)}.{LAYER[m.group(2)]}.weight"
    raise UserError(f"the model holds a weight llama.cpp's `llama` graph has no place for: {hf_name}")


def permute(w, n_head: int):
    """llama.cpp's row order for q and k (convert_hf_to_gguf's LlamaModel.permute): HF's rotary
    pairs the two halves of each head; llama.cpp's pairs adjacent rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass(slots=True)
class Planned:
    name: str
    hf_name: str
    tensor: Any
    qtype: Any
    heads: int | None


def plan_tensors(state: dict, c: dict[str, Any], outtype: str) -> list[Planned]:
    """What is written, in llama.cpp's order: token_embd, the blocks, output_norm, output."""
    import gguf

    F32 = gguf.GGMLQuantizationType.F32
    qtype = _types()[outtype][0]
    tied = bool(c.get("tie_word_embeddings"))
    out: list[Planned] = []
    for hf_name, t in state.items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = gguf_name(hf_name)
        if name is None:
            continue
        heads = (c["num_attention_heads"] if name.endswith("attn_q.weight") else
                 c.get("num_key_value_heads") or c["num_attention_heads"] if name.endswith("attn_k.weight") else None)
        keep_f32 = t.dim() <= 1 or name.endswith("_norm.weight")
        out.append(Planned(name, hf_name, t, F32 if keep_f32 else qtype, heads))

    def order(p: Planned):
        if p.name.startswith("blk."):
            return (1, int(p.name.split(".")[1]), p.name)
        return ({"token_embd.weight": 0, "output_norm.weight": 2, "output.weight": 3}[p.name], 0, p.name)

    return sorted(out, key=order)


def _array(p: Planned, outtype: str):
    """The tensor as gguf-py stores it (float32 rows permuted, then converted or quantized)."""
    import gguf
    import numpy as np
    import torch

    w = p.tensor.detach().to(torch.float32).contiguous().numpy()
    if p.heads:
        w = permute(w, p.heads)
    if p.qtype == gguf.GGMLQuantizationType.F16:
        big = float(np.abs(w).max()) if w.size else 0.0
        if big > F16_MAX:
            raise UserError(f"--outtype {outtype}: {p.hf_name} holds values up to {big:.4g}, beyond float16's "
                            f"{F16_MAX:g}; use --outtype bf16 or f32")
    return np.ascontiguousarray(gguf.quants.quantize(w, p.qtype))


def write_gguf(path: Path, c: dict[str, Any], vocab: Vocab, planned: list[Planned], outtype: str,
               name: str) -> dict[str, int]:
    """The file: metadata (general.*, llama.*, tokenizer.*), tensor infos, then each tensor
    converted as it is written (at most one converted tensor in memory)."""
    import gguf
    import numpy as np

    qtype, ftype = _types()[outtype]
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_size_label(gguf.size_label(sum(int(np.prod(tuple(p.tensor.shape))) for p in planned), 0, 0, 0))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(int(ftype))
    w.add_vocab_size(int(c["vocab_size"]))
    w.add_context_length(int(c.get("max_position_embeddings") or 2048))
    w.add_embedding_length(int(c["hidden_size"]))
    w.add_block_count(int(c["num_hidden_layers"]))
    w.add_feed_forward_length(int(c["intermediate_size"]))
    w.add_head_count(int(c["num_attention_heads"]))
    w.add_head_count_kv(int(c.get("num_key_value_heads") or c["num_attention_heads"]))
    w.add_rope_dimension_count(head_dim(c))
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    w.add_rope_freq_base(float(theta))
    w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps") or 1e-6))
    if c.get("head_dim"):
        w.add_key_length(head_dim(c))
        w.add_value_length(head_dim(c))
    w.add_tokenizer_model(vocab.model)
    if vocab.pre:
        w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    if vocab.merges:
        w.add_token_merges(vocab.merges)
    setters = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
               "pad": w.add_pad_token_id, "eot": w.add_eot_token_id}
    for key, fn in setters.items():
        if vocab.special.get(key) is not None:
            fn(int(vocab.special[key]))
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)
    written: dict[str, int] = {}
    for p in planned:
        shape = tuple(p.tensor.shape)
        if p.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            dt = np.float32 if p.qtype == gguf.GGMLQuantizationType.F32 else np.float16
            w.add_tensor_info(p.name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
        else:
            raw = gguf.quant_shape_to_byte_shape(shape, p.qtype)
            w.add_tensor_info(p.name, raw, np.dtype(np.uint8), int(np.prod(raw)), raw_dtype=p.qtype)
        written[p.qtype.name] = written.get(p.qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for p in planned:
        w.write_tensor_data(_array(p, outtype))
    w.close()
    return dict(sorted(written.items()))


# -- the verification: transformers' GGUF loader reads the file back ----------------------------------


def verify(path: Path, reference, tok, vocab: Vocab, c: dict[str, Any], cfg: ToGGUFConfig) -> dict[str, Any]:
    """The GGUF read back by transformers (model dequantized to float32, tokenizer rebuilt) against
    the HF dir's model and tokenizer. The report has `convert to-hf`'s shape (`verify.describe`
    reads it), plus `tokenizer` and `config` sections."""
    from domainlm.pretrain.convert.gguf import _load_model, _load_tokenizer, logit_rows, prompt_ids, reading_once

    with reading_once():
        back = _load_model(path)
        btok = _load_tokenizer(path)
    config = _config_mismatches(back.config, c)
    tokenizer = compare_tokenizers(tok, btok, vocab, cfg.checks.texts)
    inputs = [(p, prompt_ids(tok, p), True) for p in cfg.checks.prompts]     # chat-rendered
    inputs += [(t, tok(t, add_special_tokens=False)["input_ids"], False) for t in cfg.checks.texts[:2]]
    rows, worst, scale = logit_rows(reference, back, tok, inputs, cfg.checks.new_tokens, key="gguf_ids")
    bound = BOUNDS[cfg.outtype]
    greedy = [r for r in rows if "greedy_identical" in r]
    logits_ok = worst <= bound * scale
    return {"dtype": cfg.outtype, "reference": "the HF dir (float32) against the GGUF read back by transformers' "
                                               "GGUF loader (dequantized to float32)",
            "max_abs_diff": worst, "max_abs_logit": scale, "relative_diff": worst / scale,
            "relative_tolerance": bound, "tolerance": bound * scale,
            "passed": logits_ok and tokenizer["passed"] and not config, "logits_passed": logits_ok,
            "greedy_identical": all(r["greedy_identical"] for r in greedy), "new_tokens": cfg.checks.new_tokens,
            "prompts": greedy, "logit_texts": [r for r in rows if "greedy_identical" not in r],
            "tokenizer": tokenizer, "config_mismatches": config}


def _config_mismatches(back, c: dict[str, Any]) -> list[str]:
    """The hyperparameters transformers read from the GGUF, against config.json."""
    theta = (getattr(back, "rope_parameters", None) or {}).get("rope_theta", getattr(back, "rope_theta", None))
    got = {"num_hidden_layers": back.num_hidden_layers, "hidden_size": back.hidden_size,
           "intermediate_size": back.intermediate_size, "num_attention_heads": back.num_attention_heads,
           "num_key_value_heads": back.num_key_value_heads, "vocab_size": back.vocab_size,
           "head_dim": getattr(back, "head_dim", None), "tie_word_embeddings": bool(back.tie_word_embeddings),
           "max_position_embeddings": back.max_position_embeddings, "rope_theta": float(theta or 0)}
    want = {"num_hidden_layers": c["num_hidden_layers"], "hidden_size": c["hidden_size"],
            "intermediate_size": c["intermediate_size"], "num_attention_heads": c["num_attention_heads"],
            "num_key_value_heads": c.get("num_key_value_heads") or c["num_attention_heads"],
            "vocab_size": c["vocab_size"], "head_dim": head_dim(c),
            "tie_word_embeddings": bool(c.get("tie_word_embeddings")),
            "max_position_embeddings": c.get("max_position_embeddings") or 2048,
            "rope_theta": float(c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0)}
    out = [f"{k}: {got[k]} read back, {want[k]} in config.json" for k in want if got[k] != want[k]]
    if abs(back.rms_norm_eps - float(c.get("rms_norm_eps") or 1e-6)) > 1e-9:
        out.append(f"rms_norm_eps: {back.rms_norm_eps} read back, {c.get('rms_norm_eps')} in config.json")
    return out


def compare_tokenizers(tok, back, vocab: Vocab, texts: list[str]) -> dict[str, Any]:
    """Ids of held-out texts (without and with the special tokens the tokenizer adds), the
    special tokens and the chat template: the HF dir's tokenizer against the one rebuilt from the
    GGUF."""
    chat = [tok.apply_chat_template([{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}],
                                    tokenize=False)] if tok.chat_template else []
    samples = list(texts) + chat
    bad, tokens = [], 0
    for t in samples:
        a = tok(t, add_special_tokens=False)["input_ids"]
        b = back(t, add_special_tokens=False)["input_ids"]
        tokens += len(a)
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            bad.append({"text": t[:60], "at": at, "hf": a[at:at + 4], "gguf": b[at:at + 4]})
    with_special = tok(samples[0])["input_ids"] == back(samples[0])["input_ids"]
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    specials = {n: (getattr(tok, n), getattr(back, n)) for n in names}
    special_bad = [f"{n}: {a!r} -> {b!r}" for n, (a, b) in specials.items() if a is not None and a != b]
    template_same = (back.chat_template or None) == (vocab.chat_template or None)
    passed = not bad and with_special and not special_bad and template_same
    return {"texts": len(samples), "tokens": tokens, "id_mismatches": len(bad), "mismatches": bad[:3],
            "special_tokens_added_identically": with_special, "special_token_mismatches": special_bad,
            "chat_template_identical": template_same, "passed": passed}


def describe(report: dict[str, Any]) -> str:
    from domainlm.pretrain.convert.verify import describe as logits_line

    t = report["tokenizer"]
    tok = (f"tokenizer ids identical on {t['texts']} held-out texts ({t['tokens']} tokens)" if not t["id_mismatches"]
           else f"tokenizer ids DIFFER on {t['id_mismatches']}/{t['texts']} texts (first: {t['mismatches'][0]})")
    if t["special_token_mismatches"]:
        tok += f"; special tokens differ: {', '.join(t['special_token_mismatches'])}"
    if not t["special_tokens_added_identically"]:
        tok += "; bos/eos added differently"
    tok += ", chat template identical" if t["chat_template_identical"] else ", chat template DIFFERS"
    cfg = f"; config read back differs: {'; '.join(report['config_mismatches'])}" if report["config_mismatches"] else ""
    return f"{logits_line(report)}; {tok}{cfg}"


# -- the command ------------------------------------------------------------------------------------


class Staging:
    """A hidden folder beside the output (same file system, so the finished file is renamed into
    place atomically); removed on exit whatever happened, with the output's folder if this
    export created it."""

    def __init__(self, out: Path):
        self.out = out
        self.created: list[Path] = []
        d = out.parent
        while not d.exists():
            self.created.append(d)
            d = d.parent
        out.parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        self.file = self.dir / out.name
        self.done = False

    def __enter__(self) -> "Staging":
        return self

    def commit(self) -> None:
        os.replace(self.file, self.out)
        self.done = True

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if not self.done:
            for d in self.created:               # deepest first
                try:
                    d.rmdir()
                except OSError:
                    break


def export(cfg: ToGGUFConfig, model_dir: str | None = None, merged: dict[str, Any] | None = None,
           staging: Staging | None = None) -> dict[str, Any]:
    """Entry point of the work (`domainlm.finetune.to_gguf` calls it, after merging an adapter into
    `model_dir` inside `staging`); returns what the summary shows."""
    from domainlm.pretrain.convert.command import load_hf_model

    import torch

    t0 = time.perf_counter()
    out = check_output(cfg)
    if cfg.adapter and model_dir is None:
        raise UserError("--adapter needs the merge of `domainlm.finetune.to_gguf` (the `convert to-gguf` command)")
    hf = check_model(model_dir or cfg.model)
    check_outtype(hf.config, cfg.outtype, f"model {cfg.model!r}")
    own = staging is None
    staging = staging or Staging(out)
    timing: dict[str, float] = {}
    try:
        t = time.perf_counter()
        tok = hf.tokenizer()
        c = hf.config
        vocab = build_vocab(hf, tok, int(c["vocab_size"]))
        model = load_hf_model(hf.path, torch.float32)
        planned = plan_tensors(model.state_dict(), c, cfg.outtype)
        timing["load_s"] = time.perf_counter() - t
        t = time.perf_counter()
        name = cfg.name or (Path(cfg.model).resolve().name if not cfg.adapter else
                            f"{Path(cfg.model).resolve().name}+{Path(cfg.adapter).resolve().name}")
        log.info("convert: writing %s (%s, %d tensors, %s)", out, cfg.outtype, len(planned), vocab.describe())
        types = write_gguf(staging.file, c, vocab, planned, cfg.outtype, name)
        del planned
        timing["write_s"] = time.perf_counter() - t
        report = None
        if cfg.verify:
            t = time.perf_counter()
            report = verify(staging.file, model, tok, vocab, c, cfg)
            timing["verify_s"] = time.perf_counter() - t
            log.info("verify: %s", describe(report))
            if not report["passed"]:
                raise UserError(f"verification failed, nothing written to {cfg.output!r}: {describe(report)}")
        size = staging.file.stat().st_size
        params = sum(p.numel() for n, p in model.state_dict().items()
                     if not (c.get("tie_word_embeddings") and n == "lm_head.weight"))
        del model
        staging.commit()
    finally:
        if own:
            staging.__exit__(None, None, None)
    timing["total_s"] = time.perf_counter() - t0
    result = {"stage": STAGE, "output": str(out), "bytes": size, "outtype": cfg.outtype, "tensor_types": types,
              "tensors": sum(types.values()), "parameters": params, "vocab": vocab, "verification": report,
              "model": str(hf.path) if not merged else cfg.model, "merged": merged, "name": name, "timing": timing}
    _summary(cfg, result)
    return result


def _summary(cfg: ToGGUFConfig, r: dict[str, Any]) -> None:
    v: Vocab = r["vocab"]
    report = r["verification"]
    timing = r["timing"]
    merge_s = float((r["merged"] or {}).get("seconds", 0.0))
    rows = [("model", r["model"] + (f" + adapter {cfg.adapter} (merged: {r['merged']['line']})" if r["merged"] else "")),
            ("file", f"{r['output']} ({r['bytes'] / 1e6:,.1f} MB, general.name {r['name']!r})"),
            ("outtype", f"{r['outtype']}: " + ", ".join(f"{k} x{n}" for k, n in r["tensor_types"].items())
             + f" ({r['tensors']} tensors, {r['parameters']:,} parameters)"),
            ("tokenizer", v.describe() + f"; bos {v.special['bos']}, eos {v.special['eos']}"
             + (f", eot {v.special['eot']}" if v.special.get("eot") is not None else "")
             + f", pad {v.special['pad']}, add_bos {v.add_bos}"),
            ("chat template", "tokenizer.chat_template" if v.chat_template else
             "NONE: llama.cpp falls back to its default template; give the HF dir a chat_template.jinja"),
            ("verification", describe(report) if report else "skipped (--no-verify)")]
    for p in (report or {}).get("prompts", []):
        rows.append((f"answer {p['prompt'][:24]!r}", repr(p["sample"][:100])))
    rows += [("run it", f"llama-server -m {r['output']}  (or an Ollama Modelfile: FROM {r['output']})"),
             ("time", f"{timing['total_s'] + merge_s:.1f}s ("
                      + (f"merge {merge_s:.1f}s, " if r["merged"] else "")
                      + f"load {timing['load_s']:.1f}s, write {timing['write_s']:.1f}s"
                      + (f", verify {timing['verify_s']:.1f}s)" if "verify_s" in timing else ")"))]
    summary(f"domainlm {STAGE}", rows)

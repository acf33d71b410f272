"""Megatron-core GPTModel (Llama layer spec, TP=1 names) <-> transformers LlamaForCausalLM.

The one place that knows both layouts. Names map one to one except for two fused matrices:

- `self_attention.linear_qkv.weight` is [ng * (q_per_group + 2) * hd, d]: for each of the ng
  query groups, that group's q_per_group query heads, then its key head, then its value head
  (megatron's SelfAttention.get_query_key_value_tensors views the projection as
  [ng, (q_per_group + 2) * hd] and splits each group q | k | v). Llama keeps q_proj
  [heads * hd, d], k_proj and v_proj [ng * hd, d] with heads in order, so query head h belongs to
  group h // q_per_group in both.
- `mlp.linear_fc1.weight` is [2 * ffn, d] = [gate; up]: megatron's gated linear unit chunks the
  output in two and applies the activation to the first half (MLP.forward's glu); megatron's
  checkpoints keep that order at any TP (apply_swiglu_sharded_factory), so TP=1 names suffice.

Megatron pads the embedding and output rows (vocab padding); Llama has exactly the tokenizer's
rows. Tied embeddings: megatron has no output_layer weight, Llama no lm_head in its files.
Also: the HF config.json written for the export, and the checks that decide which HF models
convert back (`model_args_from_hf`).
"""

from __future__ import annotations

from typing import Any

import torch

from domainlm.errors import UserError
from domainlm.pretrain.config import ModelArgs

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
SUPPORTED_TEXT = ("LlamaForCausalLM (Llama 1, 2, 3 and 3-style models without RoPE scaling, TinyLlama, "
                  "domainlm exports) and MistralForCausalLM with sliding_window null (Mistral 7B v0.2/v0.3)")
# Buffers old transformers versions saved with the weights; recomputed from rope_theta.
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def _layer_pairs(i: int) -> list[tuple[str, str]]:
    """(megatron, HF) names of one layer's unfused tensors."""
    p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
    return [(p + "input_layernorm.weight", q + "input_layernorm.weight"),
            (p + "self_attention.linear_proj.weight", q + "self_attn.o_proj.weight"),
            (p + "pre_mlp_layernorm.weight", q + "post_attention_layernorm.weight"),
            (p + "mlp.linear_fc2.weight", q + "mlp.down_proj.weight")]


def hf_names(m: ModelArgs) -> list[str]:
    """Every weight name of the HF checkpoint, in the order written."""
    names = ["model.embed_tokens.weight"]
    for i in range(m.num_layers):
        q = f"model.layers.{i}."
        names += [q + "input_layernorm.weight", q + "self_attn.q_proj.weight", q + "self_attn.k_proj.weight",
                  q + "self_attn.v_proj.weight", q + "self_attn.o_proj.weight",
                  q + "post_attention_layernorm.weight", q + "mlp.gate_proj.weight", q + "mlp.up_proj.weight",
                  q + "mlp.down_proj.weight"]
    names.append("model.norm.weight")
    if not m.tie_embeddings:
        names.append("lm_head.weight")
    return names


def megatron_names(m: ModelArgs) -> list[str]:
    """Every weight of the TP=1 megatron model's state dict (its `_extra_state` entries aside)."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        names += [p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight",
                  p + "self_attention.linear_proj.weight", p + "pre_mlp_layernorm.weight",
                  p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    names.append("decoder.final_layernorm.weight")
    if not m.tie_embeddings:
        names.append("output_layer.weight")
    return names


def _heads(m: ModelArgs) -> tuple[int, int, int, int]:
    d, heads, groups = m.hidden_size, m.num_attention_heads, m.num_query_groups
    return d, groups, heads // groups, d // heads


def to_hf(sd: dict[str, torch.Tensor], m: ModelArgs, vocab: int) -> dict[str, torch.Tensor]:
    """Megatron TP=1 state dict -> Llama state dict (views where possible), `vocab` rows kept."""
    d, groups, per, hd = _heads(m)
    out = {"model.embed_tokens.weight": sd["embedding.word_embeddings.weight"][:vocab]}
    for i in range(m.num_layers):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = sd[p + "self_attention.linear_qkv.weight"].view(groups, (per + 2) * hd, d)
        out[q + "self_attn.q_proj.weight"] = qkv[:, : per * hd].reshape(groups * per * hd, d)
        out[q + "self_attn.k_proj.weight"] = qkv[:, per * hd: (per + 1) * hd].reshape(groups * hd, d)
        out[q + "self_attn.v_proj.weight"] = qkv[:, (per + 1) * hd:].reshape(groups * hd, d)
        gate, up = sd[p + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[q + "mlp.gate_proj.weight"], out[q + "mlp.up_proj.weight"] = gate, up
        for src, dst in _layer_pairs(i):
            out[dst] = sd[src]
    out["model.norm.weight"] = sd["decoder.final_layernorm.weight"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = sd["output_layer.weight"][:vocab]
    return {k: out[k] for k in hf_names(m)}


def from_hf(hf: dict[str, torch.Tensor], m: ModelArgs, padded_vocab: int) -> dict[str, torch.Tensor]:
    """Llama state dict -> megatron TP=1 state dict with `padded_vocab` rows (extra rows zero)."""
    d, groups, per, hd = _heads(m)
    out = {"embedding.word_embeddings.weight": _rows(hf["model.embed_tokens.weight"], padded_vocab)}
    for i in range(m.num_layers):
        p, q = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = torch.cat([hf[q + "self_attn.q_proj.weight"].reshape(groups, per * hd, d),
                         hf[q + "self_attn.k_proj.weight"].reshape(groups, hd, d),
                         hf[q + "self_attn.v_proj.weight"].reshape(groups, hd, d)], dim=1)
        out[p + "self_attention.linear_qkv.weight"] = qkv.reshape(groups * (per + 2) * hd, d)
        out[p + "mlp.linear_fc1.weight"] = torch.cat([hf[q + "mlp.gate_proj.weight"], hf[q + "mlp.up_proj.weight"]])
        for src, dst in _layer_pairs(i):
            out[src] = hf[dst]
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not m.tie_embeddings:
        out["output_layer.weight"] = _rows(hf["lm_head.weight"], padded_vocab)
    return out


def _rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.size(0) >= rows:
        return t[:rows]
    return torch.cat([t, t.new_zeros(rows - t.size(0), *t.shape[1:])])


# -- HF config.json -----------------------------------------------------------------------------

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config(m: ModelArgs, *, vocab: int, seq_len: int, dtype: torch.dtype, bos_id: int | None,
              eos_id: int | None, pad_id: int | None) -> dict[str, Any]:
    """config.json of the export, written in the legacy spelling (top-level rope_theta,
    torch_dtype) that transformers 4.x, vLLM and llama.cpp's converter read and 5.x standardizes."""
    import transformers

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": seq_len,
        "initializer_range": m.init_std,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": float(m.rotary_base),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "tie_word_embeddings": bool(m.tie_embeddings),
        "use_cache": True,
        "bos_token_id": _id(bos_id),
        "eos_token_id": _id(eos_id),
        "pad_token_id": _id(pad_id),
        "torch_dtype": DTYPE_NAMES[dtype],
        "transformers_version": transformers.__version__,
    }


def _id(i: int | None) -> int | None:
    return None if i is None or i < 0 else int(i)


# -- which HF models convert back ----------------------------------------------------------------


def _rope(cfg: dict[str, Any]) -> tuple[float, str | None]:
    """(theta, scaling type or None) from the 4.x (rope_theta, rope_scaling) or 5.x
    (rope_parameters) spelling."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = None
    for section in (scaling, params):
        t = section.get("rope_type", section.get("type"))
        if t not in (None, "default"):
            kind = t
    return float(theta), kind


def model_args_from_hf(cfg: dict[str, Any], where: str) -> ModelArgs:
    """ModelArgs of an HF config.json, or UserError naming what domainlm's model cannot hold.

    make_vocab_size_divisible_by is left empty for the caller (it depends on the tokenizer)."""
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else cfg.get("model_type", "unknown")
    if len(archs) != 1 or arch not in SUPPORTED_ARCHITECTURES or cfg.get("model_type") != SUPPORTED_ARCHITECTURES[arch]:
        raise UserError(f"{where}: architecture {arch!r} (model_type {cfg.get('model_type')!r}) is not supported; "
                        f"domainlm converts {SUPPORTED_TEXT}")
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (the model uses SwiGLU: silu)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            problems.append(f"{key}=true (the model has no biases)")
    if cfg.get("quantization_config"):
        problems.append("quantization_config (quantized weights; give the unquantized model)")
    if cfg.get("sliding_window") is not None and arch == "MistralForCausalLM":
        problems.append(f"sliding_window={cfg['sliding_window']} (sliding-window attention is not implemented; "
                        "Mistral 7B v0.2/v0.3 have it null)")
    theta, scaling = _rope(cfg)
    if scaling:
        problems.append(f"RoPE scaling type {scaling!r} (only plain RoPE is implemented; Llama 3.1+ "
                        "'llama3', linear, dynamic and YaRN scaling are not)")
    try:
        d, heads, layers = int(cfg["hidden_size"]), int(cfg["num_attention_heads"]), int(cfg["num_hidden_layers"])
        ffn, vocab = int(cfg["intermediate_size"]), int(cfg["vocab_size"])
    except KeyError as e:
        raise UserError(f"{where}: no {e.args[0]!r}; the config.json is incomplete") from None
    groups = int(cfg.get("num_key_value_heads") or heads)
    if d % heads or heads % groups:
        problems.append(f"hidden_size={d}, num_attention_heads={heads}, num_key_value_heads={groups} "
                        "(heads must divide the width and key/value heads the heads)")
    elif cfg.get("head_dim") not in (None, d // heads):
        problems.append(f"head_dim={cfg['head_dim']} != hidden_size/num_attention_heads={d // heads}")
    if problems:
        raise UserError(f"{where}: {arch} with " + "; ".join(problems) + " cannot be converted")
    return ModelArgs(num_layers=layers, hidden_size=d, num_attention_heads=heads, num_query_groups=groups,
                     ffn_hidden_size=ffn, rotary_base=theta, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                     init_std=float(cfg.get("initializer_range", 0.02)))


def auto_divisible_by(vocab: int) -> int:
    """The largest power of two up to 128 that divides `vocab`: padded_vocab (a multiple of
    lcm(this, TP)) then equals `vocab`, no padding rows, whenever TP divides it too."""
    div = 1
    while div < 128 and vocab % (div * 2) == 0:
        div *= 2
    return div

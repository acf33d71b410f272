"""megatron-core modules that run the Triton kernels, chosen through the layer spec.

`kernels: triton` (pretrain/model.py, `implementations`) swaps, with no change to the model code:

| megatron-core / torch path          | here                     | kernel                                  |
| ----------------------------------- | ------------------------ | --------------------------------------- |
| RMSNorm (torch.nn.RMSNorm)          | `TritonRMSNorm`          | `rms_norm` (input, pre-MLP, final norms) * |
| `TransformerLayer`                  | `TritonTransformerLayer` | attention residual add fused into the pre-MLP norm * |
| `MLP` (gated linear unit, silu)     | `TritonMLP`              | `swiglu` on fc1's output                |
| `SelfAttention` (rotary inside)     | `TritonSelfAttention`    | `apply_rotary` on q and k in one launch |
| `GPTModel` output layer + loss      | `fused_lm_postprocess`   | `fused_linear_cross_entropy`, vocab-parallel |

* with `norm_kernel: triton` only; by default the norms stay torch's F.rms_norm, which ran 3x
faster than `rms_norm` on an H100 (bench/RESULTS.md).

Parameters and their names are exactly megatron's, so checkpoints move freely between
`kernels: triton` and `kernels: torch`. Each module falls back to megatron's own code for the
cases its kernel does not cover (inference contexts, packed sequences, interleaved rotary,
dropout on the residual, MTP, ...) and wherever Triton cannot launch (CPU without
TRITON_INTERPRET=1), so turning the switch on never changes what a model computes.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer
from megatron.core.utils import make_viewless_tensor

from . import use_triton
from .fused_linear_ce import fused_linear_cross_entropy
from .rmsnorm import rms_norm
from .rope import apply_rotary
from .swiglu import swiglu

IGNORE_INDEX = -100


class TritonRMSNorm(torch.nn.Module):
    """RMSNorm with megatron's norm constructor `(config, hidden_size, eps)`.

    `forward(x)` returns the norm; `forward(x, residual=r)` returns `(norm(x + r), x + r)` in one
    kernel (used by `TritonTransformerLayer`). The weight is named and initialized as
    torch.nn.RMSNorm's (ones), so state dicts match the torch path.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"kernels: triton provides RMSNorm only; the model config asks for "
                             f"normalization={config.normalization!r} (use kernels: torch)")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("kernels: triton does not implement layernorm_zero_centered_gamma")
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        # megatron all-reduces the grads of parameters marked so across the TP group when the
        # norm runs on sequence-parallel shards (finalize_model_grads).
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class TritonMLP(MLP):
    """megatron's MLP with the SwiGLU on fc1's output done by the Triton kernel."""

    def _ours(self, hidden_states, per_token_scale) -> bool:
        c = self.config
        return (c.gated_linear_unit and c.activation_func is F.silu and per_token_scale is None
                and c.activation_func_clamp_value is None and c.glu_linear_offset == 0.0
                and not c.use_te_activation_func and use_triton(hidden_states))

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if not self._ours(hidden_states, per_token_scale):
            return super().forward(hidden_states, per_token_scale, **kwargs)
        intermediate, bias = self.linear_fc1(hidden_states)
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(swiglu(intermediate))


class TritonSelfAttention(SelfAttention):
    """megatron's SelfAttention with the rotary embedding applied by the Triton kernel.

    megatron applies rotary inside `Attention.forward` through a module-level function, with no
    hook. This class passes `rotary_pos_emb=None` to that forward and rotates q and k itself
    in `get_query_key_value_tensors`, right after megatron's q/k layernorms, the point where
    megatron would have applied it. Every case the kernel does not cover goes to megatron.
    """

    _pending_rope = None

    def _ours(self, hidden_states, rotary_pos_emb, kwargs) -> bool:
        c = self.config
        if rotary_pos_emb is None or not use_triton(hidden_states):
            return False
        if kwargs.get("inference_context") is not None or kwargs.get("inference_params") is not None:
            return False
        if kwargs.get("packed_seq_params") is not None or kwargs.get("key_value_states") is not None:
            return False
        if c.no_rope_freq and c.no_rope_freq[self.layer_number - 1]:
            return False
        return (not c.rotary_interleaved and not c.apply_rope_fusion
                and not c.fused_single_qkv_rope and not c.multi_latent_attention
                and _yarn_get_concentration_factor_from_config(c) == 1.0)

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        if args or not self._ours(hidden_states, rotary_pos_emb, kwargs):
            return super().forward(hidden_states, attention_mask, *args,
                                   rotary_pos_emb=rotary_pos_emb, **kwargs)
        self._pending_rope = rotary_pos_emb
        try:
            return super().forward(hidden_states, attention_mask, rotary_pos_emb=None, **kwargs)
        finally:
            self._pending_rope = None

    def get_query_key_value_tensors(self, *args, **kwargs):
        out = super().get_query_key_value_tensors(*args, **kwargs)
        emb = self._pending_rope
        if emb is None:
            return out
        query, key = out[0], out[1]
        q_emb, k_emb = emb if isinstance(emb, tuple) else (emb, emb)
        if q_emb is k_emb:
            query, key = apply_rotary(query, q_emb, key)
        else:
            query = apply_rotary(query, q_emb) if q_emb is not None else query
            key = apply_rotary(key, k_emb) if k_emb is not None else key
        return (query, key) + tuple(out[2:])


class TritonTransformerLayer(TransformerLayer):
    """megatron's TransformerLayer with the attention residual add fused into the pre-MLP norm.

    Eager: h = residual + attn_out (one pass), then norm(h) (another). Here one kernel reads
    both, writes h and norm(h), and its backward writes the shared gradient once. Taken only in
    the plain pre-norm training/eval layer (no dropout on the residual, no norm recompute or
    offload, no cross-attention, no inference context); otherwise megatron's forward runs.
    """

    def _ours(self, kwargs) -> bool:
        c = self.config
        return (isinstance(self.pre_mlp_layernorm, TritonRMSNorm)
                and isinstance(self.cross_attention, IdentityOp)
                and not self.is_moe_layer
                and not (self.training and self.hidden_dropout > 0.0)
                and not self.recompute_input_layernorm and not self.recompute_pre_mlp_layernorm
                and not self.recompute_mlp
                and not getattr(self, "offload_attn_norm", False)
                and not getattr(self, "offload_mlp_norm", False)
                and not c.inference_fuse_tp_communication
                and kwargs.get("inference_context") is None
                and kwargs.get("inference_params") is None
                and kwargs.get("context") is None)

    def forward(self, *args, **kwargs):
        if args or not self._ours(kwargs):
            return super().forward(*args, **kwargs)
        kwargs.pop("dynamic_inference_decode_only", None)
        hidden_states = kwargs.pop("hidden_states")
        padding_mask = kwargs.pop("padding_mask", None)
        kwargs.pop("context", None)
        kwargs.pop("context_mask", None)
        kwargs.pop("inference_context", None)
        kwargs.pop("inference_params", None)
        residual = hidden_states
        attn_out, attn_bias = self.self_attention(self.input_layernorm(hidden_states), **kwargs)
        if attn_bias is not None:
            attn_out = attn_out + attn_bias
        normed, hidden_states = self.pre_mlp_layernorm(attn_out, residual=residual)
        mlp_out, mlp_bias = self.mlp(normed, padding_mask=padding_mask)
        if mlp_bias is not None:
            mlp_out = mlp_out + mlp_bias
        out = hidden_states + mlp_out
        # Same as megatron: the block's checkpointing rejects view tensors.
        out = make_viewless_tensor(inp=out, requires_grad=out.requires_grad, keep_graph=True)
        return out, None


def vocab_parallel_lm_loss(hidden_states, weight, labels, *, loss_mask=None, tp_group=None,
                           sequence_parallel=False, label_smoothing=0.0, z_loss=0.0,
                           chunk_size=None):
    """Per-token LM loss [b, s] from hidden states [s, b, h] and the (vocab-sharded) output weight.

    The same contract as megatron's `compute_language_model_loss(labels, output_layer(h))`.
    Where `loss_mask` is given, masked tokens are folded into the labels (their loss reads 0,
    and `sum(loss * mask) / n` backpropagates through the fused kernel's fast path).
    The input side uses megatron's own TP mappings, as its ColumnParallelLinear does.
    """
    if sequence_parallel:
        hidden_states = gather_from_sequence_parallel_region(hidden_states, group=tp_group)
    else:
        hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
    labels_sb = labels.transpose(0, 1)
    if loss_mask is not None:
        labels_sb = labels_sb.masked_fill(loss_mask.transpose(0, 1) == 0, IGNORE_INDEX)
    loss = fused_linear_cross_entropy(hidden_states, weight, labels_sb, ignore_index=IGNORE_INDEX,
                                      label_smoothing=label_smoothing, z_loss=z_loss,
                                      reduction="none", tp_group=tp_group, chunk_size=chunk_size)
    return loss.transpose(0, 1).contiguous()


_POSTPROCESS_SIGNATURE = inspect.signature(GPTModel._postprocess)


def fused_lm_postprocess(model: GPTModel, fallback: Callable, *args, label_smoothing: float = 0.0,
                         z_loss: float = 0.0, **kwargs):
    """GPTModel._postprocess with the output layer and the loss fused, for a GPTModel subclass:

        def _postprocess(self, *args, **kwargs):
            return fused_lm_postprocess(self, super()._postprocess, *args, **kwargs)

    When labels are given, returns the per-token loss [b, s] straight from the final hidden
    states and the output weight (tied or not), never the [s, b, V] logits. Logits (labels=None),
    inference, MTP, deferred-wgrad setups, and machines where Triton cannot launch go to
    `fallback` (megatron's own _postprocess) unchanged.
    """
    bound = _POSTPROCESS_SIGNATURE.bind(model, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    inference = a["inference_context"] is not None and not model.training
    fused = (a["labels"] is not None and model.post_process and not a["mtp_in_postprocess"]
             and model.config.mtp_num_layers is None and not inference
             and not model.config.defer_embedding_wgrad_compute
             and use_triton(a["hidden_states"]))
    if not fused:
        return fallback(*args, **kwargs)
    weight = (model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights
              else model.output_layer.weight)
    return vocab_parallel_lm_loss(
        a["hidden_states"], weight, a["labels"], loss_mask=a["loss_mask"],
        tp_group=model.pg_collection.tp, sequence_parallel=model.output_layer.sequence_parallel,
        label_smoothing=label_smoothing, z_loss=z_loss)

"""The model: a Llama-style GPT on megatron-core, read top to bottom.

1. `padded_vocab`       the embedding rows, padded so every tensor-parallel rank holds an equal slice.
2. `transformer_config` our compact ModelArgs -> megatron-core's TransformerConfig (the only place
                        its ~270 fields are set; none of them is in our YAML).
3. `implementations`    THE one place that picks the modules of a layer: norm, attention (with its
                        rotary embedding), SwiGLU activation and loss. 'torch' is megatron-core's
                        local layers plus torch RMSNorm / SDPA; 'triton' plugs in our kernels.
4. `layer_spec`         the megatron ModuleSpec of one Llama layer built from those modules.
5. `build_model`        GPTModel for this rank's pipeline stage (or one virtual chunk of it),
                        bf16-wrapped on GPU; `build_model_chunks` the list of a rank's chunks.

Parallelism comes from megatron-core's own layers (ColumnParallelLinear, RowParallelLinear,
VocabParallelEmbedding) and its block/pipeline splitting, not from branches here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import Float16Module, MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from domainlm.pretrain.config import ModelArgs


# 1. Vocabulary ---------------------------------------------------------------------------------


def padded_vocab(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Round the vocab up to a multiple of lcm(divisible_by, TP).

    Megatron-LM pads to divisible_by x TP, which changes the table's shape with TP and so breaks
    resuming under another TP size; the lcm gives every TP rank an equal slice and, for the usual
    power-of-two TP sizes, the same shape at any TP.
    """
    multiple = math.lcm(divisible_by, tensor_parallel_size)
    return -(-vocab_size // multiple) * multiple


# 2. megatron-core TransformerConfig ------------------------------------------------------------


def transformer_config(m: ModelArgs, *, tensor: int = 1, pipeline: int = 1, virtual_pipeline: int = 1,
                       sequence_parallel: bool = False, bf16: bool = False, recompute: str = "none",
                       cpu: bool = False) -> TransformerConfig:
    """Map ModelArgs and the run's layout/precision onto megatron-core's TransformerConfig."""
    impl = implementations(m.kernels, m.norm_kernel)
    return TransformerConfig(
        # Architecture: Llama (pre-norm RMSNorm, SwiGLU, RoPE, GQA, no biases, no dropout).
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.hidden_size // m.num_attention_heads,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=impl.activation,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        rotary_interleaved=False,
        # Init: N(0, std); megatron scales the output projections of each layer by 1/sqrt(2L).
        init_method_std=m.init_std,
        use_cpu_initialization=cpu,
        # Layout and precision.
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        virtual_pipeline_model_parallel_size=virtual_pipeline if virtual_pipeline > 1 else None,
        sequence_parallel=sequence_parallel,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        deallocate_pipeline_outputs=pipeline > 1,
        # Activation recomputation: 'selective' = the attention core, 'full' = every layer.
        recompute_granularity=None if recompute == "none" else recompute,
        recompute_method="uniform" if recompute == "full" else None,
        recompute_num_layers=1 if recompute == "full" else None,
        # megatron's own fusions need Apex or Transformer Engine; `implementations` picks ours.
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )


# 3. Module implementations ----------------------------------------------------------------------


class RMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm, as megatron-core's local spec builds it (WrappedTorchNorm), with one change:
    its weight is marked `sequence_parallel`, so megatron's finalize_model_grads all-reduces its
    gradient over the TP group under sequence parallelism (WrappedTorchNorm refuses SP)."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)


class SDPAttention(MegatronModule):
    """Causal attention core through torch's scaled_dot_product_attention.

    The same math as megatron-core's local DotProductAttention with no dropout (softmax(QK^T s)V,
    causal, grouped KV heads), but through flash / memory-efficient kernels on GPU and a fused
    kernel on CPU, and without DotProductAttention's s x s score buffer, which megatron allocates
    on CUDA. Constructor and forward follow DotProductAttention's, so it drops into its spec slot.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        assert attn_mask_type == AttnMaskType.causal, "the Llama layer is causal"
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        # megatron hands [s, b, heads, d]; SDPA wants [b, heads, s, d].
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             enable_gqa=q.size(1) != k.size(1))
        s, b = out.size(2), out.size(0)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def vocab_parallel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token cross entropy of vocab-parallel logits [s, b, V/TP] -> [s, b], in fp32."""
    return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)


@dataclass(frozen=True, slots=True)
class Implementations:
    """The modules of one Llama layer. A kernel set replaces any of them."""

    norm: type
    """RMSNorm module: (config, hidden_size, eps)."""
    self_attention: type
    """Self-attention module (QKV projection, rotary embedding, core, output projection);
    megatron's SelfAttention applies RoPE with megatron's apply_rotary_pos_emb."""
    core_attention: type
    """Attention core: (query, key, value) after RoPE -> context."""
    activation: Callable
    """Gate activation of SwiGLU: act(x W_gate) * (x W_up)."""
    loss: Callable
    """Per-token LM loss from vocab-parallel logits [s, b, V/TP] and labels [s, b]."""
    layer: type = TransformerLayer
    """Transformer layer module (triton: the attention residual add fused into the pre-MLP norm)."""
    mlp: type = MLP
    """MLP module, fc1 -> SwiGLU -> fc2 (triton: one kernel for silu(gate) * up)."""
    output_loss: Callable | None = None
    """Optional (model, fallback, *args, **kwargs) stand-in for GPTModel._postprocess that takes the
    per-token loss straight from the final hidden states and the output weight, never the logits
    (triton: fused linear + cross-entropy); it calls `fallback` where it does not apply."""


def implementations(kernels: str, norm_kernel: str = "torch") -> Implementations:
    """THE switch between module sets ('torch' is megatron-core's local path). Under 'triton',
    `norm_kernel` picks the norms: torch's RMSNorm and megatron's layer, or ours."""
    if kernels == "triton":
        from domainlm.pretrain.kernels import resolve_kernels

        kernels = resolve_kernels(kernels)  # 'torch' where Triton cannot launch; logs which
    if kernels == "torch":
        return Implementations(norm=RMSNorm, self_attention=SelfAttention, core_attention=SDPAttention,
                               activation=F.silu, loss=vocab_parallel_loss)
    if kernels == "triton":
        from domainlm.pretrain.kernels import modules as tk

        if norm_kernel not in ("torch", "triton"):
            raise ValueError(f"unknown norm_kernel {norm_kernel!r}")
        ours = norm_kernel == "triton"
        return Implementations(norm=tk.TritonRMSNorm if ours else RMSNorm, self_attention=tk.TritonSelfAttention,
                               core_attention=SDPAttention, activation=F.silu, loss=vocab_parallel_loss,
                               layer=tk.TritonTransformerLayer if ours else TransformerLayer, mlp=tk.TritonMLP,
                               output_loss=tk.fused_lm_postprocess)
    raise ValueError(f"unknown kernels {kernels!r}")


# 4. Layer spec ----------------------------------------------------------------------------------


def layer_spec(impl: Implementations) -> ModuleSpec:
    """One pre-norm Llama layer: x + Attn(Norm(x)), then x + SwiGLU(Norm(x))."""
    return ModuleSpec(
        module=impl.layer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=impl.norm,
            self_attention=ModuleSpec(
                module=impl.self_attention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=tensor_parallel.ColumnParallelLinear,
                    core_attention=impl.core_attention,
                    linear_proj=tensor_parallel.RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=impl.norm,
            mlp=ModuleSpec(
                module=impl.mlp,
                submodules=MLPSubmodules(linear_fc1=tensor_parallel.ColumnParallelLinear,
                                         linear_fc2=tensor_parallel.RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


# 5. The model -----------------------------------------------------------------------------------


class LlamaGPT(GPTModel):
    """megatron-core GPTModel whose LM loss comes from the chosen implementations."""

    def __init__(self, *args, loss_fn: Callable, output_loss: Callable | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
        self.output_loss = output_loss

    def _postprocess(self, *args, **kwargs):
        if self.output_loss is not None:
            return self.output_loss(self, super()._postprocess, *args, **kwargs)
        return super()._postprocess(*args, **kwargs)

    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        # labels [b, s], logits [s, b, V/TP] -> loss [b, s], as GPTModel's own does.
        return self.loss_fn(logits, labels.transpose(0, 1).contiguous()).transpose(0, 1).contiguous()


def build_model(m: ModelArgs, config: TransformerConfig, *, vocab_size: int, seq_len: int,
                vp_stage: int | None = None) -> torch.nn.Module:
    """GPTModel for this rank's pipeline stage (parallel_state must be initialized), or for its
    virtual chunk `vp_stage` when the config has virtual pipeline stages.

    `vocab_size` is the padded size. On CPU megatron's RoPE is swapped for its CPU stand-in; on
    bf16 the model is wrapped in megatron's Float16Module (bf16 weights, fp32 loss out).
    """
    impl = implementations(m.kernels, m.norm_kernel)
    stage_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    model = LlamaGPT(
        config=config,
        transformer_layer_spec=TransformerBlockSubmodules(
            layer_specs=[layer_spec(impl)] * stage_layers, layer_norm=impl.norm),
        vocab_size=vocab_size,
        max_sequence_length=seq_len,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        parallel_output=True,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=m.rotary_base,
        loss_fn=impl.loss,
        output_loss=impl.output_loss,
        vp_stage=vp_stage,
    )
    if config.use_cpu_initialization:
        from domainlm.pretrain import cpu_compat

        cpu_compat.use_cpu_rope(model)
    else:
        model.cuda(torch.cuda.current_device())
    if config.bf16:
        model = Float16Module(config, model)
    return model


def build_model_chunks(m: ModelArgs, config: TransformerConfig, *, vocab_size: int, seq_len: int) -> list:
    """This rank's model chunks, as Megatron-LM's get_model builds them: one GPTModel per virtual
    pipeline stage (one in all without virtual stages), chunk v holding layers
    [(v * PP + pp_rank) * n, ... + n) of n = layers / (PP x VPP).

    CPU initialization with PP > 1: the chunks of every stage are visited in layer order and the
    draws of other stages' chunks made and dropped (cpu_compat.skip_init_draws), so each stage
    starts from the weights a PP=1 model with the same seed has (as megatron's CPU init already
    does for TP). GPU initialization is megatron's (seeded per stage), unchanged."""
    pp = config.pipeline_model_parallel_size
    vpp = config.virtual_pipeline_model_parallel_size or 1
    if pp == 1:
        return [build_model(m, config, vocab_size=vocab_size, seq_len=seq_len)]
    if not config.use_cpu_initialization:
        return [build_model(m, config, vocab_size=vocab_size, seq_len=seq_len, vp_stage=v if vpp > 1 else None)
                for v in range(vpp)]
    from domainlm.pretrain import cpu_compat

    mine = parallel_state.get_pipeline_model_parallel_rank()
    per_chunk = config.num_layers // (pp * vpp)
    spec = layer_spec(implementations(m.kernels, m.norm_kernel))
    chunks = []
    with cpu_compat.shared_embedding_on_cpu():
        for v in range(vpp):
            for stage in range(pp):
                if stage == mine:
                    chunks.append(build_model(m, config, vocab_size=vocab_size, seq_len=seq_len,
                                              vp_stage=v if vpp > 1 else None))
                elif config.perform_initialization:
                    cpu_compat.skip_init_draws(config, spec, embedding=v == 0 and stage == 0, layers=per_chunk,
                                               vocab_size=vocab_size, seq_len=seq_len)
    return chunks


def unwrap(model: torch.nn.Module) -> LlamaGPT:
    """The LlamaGPT inside DDP / Float16Module wrappers (of one model chunk)."""
    while not isinstance(model, LlamaGPT):
        model = model.module
    return model


def count_parameters(m: ModelArgs, vocab_size: int) -> dict[str, int]:
    """Whole-model parameter counts (not per rank): total and non-embedding.

    'flops' is the N of the PaLM estimate 6N + 12 L d T: every weight used in a matmul, so the
    output projection counts and the input embedding table (a lookup) does not.
    """
    d, L, f = m.hidden_size, m.num_layers, m.ffn_hidden_size
    kv = m.num_query_groups * (d // m.num_attention_heads)
    per_layer = d * (d + 2 * kv) + d * d + 3 * d * f + 2 * d
    body = L * per_layer + d
    embed = vocab_size * d
    total = body + embed + (0 if m.tie_embeddings else embed)
    return {"total": total, "non_embedding": body, "flops": body + embed}

"""`--kernels triton`: our Triton kernels inside a Hugging Face Llama model, as Liger-Kernel does.

| HF module / function            | becomes                         | kernel (domainlm.pretrain.kernels)           |
| ------------------------------- | ------------------------------- | -------------------------------------------- |
| `LlamaRMSNorm` (every norm)     | `TritonRMSNorm` (class swapped) | `rms_norm`: fp32 statistics, one rounding    |
| `LlamaMLP`                      | `TritonMLP` (class swapped)     | `swiglu` on [gate(x), up(x)], silu recomputed in backward |
| `apply_rotary_pos_emb` in attention | `TritonRopeAttention` turns it on for its own forward | `apply_rotary`: q and k in one launch, angles kept for backward |
| `lm_head` + cross-entropy       | the trainer's loss (model.py)   | `fused_linear_cross_entropy`: chunks, never the full logits |

Swapping the class of each module instance keeps parameter names and state dicts as they are
(adapters and checkpoints do not know the kernels were on) and leaves every other model in the
process alone. peft's LoRA layers stay inside the projections, so the kernels work under LoRA,
DoRA and full fine-tuning alike. The rotary function is replaced in the model's modeling module
by a dispatcher that runs the kernel only inside a `TritonRopeAttention` forward (also when
gradient checkpointing recomputes it) and HF's own code everywhere else (generation with a KV
cache, other models). Where Triton cannot launch (CPU without TRITON_INTERPRET=1) every module
runs the kernels' PyTorch references, so the switch never changes what the model computes.

The kernels take megatron's layout and angles; the HF side hands over [batch, heads, seq, dim]
and cos/sin. The dispatcher passes permuted views (no copy) and recovers the angles as
atan2(sin, cos) in fp32, where that is exact to rounding. RoPE variants whose cos/sin carry an
attention scaling other than 1 (YaRN, LongRoPE) keep HF's rotary code.
"""

from __future__ import annotations

import sys
import threading

import torch

from domainlm.pretrain.kernels import use_triton
from domainlm.pretrain.kernels.rmsnorm import rms_norm
from domainlm.pretrain.kernels.rope import apply_rotary
from domainlm.pretrain.kernels.swiglu import swiglu

_rope = threading.local()


def _rope_on() -> bool:
    return getattr(_rope, "depth", 0) > 0


class TritonRMSNorm(torch.nn.Module):
    """Stands in for an HF `*RMSNorm` instance (weight, variance_epsilon): same parameters."""

    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


class TritonMLP(torch.nn.Module):
    """Stands in for an HF Llama/Mistral MLP instance (gate_proj, up_proj, down_proj, SiLU)."""

    def forward(self, x):
        return self.down_proj(swiglu(torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)))


class TritonRopeAttention(torch.nn.Module):
    """Mixin placed before an HF attention class: its forward runs with the rotary kernel on."""

    def forward(self, *args, **kwargs):
        _rope.depth = getattr(_rope, "depth", 0) + 1
        try:
            return super().forward(*args, **kwargs)
        finally:
            _rope.depth -= 1


def _rope_dispatcher(original):
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze = kwargs.get("unsqueeze_dim", args[0] if args else 1)
        if not (_rope_on() and unsqueeze == 1 and use_triton(q) and cos.dim() == 3):
            return original(q, k, cos, sin, *args, **kwargs)
        # [b, h, s, d] -> [s, b, h, d] views; cos/sin [b, s, d] -> angles [s, b, 1, d]
        angles = torch.atan2(sin.float(), cos.float()).permute(1, 0, 2).unsqueeze(2)
        qo, ko = apply_rotary(q.permute(2, 0, 1, 3), angles, k.permute(2, 0, 1, 3))
        return qo.permute(1, 2, 0, 3), ko.permute(1, 2, 0, 3)

    apply_rotary_pos_emb.domainlm_original = original
    return apply_rotary_pos_emb


def _original_class(module: torch.nn.Module) -> type:
    return getattr(type(module), "domainlm_original", type(module))


def _swap(module: torch.nn.Module, mixin: type) -> None:
    cls = type(module)
    if issubclass(cls, mixin):
        return
    # The mixin's forward comes first in the MRO; the HF class keeps everything else.
    module.__class__ = type(f"{mixin.__name__}_{cls.__name__}", (mixin, cls),
                            {"domainlm_original": cls, "__module__": __name__})


def apply_kernels(model: torch.nn.Module) -> dict[str, int]:
    """Put the kernels into every norm, MLP and attention of an HF Llama-family model.

    Returns how many modules of each kind now run them (the trainer logs it)."""
    counts = {"rms_norm": 0, "swiglu": 0, "rotary": 0}
    rope_ok = all(float(getattr(m, "attention_scaling", 1.0)) == 1.0
                  for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))
    for m in model.modules():
        name = type(m).__name__
        if name.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and hasattr(m, "weight"):
            _swap(m, TritonRMSNorm)
            counts["rms_norm"] += 1
        elif (name.endswith("MLP") and all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj"))
              and getattr(getattr(m, "config", None), "hidden_act", "silu") == "silu"):
            _swap(m, TritonMLP)
            counts["swiglu"] += 1
        elif rope_ok and name.endswith("Attention") and hasattr(m, "q_proj"):
            module = sys.modules[_original_class(m).__module__]
            fn = getattr(module, "apply_rotary_pos_emb", None)
            if fn is None:
                continue
            if not hasattr(fn, "domainlm_original"):
                module.apply_rotary_pos_emb = _rope_dispatcher(fn)
            _swap(m, TritonRopeAttention)
            counts["rotary"] += 1
    return counts

"""`--kernels triton`: our Triton kernels inside a Hugging Face Llama model, as Liger-Kernel does.

| HF module / function            | becomes                         | kernel (domainlm.pretrain.kernels)           |
| ------------------------------- | ------------------------------- | -------------------------------------------- |
| `LlamaRMSNorm` (every norm)     | `TritonRMSNorm` (class swapped) | `rms_norm`: fp32 statistics, one rounding    |
| `LlamaMLP`                      | `TritonMLP` (class swapped)     | `swiglu` on [gate(x), up(x)], silu recomputed in backward |
| `apply_rotary_pos_emb` in attention | `TritonRopeAttention` turns it on for its own forward | `apply_rotary`: q and k in one launch, angles kept for backward |
| `lm_head` + cross-entropy       | the trainer's loss (model.py)   | `fused_linear_cross_entropy`: chunks, never the full logits |
| peft `lora.Linear` (each adapter) | `FusedLoraLinear` (class swapped) | `torch.addmm`: base(x) + s * A(x) B^T in one GEMM epilogue |

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

Recomputed, not kept (`recompute_elementwise`, on by default with the kernels): autograd keeps
each norm's output for the LoRA A (and any trained) projections that read it, and SwiGLU's output
for down_proj's, although both are one elementwise kernel away from tensors backward keeps anyway
(the norm's input and its weight; SwiGLU's input [gate, up]). Inside `recompute_elementwise()`
the norm and MLP forwards register their outputs, and a `saved_tensors_hooks` pair packs a saved
tensor that lives in a registered output's storage as a recipe (the function, its inputs, the
view), which backward turns back into the same view of a recomputed output: bitwise the same
values (the same kernel on the same inputs), computed once per output however many projections
read it, and 2H + F values a token and layer fewer kept (24 KiB at the 1B shape in bf16: 74.6 ->
50.6 KiB, bench/activations.py --lora). It finds the outputs themselves only where the
projections read them as they are: in bf16 once peft's input cast is off
(finetune/model.py: keep_input_dtype, which the trainer does under autocast), and with
`lora.dropout` 0 (dropout gives each adapter its own tensor). Inside a gradient-checkpointed layer
the checkpoint's own hooks come first and this does nothing.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref

import torch

from domainlm.pretrain.kernels import use_triton
from domainlm.pretrain.kernels.rmsnorm import rms_norm
from domainlm.pretrain.kernels.rope import apply_rotary
from domainlm.pretrain.kernels.swiglu import swiglu

_rope = threading.local()
_recompute = threading.local()   # .registry: storage pointer -> _Source, inside recompute_elementwise()


class _Source:
    """An output that backward can recompute: fn(*args) under the autocast state of its forward.
    Registered with weak references only (a forward whose outputs nobody saves, or whose layers are
    checkpointed, holds nothing more); the first pack pins the inputs, which the kernels' own
    backward keeps anyway. `uses` counts the saved views still to unpack; the recomputed value is
    held until the last."""

    __slots__ = ("ref", "fn", "arg_refs", "args", "autocast", "value", "uses")

    def __init__(self, out: torch.Tensor, fn, args: tuple):
        self.ref, self.fn, self.args = weakref.ref(out), fn, None
        self.arg_refs = tuple(weakref.ref(a) if isinstance(a, torch.Tensor) else a for a in args)
        dev = out.device.type
        self.autocast = (dev, torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else None
        self.value, self.uses = None, 0

    def pin(self) -> bool:
        """Hold the inputs from now on; False where one is gone (then the tensor is kept as is)."""
        if self.args is None:
            args = tuple(a() if isinstance(a, weakref.ref) else a for a in self.arg_refs)
            if any(a is None for a in args):
                return False
            self.args = args
        return True

    def get(self) -> torch.Tensor:
        value = self.value
        if value is None:
            amp = (torch.autocast(self.autocast[0], dtype=self.autocast[1]) if self.autocast
                   else contextlib.nullcontext())
            with torch.no_grad(), amp:
                value = self.fn(*self.args)
        self.uses -= 1
        self.value = value if self.uses > 0 else None
        return value


class _Packed:
    """What autograd holds instead of a saved view of a registered output."""

    __slots__ = ("source", "size", "stride", "offset")

    def __init__(self, source: _Source, t: torch.Tensor):
        self.source, self.size, self.stride, self.offset = source, t.size(), t.stride(), t.storage_offset()


def _remember(out: torch.Tensor, fn, *args) -> torch.Tensor:
    """Register `out` (= fn(*args), contiguous, its own storage) as recomputable while
    recompute_elementwise() is on; returns it."""
    registry = getattr(_recompute, "registry", None)
    if (registry is not None and torch.is_grad_enabled() and out.numel() and out.storage_offset() == 0
            and out.is_contiguous() and out.untyped_storage().nbytes() == out.numel() * out.element_size()):
        registry[out.untyped_storage().data_ptr()] = _Source(out, fn, args)
    return out


class _Outer:
    """A saved tensor this module does not take, as the enclosing hooks packed it."""

    __slots__ = ("packed", "unpack")

    def __init__(self, packed, unpack):
        self.packed, self.unpack = packed, unpack


def _enclosing_hooks():
    """The saved-tensor hooks in force outside (torch.autograd.graph.save_on_cpu, a counter of what
    is kept), which would otherwise be shadowed: only the innermost pair runs. torch has no public
    getter; without one, None."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    try:
        return top(True) if top is not None else None
    except (TypeError, RuntimeError):
        return None


def _hooks(outer):
    outer_pack, outer_unpack = outer if outer is not None else (None, None)

    def pack(t: torch.Tensor):
        registry = getattr(_recompute, "registry", None)
        if registry and t.layout == torch.strided and t.numel():
            source = registry.get(t.untyped_storage().data_ptr())
            if source is not None:
                out = source.ref()
                # alive, so the storage at that address is still its own
                if out is not None and out.dtype == t.dtype and out.device == t.device and source.pin():
                    source.uses += 1
                    return _Packed(source, t)
        return t if outer_pack is None else _Outer(outer_pack(t), outer_unpack)

    def unpack(packed):
        if isinstance(packed, _Packed):
            return packed.source.get().as_strided(packed.size, packed.stride, packed.offset)
        if isinstance(packed, _Outer):
            return packed.unpack(packed.packed)
        return packed

    return pack, unpack


@contextlib.contextmanager
def recompute_elementwise():
    """A forward under this keeps the norms' and SwiGLU's outputs as recipes for backward
    (see the module's docstring). Backward may run after the block ends."""
    if getattr(_recompute, "registry", None) is not None:   # nested: the outer one serves
        yield
        return
    _recompute.registry = {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(*_hooks(_enclosing_hooks())):
            yield
    finally:
        _recompute.registry = None


class FusedLoraLinear(torch.nn.Module):
    """Mixin placed before peft's `lora.Linear`: base(x) + scaling * B(A(x)) with the adapter's
    product added inside one `torch.addmm` (scaling as its alpha), where peft writes B's output, then
    a scaled copy of it, then the sum: two passes over the [tokens, out] output fewer forward and
    one fewer backward, for every adapted projection (bench/lora_linear.py times both). What
    autograd keeps is the same (A's output and the weights). Runs
    peft's own forward whenever this is not one plain adapter: adapters disabled or merged, several
    active, DoRA or another variant, dropout, a bias on B, extra arguments, or dtypes that only
    peft's casts reconcile (no autocast and the base's dtype is not the adapters')."""

    def forward(self, x, *args, **kwargs):
        adapters = self.active_adapters
        if args or kwargs or self.disable_adapters or self.merged or len(adapters) != 1:
            return super().forward(x, *args, **kwargs)
        name = adapters[0]
        if (name not in self.lora_A or name in getattr(self, "lora_variant", ()) or self.use_dora.get(name)
                or not isinstance(self.lora_dropout[name], torch.nn.Identity) or self.lora_B[name].bias is not None):
            return super().forward(x, *args, **kwargs)
        a_w, b_w = self.lora_A[name].weight, self.lora_B[name].weight
        if not torch.is_autocast_enabled(x.device.type) and not (x.dtype == a_w.dtype == b_w.dtype
                                                                   == self.get_base_layer().weight.dtype):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        a = torch.nn.functional.linear(x, a_w)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), a.reshape(-1, a.shape[-1]), b_w.t(),
                          alpha=self.scaling[name])
        return out.view(result.shape)


def _rope_on() -> bool:
    return getattr(_rope, "depth", 0) > 0


class TritonRMSNorm(torch.nn.Module):
    """Stands in for an HF `*RMSNorm` instance (weight, variance_epsilon): same parameters."""

    def forward(self, hidden_states):
        return _remember(rms_norm(hidden_states, self.weight, self.variance_epsilon), rms_norm, hidden_states,
                         self.weight, self.variance_epsilon)


class TritonMLP(torch.nn.Module):
    """Stands in for an HF Llama/Mistral MLP instance (gate_proj, up_proj, down_proj, SiLU)."""

    def forward(self, x):
        gate_up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        return self.down_proj(_remember(swiglu(gate_up), swiglu, gate_up))


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


def fuse_lora(model: torch.nn.Module) -> int:
    """Every plain peft `lora.Linear` of the model as a `FusedLoraLinear` (not peft's subclasses:
    4-bit, ...); how many. Also what evaluation's generation runs adapters through (Generator):
    in fp32 the same answers as peft's forward; on the 2-core VM 1.00-1.10x faster generation in
    the demo's comparison, interleaved with peft's (bench/compare_breakdown.py)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for m in model.modules():
        if type(m) is LoraLinear or isinstance(m, FusedLoraLinear):
            _swap(m, FusedLoraLinear)
            n += 1
    return n


def apply_kernels(model: torch.nn.Module) -> dict[str, int]:
    """Put the kernels into every norm, MLP and attention of an HF Llama-family model.

    Returns how many modules of each kind now run them (the trainer logs it). Call it after
    peft's get_peft_model for its LoRA layers to be fused too (`lora_addmm`)."""
    counts = {"rms_norm": 0, "swiglu": 0, "rotary": 0, "lora_addmm": fuse_lora(model)}
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

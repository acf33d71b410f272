"""SwiGLU on megatron's fused fc1 output.

megatron-core's MLP with `gated_linear_unit` produces one fc1 output of width 2F per rank and
splits it with `torch.chunk(x, 2, dim=-1)`: the first half is the gate (through the activation),
the second the linear ("up") half (megatron/core/transformer/mlp.py, `glu`):

    y = silu(x[..., :F]) * x[..., F:]

Eager PyTorch keeps gate, up and silu(gate) for backward (3 x F per token) and allocates the
product's gradients separately before concatenating them. Here only the fc1 output (2 x F) is
kept; silu and its derivative are recomputed in backward from the gate, and both halves of the
gradient are written straight into one [.., 2F] tensor.
"""

import torch

from . import lazy_jit, use_triton
from ._tl import tl

BLOCK = 1024  # columns per program: large enough for full-width vector loads, any F is masked


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: silu(gate) * up in fp32, one rounding to x's dtype."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(x.dtype)


@lazy_jit
def _swiglu_fwd(X, Y, stride_x, stride_y, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + F + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@lazy_jit
def _swiglu_bwd(X, DY, DX, stride_x, stride_dy, stride_dx, F, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < F
    g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(X + row * stride_x + F + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    # d silu(g) / dg = s * (1 + g * (1 - s))
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    du = dy * silu
    tl.store(DX + row * stride_dx + cols, dg.to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + row * stride_dx + F + cols, du.to(DX.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


class SwiGLUFunction(torch.autograd.Function):
    """Triton silu(gate) * up over the two halves of the last dim."""

    @staticmethod
    def forward(ctx, x):
        two_f = x.shape[-1]
        if two_f % 2:
            raise ValueError(f"swiglu: last dim {two_f} must be even (gate and up halves)")
        f = two_f // 2
        x2 = _rows(x, two_f)
        m = x2.shape[0]
        y = torch.empty((m, f), dtype=x.dtype, device=x.device)
        block = min(BLOCK, 1 << max(f - 1, 0).bit_length())
        if m > 0 and f > 0:
            _swiglu_fwd[(m, -(-f // block))](x2, y, x2.stride(0), y.stride(0), f, BLOCK=block,
                                             num_warps=4)
        ctx.save_for_backward(x2)
        ctx.shape = x.shape
        return y.view(*x.shape[:-1], f)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        m, two_f = x2.shape
        f = two_f // 2
        dy2 = _rows(dy, f)
        dx = torch.empty_like(x2)
        block = min(BLOCK, 1 << max(f - 1, 0).bit_length())
        if m > 0 and f > 0:
            _swiglu_bwd[(m, -(-f // block))](x2, dy2, dx, x2.stride(0), dy2.stride(0), dx.stride(0),
                                             f, BLOCK=block, num_warps=4)
        return dx.view(ctx.shape)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(first half) * second half of the last dim (megatron's gated linear unit order)."""
    if use_triton(x):
        return SwiGLUFunction.apply(x)
    return swiglu_reference(x)

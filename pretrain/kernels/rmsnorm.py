"""RMSNorm, optionally fused with the residual add that precedes it.

    h = x + residual            (only when a residual is given; h is the new residual stream)
    y = h * rsqrt(mean(h^2) + eps) * weight

Forward: one program per row, statistics in fp32 whatever the storage dtype; the per-row rstd
(4 bytes a row) is the only extra tensor kept for backward, h itself is the input (or the new
residual, which the caller keeps anyway).
Backward: a fixed number of programs (one per SM) each walk a contiguous block of rows, write
dx (plus the incoming gradient of the new residual) and keep a partial dW for their rows in
registers; the few partial rows are summed at the end. That avoids both a [rows, hidden] fp32
dW temporary and atomics on the weight gradient.
"""

import torch

from . import lazy_jit, next_power_of_2, num_warps_for, sm_count, use_triton

from ._tl import tl

MAX_HIDDEN = 65536  # one row must fit a single block


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                       residual: torch.Tensor | None = None):
    """PyTorch reference: the statistics and the scaling in fp32, one rounding to x's dtype.

    With `residual`, returns (y, h) where h = x + residual in x's dtype, as megatron's
    bias-dropout-add produces it.
    """
    h = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    hf = h.float()
    y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return y if residual is None else (y, h)


@lazy_jit
def _rmsnorm_fwd(X, R, W, Y, H, RSTD, stride_x, stride_r, stride_y, stride_h, N, eps,
                 HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        # Round the sum to the stream's dtype before normalizing, so y is the norm of exactly
        # the residual that is stored and used again downstream.
        h_store = (x + r).to(H.dtype.element_ty)
        tl.store(H + row * stride_h + cols, h_store, mask=mask)
        h = h_store.to(tl.float32)
    else:
        h = x
    var = tl.sum(h * h, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (h * rstd * w).to(Y.dtype.element_ty), mask=mask)


@lazy_jit
def _rmsnorm_bwd(DY, H, W, RSTD, DX, DRES, DW_PART, stride_dy, stride_h, stride_dx, stride_dres,
                 M, N, rows_per_program, HAS_DRES: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    for i in range(0, rows_per_program):
        row = row_start + i
        in_rows = row < M
        # A comparison, not `mask & in_rows`: the interpreter rejects masks built from a
        # block and a scalar predicate.
        rmask = cols < tl.where(in_rows, N, 0)
        dy = tl.load(DY + row * stride_dy + cols, mask=rmask, other=0.0).to(tl.float32)
        h = tl.load(H + row * stride_h + cols, mask=rmask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=in_rows, other=0.0)
        hhat = h * rstd
        wdy = w * dy
        c = tl.sum(hhat * wdy, axis=0) / N
        dx = (wdy - hhat * c) * rstd
        if HAS_DRES:
            dx += tl.load(DRES + row * stride_dres + cols, mask=rmask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=rmask)
        dw += dy * hhat
    tl.store(DW_PART + pid * N + cols, dw, mask=mask)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm (+ residual add). Returns y, or (y, h) when a residual is given."""

    @staticmethod
    def forward(ctx, x, weight, residual, eps):
        shape, n = x.shape, x.shape[-1]
        if n > MAX_HIDDEN:
            raise ValueError(f"rms_norm: hidden size {n} exceeds the kernel's limit {MAX_HIDDEN}")
        if weight.shape != (n,):
            raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} != ({n},)")
        x2 = _rows(x, n)
        m = x2.shape[0]
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        has_res = residual is not None
        if has_res:
            if residual.shape != shape:
                raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != {tuple(shape)}")
            r2 = _rows(residual, n)
            h2 = torch.empty((m, n), dtype=x.dtype, device=x.device)
        else:
            r2 = h2 = x2  # unused by the kernel
        block = next_power_of_2(n)
        if m > 0:
            _rmsnorm_fwd[(m,)](x2, r2, weight, y, h2, rstd, x2.stride(0), r2.stride(0), y.stride(0),
                               h2.stride(0), n, eps, HAS_RES=has_res, BLOCK=block,
                               num_warps=num_warps_for(block))
        ctx.save_for_backward(h2, weight, rstd)
        ctx.has_res = has_res
        ctx.res_dtype = residual.dtype if has_res else None
        ctx.shape = shape
        if has_res:
            return y.view(shape), h2.view(shape)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        h2, weight, rstd = ctx.saved_tensors
        m, n = h2.shape
        dy2 = _rows(dy, n)
        has_dres = ctx.has_res and dh is not None
        dres2 = _rows(dh, n) if has_dres else dy2
        dx = torch.empty((m, n), dtype=h2.dtype, device=h2.device)
        programs = max(1, min(m, sm_count(h2.device)))
        rows_per_program = -(-m // programs) if m else 1
        dw_part = torch.empty((programs, n), dtype=torch.float32, device=h2.device)
        block = next_power_of_2(n)
        if m > 0:
            _rmsnorm_bwd[(programs,)](dy2, h2, weight, rstd, dx, dres2, dw_part, dy2.stride(0),
                                      h2.stride(0), dx.stride(0), dres2.stride(0), m, n,
                                      rows_per_program, HAS_DRES=has_dres, BLOCK=block,
                                      num_warps=num_warps_for(block))
        else:
            dw_part.zero_()
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dx = dx.view(ctx.shape)
        dres = None
        if ctx.has_res and ctx.needs_input_grad[2]:
            # x and the residual enter as a sum: both get the same gradient.
            dres = dx if ctx.res_dtype == dx.dtype else dx.to(ctx.res_dtype)
        return dx, dw, dres, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
             residual: torch.Tensor | None = None):
    """RMSNorm over the last dim; with `residual`, returns (norm(x + residual), x + residual).

    Runs the Triton kernels where they can launch (CUDA, or CPU under TRITON_INTERPRET=1),
    else the PyTorch reference.
    """
    if use_triton(x):
        return RMSNormFunction.apply(x, weight, residual, eps)
    return rms_norm_reference(x, weight, eps, residual)

"""Rotary position embedding for q and k in megatron-core's layout, in one launch.

Semantics are megatron-core's `_apply_rotary_pos_emb_bshd` (models/common/embeddings/rope_utils.py)
with `rotary_interleaved=False`:

    t: [seq, batch, heads, dim]; freqs: [seq, 1 or batch, 1, rot_dim] (RotaryEmbedding's output,
    angles in fp32, rot_dim = dim * rotary_percent, the two halves of freqs normally equal)
    out[..., :rot] = t_rot * cos(freqs) + rotate_half(t_rot) * sin(freqs)
    out[..., rot:] = t[..., rot:]           rotate_half(x) = cat(-x2, x1)

One program per (position, batch) row handles every head of q and of k, so cos/sin are computed
once per position in fp32 (megatron rounds them to the activation dtype first) and nothing but
the angles is kept for backward: the gradient is the same rotation by the opposite angle.
q and k may be strided views (megatron splits them out of the fused qkv projection).
"""

import torch

from . import lazy_jit, next_power_of_2, use_triton
from ._tl import tl


def rope_reference(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: megatron's formula with cos/sin and the products in fp32."""
    rot = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot], t[..., rot:]
    x1, x2 = torch.chunk(t_rot.float(), 2, dim=-1)
    cos, sin = torch.cos(freqs.float()), torch.sin(freqs.float())
    out = t_rot.float() * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((out.to(t.dtype), t_pass), dim=-1)


@lazy_jit
def _rope_kernel(Q, K, QO, KO, FREQ, B, sq_s, sq_b, sq_h, sk_s, sk_b, sk_h, sqo_s, sqo_b, sqo_h,
                 sko_s, sko_b, sko_h, sf_s, sf_b, HQ, HK, D, R_HALF,
                 HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr, RH_PAD: tl.constexpr,
                 PASS_PAD: tl.constexpr, HAS_K: tl.constexpr, HAS_PASS: tl.constexpr,
                 BACKWARD: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    s = pid // B
    b = pid % B
    j = tl.arange(0, RH_PAD)[None, :]
    jm = j < R_HALF
    f1 = tl.load(FREQ + s * sf_s + b * sf_b + j, mask=jm, other=0.0).to(tl.float32)
    f2 = tl.load(FREQ + s * sf_s + b * sf_b + R_HALF + j, mask=jm, other=0.0).to(tl.float32)
    c1 = tl.cos(f1)
    c2 = tl.cos(f2)
    if BACKWARD:
        # The transpose of [[c1, -s1], [s2, c2]]: dx1 = dy1*c1 + dy2*s2, dx2 = dy2*c2 - dy1*s1.
        s1 = -tl.sin(f2)
        s2 = -tl.sin(f1)
    else:
        s1 = tl.sin(f1)
        s2 = tl.sin(f2)
    # q then k; written out twice because a compiled kernel can only call other jit functions.
    heads = tl.arange(0, HQ_PAD)[:, None]
    mask = (heads < HQ) & jm
    src = Q + s * sq_s + b * sq_b + heads * sq_h
    dst = QO + s * sqo_s + b * sqo_b + heads * sqo_h
    x1 = tl.load(src + j, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + R_HALF + j, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst + j, (x1 * c1 - x2 * s1).to(QO.dtype.element_ty), mask=mask)
    tl.store(dst + R_HALF + j, (x2 * c2 + x1 * s2).to(QO.dtype.element_ty), mask=mask)
    if HAS_PASS:
        p = 2 * R_HALF + tl.arange(0, PASS_PAD)[None, :]
        pmask = (heads < HQ) & (p < D)
        tl.store(dst + p, tl.load(src + p, mask=pmask, other=0.0), mask=pmask)
    if HAS_K:
        heads = tl.arange(0, HK_PAD)[:, None]
        mask = (heads < HK) & jm
        src = K + s * sk_s + b * sk_b + heads * sk_h
        dst = KO + s * sko_s + b * sko_b + heads * sko_h
        x1 = tl.load(src + j, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + R_HALF + j, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + j, (x1 * c1 - x2 * s1).to(KO.dtype.element_ty), mask=mask)
        tl.store(dst + R_HALF + j, (x2 * c2 + x1 * s2).to(KO.dtype.element_ty), mask=mask)
        if HAS_PASS:
            p = 2 * R_HALF + tl.arange(0, PASS_PAD)[None, :]
            pmask = (heads < HK) & (p < D)
            tl.store(dst + p, tl.load(src + p, mask=pmask, other=0.0), mask=pmask)


def _check(t: torch.Tensor, name: str) -> None:
    if t.dim() != 4:
        raise ValueError(f"apply_rotary: {name} must be [seq, batch, heads, dim], got {tuple(t.shape)}")
    if t.stride(-1) != 1:
        raise ValueError(f"apply_rotary: {name} must be contiguous in its last dim")


def _launch(q, k, freqs, backward: bool):
    s_len, bsz, hq, d = q.shape
    rot = freqs.shape[-1]
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device) if k is not None else None
    kk, kko = (k, ko) if k is not None else (q, qo)  # placeholders when there is no k
    hk = kk.shape[2] if k is not None else 1
    sf_b = freqs.stride(1) if freqs.shape[1] > 1 else 0
    r_half = rot // 2
    if s_len * bsz > 0:
        _rope_kernel[(s_len * bsz,)](
            q, kk, qo, kko, freqs, bsz,
            q.stride(0), q.stride(1), q.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
            qo.stride(0), qo.stride(1), qo.stride(2), kko.stride(0), kko.stride(1), kko.stride(2),
            freqs.stride(0), sf_b, hq, hk, d, r_half,
            HQ_PAD=next_power_of_2(hq), HK_PAD=next_power_of_2(hk), RH_PAD=next_power_of_2(r_half),
            PASS_PAD=next_power_of_2(max(d - rot, 1)), HAS_K=k is not None, HAS_PASS=rot < d,
            BACKWARD=backward, num_warps=4)
    return qo, ko


class RotaryFunction(torch.autograd.Function):
    """Triton rotary embedding of q (and k) with megatron's freqs; returns (q_out, k_out)."""

    @staticmethod
    def forward(ctx, q, k, freqs):
        _check(q, "q")
        if k is not None:
            _check(k, "k")
            if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or k.dtype != q.dtype:
                raise ValueError(f"apply_rotary: k {tuple(k.shape)} does not match q {tuple(q.shape)}")
        s_len, bsz, _, d = q.shape
        if freqs.dim() != 4 or freqs.shape[0] != s_len or freqs.shape[1] not in (1, bsz) \
                or freqs.shape[2] != 1:
            raise ValueError(f"apply_rotary: freqs must be [{s_len}, 1 or {bsz}, 1, rot_dim], "
                             f"got {tuple(freqs.shape)}")
        rot = freqs.shape[-1]
        if rot % 2 or rot > d:
            raise ValueError(f"apply_rotary: rot_dim {rot} must be even and <= head dim {d}")
        if freqs.stride(-1) != 1:
            freqs = freqs.contiguous()
        ctx.save_for_backward(freqs)
        ctx.has_k = k is not None
        return _launch(q, k, freqs, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        (freqs,) = ctx.saved_tensors
        # Gradients are materialized (zeros where an output was unused), so dq is a tensor.
        dq = dq if dq.stride(-1) == 1 else dq.contiguous()
        if not ctx.has_k:
            dk = None
        elif dk.stride(-1) != 1:
            dk = dk.contiguous()
        gq, gk = _launch(dq, dk, freqs, backward=True)
        return gq, gk, None


def apply_rotary(q: torch.Tensor, freqs: torch.Tensor, k: torch.Tensor | None = None):
    """Rotate q (and k) by megatron's RotaryEmbedding angles; returns q_out or (q_out, k_out).

    Layout [seq, batch, heads, dim], non-interleaved (rotate_half) convention, freqs
    [seq, 1|batch, 1, rot_dim] with rot_dim <= dim (rotary_percent < 1 passes the rest through).
    """
    if use_triton(q):
        qo, ko = RotaryFunction.apply(q, k, freqs)
        return qo if k is None else (qo, ko)
    if k is None:
        return rope_reference(q, freqs)
    return rope_reference(q, freqs), rope_reference(k, freqs)

"""Triton kernels (domainlm.pretrain.kernels) against PyTorch references, on CPU.

The kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by the autouse fixture for
this module only; the kernels are decorated at first launch, so the setting takes effect even
if another test imported them first). Each test also checks that the Triton autograd Function
really ran, so a silent fallback to the PyTorch path cannot pass for a kernel.
References are evaluated in float64 on the same (rounded) inputs; tolerances are per dtype.
"""

from __future__ import annotations

import logging
import os
import socket

import pytest
import torch
import torch.nn.functional as F
import torch.utils._python_dispatch

from domainlm.pretrain import kernels
from domainlm.pretrain.kernels.fused_linear_ce import (
    auto_chunk_size,
    fused_linear_cross_entropy,
    linear_cross_entropy_reference,
)
from domainlm.pretrain.kernels.rmsnorm import rms_norm, rms_norm_reference
from domainlm.pretrain.kernels.rope import apply_rotary, rope_reference
from domainlm.pretrain.kernels.swiglu import swiglu, swiglu_reference
from tests.conftest import triton_interpreter_env

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter():
    with triton_interpreter_env():
        yield


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0):
    """Elementwise closeness; `scale` widens atol for sums of many terms (weight gradients)."""
    tol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol["rtol"],
                               atol=tol["atol"] * scale)


def ran(out: torch.Tensor, fn_name: str) -> bool:
    return type(out.grad_fn).__name__ == f"{fn_name}Backward"


def leaf(shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).requires_grad_()


def f64(*ts):
    return [t.detach().double().requires_grad_() for t in ts]


def test_interpreter_path_selected(caplog):
    assert kernels.use_triton(torch.zeros(1))
    kernels._SAID.clear()  # each choice is logged once per process; this test wants to see it
    with caplog.at_level(logging.INFO, logger="domainlm.pretrain.kernels"):
        assert kernels.resolve_kernels("triton", "cpu") == "triton"
    assert "interpreter" in caplog.text
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        assert not kernels.use_triton(torch.zeros(1))
        with caplog.at_level(logging.WARNING, logger="domainlm.pretrain.kernels"):
            assert kernels.resolve_kernels("triton", "cpu") == "torch"
        assert "TRITON_INTERPRET=1" in caplog.text
        # Where Triton cannot launch, the public functions run their reference.
        x = torch.randn(3, 8)
        torch.testing.assert_close(rms_norm(x, torch.ones(8)), rms_norm_reference(x, torch.ones(8)))
    finally:
        os.environ["TRITON_INTERPRET"] = "1"
    with pytest.raises(ValueError, match="kernels must be one of"):
        kernels.resolve_kernels("cuda")


def test_interpreter_mode_without_triton_knobs(monkeypatch):
    """Triton < 3.4 has no triton.knobs: the mode then comes from TRITON_INTERPRET, which is what
    triton.jit itself reads there (pyproject allows triton >= 3.2)."""
    import sys

    import triton

    assert kernels._interpret_mode() is True          # knobs, with TRITON_INTERPRET=1 (fixture)
    monkeypatch.delattr(triton, "knobs", raising=False)
    monkeypatch.setitem(sys.modules, "triton.knobs", None)   # `from triton import knobs` fails
    assert kernels._interpret_mode() is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernels._interpret_mode() is False


# Compiled mode: every kernel through Triton's GPU compiler (to a cubin), no GPU needed ----------

BF = "*bf16"
COMPILE_CASES = [
    ("rmsnorm", "_rmsnorm_fwd", dict(X=BF, R=BF, W=BF, Y=BF, H=BF, RSTD="*fp32", eps="fp32"),
     dict(HAS_RES=True, BLOCK=4096), 8),
    ("rmsnorm", "_rmsnorm_fwd", dict(X=BF, R=BF, W="*fp32", Y=BF, H=BF, RSTD="*fp32", eps="fp32"),
     dict(HAS_RES=False, BLOCK=128), 4),
    ("rmsnorm", "_rmsnorm_bwd", dict(DY=BF, H=BF, W=BF, RSTD="*fp32", DX=BF, DRES=BF,
                                     DW_PART="*fp32"), dict(HAS_DRES=True, BLOCK=2048), 8),
    ("swiglu", "_swiglu_fwd", dict(X=BF, Y=BF), dict(BLOCK=1024), 4),
    ("swiglu", "_swiglu_bwd", dict(X=BF, DY=BF, DX=BF), dict(BLOCK=1024), 4),
    ("rope", "_rope_kernel", dict(Q=BF, K=BF, QO=BF, KO=BF, FREQ="*fp32"),
     dict(HQ_PAD=32, HK_PAD=8, RH_PAD=64, PASS_PAD=1, HAS_K=True, HAS_PASS=False, BACKWARD=False), 4),
    ("rope", "_rope_kernel", dict(Q=BF, K=BF, QO=BF, KO=BF, FREQ="*fp32"),
     dict(HQ_PAD=32, HK_PAD=8, RH_PAD=32, PASS_PAD=64, HAS_K=False, HAS_PASS=True, BACKWARD=True), 4),
    ("fused_linear_ce", "_ce_stats", dict(LOGITS=BF, LABELS="*i64", STATS="*fp32"),
     dict(BLOCK_V=4096), 8),
    ("fused_linear_ce", "_ce_grad", dict(LOGITS=BF, LABELS="*i64", LSE="*fp32", SCALE="*fp32",
                                         smooth="fp32", target_coef="fp32", z2="fp32"),
     dict(HAS_SCALE=True, BLOCK_V=4096), 8),
    ("fused_linear_ce", "_scale", dict(X=BF, Y=BF, S="*fp32", numel="i64"), dict(BLOCK=1024), 4),
]


def _compile(case, cc: int):
    """One COMPILE_CASES kernel through Triton's GPU compiler for compute capability `cc`."""
    import importlib
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, types, consts, warps = case
    lazy = getattr(importlib.import_module(f"domainlm.pretrain.kernels.{module}"), name)
    params = list(inspect.signature(lazy.fn).parameters)
    signature = {p: "constexpr" if p in consts else types.get(p, "i32") for p in params}
    constexprs = {(i,): consts[p] for i, p in enumerate(params) if p in consts}
    src = ASTSource(fn=triton.jit(lazy.fn), signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps})


def test_kernels_compile_for_gpu():
    """The interpreter runs kernels as Python and accepts code the GPU compiler rejects (loop-carried
    type changes, non-jit calls); compile each kernel for Hopper and Ampere to a cubin as well."""
    import triton

    os.environ["TRITON_INTERPRET"] = "0"
    # Triton >= 3.4 reads the mode through triton.knobs, where a value set in the process (by an
    # earlier test's library code) overrides the variable: drop it for the compile, put it back after.
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    pinned = runtime.__dict__.pop("interpret", None) if runtime is not None else None
    try:
        kernels._sync_language_mode(False)
        for case in COMPILE_CASES:
            for cc in (90, 80):
                assert _compile(case, cc).asm["cubin"], (case[1], case[3], cc)
    finally:
        os.environ["TRITON_INTERPRET"] = "1"
        if pinned is not None:
            runtime.__dict__["interpret"] = pinned


def _interpreter_stand_ins() -> list[str]:
    """Attributes of triton.language.core / math / tensor / dtype that are Triton interpreter code."""
    import triton.language as tl

    out = []
    for obj in (tl.core, tl.math, tl.core.tensor, tl.core.dtype, tl.core.condition):
        for name, value in vars(obj).items():
            code = getattr(value, "fget", value)
            if getattr(code, "__qualname__", "").startswith("_patch") or \
                    getattr(code, "__module__", "") == "triton.runtime.interpreter":
                out.append(f"{getattr(obj, '__name__', obj)}.{name}")
    return out


def test_compiled_mode_after_interpreted_kernels_is_clean():
    """Interpreted kernels whose device functions (tl.sum, tl.max) Triton's interpreter patches
    into triton.language.core without restoring: back in compiled mode none of its stand-ins is
    left (they made the compile test fail after the interpreter tests: `create_icmpSLT()`), and a
    kernel compiles; then the interpreter works again. Order-independent by construction."""
    import triton

    x, w = leaf((5, 96), torch.float32), leaf((96,), torch.float32, seed=1)
    y = rms_norm(x, w, 1e-6)
    y.sum().backward()
    h, W = leaf((6, 16), torch.float32), leaf((50, 16), torch.float32, seed=2)
    fused_linear_cross_entropy(h, W, torch.randint(0, 50, (6,))).backward()
    assert ran(y, "RMSNormFunction")
    os.environ["TRITON_INTERPRET"] = "0"
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    pinned = runtime.__dict__.pop("interpret", None) if runtime is not None else None
    try:
        kernels._sync_language_mode(False)
        assert _interpreter_stand_ins() == []
        assert _compile(COMPILE_CASES[1], 90).asm["cubin"]
    finally:
        os.environ["TRITON_INTERPRET"] = "1"
        if pinned is not None:
            runtime.__dict__["interpret"] = pinned
    y2 = rms_norm(x, w, 1e-6)                                  # the interpreter again
    assert ran(y2, "RMSNormFunction") and torch.equal(y2, y)


# RMSNorm ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 67), (7, 100), (2, 3, 64)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm(dtype, shape, with_residual):
    n = shape[-1]
    x = leaf(shape, dtype, seed=1)
    w = (1 + 0.2 * torch.randn(n, generator=torch.Generator().manual_seed(2))).to(dtype).requires_grad_()
    r = leaf(shape, dtype, seed=3) if with_residual else None
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    dh = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    inputs = [x, w] + ([r] if with_residual else [])
    ref_inputs = f64(*inputs)

    out = rms_norm(x, w, 1e-5, r)
    ref = rms_norm_reference(ref_inputs[0], ref_inputs[1], 1e-5,
                             ref_inputs[2] if with_residual else None)
    if with_residual:
        (y, h), (y_ref, h_ref) = out, ref
        assert ran(y, "RMSNormFunction") and h.dtype == dtype
        close(h, h_ref, dtype)
        grads = torch.autograd.grad((y, h), inputs, (dy, dh))
        ref_grads = torch.autograd.grad((y_ref, h_ref), ref_inputs, (dy.double(), dh.double()))
    else:
        y, y_ref = out, ref
        assert ran(y, "RMSNormFunction")
        grads = torch.autograd.grad(y, inputs, dy)
        ref_grads = torch.autograd.grad(y_ref, ref_inputs, dy.double())
    assert y.dtype == dtype and y.shape == shape
    close(y, y_ref, dtype)
    for name, g, g_ref in zip(("x", "weight", "residual"), grads, ref_grads):
        assert g.dtype == dtype, name
        close(g, g_ref, dtype, scale=4.0 if name == "weight" else 1.0)


def test_rmsnorm_fp32_weight_with_bf16_input():
    # megatron keeps norm weights in params_dtype; activations may be bf16 under autocast-free bf16.
    x = leaf((5, 48), torch.bfloat16, seed=6)
    w = torch.linspace(0.5, 1.5, 48).requires_grad_()
    y = rms_norm(x, w)
    assert ran(y, "RMSNormFunction") and y.dtype == torch.bfloat16
    xr, wr = f64(x, w)
    close(y, rms_norm_reference(xr, wr), torch.bfloat16)
    g = torch.autograd.grad(y.float().sum(), [x, w])
    g_ref = torch.autograd.grad(rms_norm_reference(xr, wr).sum(), [xr, wr])
    assert g[1].dtype == torch.float32
    close(g[0], g_ref[0], torch.bfloat16)
    close(g[1], g_ref[1], torch.bfloat16, scale=4.0)


# SwiGLU -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2 * 67), (6, 200), (2, 3, 2 * 1100)])
def test_swiglu(dtype, shape):
    x = leaf(shape, dtype, scale=2.0, seed=7)
    y = swiglu(x)
    assert ran(y, "SwiGLUFunction") and y.shape == shape[:-1] + (shape[-1] // 2,)
    (xr,) = f64(x)
    # megatron's gated linear unit: chunk(2, -1), activation on the first half.
    gate, up = torch.chunk(xr, 2, dim=-1)
    y_ref = F.silu(gate) * up
    close(y, y_ref, dtype)
    close(y, swiglu_reference(x.detach()), dtype)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    (g,) = torch.autograd.grad(y, x, dy)
    (g_ref,) = torch.autograd.grad(y_ref, xr, dy.double())
    assert g.dtype == dtype
    close(g, g_ref, dtype)


# Rotary -----------------------------------------------------------------------------------------


def megatron_freqs(seq: int, head_dim: int, rotary_percent: float) -> torch.Tensor:
    """freqs as megatron's RotaryEmbedding builds them (get_emb: cat(freqs, freqs), [s,1,1,rot])."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(head_dim, rotary_percent, use_cpu_initialization=True)
    f = rope.get_freqs_non_repeated(seq)
    return torch.cat((f, f), dim=-1)[:, None, None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seq,batch,hq,hk,dim,percent", [
    (5, 2, 4, 2, 16, 1.0),   # GQA
    (3, 1, 3, 3, 20, 0.5),   # rotary_percent < 1: the tail of each head passes through
    (1, 1, 1, 1, 8, 1.0),    # a single row
])
def test_rope_matches_megatron(dtype, seq, batch, hq, hk, dim, percent):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    # q and k as megatron makes them: strided views split out of one fused qkv tensor.
    groups, per = hk, hq // hk
    mixed = leaf((seq, batch, groups, (per + 2) * dim), dtype, seed=9)
    q, k, _ = torch.split(mixed, [per * dim, dim, dim], dim=3)
    q = q.reshape(seq, batch, hq, dim)
    assert k.stride(2) == (per + 2) * dim  # a view into the fused tensor, not a copy
    freqs = megatron_freqs(seq, dim, percent)

    qo, ko = apply_rotary(q, freqs, k)
    assert ran(qo, "RotaryFunction") and qo.dtype == dtype
    (mr,) = f64(mixed)
    qr, kr, _ = torch.split(mr, [per * dim, dim, dim], dim=3)
    qr = qr.reshape(seq, batch, hq, dim)
    q_ref = _apply_rotary_pos_emb_bshd(qr, freqs.double())
    k_ref = _apply_rotary_pos_emb_bshd(kr, freqs.double())
    close(qo, q_ref, dtype)
    close(ko, k_ref, dtype)
    close(qo, rope_reference(q.detach(), freqs), dtype)
    dq = torch.randn(qo.shape, generator=torch.Generator().manual_seed(10)).to(dtype)
    dk = torch.randn(ko.shape, generator=torch.Generator().manual_seed(11)).to(dtype)
    (g,) = torch.autograd.grad((qo, ko), mixed, (dq, dk))
    (g_ref,) = torch.autograd.grad((q_ref, k_ref), mr, (dq.double(), dk.double()))
    close(g, g_ref, dtype)


def test_rope_q_only_and_per_batch_freqs():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    q = leaf((4, 3, 2, 12), torch.float32, seed=12)
    # Per-sequence positions ([s, b, 1, rot]), as with position offsets per batch row.
    freqs = megatron_freqs(8, 12, 1.0)[torch.arange(4)[:, None] + torch.tensor([0, 2, 4])[None, :], 0]
    freqs = freqs.reshape(4, 3, 1, 12)
    qo = apply_rotary(q, freqs)
    assert ran(qo, "RotaryFunction")
    (qr,) = f64(q)
    ref = _apply_rotary_pos_emb_bshd(qr, freqs.double())
    close(qo, ref, torch.float32)
    (g,) = torch.autograd.grad(qo.sum(), q)
    (g_ref,) = torch.autograd.grad(ref.sum(), qr)
    close(g, g_ref, torch.float32)
    with pytest.raises(ValueError, match="freqs must be"):
        apply_rotary(q, freqs[:3])


# Fused linear cross-entropy ---------------------------------------------------------------------


def ce_inputs(dtype, n=23, d=16, v=300, seed=13):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (0.3 * torch.randn(v, d, generator=g)).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[::4] = -100  # ignored tokens
    return h, w, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothing,z_loss,reduction,chunk", [
    (0.0, 0.0, "mean", 8),
    (0.1, 0.0, "mean", 7),
    (0.0, 1e-2, "sum", None),
    (0.1, 1e-3, "none", 8),
])
def test_fused_linear_ce(dtype, smoothing, z_loss, reduction, chunk):
    h, w, y = ce_inputs(dtype)
    loss = fused_linear_cross_entropy(h, w, y, label_smoothing=smoothing, z_loss=z_loss,
                                      reduction=reduction, chunk_size=chunk)
    assert ran(loss, "LinearCrossEntropyFunction") and loss.dtype == torch.float32
    hr, wr = f64(h, w)
    # The reference in its plainest form: F.cross_entropy on the full logits, plus z * lse^2.
    logits = hr @ wr.t()
    ref = F.cross_entropy(logits, y, ignore_index=-100, label_smoothing=smoothing, reduction="none")
    ref = ref + z_loss * torch.logsumexp(logits, -1).pow(2) * (y != -100)
    ref = {"mean": ref.sum() / (y != -100).sum(), "sum": ref.sum(), "none": ref}[reduction]
    close(loss, ref, torch.float32 if dtype == torch.float32 else dtype)
    # A constant upstream gradient over the tokens (the precomputed-gradient path).
    up = torch.tensor(0.37) if reduction != "none" else torch.full(y.shape, 0.37)
    grads = torch.autograd.grad(loss, [h, w], up)
    ref_grads = torch.autograd.grad(ref, [hr, wr], up.double())
    for g, g_ref in zip(grads, ref_grads):
        assert g.dtype == dtype
        close(g, g_ref, dtype, scale=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_ce_per_token_weights_recompute(dtype):
    # Per-token upstream weights that are not one constant take the recompute path in backward.
    h, w, y = ce_inputs(dtype, seed=14)
    loss = fused_linear_cross_entropy(h, w, y, label_smoothing=0.05, z_loss=1e-3,
                                      reduction="none", chunk_size=5)
    weights = torch.rand(y.shape, generator=torch.Generator().manual_seed(15))
    grads = torch.autograd.grad((loss * weights).sum(), [h, w])
    hr, wr = f64(h, w)
    ref = linear_cross_entropy_reference(hr, wr, y, label_smoothing=0.05, z_loss=1e-3,
                                         reduction="none")
    close(loss, ref, torch.float32 if dtype == torch.float32 else dtype)
    ref_grads = torch.autograd.grad((ref * weights.double()).sum(), [hr, wr])
    for g, g_ref in zip(grads, ref_grads):
        close(g, g_ref, dtype, scale=0.1)


def test_fused_linear_ce_fp32_accumulation_single_row_and_shapes():
    h, w, y = ce_inputs(torch.bfloat16, n=9, seed=16)
    y[0] = 5
    loss = fused_linear_cross_entropy(h, w, y, chunk_size=2, accum_dtype=torch.float32)
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert gw.dtype == torch.bfloat16
    hr, wr = f64(h, w)
    ref = linear_cross_entropy_reference(hr, wr, y)
    ref_grads = torch.autograd.grad(ref, [hr, wr])
    close(gh, ref_grads[0], torch.bfloat16, scale=0.1)
    close(gw, ref_grads[1], torch.bfloat16, scale=0.1)
    # One token; leading dims [b, s] in, [b, s] per-token losses out.
    h1, w1, _ = ce_inputs(torch.float32, n=1, seed=17)
    one = fused_linear_cross_entropy(h1, w1, torch.tensor([3]))
    close(one, F.cross_entropy(h1.double() @ w1.double().t(), torch.tensor([3])), torch.float32)
    h3 = leaf((2, 3, 16), torch.float32, seed=18)
    y3 = torch.randint(0, 300, (2, 3), generator=torch.Generator().manual_seed(19))
    per_token = fused_linear_cross_entropy(h3, w1.detach(), y3, reduction="none")
    assert per_token.shape == (2, 3)
    close(per_token, F.cross_entropy((h3.double() @ w1.double().t()).transpose(1, 2), y3,
                                     reduction="none"), torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, y, reduction="avg")
    with pytest.raises(ValueError, match="dtypes differ"):
        fused_linear_cross_entropy(h.float(), w, y)


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op run and the shapes it produced (work done and buffers made)."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        # Views and in-place ops reuse their input's memory: only new tensors count as buffers.
        name = func.overloadpacket.__name__
        fresh = not func.is_view and not name.endswith("_")
        self.ops.append((name, [tuple(t.shape) for t in outs if fresh and isinstance(t, torch.Tensor)]))
        return out

    def matmuls(self) -> int:
        return sum(name in ("mm", "addmm", "matmul", "bmm") for name, _ in self.ops)

    def made(self, shape) -> bool:
        return any(shape in shapes for _, shapes in self.ops)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_ce_under_no_grad_computes_no_gradients(reduction):
    """Validation runs the loss under torch.no_grad: one GEMM per chunk, no [V, d] weight-gradient
    or [N, d] hidden-gradient buffer, and the same losses as with autograd on."""
    n, d, v, chunk = 24, 32, 300, 8
    h, w, y = ce_inputs(torch.bfloat16, n=n, d=d, v=v, seed=31)
    with torch.no_grad(), _Ops() as ops:
        quiet = fused_linear_cross_entropy(h, w, y, chunk_size=chunk, reduction=reduction)
    assert quiet.grad_fn is None and w.grad is None
    assert ops.matmuls() == n // chunk                    # the logits' GEMM per chunk, nothing else
    assert not ops.made((v, d)) and not ops.made((n, d))  # no gradient buffers
    with _Ops() as ops_grad:
        loud = fused_linear_cross_entropy(h, w, y, chunk_size=chunk, reduction=reduction)
    assert ops_grad.matmuls() == 3 * (n // chunk) and ops_grad.made((v, d))  # what no_grad saves
    assert torch.equal(quiet, loud.detach())
    # Inputs that need no gradient take the same path with autograd on.
    with _Ops() as ops_frozen:
        frozen = fused_linear_cross_entropy(h.detach(), w.detach(), y, chunk_size=chunk, reduction=reduction)
    assert ops_frozen.matmuls() == n // chunk and torch.equal(frozen, quiet)


def test_fused_linear_ce_under_autocast_computes_in_its_dtype():
    """QLoRA trains with fp32 head and hidden states under bf16 autocast. The fused loss then runs
    in bf16 as autocast runs the unfused head (on the H100 it failed: autocast cast the backward's
    GEMM into a buffer of the other dtype), with fp32 gradients for the fp32 inputs."""
    h, w, y = ce_inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(h, w, y, chunk_size=8)
    assert ran(loss, "LinearCrossEntropyFunction") and loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, [h, w])
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]
    # The reference: the same loss on the bf16-rounded inputs, in float64.
    hb, wb = (t.detach().to(torch.bfloat16).double().requires_grad_() for t in (h, w))
    ref = F.cross_entropy(hb @ wb.t(), y, ignore_index=-100)
    close(loss, ref, torch.bfloat16)
    for g, g_ref in zip(grads, torch.autograd.grad(ref, [hb, wb])):
        close(g, g_ref, torch.bfloat16, scale=0.1)


def test_fused_linear_ce_weight_gradient_sums_chunks_in_fp32():
    """128 one-token chunks all pulling on the same weights: summed in fp32 (the default) the
    weight gradient stays within one bf16 ulp of the one-chunk result (one GEMM, fp32 inside);
    summed in bf16 (accum_dtype=None, Liger's way) it drifts several times further."""
    h, w, y = ce_inputs(torch.bfloat16, n=128, d=16, v=32, seed=32)
    h = h.detach().abs().requires_grad_()  # same-sign terms: the partial sums grow
    y[:] = 7

    def grad_w(chunk, **kw):
        loss = fused_linear_cross_entropy(h, w, y, chunk_size=chunk, reduction="sum", **kw)
        return torch.autograd.grad(loss, w)[0].double()

    one = grad_w(128)
    drift = {name: ((grad_w(1, **kw) - one).abs().max() / one.abs().max()).item()
             for name, kw in (("fp32", {}), ("bf16", {"accum_dtype": None}))}
    assert drift["fp32"] <= 2 ** -7, drift                # at most one bf16 ulp
    assert drift["bf16"] >= 3 * drift["fp32"] and drift["bf16"] >= 2 ** -6, drift
    hr, wr = f64(h, w)
    ref = torch.autograd.grad(linear_cross_entropy_reference(hr, wr, y, reduction="sum"), wr)[0]
    close(one, ref, torch.bfloat16, scale=2.0)


def test_auto_chunk_size_bounds_logits_memory():
    # 8B-like: 8192 tokens x hidden 4096 at vocab 128k -> 512-token chunks (128 MiB of bf16 logits).
    assert auto_chunk_size(8192, 4096, 128256) == 512
    assert auto_chunk_size(8192, 2048, 32000) == 2048
    assert auto_chunk_size(10, 16, 300) == 10


def _tp_worker(rank, world, port, result_q):
    import torch.distributed as dist

    os.environ["TRITON_INTERPRET"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        h, w, y = ce_inputs(torch.float32, n=11, v=96, seed=20)
        shard = w.detach()[rank * 48:(rank + 1) * 48].clone().requires_grad_()
        hh = h.detach().clone().requires_grad_()
        loss = fused_linear_cross_entropy(hh, shard, y, label_smoothing=0.1, z_loss=1e-2,
                                          chunk_size=4, tp_group=dist.group.WORLD)
        loss.backward()
        # d hidden is a partial sum over vocab shards; megatron's copy region all-reduces it.
        dist.all_reduce(hh.grad)
        # numpy copies travel by value: a shared-memory tensor is fetched from this process when
        # the parent unpickles it, which fails if this process has already exited.
        result_q.put((rank, loss.item(), hh.grad.numpy(), shard.grad.numpy()))
    finally:
        dist.destroy_process_group()


def test_fused_linear_ce_vocab_parallel_two_ranks():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_tp_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    h, w, y = ce_inputs(torch.float32, n=11, v=96, seed=20)
    hr, wr = f64(h, w)
    ref = linear_cross_entropy_reference(hr, wr, y, label_smoothing=0.1, z_loss=1e-2)
    g_h, g_w = torch.autograd.grad(ref, [hr, wr])
    for rank, loss, dh, dw in results:
        dh, dw = torch.from_numpy(dh), torch.from_numpy(dw)
        close(torch.tensor(loss), ref, torch.float32)
        close(dh, g_h, torch.float32)
        close(dw, g_w[rank * 48:(rank + 1) * 48], torch.float32)


# A tiny GPTModel: kernels: triton against kernels: torch ----------------------------------------


@pytest.fixture(scope="module")
def megatron_world():
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        created = True
    else:
        created = False
    parallel_state.initialize_model_parallel(1, 1)
    yield
    from domainlm.pretrain import cpu_compat

    cpu_compat.restore_megatron_rng()   # _tiny_gpt installed the CPU stand-in
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()


def _tiny_gpt(kernels_choice: str, norm_kernel: str = "torch", num_layers: int | None = None, seq_len: int = 12):
    from domainlm.pretrain import cpu_compat
    from domainlm.pretrain.config import ModelArgs
    from domainlm.pretrain.model import build_model, transformer_config
    from domainlm.pretrain.config import resolve_model

    m = resolve_model(ModelArgs(size="tiny", kernels=kernels_choice, norm_kernel=norm_kernel, num_layers=num_layers))
    config = transformer_config(m, cpu=True)
    cpu_compat.model_parallel_manual_seed(1234)
    return build_model(m, config, vocab_size=256, seq_len=seq_len)


def _graph_functions(t: torch.Tensor) -> set[str]:
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("norm_kernel", ["torch", "triton"])
def test_tiny_gpt_triton_matches_torch(megatron_world, norm_kernel):
    """kernels: triton against kernels: torch, the norms torch's (the default) or ours."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from domainlm.pretrain.kernels import modules as tk
    from domainlm.pretrain.model import RMSNorm

    ref, ours = _tiny_gpt("torch"), _tiny_gpt("triton", norm_kernel)
    if norm_kernel == "triton":
        assert isinstance(ours.decoder.layers[0], tk.TritonTransformerLayer)
        assert isinstance(ours.decoder.final_layernorm, tk.TritonRMSNorm)
    else:
        assert type(ours.decoder.layers[0]) is TransformerLayer
        assert type(ours.decoder.final_layernorm) is RMSNorm
        assert type(ours.decoder.layers[0].mlp) is tk.TritonMLP
    # Same parameters under the same names and init: checkpoints move between the two.
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert sd_ref.keys() == sd_ours.keys()
    for k in sd_ref:
        if torch.is_tensor(sd_ref[k]):
            torch.testing.assert_close(sd_ref[k], sd_ours[k], rtol=0, atol=0)

    g = torch.Generator().manual_seed(21)
    tokens = torch.randint(0, 256, (2, 12), generator=g)
    labels = torch.randint(0, 256, (2, 12), generator=g)
    positions = torch.arange(12)[None].expand(2, 12)
    mask = (torch.rand(2, 12, generator=g) > 0.25).float()
    outs = []
    for model, loss_mask in ((ref, None), (ours, mask)):
        per_token = model(tokens, positions, None, labels=labels, loss_mask=loss_mask)
        assert per_token.shape == (2, 12)
        loss = (per_token * mask).sum() / mask.sum()
        loss.backward()
        outs.append((per_token, loss))
    fns = _graph_functions(outs[1][1])
    for fn in ("SwiGLUFunction", "RotaryFunction", "LinearCrossEntropyFunction"):
        assert f"{fn}Backward" in fns, f"{fn} did not run in the triton model"
    assert ("RMSNormFunctionBackward" in fns) == (norm_kernel == "triton")
    torch.testing.assert_close(outs[1][0] * mask, outs[0][0] * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-6)
    for (name, p_ref), (_, p_ours) in zip(ref.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)


def _saved_bytes_per_token_and_layer(kernels_choice: str, norm_kernel: str, seq: int = 16) -> float:
    """Bytes autograd keeps for backward per token in one layer: a forward of 2 layers minus one
    of 1 (the embedding, final norm and loss cancel out), parameters not counted."""
    from domainlm.pretrain.memory import saved_for_backward_bytes

    def saved(n_layers: int) -> int:
        model = _tiny_gpt(kernels_choice, norm_kernel, num_layers=n_layers, seq_len=seq)
        g = torch.Generator().manual_seed(5)
        tokens, labels = torch.randint(0, 256, (1, seq), generator=g), torch.randint(0, 256, (1, seq), generator=g)
        return saved_for_backward_bytes(lambda: model(tokens, torch.arange(seq)[None], None, labels=labels),
                                        exclude=list(model.parameters()))

    return (saved(2) - saved(1)) / seq


def test_triton_layer_keeps_less_for_backward_than_the_torch_layer(megatron_world):
    """Activation memory of a layer (issue 21 asked where the triton path's higher GPU peak
    comes from): the fused SwiGLU keeps fc1's output (2F values a token) where megatron's eager
    gated unit also keeps silu(gate) and `up + glu_linear_offset`, 2F more (pretrain/memory.py
    counts the same); the fused add + norm keeps the sum once (2H fewer); megatron's rotary keeps
    cos and sin for q and k in every layer (4 x head_dim a token), ours the one frequency table
    all layers share. Tiny shape, fp32:
    F = 192, H = 64, head_dim 16. On the 1B shape (bench/RESULTS.md) the same count gives
    239 KiB a token and layer for torch, 174 for triton, 158 with our norm."""
    f, h, head_dim, fp32 = 192, 64, 16, 4
    torch_layer = _saved_bytes_per_token_and_layer("torch", "torch")
    triton_layer = _saved_bytes_per_token_and_layer("triton", "torch")
    triton_norm = _saved_bytes_per_token_and_layer("triton", "triton")
    print(f"bytes a token and layer: torch {torch_layer}, triton {triton_layer}, triton + our norm {triton_norm}")
    assert torch_layer - triton_layer == 2 * f * fp32 + 4 * head_dim * fp32
    assert triton_layer - triton_norm == 2 * h * fp32

"""The Triton kernels compiled for the GPU, in bf16 at Llama 1B shapes, against what `kernels: torch`
runs (F.rms_norm, megatron's gated linear unit and rotary, the output projection + cross-entropy),
forward and gradients. Skipped where CUDA is absent (tests/test_kernels.py covers the same
kernels on CPU under Triton's interpreter).

Tolerance, stated once: both implementations are compared with a float64 evaluation of the same
bf16 inputs; the kernel's largest error, relative to the largest magnitude of the result, must be
at most 1.5x the torch path's, or at most 2^-8 (one bf16 rounding), whichever is larger. A wrong
index or a dropped term shows up as an error of order 1.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TOKENS, HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 8192, 2048, 8192, 32, 8, 64, 32000  # Llama 3.2 1B
EPS = 1e-5
BF = torch.bfloat16


@pytest.fixture(autouse=True, scope="module")
def compiled_mode():
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    if old is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = old


def _leaf(*shape, scale=1.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(*shape, device="cuda", generator=g) * scale).to(BF).requires_grad_()


def _rel(x: torch.Tensor, truth: torch.Tensor) -> float:
    return ((x.double() - truth).abs().max() / truth.abs().max().clamp(min=1e-30)).item()


def _check(name: str, ours, theirs, truth) -> None:
    """ours / theirs / truth: tuples of tensors (outputs, then gradients)."""
    for i, (a, b, t) in enumerate(zip(ours, theirs, truth)):
        e_ours, e_torch = _rel(a, t), _rel(b, t)
        assert e_ours <= max(1.5 * e_torch, 2 ** -8), f"{name}[{i}]: triton {e_ours:.2e}, torch {e_torch:.2e}"


def _run(fn, inputs, grads):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gs = torch.autograd.grad(outs, inputs, grads)
    return tuple(o.detach() for o in outs) + gs


def _f64(*ts):
    return [t.detach().double().requires_grad_() for t in ts]


@pytest.mark.parametrize("residual", [False, True])
def test_rmsnorm_bf16_1b(residual):
    from domainlm.pretrain.kernels.rmsnorm import rms_norm

    x, r = _leaf(TOKENS, HIDDEN, seed=1), _leaf(TOKENS, HIDDEN, seed=2)
    w = (1 + 0.1 * _leaf(HIDDEN, seed=3).detach()).requires_grad_()
    dy = torch.randn(TOKENS, HIDDEN, device="cuda").to(BF)
    if residual:
        inputs, grads = [x, r, w], (dy, dy)
        ours = _run(lambda a, b, c: rms_norm(a, c, EPS, residual=b), inputs, grads)

        def torch_path(a, b, c):
            h = a + b
            return F.rms_norm(h, (HIDDEN,), c, EPS), h
    else:
        inputs, grads = [x, w], dy
        ours = _run(lambda a, c: rms_norm(a, c, EPS), inputs, grads)

        def torch_path(a, c):
            return F.rms_norm(a, (HIDDEN,), c, EPS)
    theirs = _run(torch_path, inputs, grads)
    grads64 = tuple(g.double() for g in (grads if isinstance(grads, tuple) else (grads,)))
    truth = _run(torch_path, _f64(*inputs), grads64)
    _check(f"rmsnorm residual={residual}", ours, theirs, truth)


def test_swiglu_bf16_1b():
    from domainlm.pretrain.kernels.swiglu import swiglu

    def torch_path(x):
        gate, up = torch.chunk(x, 2, dim=-1)
        return F.silu(gate) * up

    x = _leaf(TOKENS, 2 * FFN, seed=4)
    dy = torch.randn(TOKENS, FFN, device="cuda").to(BF)
    _check("swiglu", _run(swiglu, [x], dy), _run(torch_path, [x], dy),
           _run(torch_path, _f64(x), dy.double()))


def test_rope_bf16_1b():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from domainlm.pretrain.kernels.rope import apply_rotary

    seq, batch = 2048, TOKENS // 2048
    inv = RotaryEmbedding(HEAD_DIM, 1.0, rotary_base=500000, use_cpu_initialization=True).get_freqs_non_repeated(seq)
    freqs = torch.cat((inv, inv), -1)[:, None, None, :].cuda()
    q, k = _leaf(seq, batch, HEADS, HEAD_DIM, seed=5), _leaf(seq, batch, KV_HEADS, HEAD_DIM, seed=6)
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def torch_path(a, b, f=freqs):
        return _apply_rotary_pos_emb_bshd(a, f), _apply_rotary_pos_emb_bshd(b, f)

    _check("rope", _run(lambda a, b: apply_rotary(a, freqs, b), [q, k], (dq, dk)),
           _run(torch_path, [q, k], (dq, dk)),
           _run(lambda a, b: torch_path(a, b, freqs.double()), _f64(q, k), (dq.double(), dk.double())))


@pytest.mark.parametrize("vocab,tokens", [(VOCAB, TOKENS), (128256, 2048)])
def test_fused_linear_cross_entropy_bf16_1b(vocab, tokens):
    from domainlm.pretrain.kernels.fused_linear_ce import fused_linear_cross_entropy

    h, w = _leaf(tokens, HIDDEN, seed=7), _leaf(vocab, HIDDEN, scale=0.02, seed=8)
    y = torch.randint(0, vocab, (tokens,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(9))
    y[::7] = -100
    one = torch.ones((), device="cuda")

    def torch_path(a, b):   # GPTModel's output layer, then the loss on fp32 logits
        return F.cross_entropy((a @ b.t()).float(), y, ignore_index=-100)

    ours = _run(lambda a, b: fused_linear_cross_entropy(a, b, y), [h, w], one)
    theirs = _run(torch_path, [h, w], one)
    truth = _run(torch_path, _f64(h, w), one.double())
    _check(f"fused CE V={vocab}", ours, theirs, truth)
    from domainlm.pretrain.kernels import fused_linear_ce

    # Which weight-gradient accumulation ran (fp32 addmm from bf16, or the bf16 product + add).
    print(f"mixed-precision addmm used: {fused_linear_ce._MIXED_ADDMM}")
    # Validation: the same loss with no gradient work.
    with torch.no_grad():
        quiet = fused_linear_cross_entropy(h, w, y)
    assert torch.equal(quiet, ours[0])

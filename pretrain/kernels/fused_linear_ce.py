"""Output projection + cross-entropy without the full [tokens, vocab] logits.

    logits = hidden @ weight.T                       hidden [N, d], weight [V, d]
    loss_i = (1 - eps) * (lse_i - logits_i[y_i]) + eps * (lse_i - mean_j logits_ij) + z * lse_i^2

(eps: label smoothing, PyTorch's definition; z: the PaLM z-loss weight; tokens whose label is
`ignore_index` contribute nothing.) Reduction "mean" divides by the number of non-ignored tokens.

How: the tokens are walked in chunks. For each chunk one GEMM gives its logits [C, V] in the
activation dtype; a Triton kernel takes an online max / sum-exp over the vocab in blocks (plus
the target logit and the logit sum for smoothing); a second kernel overwrites the logits with
d loss / d logits; two more GEMMs turn that into the chunk's rows of d hidden and its share of
d weight. So the backward GEMMs run inside the forward (Liger's scheme): the whole op is the
same three GEMMs as eager, and only one chunk of logits exists at a time. Backward multiplies
the stored gradients by the incoming scalar.

Reduction "none" (megatron's per-token loss contract) keeps the same scheme when the incoming
per-token gradient is one constant over the non-ignored tokens (what `sum(loss * mask) / n`
produces once the mask is folded into the labels, see modules.py); otherwise backward
recomputes each chunk's logits with the real per-token weights (one extra GEMM per chunk).

Tensor parallelism (vocab-parallel, our own): with `tp_group` of size > 1, `weight` is this
rank's [V/tp, d] slice (megatron's ColumnParallelLinear layout, rank r owns rows r*V/tp ...).
The per-token max is all-reduced (MAX), then the rescaled sum-exp, the target logit (owned by
one rank) and the logit sum (SUM): three small [C] all-reduces per chunk, never logits. d hidden
is a partial sum over the vocab slices: the caller passes `hidden` through megatron's
`copy_to_tensor_model_parallel_region` (or the sequence-parallel gather), whose backward
all-reduces it, exactly as for megatron's own output layer. d weight stays local.

Precision: statistics, loss and gradients in fp32; d weight accumulates over chunks in
`accum_dtype`, fp32 by default: summing dozens of chunk products in bf16 rounds each partial sum
to 8 bits of mantissa (Liger's choice, the weight's dtype, stays available as
accum_dtype=None). The cost is the buffer: [V/tp, d] fp32 instead of bf16, 2 bytes more per
element (vocab 128k x 4096: 1 GiB more) for the length of the loss's forward, and on GPUs whose
torch lacks a bf16 -> fp32 `addmm` one bf16 [V/tp, d] product per chunk on top.

Without autograd (validation under torch.no_grad, or inputs that need no gradient) only the loss
is computed: one GEMM per chunk and no gradient buffers. `ctx.needs_input_grad` cannot tell,
since it reports the inputs' requires_grad flags even under no_grad.
"""

import torch
import torch.distributed as dist

from . import lazy_jit, next_power_of_2, num_warps_for, use_triton
from ._tl import tl

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy_reference(hidden, weight, labels, *, ignore_index: int = -100,
                                   label_smoothing: float = 0.0, z_loss: float = 0.0,
                                   reduction: str = "mean"):
    """PyTorch reference: full logits, F.cross_entropy in fp32, plus z * logsumexp^2."""
    logits = (hidden @ weight.t()).float()
    loss = torch.nn.functional.cross_entropy(logits, labels, ignore_index=ignore_index,
                                             label_smoothing=label_smoothing, reduction="none")
    valid = labels != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, dim=-1).pow(2) * valid
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp(min=1)
    if reduction == "sum":
        return loss.sum()
    return loss


@lazy_jit
def _ce_stats(LOGITS, LABELS, STATS, stride_l, V, v_start, ignore_index,
              BLOCK_V: tl.constexpr):
    """Per row: max, sum exp(x - max), target logit (0 if another rank owns it), sum of x."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    label = tl.load(LABELS + row)
    m = float("-inf")
    d = 0.0
    sx = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        sx += tl.sum(tl.where(mask, x, 0.0), axis=0)
        m = m_new
    local = label - v_start
    own = (local >= 0) & (local < V) & (label != ignore_index)
    xy = tl.load(base + tl.where(own, local, 0)).to(tl.float32)
    xy = tl.where(own, xy, 0.0)
    tl.store(STATS + row * 4, m)
    tl.store(STATS + row * 4 + 1, d)
    tl.store(STATS + row * 4 + 2, xy)
    tl.store(STATS + row * 4 + 3, sx)


@lazy_jit
def _ce_grad(LOGITS, LABELS, LSE, SCALE, stride_l, V, v_start, ignore_index, smooth, target_coef,
             z2, HAS_SCALE: tl.constexpr, BLOCK_V: tl.constexpr):
    """Overwrite a row of logits with d loss / d logits (times the row's scale)."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_l
    label = tl.load(LABELS + row)
    lse = tl.load(LSE + row)
    if HAS_SCALE:
        scale = tl.load(SCALE + row).to(tl.float32)
    else:
        scale = 1.0
    scale = tl.where(label == ignore_index, 0.0, scale)
    zfac = 1.0 + z2 * lse
    local = label - v_start
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        g = p * zfac - smooth - tl.where(cols == local, target_coef, 0.0)
        tl.store(base + cols, (g * scale).to(LOGITS.dtype.element_ty), mask=mask)


@lazy_jit
def _scale(X, Y, S, numel, BLOCK: tl.constexpr):
    """Y = X * S[0] in fp32, one rounding to Y's dtype (a bf16 0-dim multiply would round S)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    s = tl.load(S).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (x * s).to(Y.dtype.element_ty), mask=mask)


def _scaled(x: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    out = x if out_dtype == x.dtype else torch.empty(x.shape, dtype=out_dtype, device=x.device)
    n = x.numel()
    if n:
        block = 1024
        _scale[(-(-n // block),)](x, out, scale.reshape(1).float(), n, BLOCK=block, num_warps=4)
    return out


def auto_chunk_size(n_tokens: int, hidden: int, vocab_local: int) -> int:
    """Tokens per chunk: the chunk's logits hold about as many elements as the hidden states
    (never fewer than 2^26, about 128 MiB in bf16, so the GEMMs stay large), a multiple of 64."""
    target = max(n_tokens * hidden, 1 << 26)
    c = max(64, (target // max(vocab_local, 1)) // 64 * 64)
    return max(1, min(n_tokens, c))


def _block_v(vocab_local: int, device: torch.device) -> int:
    # The interpreter gains nothing from wide blocks; narrow ones keep its numpy temporaries small.
    cap = 4096 if device.type == "cuda" else 128
    return min(next_power_of_2(vocab_local), cap)


def _tp(tp_group) -> tuple[int, int]:
    if tp_group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


class _Chunker:
    """The per-chunk work shared by forward and the recompute path of backward."""

    def __init__(self, weight, ignore_index, label_smoothing, z_loss, tp_group):
        self.weight = weight
        self.ignore_index = ignore_index
        self.eps = float(label_smoothing)
        self.z = float(z_loss)
        self.tp_group = tp_group
        self.tp_size, tp_rank = _tp(tp_group)
        self.v_local = weight.shape[0]
        self.v_global = self.v_local * self.tp_size
        self.v_start = tp_rank * self.v_local
        self.block_v = _block_v(self.v_local, weight.device)
        self.warps = num_warps_for(self.block_v)

    def logits(self, h_c):
        return h_c @ self.weight.t()

    def loss(self, logits, labels_c):
        rows = logits.shape[0]
        stats = torch.empty((rows, 4), dtype=torch.float32, device=logits.device)
        _ce_stats[(rows,)](logits, labels_c, stats, logits.stride(0), self.v_local, self.v_start,
                           self.ignore_index, BLOCK_V=self.block_v, num_warps=self.warps)
        m, d, xy, sx = stats.unbind(1)
        if self.tp_size > 1:
            m_g = m.clone()
            dist.all_reduce(m_g, op=dist.ReduceOp.MAX, group=self.tp_group)
            rest = torch.stack((d * torch.exp(m - m_g), xy, sx), dim=1)
            dist.all_reduce(rest, group=self.tp_group)
            d, xy, sx = rest.unbind(1)
            m = m_g
        lse = m + torch.log(d)
        loss = (1.0 - self.eps) * (lse - xy)
        if self.eps:
            loss = loss + self.eps * (lse - sx / self.v_global)
        if self.z:
            loss = loss + self.z * lse * lse
        loss = torch.where(labels_c != self.ignore_index, loss, 0.0)
        return lse.contiguous(), loss

    def grad_logits_(self, logits, labels_c, lse, row_scale=None):
        rows = logits.shape[0]
        _ce_grad[(rows,)](logits, labels_c, lse, row_scale if row_scale is not None else lse,
                          logits.stride(0), self.v_local, self.v_start, self.ignore_index,
                          self.eps / self.v_global, 1.0 - self.eps, 2.0 * self.z,
                          HAS_SCALE=row_scale is not None, BLOCK_V=self.block_v,
                          num_warps=self.warps)
        return logits

    def backprop(self, g_logits, h_c, grad_h_c, grad_w):
        if grad_h_c is not None:
            torch.mm(g_logits, self.weight, out=grad_h_c)
        if grad_w is not None:
            _accumulate(grad_w, g_logits.t(), h_c)


_MIXED_ADDMM: dict[str, bool] = {}


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, summed in acc's dtype. bf16 inputs into an fp32 acc use cuBLAS's mixed
    addmm (fp32 output, no bf16 rounding of the product) where this torch has it on this
    device (`out_dtype`, CUDA); elsewhere the product is formed in the inputs' dtype first."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    dev = acc.device.type
    if dev not in _MIXED_ADDMM:
        _MIXED_ADDMM[dev] = dev == "cuda" and _mixed_addmm_works(acc.device, a.dtype, acc.dtype)
    if _MIXED_ADDMM[dev]:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(a @ b)


def _mixed_addmm_works(device: torch.device, in_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """Whether addmm(out_dtype=..., out=acc) exists here and adds into acc (checked once on a
    tiny product against the fp32 formula; torch builds without it raise, older ones may differ)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(8, 16, device=device, generator=g).to(in_dtype)
    b = torch.randn(16, 4, device=device, generator=g).to(in_dtype)
    acc = torch.randn(8, 4, device=device, generator=g, dtype=out_dtype)
    want = acc + a.to(out_dtype) @ b.to(out_dtype)
    try:
        torch.addmm(acc, a, b, out_dtype=out_dtype, out=acc)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked fused linear + cross-entropy; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction,
                tp_group, chunk_size, accum_dtype):
        n = hidden.shape[0]
        ck = _Chunker(weight, ignore_index, label_smoothing, z_loss, tp_group)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = (torch.zeros(weight.shape, dtype=accum_dtype or weight.dtype, device=weight.device)
                  if need_w else None)
        c = chunk_size or auto_chunk_size(n, hidden.shape[1], ck.v_local)
        for start in range(0, n, c):
            end = min(n, start + c)
            h_c, y_c = hidden[start:end], labels[start:end]
            logits = ck.logits(h_c)
            lse_all[start:end], losses[start:end] = ck.loss(logits, y_c)
            if need_h or need_w:
                ck.grad_logits_(logits, y_c, lse_all[start:end])
                ck.backprop(logits, h_c, grad_h[start:end] if need_h else None, grad_w)
            del logits
        valid = labels != ignore_index
        n_valid = valid.sum()
        ctx.reduction, ctx.chunk, ctx.ck = reduction, c, ck
        ctx.save_for_backward(grad_h, grad_w, n_valid, valid, hidden, weight, labels, lse_all)
        ctx.weight_dtype, ctx.accum_dtype = weight.dtype, accum_dtype
        if reduction == "mean":
            return losses.sum() / n_valid.clamp(min=1)
        if reduction == "sum":
            return losses.sum()
        return losses

    @staticmethod
    def backward(ctx, g):
        grad_h, grad_w, n_valid, valid, hidden, weight, labels, lse_all = ctx.saved_tensors
        if ctx.reduction == "mean":
            scale = g.float() / n_valid.clamp(min=1)
        elif ctx.reduction == "sum":
            scale = g.float()
        else:
            gv = g.float()[valid]  # one host sync: is the per-token weight one constant?
            if gv.numel() == 0:
                scale = g.new_zeros((), dtype=torch.float32)
            elif bool((gv == gv[0]).all()):
                scale = gv[0]
            else:
                return LinearCrossEntropyFunction._recompute(ctx, g, hidden, weight, labels,
                                                             lse_all, grad_h is not None,
                                                             grad_w is not None)
        dh = _scaled(grad_h, scale, grad_h.dtype) if grad_h is not None else None
        dw = _scaled(grad_w, scale, ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None, None, None, None, None, None

    @staticmethod
    def _recompute(ctx, g, hidden, weight, labels, lse_all, need_h, need_w):
        ck, c = ctx.ck, ctx.chunk
        g = g.float().contiguous()
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = (torch.zeros(weight.shape, dtype=ctx.accum_dtype or weight.dtype,
                              device=weight.device) if need_w else None)
        for start in range(0, hidden.shape[0], c):
            end = min(hidden.shape[0], start + c)
            h_c, y_c = hidden[start:end], labels[start:end]
            logits = ck.grad_logits_(ck.logits(h_c), y_c, lse_all[start:end], g[start:end])
            ck.backprop(logits, h_c, grad_h[start:end] if need_h else None, grad_w)
            del logits
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def _loss_only(hidden, weight, labels, ignore_index, label_smoothing, z_loss, reduction, tp_group,
               chunk_size):
    """The forward without autograd: per chunk one GEMM and the statistics kernel, no gradients."""
    n = hidden.shape[0]
    ck = _Chunker(weight, ignore_index, label_smoothing, z_loss, tp_group)
    losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
    c = chunk_size or auto_chunk_size(n, hidden.shape[1], ck.v_local)
    for start in range(0, n, c):
        end = min(n, start + c)
        logits = ck.logits(hidden[start:end])
        _, losses[start:end] = ck.loss(logits, labels[start:end])
        del logits
    if reduction == "mean":
        return losses.sum() / (labels != ignore_index).sum().clamp(min=1)
    if reduction == "sum":
        return losses.sum()
    return losses


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                               ignore_index: int = -100, label_smoothing: float = 0.0,
                               z_loss: float = 0.0, reduction: str = "mean", tp_group=None,
                               chunk_size: int | None = None,
                               accum_dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T` against `labels` without materializing the logits.

    hidden [..., d], weight [V or V/tp, d], labels [...] (int). Returns a 0-dim fp32 loss for
    "mean"/"sum", else fp32 per-token losses shaped like `labels` (0 where ignored).
    `accum_dtype`: what d weight is summed in over the chunks (None: the weight's dtype).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        # Under autocast (QLoRA: fp32 head and hidden states, bf16 compute) the GEMMs inside would
        # be cast one by one and disagree with the buffers the kernel allocates: run the whole
        # function in autocast's dtype instead, as autocast would run the unfused head, with
        # autocast off inside; gradients flow back through the casts in the inputs' dtypes.
        dt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return fused_linear_cross_entropy(
                hidden.to(dt), weight.to(dt), labels, ignore_index=ignore_index,
                label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction, tp_group=tp_group,
                chunk_size=chunk_size, accum_dtype=accum_dtype)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if hidden.shape[-1] != weight.shape[-1] or weight.dim() != 2:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} do not "
                         "match (weight must be [vocab, hidden])")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) dtypes differ")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    lead = labels.shape
    h2 = hidden.reshape(-1, hidden.shape[-1])
    y2 = labels.reshape(-1)
    if use_triton(hidden):
        if h2.stride(-1) != 1:
            h2 = h2.contiguous()
        if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad):
            out = LinearCrossEntropyFunction.apply(h2, weight, y2.contiguous().long(), ignore_index,
                                                   label_smoothing, z_loss, reduction, tp_group,
                                                   chunk_size, accum_dtype)
        else:
            out = _loss_only(h2, weight, y2.contiguous().long(), ignore_index, label_smoothing, z_loss,
                             reduction, tp_group, chunk_size)
    else:
        if _tp(tp_group)[0] > 1:
            raise RuntimeError("fused_linear_cross_entropy: the vocab-parallel path needs the "
                               "Triton kernels (CUDA, or TRITON_INTERPRET=1 on CPU)")
        out = linear_cross_entropy_reference(h2, weight, y2, ignore_index=ignore_index,
                                             label_smoothing=label_smoothing, z_loss=z_loss,
                                             reduction=reduction)
    return out.view(lead) if reduction == "none" and out.shape != lead else out

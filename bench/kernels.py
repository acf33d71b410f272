"""Triton kernels (domainlm.pretrain.kernels) against the torch path, torch.compile and Liger Kernel.

    .venv/bin/python bench/kernels.py                     # all kernels, Llama 1B and 8B shapes, bf16
    .venv/bin/python bench/kernels.py --only rmsnorm,ce   # a subset
    .venv/bin/python bench/kernels.py --e2e 125M,1B       # + model step tokens/s, kernels on vs off

Needs a CUDA device (on a machine without one it says so and exits 0). Each kernel runs forward
+ backward in bf16 at Llama 1B (hidden 2048, ffn 8192, 32 q / 8 kv heads of 64) and 8B (4096,
14336, 32 / 8 of 128) shapes, 8192 tokens (micro batch 4 x seq 2048), in the same process against:
  torch    exactly what `model.kernels: torch` runs (the baseline of every ratio):
           RMSNorm: torch.nn.RMSNorm, i.e. F.rms_norm (+ the residual add megatron's
           bias-dropout-add does before it); SwiGLU: megatron's gated linear unit
           (chunk, F.silu(gate) * up); RoPE: megatron's _apply_rotary_pos_emb_bshd (what
           SelfAttention calls without fusion); linear + CE: the output projection, then
           megatron's vocab_parallel_cross_entropy on fp32 logits (compute_language_model_loss);
  eager formula  (RMSNorm only) the unfused Python formula, x * rsqrt(mean(x^2) + eps) * w,
           which torch.nn.RMSNorm replaced; for reference;
  compile  torch.compile of the torch-path function;
  liger    Liger Kernel (`pip install liger-kernel`, installed only for the benchmark run;
           skipped with a note when absent), given its native layouts (separate gate/up
           tensors, HF [b, h, s, d] rotary input).
Times are medians of triton.testing.do_bench (ms, fwd+bwd). Memory-bound kernels also report
achieved GB/s (minimum bytes a fwd+bwd must move / time) against the device's peak. Peak memory is
the allocator's high-water mark during one fwd+bwd above what the inputs held before it.
The fused linear cross-entropy is measured at vocab 32000 and 128256 for peak memory and time.
Goals (issue 11): RMSNorm fwd+bwd >= Liger and >= 2x F.rms_norm at 1B shapes; RoPE >= 2x the
torch path; fused CE peak memory <= 1/4 of logits + CE at vocab 128k.
Results are printed and appended to bench/results/kernels.txt (--out to change).

`model_step_throughput(size, kernels)` measures end-to-end tokens/s and peak memory of one
pretraining fwd+bwd step of a named model size with kernels: triton vs torch (what --e2e runs);
the pretraining benchmark can call it too.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TOKENS = 8192  # micro batch 4 x seq 2048
SHAPES = {
    "1B": dict(hidden=2048, ffn=8192, heads=32, kv_heads=8, head_dim=64),
    "8B": dict(hidden=4096, ffn=14336, heads=32, kv_heads=8, head_dim=128),
}
VOCABS = (32000, 128256)
EPS = 1e-5


# Measurement -------------------------------------------------------------------------------------


@dataclass
class Result:
    ms: float | None
    peak_mib: float | None
    note: str = ""


class Timer:
    """GPU: triton.testing.do_bench medians and allocator peaks. CPU smoke: wall clock, no memory."""

    def __init__(self, cuda: bool, rep_ms: int):
        self.cuda, self.rep_ms = cuda, rep_ms

    def run(self, step: Callable[[], None]) -> Result:
        try:
            step()  # compile / autotune / first-call allocations outside the measurement
            if not self.cuda:
                t0 = time.perf_counter()
                step()
                return Result((time.perf_counter() - t0) * 1e3, None)
            import triton.testing

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = triton.testing.do_bench(step, warmup=25, rep=self.rep_ms, return_mode="median")
            return Result(ms, peak)
        except Exception as e:  # one failing implementation must not hide the others
            return Result(None, None, f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}")


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor], grads) -> Callable[[], None]:
    """A step that runs fn forward and backward with fixed output gradients."""

    def step():
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        gs = grads if isinstance(grads, tuple) else (grads,)
        torch.autograd.backward(outs, gs)

    return step


def compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def liger_functional():
    try:
        from liger_kernel.transformers import functional as lf  # noqa: F401

        return lf
    except Exception:
        return None


# Device facts ------------------------------------------------------------------------------------


def peak_bandwidth_gbs(cuda: bool) -> tuple[float | None, float | None]:
    """(theoretical peak from the memory clock and bus width, measured device-to-device copy)."""
    if not cuda:
        return None, None
    p = torch.cuda.get_device_properties(0)
    clock_khz = getattr(p, "memory_clock_rate", None)
    bus_bits = getattr(p, "memory_bus_width", None)
    theo = 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None
    import triton.testing

    src = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    return theo, 2 * src.numel() / (ms * 1e-3) / 1e9


def device_lines(cuda: bool) -> list[str]:
    from importlib import metadata

    import machine

    versions = []
    for pkg in ("torch", "triton", "liger-kernel", "megatron-core"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{pkg} absent")
    lines = machine.describe().splitlines()[:2] + ["; ".join(versions)]
    if cuda:
        cap = torch.cuda.get_device_capability(0)
        p = torch.cuda.get_device_properties(0)
        lines.append(f"device: {torch.cuda.get_device_name(0)}, sm_{cap[0]}{cap[1]}, "
                     f"{p.multi_processor_count} SMs, CUDA runtime {torch.version.cuda}")
    return lines


# Cases -------------------------------------------------------------------------------------------


def eager_rmsnorm(x, w):
    # The HF/megatron formula unfused: what an RMSNorm without a fused kernel used to run.
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype) * w


def torch_rmsnorm(x, w):
    # torch.nn.RMSNorm.forward, what domainlm.pretrain.model.RMSNorm (kernels: torch) runs.
    return F.rms_norm(x, (x.shape[-1],), w, EPS)


def torch_add_rmsnorm(x, r, w):
    h = x + r          # megatron's bias-dropout-add (no bias, no dropout), then the norm
    return torch_rmsnorm(h, w), h


def torch_swiglu(x):
    gate, up = torch.chunk(x, 2, dim=-1)  # megatron's MLP gated linear unit
    return F.silu(gate) * up


def torch_rope(q, k, freqs):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    return _apply_rotary_pos_emb_bshd(q, freqs), _apply_rotary_pos_emb_bshd(k, freqs)


def torch_ce(h, w, y):
    # GPTModel's output layer, then compute_language_model_loss as domainlm's torch path does it
    # (model.vocab_parallel_loss: megatron's vocab-parallel CE on fp32 logits), mean over tokens.
    from megatron.core import tensor_parallel

    return tensor_parallel.vocab_parallel_cross_entropy((h @ w.t()).float(), y).mean()


def megatron_world(cuda: bool) -> None:
    """A world of one process with megatron's TP=1 groups (its vocab-parallel CE needs them)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)


def bench_rmsnorm(shape, dev, dtype, timer, lf, tokens):
    from domainlm.pretrain.kernels.rmsnorm import rms_norm

    n = shape["hidden"]
    x = torch.randn(tokens, n, device=dev, dtype=dtype, requires_grad=True)
    r = torch.randn(tokens, n, device=dev, dtype=dtype, requires_grad=True)
    w = torch.ones(n, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, n, device=dev, dtype=dtype)
    rows = {}
    plain = {"torch": torch_rmsnorm, "eager formula": eager_rmsnorm, "compile": compiled(torch_rmsnorm),
             "triton": lambda a, b: rms_norm(a, b, EPS)}
    if lf is not None:
        plain["liger"] = lambda a, b: lf.liger_rms_norm(a, b, EPS, in_place=False)
    for name, fn in plain.items():
        rows[name] = timer.run(fwd_bwd(fn, [x, w], dy))
    nbytes = 5 * tokens * n * x.element_size()  # fwd: read x, write y; bwd: read dy, x, write dx
    yield "rmsnorm", rows, nbytes
    rows = {}
    fused = {"torch": torch_add_rmsnorm, "compile": compiled(torch_add_rmsnorm),
             "triton": lambda a, b, c: rms_norm(a, c, EPS, residual=b)}
    for name, fn in fused.items():
        rows[name] = timer.run(fwd_bwd(fn, [x, r, w], (dy, dy)))
    nbytes = 8 * tokens * n * x.element_size()  # fwd: x, r -> y, h; bwd: dy, dh, h -> dx
    yield "add+rmsnorm", rows, nbytes


def bench_swiglu(shape, dev, dtype, timer, lf, tokens):
    from domainlm.pretrain.kernels.swiglu import swiglu

    f = shape["ffn"]
    x = torch.randn(tokens, 2 * f, device=dev, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, f, device=dev, dtype=dtype)
    rows = {name: timer.run(fwd_bwd(fn, [x], dy)) for name, fn in
            (("torch", torch_swiglu), ("compile", compiled(torch_swiglu)), ("triton", swiglu))}
    if lf is not None:
        a = torch.randn(tokens, f, device=dev, dtype=dtype, requires_grad=True)
        b = torch.randn(tokens, f, device=dev, dtype=dtype, requires_grad=True)
        rows["liger"] = timer.run(fwd_bwd(lf.liger_swiglu, [a, b], dy))
    nbytes = 8 * tokens * f * x.element_size()  # fwd: 2F in, F out; bwd: 2F + F in, 2F out
    yield "swiglu", rows, nbytes


def bench_rope(shape, dev, dtype, timer, lf, tokens):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from domainlm.pretrain.kernels.rope import apply_rotary

    seq = 2048 if tokens >= 2048 else tokens
    bsz = max(1, tokens // seq)
    hq, hk, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    inv = RotaryEmbedding(d, 1.0, use_cpu_initialization=True).get_freqs_non_repeated(seq)
    freqs = torch.cat((inv, inv), -1)[:, None, None, :].to(dev)
    q = torch.randn(seq, bsz, hq, d, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(seq, bsz, hk, d, device=dev, dtype=dtype, requires_grad=True)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    rows = {}
    for name, fn in (("torch", torch_rope), ("compile", compiled(torch_rope)),
                     ("triton", lambda a, b, f: apply_rotary(a, f, b))):
        rows[name] = timer.run(fwd_bwd(lambda a, b, fn=fn: fn(a, b, freqs), [q, k], (dq, dk)))
    if lf is not None:
        # HF layout [b, h, s, d] as a transposed view of [b, s, h, d]; cos/sin [1, s, d].
        qh = torch.randn(bsz, seq, hq, d, device=dev, dtype=dtype).transpose(1, 2).requires_grad_()
        kh = torch.randn(bsz, seq, hk, d, device=dev, dtype=dtype).transpose(1, 2).requires_grad_()
        cos = torch.cos(freqs[:, 0, 0]).to(dtype)[None]
        sin = torch.sin(freqs[:, 0, 0]).to(dtype)[None]
        dqh, dkh = torch.randn_like(qh), torch.randn_like(kh)
        rows["liger"] = timer.run(fwd_bwd(lambda a, b: lf.liger_rope(a, b, cos, sin), [qh, kh],
                                          (dqh, dkh)))
    nbytes = 4 * (q.numel() + k.numel()) * q.element_size()  # fwd: q, k in and out; bwd: same
    yield "rope", rows, nbytes


def bench_ce(shape, dev, dtype, timer, lf, tokens, vocabs=VOCABS):
    for vocab in vocabs:
        rows = _ce_rows(shape["hidden"], vocab, dev, dtype, timer, lf, tokens)
        if timer.cuda:
            torch.cuda.empty_cache()
        yield f"linear+ce V={vocab}", rows, None


def _ce_rows(d, vocab, dev, dtype, timer, lf, tokens):
    from domainlm.pretrain.kernels.fused_linear_ce import fused_linear_cross_entropy

    h = torch.randn(tokens, d, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, d, device=dev, dtype=dtype) * 0.02).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), device=dev)
    one = torch.ones((), device=dev)
    rows = {"torch": timer.run(fwd_bwd(lambda a, b: torch_ce(a, b, y), [h, w], one)),
            "compile": timer.run(fwd_bwd(compiled(lambda a, b: torch_ce(a, b, y)), [h, w], one)),
            "triton": timer.run(fwd_bwd(lambda a, b: fused_linear_cross_entropy(a, b, y), [h, w], one))}
    if lf is not None:
        rows["liger"] = timer.run(fwd_bwd(lambda a, b: lf.liger_fused_linear_cross_entropy(a, b, y),
                                          [h, w], one))
    return rows


CASES = {"rmsnorm": bench_rmsnorm, "swiglu": bench_swiglu, "rope": bench_rope, "ce": bench_ce}


def format_rows(title: str, rows: dict[str, Result], nbytes, peak_bw) -> list[str]:
    out = [f"  {title}"]
    eager = rows.get("torch")     # the baseline: what kernels: torch runs
    for name, r in rows.items():
        if r.ms is None:
            out.append(f"    {name:<13} {r.note}")
            continue
        speed = f"{eager.ms / r.ms:5.2f}x torch" if eager and eager.ms else ""
        mem = f"peak {r.peak_mib:9.1f} MiB" if r.peak_mib is not None else "peak      n/a"
        if eager and eager.peak_mib and r.peak_mib is not None:
            mem += f" ({r.peak_mib / eager.peak_mib:4.2f} of torch)"
        bw = ""
        if nbytes:
            gbs = nbytes / (r.ms * 1e-3) / 1e9
            bw = f"  {gbs:7.1f} GB/s" + (f" ({gbs / peak_bw:4.0%} of peak)" if peak_bw else "")
        out.append(f"    {name:<13} {r.ms:9.3f} ms  {speed:<12} {mem}{bw}")
    return out


# End to end ---------------------------------------------------------------------------------------


def model_step_throughput(size: str, kernels: str, *, seq_len: int = 2048, micro_batch: int = 4,
                          steps: int = 10, vocab: int = 32000) -> dict:
    """Tokens/s and peak memory of a pretraining fwd+bwd step (bf16, one GPU, no optimizer) of
    the named model size built by domainlm.pretrain.model with `kernels` ('triton' | 'torch').

    Sets up a world of one process on NCCL if none exists. Returns {'tokens_per_s', 'peak_gib',
    'step_ms', 'loss'}.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from domainlm.pretrain.config import ModelArgs
    from domainlm.pretrain.model import build_model, padded_vocab, transformer_config
    from domainlm.pretrain.config import resolve_model

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    from domainlm.pretrain import rng

    rng.seed(0, "cuda")
    m = resolve_model(ModelArgs(size=size, kernels=kernels))
    config = transformer_config(m, bf16=True)
    model = build_model(m, config, vocab_size=padded_vocab(vocab, m.make_vocab_size_divisible_by, 1),
                        seq_len=seq_len)
    tokens = torch.randint(0, vocab, (micro_batch, seq_len), device="cuda")
    labels = torch.randint(0, vocab, (micro_batch, seq_len), device="cuda")
    positions = torch.arange(seq_len, device="cuda")[None].expand(micro_batch, seq_len)

    def step():
        for p in model.parameters():
            p.grad = None
        loss = model(tokens, positions, None, labels=labels).float().mean()
        loss.backward()
        return loss

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    result = {"tokens_per_s": micro_batch * seq_len / (ms * 1e-3), "step_ms": ms,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss)}
    model = None  # noqa: F841 - drop the weights before the next size is built
    torch.cuda.empty_cache()
    return result


# Main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="rmsnorm,swiglu,rope,ce", help="comma list of " + ", ".join(CASES))
    ap.add_argument("--shapes", default="1B,8B", help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--e2e", default="", help="model sizes for the end-to-end step comparison, e.g. 125M,1B")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per case (ms)")
    ap.add_argument("--out", default=None,
                    help="append results here (default bench/results/kernels.txt on GPU; '' = no file)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="no GPU: run every case once at tiny shapes under TRITON_INTERPRET=1 (checks this script)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("bench/kernels.py needs a CUDA device (none found); nothing measured. "
              "(--cpu-smoke runs the harness at tiny shapes on the Triton interpreter.)")
        return 0
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    dev, dtype = ("cuda" if cuda else "cpu"), torch.bfloat16
    tokens = TOKENS if cuda else 16
    shapes = {k: SHAPES[k] for k in args.shapes.split(",") if k}
    if not cuda:
        shapes = {"smoke": dict(hidden=48, ffn=72, heads=4, kv_heads=2, head_dim=12)}
    lf = liger_functional()
    timer = Timer(cuda, args.rep_ms)
    megatron_world(cuda)
    lines = [f"# bench/kernels.py  {datetime.datetime.now():%Y-%m-%d %H:%M:%S}  load average "
             + ", ".join(f"{x:.2f}" for x in os.getloadavg()),
             "command: python bench/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])]
    lines += device_lines(cuda)
    theo, measured = peak_bandwidth_gbs(cuda)
    peak_bw = theo or measured
    if cuda:
        lines.append(f"memory bandwidth: theoretical {theo or float('nan'):.0f} GB/s, "
                     f"device copy measured {measured:.0f} GB/s")
    if args.cpu_smoke:
        lines.append("CPU SMOKE RUN (Triton interpreter, tiny shapes): checks the harness, measures nothing")
    if lf is None:
        lines.append("liger: not installed (pip install liger-kernel) - its rows are skipped")
    lines.append(f"bf16, {tokens} tokens; ms = median fwd+bwd; peak = allocator high-water above inputs; "
                 "ratios against torch = what kernels: torch runs")
    for line in lines:
        print(line, flush=True)
    for shape_name, shape in shapes.items():
        print(f"[{shape_name}] {shape}", flush=True)
        lines.append(f"[{shape_name}] {shape}")
        for case in args.only.split(","):
            kwargs = {} if cuda or case != "ce" else {"vocabs": (300,)}
            for title, rows, nbytes in CASES[case](shape, dev, dtype, timer, lf, tokens, **kwargs):
                block = format_rows(title, rows, nbytes, peak_bw)
                print("\n".join(block), flush=True)
                lines += block
    for size in [s for s in args.e2e.split(",") if s]:
        if not cuda:
            break
        for k in ("torch", "triton"):
            r = model_step_throughput(size, k)
            line = (f"e2e {size} kernels={k:<6} {r['tokens_per_s']:10.0f} tokens/s  step {r['step_ms']:8.1f} ms"
                    f"  peak {r['peak_gib']:6.2f} GiB  loss {r['loss']:.4f}")
            print(line, flush=True)
            lines.append(line)
    out = args.out if args.out is not None else ("" if args.cpu_smoke else str(HERE / "results" / "kernels.txt"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a") as f:
            f.write("\n".join(lines) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

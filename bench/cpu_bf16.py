"""Is bf16 worth it on this CPU? A matmul of a 135M model's MLP shape (576 -> 1536, 512 tokens) and
a LoRA-style forward + backward of one such layer, fp32 against bf16, interleaved rounds, one
thread; prints the CPU's bf16 flags and what `domainlm.devices.cpu_has_bf16` decides.

    .venv/bin/python bench/cpu_bf16.py --rounds 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def flags() -> set[str]:
    try:
        line = next(x for x in open("/proc/cpuinfo") if x.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def model_name() -> str:
    try:
        return next(x for x in open("/proc/cpuinfo") if x.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor()


def timed(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from domainlm.devices import cpu_has_bf16

    f = flags()
    print(f"cpu: {model_name()}; flags: " + ", ".join(sorted(f & {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}))
          + f"; oneDNN says bf16 supported: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; "
          f"cpu_has_bf16(): {cpu_has_bf16()}; torch {torch.__version__}")
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(512, 576, generator=g)
    w32 = torch.randn(1536, 576, generator=g) * 0.02
    layer32 = torch.nn.Linear(576, 1536, bias=False)
    layer16 = torch.nn.Linear(576, 1536, bias=False).to(torch.bfloat16)
    xg32 = x32.clone().requires_grad_(True)
    xg16 = x32.to(torch.bfloat16).requires_grad_(True)

    def matmul(dtype):
        x, w = x32.to(dtype), w32.to(dtype)
        return lambda: x @ w.t()

    def fwd_bwd(layer, x):
        def step():
            layer(x).float().square().mean().backward()
        return step

    cases = {"matmul 512x576 @ 576x1536": (matmul(torch.float32), matmul(torch.bfloat16)),
             "linear forward+backward": (fwd_bwd(layer32, xg32), fwd_bwd(layer16, xg16))}
    for name, (f32, b16) in cases.items():
        a, b = [], []
        for _ in range(args.rounds):
            a.append(timed(f32, args.reps))
            b.append(timed(b16, args.reps))
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"{name}: fp32 {ma:.2f} ms, bf16 {mb:.2f} ms (median of {args.rounds} interleaved rounds): "
              f"bf16/fp32 {mb / ma:.2f}")


if __name__ == "__main__":
    main()

"""What the machine computes well: native bf16 on the CPU.

On a CPU with AVX512-BF16 or AMX, bf16 matmuls (oneDNN) run about twice as fast as fp32; on
others bf16 is emulated and slower than fp32. Fine-tuning (`train.precision: bf16`) and
generation (`gen.dtype: bf16`) use bf16 on the CPU only where this says so.
"""

from __future__ import annotations


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (measured on an AVX512-BF16 Xeon: LoRA steps of a
    135M model 1.4x, forwards 1.8x faster than fp32).

    On x86 that is the AVX512-BF16 or AMX instructions. oneDNN's own check
    (`torch.ops.mkldnn._is_mkldnn_bf16_supported`) also says yes on any AVX512 CPU, where bf16 is
    emulated: on an AVX512 Xeon without AVX512-BF16 a bf16 matmul took 3.9x an fp32 one, a linear
    forward + backward 3.0x (`bench/cpu_bf16.py`, `bench/results/cpu_bf16.txt`), and LoRA SFT of
    the 135M base 3.5x, so it is
    asked only on other architectures (ARM's BF16)."""
    import platform

    import torch

    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        try:
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        except AttributeError:          # a torch without these checks: bf16 only where surely native
            return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def init_process_group(backend: str, **kwargs) -> None:
    """`torch.distributed.init_process_group`, less the traceback prefix in a world of one
    process: torch wraps `sys.excepthook` at every init to prefix each line of a traceback with
    "[rankN]: ", and the stages `domainlm run` trains in one process stacked it ("[rank0]: " five
    times a line). With several ranks the prefix stays: it says whose traceback it is."""
    import sys

    import torch.distributed as dist

    hook = sys.excepthook
    dist.init_process_group(backend, **kwargs)
    if dist.get_world_size() == 1:
        sys.excepthook = hook

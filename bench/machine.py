"""One line per fact about the machine a benchmark ran on, printed at the top of every result."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def gpu_line() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True).stdout.strip()
            return f"{torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.0f} GiB, driver {drv}, CUDA {torch.version.cuda}"
    except Exception:
        pass
    return "none"


def describe(packages: tuple[str, ...] = ("torch", "sentencepiece", "tokenizers", "apache-beam", "megatron-core")) -> str:
    versions = []
    for p in packages:
        try:
            versions.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            pass
    lines = [
        f"machine: {cpu_model()}, {os.cpu_count()} cores, {memory_gib():.0f} GiB RAM, {platform.system()} {platform.release()}",
        f"gpu: {gpu_line()}",
        f"python {platform.python_version()}; " + "; ".join(versions),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe())

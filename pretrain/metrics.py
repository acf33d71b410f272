"""Training metrics: a progress line on screen, DIR/logs/metrics.jsonl and TensorBoard.

Throughput is tokens/s over the logging interval; MFU is model FLOPs per second over the peak
dense bf16 FLOPs of the devices, with FLOPs per token = 6N + 12 L d T (PaLM, appendix B: N the
parameters in matmuls, L layers, d width, T sequence length; the 12 L d T term is attention's
QK^T and AV), counting no recomputation. On CPU there is no meaningful peak, so no MFU.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendor datasheets.
PEAK_BF16_FLOPS = {
    "H200": 989e12,   # H200 SXM
    "H100": 989e12,   # H100 SXM5 (H100 PCIe: 756e12)
    "H100 PCIe": 756e12,
    "A100": 312e12,
}


def flops_per_token(n_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    return 6.0 * n_params + 12.0 * num_layers * hidden_size * seq_len


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU named like torch.cuda.get_device_name(); None if unknown."""
    best = None
    for key, value in PEAK_BF16_FLOPS.items():
        if key in device_name and (best is None or len(key) > len(best[0])):
            best = (key, value)
    return best[1] if best else None


def memory_gb(device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Metrics:
    """Records on the logging rank; other ranks make a Metrics that writes nothing."""

    def __init__(self, log_dir: Path | None, *, total_steps: int, tokens_per_step: int,
                 flops_per_token: float, peak_flops_total: float | None, tensorboard: bool):
        self.enabled = log_dir is not None
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_total
        self.jsonl = None
        self.tb = None
        self.last: dict[str, Any] = {}
        if self.enabled:
            log_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(log_dir / "metrics.jsonl", "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(log_dir / "tensorboard"))
        self._mark(0)

    def _mark(self, step: int) -> None:
        self._t0, self._step0 = time.perf_counter(), step

    def start(self, step: int) -> None:
        """Start timing from `step` (after setup or a resume, before the first train step)."""
        self._mark(step)
        self._start_step, self._start_time = step, time.perf_counter()

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (validation, checkpoint saves) out of the throughput and ETA."""
        self._t0 += seconds
        self._start_time += seconds

    def train(self, step: int, *, loss: float, lr: float, grad_norm: float | None, memory: float) -> dict:
        """Record the interval ending at `step`; print and write it."""
        now = time.perf_counter()
        steps = max(1, step - self._step0)
        tok_s = steps * self.tokens_per_step / max(now - self._t0, 1e-9)
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
               "mfu": tok_s * self.flops_per_token / self.peak if self.peak else None,
               "memory_gb": memory, "tokens": step * self.tokens_per_step}
        self._mark(step)
        left = (self.total_steps - step) * (now - self._start_time) / max(1, step - self._start_step)
        if self.enabled:
            parts = [f"step {step}/{self.total_steps}", f"loss {loss:.4f}", f"lr {lr:.2e}",
                     f"gnorm {grad_norm:.3f}" if grad_norm is not None else "gnorm -",
                     f"{tok_s:,.0f} tok/s"]
            if rec["mfu"] is not None:
                parts.append(f"MFU {100 * rec['mfu']:.1f}%")
            parts += [f"mem {memory:.2f} GB", f"ETA {_duration(left)}"]
            print(" | ".join(parts), file=sys.stderr, flush=True)
            self._write(rec, "train")
        self.last = rec
        return rec

    def eval(self, step: int, loss: float) -> dict:
        rec = {"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        if self.enabled:
            print(f"step {step}/{self.total_steps} | val loss {loss:.4f} | val ppl {rec['val_ppl']:.2f}",
                  file=sys.stderr, flush=True)
            self._write(rec, "eval")
        return rec

    def _write(self, rec: dict, kind: str) -> None:
        self.jsonl.write(json.dumps({"kind": kind, **rec}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and v is not None:
                    self.tb.add_scalar(f"{kind}/{k}", v, rec["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()

"""Training metrics: a progress line on screen, DIR/logs/metrics.jsonl and TensorBoard.

Throughput is tokens/s over the logging interval; MFU is model FLOPs per second over the peak
dense bf16 FLOPs of the devices, with FLOPs per token = 6N + 12 L d T (PaLM, appendix B: N the
parameters in matmuls, L layers, d width, T sequence length; the 12 L d T term is attention's
QK^T and AV), counting no recomputation. On CPU there is no meaningful peak, so no MFU.
"""

from __future__ import annotations

from pathlib import Path

from domainlm.progress import TrainLog, memory_gb  # noqa: F401 (memory_gb: the trainer's import)

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


class Metrics(TrainLog):
    """Pretraining's train records: tokens/s over the interval, MFU, memory, tokens so far."""

    def __init__(self, log_dir: Path | None, *, total_steps: int, tokens_per_step: int,
                 flops_per_token: float, peak_flops_total: float | None, tensorboard: bool):
        super().__init__(log_dir, total_steps=total_steps, tensorboard=tensorboard)
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_total

    def train(self, step: int, *, loss: float, lr: float, grad_norm: float | None, memory: float) -> dict:
        """Record the interval ending at `step`; print and write it."""
        seconds, steps, eta = self.interval(step)
        tok_s = steps * self.tokens_per_step / seconds
        rec = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
               "mfu": tok_s * self.flops_per_token / self.peak if self.peak else None,
               "memory_gb": memory, "tokens": step * self.tokens_per_step}
        parts = [f"loss {loss:.4f}", f"lr {lr:.2e}", f"gnorm {grad_norm:.3f}" if grad_norm is not None else "gnorm -",
                 f"{tok_s:,.0f} tok/s"]
        if rec["mfu"] is not None:
            parts.append(f"MFU {100 * rec['mfu']:.1f}%")
        parts.append(f"mem {memory:.2f} GB")
        return self.log_train(rec, parts, eta)

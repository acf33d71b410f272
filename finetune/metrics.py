"""Training metrics of `finetune sft`: a progress line on stderr, logs/metrics.jsonl, TensorBoard.

One record per logged step ({"kind": "train", step, loss, lr, grad_norm, tokens_per_s, ...}) and
per validation ({"kind": "eval", step, val_loss, val_ppl}); a resumed run appends to the same
file (the last record of a step is the one that counts). Only the first process writes.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any


def memory_gb(device) -> float:
    """Peak memory of this process: the CUDA allocator's peak on GPU, max RSS on CPU."""
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
    def __init__(self, log_dir: Path | None, *, total_steps: int, tensorboard: bool):
        self.enabled = log_dir is not None
        self.total_steps = total_steps
        self.jsonl = self.tb = None
        self.last: dict[str, Any] = {}
        if self.enabled:
            log_dir.mkdir(parents=True, exist_ok=True)
            self.jsonl = open(log_dir / "metrics.jsonl", "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(log_dir / "tensorboard"))
        self.start(0)

    def start(self, step: int) -> None:
        self._t0 = self._start_time = time.perf_counter()
        self._step0 = self._start_step = step
        self._tokens = 0

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (validation, checkpoints) out of the throughput and the ETA."""
        self._t0 += seconds
        self._start_time += seconds

    def count(self, tokens: int) -> None:
        self._tokens += tokens

    def train(self, step: int, **values: Any) -> dict[str, Any]:
        now = time.perf_counter()
        rec = {"step": step, **values, "tokens_per_s": self._tokens / max(now - self._t0, 1e-9)}
        left = (self.total_steps - step) * (now - self._start_time) / max(1, step - self._start_step)
        self._t0, self._step0, self._tokens = now, step, 0
        if self.enabled:
            gn = rec.get("grad_norm")
            print(" | ".join([f"step {step}/{self.total_steps}", f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}",
                              f"gnorm {gn:.3f}" if gn is not None else "gnorm -",
                              f"{rec['tokens_per_s']:,.0f} tok/s", f"mem {rec.get('memory_gb', 0):.2f} GB",
                              f"ETA {_duration(left)}"]), file=sys.stderr, flush=True)
            self._write(rec, "train")
        self.last = rec
        return rec

    def eval(self, step: int, loss: float) -> dict[str, Any]:
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
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, rec["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
            self.jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

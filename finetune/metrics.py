"""Training metrics of `finetune sft`: a progress line on stderr, logs/metrics.jsonl, TensorBoard.

One record per logged step ({"kind": "train", step, loss, lr, grad_norm, tokens_per_s, ...}) and
per validation ({"kind": "eval", step, val_loss, val_ppl}); a resumed run appends to the same
file (the last record of a step is the one that counts). Only the first process writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from domainlm.progress import TrainLog, memory_gb  # noqa: F401 (memory_gb: the trainer's import)


class Metrics(TrainLog):
    """Fine-tuning's train records: tokens/s counts the non-pad tokens the forwards received."""

    def __init__(self, log_dir: Path | None, *, total_steps: int, tensorboard: bool):
        self._tokens = 0
        super().__init__(log_dir, total_steps=total_steps, tensorboard=tensorboard)

    def start(self, step: int) -> None:
        super().start(step)
        self._tokens = 0

    def count(self, tokens: int) -> None:
        self._tokens += tokens

    def train(self, step: int, **values: Any) -> dict[str, Any]:
        seconds, _, eta = self.interval(step)
        rec = {"step": step, **values, "tokens_per_s": self._tokens / seconds}
        self._tokens = 0
        gn = rec.get("grad_norm")
        parts = [f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}", f"gnorm {gn:.3f}" if gn is not None else "gnorm -",
                 f"{rec['tokens_per_s']:,.0f} tok/s", f"mem {rec.get('memory_gb', 0):.2f} GB"]
        if "margin" in rec:                     # finetune dpo: the step's reward margin and accuracy
            parts[1:1] = [f"margin {rec['margin']:.3f}", f"acc {rec['accuracy']:.2f}"]
        return self.log_train(rec, parts, eta)

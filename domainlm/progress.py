"""Logging, progress bars, training metrics and end-of-run summaries, the same for every stage.

Long work shows a tqdm bar (rate and ETA) on stderr; each command ends with a one-screen
summary on stdout. Bars turn off by themselves when stderr is not a terminal (CI logs, files)
unless DOMAINLM_PROGRESS=1 asks for them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

log = logging.getLogger("domainlm")


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("domainlm")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def bars_enabled() -> bool:
    env = os.environ.get("DOMAINLM_PROGRESS")
    if env is not None:
        return env not in ("0", "false", "")
    return sys.stderr.isatty()


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str = "",
             unit: str = "it", unit_scale: bool = False, **kw: Any) -> tqdm:
    """A tqdm bar on stderr showing rate and ETA; silent where bars are off."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                disable=not bars_enabled(), file=sys.stderr, dynamic_ncols=True, mininterval=0.5, **kw)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return f"{n:.2f}B"


def summary(title: str, rows: list[tuple[str, Any]], file=None) -> str:
    """Print a boxed two-column summary and return its text."""
    width = max([len(k) for k, _ in rows] + [0])
    lines = [f"── {title} " + "─" * max(0, 60 - len(title))]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    lines.append("─" * 64)
    text = "\n".join(lines)
    print(text, file=file or sys.stdout, flush=True)
    return text


def duration(seconds: float) -> str:
    """'1h05m' or '4m09s' (ETA in progress lines)."""
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def memory_gb(device) -> float:
    """Peak memory of this process: the CUDA allocator's peak on GPU, max RSS on CPU."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class TrainLog:
    """A training run's metrics, as every trainer reports them: a progress line on stderr,
    DIR/metrics.jsonl ({"kind": "train"|"eval", "step", ...} per line; a resumed run appends) and
    TensorBoard (DIR/tensorboard). Only an enabled log (the logging rank's) prints or writes.
    Trainers build their own "train" records; the timing (interval, ETA with validation and saves
    left out) and the writing are here."""

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
        """Start timing from `step` (after setup or a resume, before the first train step)."""
        self._t0 = self._start_time = time.perf_counter()
        self._step0 = self._start_step = step

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (validation, checkpoint saves) out of the throughput and the ETA."""
        self._t0 += seconds
        self._start_time += seconds

    def interval(self, step: int) -> tuple[float, int, float]:
        """(seconds, steps) since the last logged step, and the ETA in seconds; starts the next interval."""
        now = time.perf_counter()
        seconds, steps = max(now - self._t0, 1e-9), max(1, step - self._step0)
        eta = (self.total_steps - step) * (now - self._start_time) / max(1, step - self._start_step)
        self._t0, self._step0 = now, step
        return seconds, steps, eta

    def log_train(self, rec: dict[str, Any], parts: list[str], eta: float) -> dict[str, Any]:
        """Print `parts` + the ETA as the progress line and write `rec`."""
        if self.enabled:
            print(" | ".join([f"step {rec['step']}/{self.total_steps}", *parts, f"ETA {duration(eta)}"]),
                  file=sys.stderr, flush=True)
            self.write(rec, "train")
        self.last = rec
        return rec

    def eval(self, step: int, loss: float) -> dict[str, Any]:
        rec = {"step": step, "val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        if self.enabled:
            print(f"step {step}/{self.total_steps} | val loss {loss:.4f} | val ppl {rec['val_ppl']:.2f}",
                  file=sys.stderr, flush=True)
            self.write(rec, "eval")
        return rec

    def write(self, rec: dict[str, Any], kind: str) -> None:
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

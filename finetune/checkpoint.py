"""Training checkpoints of `domainlm finetune sft`, for exact resume.

    OUTPUT.run/                      (checkpoint.dir)
      run.json                       the run's fingerprint: a rerun resumes only the same run
      step_0000010/                  torch.distributed.checkpoint files: trained weights (adapters
                                     only for LoRA; FSDP shards for full fine-tuning) + optimizer
        trainer_rank0.pt ...         per process: step, schedule, RNG states (CPU, CUDA)
      latest                         names the newest complete step dir; moved last
      before.json                    the checks before training (so a resumed run reports them)
      dead_letter.jsonl, logs/

The weights and optimizer go through torch.distributed.checkpoint's `get_state_dict` /
`set_state_dict`, which strip DDP / FSDP wrappers and store FSDP shards in global coordinates,
so a checkpoint resumes under another number of processes; the data stream depends only on the
step (batches.py), so that resume is exact too.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from domainlm.errors import UserError

LATEST = "latest"
RUN = "run.json"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def _options(full: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Adapters: only the trained tensors (a few MB), never the frozen base (which `load` then
    # does not find in the file: checked below instead of by strict loading).
    return StateDictOptions(ignore_frozen_params=not full, strict=full)


def inspect(root: Path, fingerprint: str, overwrite: bool, rank: int) -> int | None:
    """The step to resume from, or None for a fresh run; refuses a dir with checkpoints of another
    run (one that failed before its first checkpoint left nothing to resume: it is reset)."""
    run = root / RUN
    if run.is_file():
        saved = json.loads(run.read_text()).get("fingerprint")
        if saved != fingerprint:
            if not overwrite and any(root.glob("step_*")):
                raise UserError(f"checkpoint dir {str(root)!r} holds checkpoints of another run (other config or "
                                "inputs); rerun with the same arguments to resume it, or pass --overwrite to start afresh")
            if rank == 0:
                _reset(root)
            return None
    elif root.is_dir() and any(root.iterdir()):
        # Not a run dir of ours: never written into (it is deleted when the run ends), --overwrite or not.
        raise UserError(f"checkpoint dir {str(root)!r} holds something else (no {RUN}); choose another "
                        "--checkpoint.dir")
    latest = root / LATEST
    if latest.is_file() and (root / latest.read_text().strip()).is_dir():
        return int(latest.read_text().strip().removeprefix("step_"))
    return None


def _reset(root: Path) -> None:
    """Delete a run dir, run.json last: another process inspecting it meanwhile (under torchrun)
    sees either that run or an empty dir, never a dir without run.json."""
    for p in root.iterdir():
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name != RUN:
            p.unlink(missing_ok=True)
    shutil.rmtree(root, ignore_errors=True)


def prepare(root: Path, fingerprint: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / RUN).write_text(json.dumps({"fingerprint": fingerprint}) + "\n")


def save(root: Path, step: int, model, optimizer, scheduler, *, full: bool, rank: int, keep_last: int) -> None:
    """Write step dir (every rank its share), then move `latest` (rank 0)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    d = root / step_name(step)
    msd, osd = get_state_dict(model, optimizer, options=_options(full))
    with warnings.catch_warnings():
        # A single process saves without a process group on purpose; torch says so on every save.
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(d), no_dist=not dist.is_initialized())
    torch.save({"step": step, "scheduler": scheduler.state_dict(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               d / f"trainer_rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(step_name(step) + "\n")
        os.replace(tmp, root / LATEST)
        if keep_last:
            steps = sorted(p for p in root.glob("step_*") if p.is_dir())
            for old in steps[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)


def load(root: Path, step: int, model, optimizer, scheduler, *, full: bool, rank: int) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    d = root / step_name(step)
    msd, osd = get_state_dict(model, optimizer, options=_options(full))
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(d), no_dist=not dist.is_initialized())
    result = set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                            options=_options(full))
    trained = set(msd)
    missing = [k for k in getattr(result, "missing_keys", []) if k in trained]
    if missing or getattr(result, "unexpected_keys", []):
        raise UserError(f"checkpoint {str(d)!r} does not fit the model (missing {missing[:3]}, unexpected "
                        f"{list(result.unexpected_keys)[:3]}); delete {str(root)!r} to start afresh")
    mine = d / f"trainer_rank{rank}.pt"
    trainer = torch.load(mine if mine.is_file() else d / "trainer_rank0.pt", weights_only=True)
    scheduler.load_state_dict(trainer["scheduler"])
    if mine.is_file():          # same process count: each rank's own dropout stream continues
        torch.set_rng_state(trainer["rng_cpu"])
        if trainer["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(trainer["rng_cuda"])
    return trainer


def write_json(root: Path, name: str, obj: Any) -> None:
    tmp = root / f".{name}.tmp"
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, root / name)


def read_json(root: Path, name: str) -> Any | None:
    p = root / name
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

"""The checkpoint directory (ARCHITECTURE.md, "Contracts") and megatron-core distributed checkpoints.

    DIR/
      manifest.json      stage "pretrain": config, architecture, tokenizer, inputs, versions,
                         the checkpoints kept and the step of `latest`
      config.yaml        the resolved run config
      tokenizer/         a copy of the tokenizer dir (conversion to HF needs it)
      iter_0000100/      a megatron-core dist_checkpointing dir: model, optimizer, scheduler and
                         trainer state (step, tokens, per-rank RNG and loader positions)
      latest             "iter_0000100", replaced atomically once that dir is complete
      logs/              metrics.jsonl, tensorboard/

A save writes iter_N.tmp/ on every rank, renames it to iter_N/ once all ranks are done, and only
then moves `latest`; a crash mid-save leaves the previous `latest` intact. Tensors are saved as
sharded tensors in global coordinates, so a checkpoint loads under any TP/PP/DP layout.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from dataclasses import dataclass

from domainlm import stages
from domainlm.config import dump_yaml
from domainlm.errors import UserError
from domainlm.manifest import MANIFEST, write_json
from domainlm.tokenizer.tokdir import TokenizerId, check_same

STAGE = stages.PRETRAIN
LATEST = "latest"
_ITER = re.compile(r"^iter_(\d{7})$")


def iter_name(step: int) -> str:
    return f"iter_{step:07d}"


def read_latest(root: Path) -> int | None:
    """The step `latest` points to, or None when there is no checkpoint yet."""
    f = root / LATEST
    if not f.is_file():
        return None
    name = f.read_text().strip()
    m = _ITER.match(name)
    if not m:
        raise UserError(f"{f}: holds {name!r}, not an iter_NNNNNNN name; the checkpoint dir is damaged")
    if not (root / name / "metadata.json").is_file():
        raise UserError(f"{f} points to {name}, which is missing or incomplete; point `latest` at a "
                        f"complete iter_* dir ({', '.join(kept(root)) or 'none left'})")
    return int(m.group(1))


def kept(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _ITER.match(p.name))


def read_run_manifest(root: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{root / MANIFEST}: unreadable ({e}); the checkpoint dir is damaged") from None


@dataclass(slots=True)
class CheckpointDir:
    """A checkpoint dir (of `pretrain` or `convert from-hf`) with its manifest, checked."""

    root: Path
    manifest: dict[str, Any]

    @property
    def stage(self) -> str:
        return str(self.manifest.get("stage"))

    @property
    def tokenizer_id(self) -> TokenizerId:
        return TokenizerId.of(self.manifest.get("tokenizer"))

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    def kept(self) -> list[str]:
        return kept(self.root)

    def latest(self) -> int | None:
        return read_latest(self.root)

    def iteration(self, step: int | None, label: str) -> int:
        """`step` checked to be a complete checkpoint here, or `latest` when None."""
        available = self.kept()
        if step is None:
            step = self.latest()
            if step is None:
                raise UserError(f"{label} {str(self.root)!r} holds no complete checkpoint yet (no `latest`; iter "
                                f"dirs: {', '.join(available) or 'none'}); let pretraining save one first")
            return step
        if not (self.root / iter_name(step) / "metadata.json").is_file():
            steps = ", ".join(str(int(n[5:])) for n in available) or "none"
            raise UserError(f"{label} {str(self.root)!r} has no iteration {step}; available iterations: {steps}")
        return step

    def architecture_diffs(self, now: dict[str, Any]) -> list[str]:
        """'model.KEY: SAVED there, NOW here' for every architecture field that differs."""
        saved = self.manifest.get("model", {})
        return [f"model.{k}: {saved.get(k)!r} there, {now.get(k)!r} here" for k in sorted(set(saved) | set(now))
                if saved.get(k) != now.get(k)]

    def check_architecture(self, now: dict[str, Any], label: str, fix: str) -> None:
        diffs = self.architecture_diffs(now)
        if diffs:
            raise UserError(f"{label} {str(self.root)!r} holds a model of another architecture ({'; '.join(diffs)}); "
                            f"{fix}")

    def check_tokenizer(self, mine: TokenizerId, label: str, mine_label: str, fix: str) -> None:
        saved = self.tokenizer_id
        if saved.sha256 is None:            # a model whose tokenizer is not SentencePiece: nothing recorded
            return
        check_same(saved, mine, what=f"{label} {str(self.root)!r}", mine_label=mine_label, fix=fix)


def open_checkpoint_dir(path: str | Path, label: str = "checkpoint",
                        accept: tuple[str, ...] = stages.CHECKPOINT_DIRS) -> CheckpointDir:
    """Check `path` is a checkpoint dir made by one of `accept`; UserError naming what is wrong."""
    root = Path(path)
    what = " or ".join(f"`domainlm {s}`" for s in accept)
    if not root.is_dir():
        raise UserError(f"{label} {str(path)!r} is not a directory; give a checkpoint dir of {what}")
    if not (root / MANIFEST).is_file():
        shown = ", ".join(sorted(p.name for p in root.iterdir())[:5]) or "nothing"
        raise UserError(f"{label} {str(path)!r} has no {MANIFEST} (it holds {shown}), so it is not a checkpoint "
                        f"dir of {what}")
    manifest = read_run_manifest(root)
    if manifest.get("stage") not in accept:
        raise UserError(f"{label} {str(path)!r} was made by `domainlm {manifest.get('stage')}`; give a checkpoint "
                        f"dir of {what}")
    return CheckpointDir(root=root, manifest=manifest)


def inspect(cfg, tokenizer: TokenizerId) -> int | None:
    """Check checkpoint.dir before any compute; returns the step to resume from (None: fresh).

    Refuses: a path that is a file; a non-empty dir that is not a pretrain checkpoint dir; a
    checkpoint of another architecture (listing the differing keys) or tokenizer; a dir with
    checkpoints when resume is off (unless overwrite); a run already at train.max_steps.
    """
    c = cfg.checkpoint
    if not c.dir:
        raise UserError("checkpoint.dir: give the directory to write checkpoints to")
    root = Path(c.dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"checkpoint.dir {c.dir!r} is a file; give a directory")
    if not root.is_dir() or not any(root.iterdir()):
        return None
    if not (root / MANIFEST).is_file() or read_run_manifest(root).get("stage") != STAGE:
        shown = ", ".join(sorted(p.name for p in root.iterdir())[:5])
        raise UserError(f"checkpoint.dir {c.dir!r} is not a domainlm pretrain checkpoint dir (it holds {shown} "
                        "and no pretrain manifest.json); choose an empty or new directory")
    ckpt = open_checkpoint_dir(root, "checkpoint.dir", (STAGE,))
    step = ckpt.latest()
    if step is None:
        return None
    if c.overwrite:
        return None
    if not c.resume:
        raise UserError(f"checkpoint.dir {c.dir!r} holds checkpoints up to step {step}; resume them "
                        "(checkpoint.resume=true) or start afresh with --checkpoint.overwrite")
    ckpt.check_architecture(cfg.model.architecture(), "checkpoint.dir",
                            "use the same model settings or another checkpoint.dir")
    ckpt.check_tokenizer(tokenizer, "checkpoint.dir", f"tokenizer {cfg.tokenizer!r}",
                         "resume with the tokenizer of its tokenizer/ copy")
    if step >= cfg.train.max_steps:
        raise UserError(f"checkpoint.dir {c.dir!r} is already at step {step} >= train.max_steps="
                        f"{cfg.train.max_steps}; raise --train.max-steps to train further")
    return step


def prepare(root: Path, cfg, tokenizer_dir: Path, manifest: dict[str, Any]) -> None:
    """Rank 0, at start: config, tokenizer copy and manifest (a fresh or overwritten dir)."""
    root.mkdir(parents=True, exist_ok=True)
    if cfg.checkpoint.overwrite:
        for name in kept(root) + [n.name for n in root.glob("iter_*.tmp")]:
            shutil.rmtree(root / name, ignore_errors=True)
        (root / LATEST).unlink(missing_ok=True)
    (root / "config.yaml").write_text(
        f"# domainlm pretrain --config {root / 'config.yaml'}\n" + dump_yaml(cfg), encoding="utf-8")
    tok = root / "tokenizer"
    if tok.exists():
        shutil.rmtree(tok)
    shutil.copytree(tokenizer_dir, tok)
    old = read_run_manifest(root) if (root / MANIFEST).is_file() else {}
    # `domainlm run` skips a stage whose manifest fingerprint matches: set only once the run is
    # done (see save), so an interrupted run is resumed, not skipped.
    manifest["fingerprint_when_done"] = manifest.pop("fingerprint")
    manifest["checkpoints"] = kept(root)
    manifest["latest"] = old.get("latest") if not cfg.checkpoint.overwrite else None
    _write_atomic(root / MANIFEST, manifest)


def _write_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(obj, str):
        tmp.write_text(obj, encoding="utf-8")
    else:
        write_json(tmp, obj)
    os.replace(tmp, path)


def _strategies(root_for_load: Path | None = None):
    import torch
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy, get_default_save_sharded_strategy)
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper, FullyParallelSaveStrategyWrapper)

    # Each DP replica writes / reads a disjoint part of the replicated tensors. The parallel
    # load exchanges the parts through CUDA, so the CPU path reads every part it needs itself.
    dp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if root_for_load is None:
        return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), dp)
    strategy = get_default_load_sharded_strategy(str(root_for_load))
    return FullyParallelLoadStrategyWrapper(strategy, dp) if torch.cuda.is_available() else strategy


def save(root: Path, step: int, state: dict[str, Any], keep_last: int, *, done: bool = False) -> Path:
    """Collective: write iter_N, then (rank 0) move `latest` to it and delete the oldest;
    `done` (the last step) also marks the run complete in the manifest."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from domainlm.pretrain.cpu_compat import dist_checkpointing_on_cpu

    rank0 = dist.get_rank() == 0
    final, tmp = root / iter_name(step), root / f"{iter_name(step)}.tmp"
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    with dist_checkpointing_on_cpu():
        dist_checkpointing.save(state, str(tmp), sharded_strategy=_strategies())
    dist.barrier()
    if rank0:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _write_atomic(root / LATEST, final.name + "\n")
        names = kept(root)
        for old in names[:-keep_last] if keep_last else []:
            shutil.rmtree(root / old, ignore_errors=True)
        manifest = read_run_manifest(root)
        manifest["checkpoints"], manifest["latest"] = kept(root), final.name
        if done:
            manifest["fingerprint"] = manifest.get("fingerprint_when_done")
        _write_atomic(root / MANIFEST, manifest)
    dist.barrier()
    return final


def load(root: Path, step: int, state: dict[str, Any]) -> dict[str, Any]:
    """Collective: load iter_N into the sharded `state` (any TP/PP/DP layout)."""
    from megatron.core import dist_checkpointing

    from domainlm.pretrain.cpu_compat import dist_checkpointing_on_cpu

    path = root / iter_name(step)
    with dist_checkpointing_on_cpu():
        return dist_checkpointing.load(state, str(path), sharded_strategy=_strategies(path))

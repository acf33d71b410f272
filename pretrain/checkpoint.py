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

A save writes iter_N.tmp/ on every rank, records the size and sha256 of every file in
iter_N.tmp/checksums.json, renames it to iter_N/ once all ranks are done, and only then moves
`latest`; a crash mid-save leaves the previous `latest` intact. Tensors are saved as sharded
tensors in global coordinates, so a checkpoint loads under any TP/PP/DP layout.

Before a checkpoint is loaded (resume, `convert to-hf`) its files are checked against
checksums.json (sizes by every rank, hashes split over the ranks). A damaged `latest` (a file
truncated by a full disk or a killed copy, say) is named, with the file, and the previous intact
checkpoint is used instead; when none is intact the command stops with one line.
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
from domainlm.manifest import MANIFEST, read_jsonl, write_json
from domainlm.tokenizer.tokdir import TokenizerId, check_same

STAGE = stages.PRETRAIN
LATEST = "latest"
_ITER = re.compile(r"^iter_(\d{7})$")
CHECKSUMS = "checksums.json"
# torch DCP names each rank's data files __{rank}_{n}.distcp; that rank hashes them at save
# time, while they are still in its page cache.
_WRITER = re.compile(r"^__(\d+)_")
_HASH_CHUNK = 8 << 20


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

    def metrics(self) -> list[dict[str, Any]]:
        """The run's logged metrics (logs/metrics.jsonl: {"kind": "train"|"eval", "step", ...} per line)."""
        return read_jsonl(self.root / "logs" / "metrics.jsonl")

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

    def intact_iteration(self, step: int | None, label: str) -> tuple[int, list[str]]:
        """`iteration(step)` with its files checked against checksums.json: a damaged `latest` falls
        back to the newest intact one (returned with the warnings); an asked-for iteration that is
        damaged is refused."""
        chosen = self.iteration(step, label)
        if step is None:
            return pick_intact(self.root, chosen, label, "give --iteration of an intact checkpoint")
        problems = verify(self.root / iter_name(chosen))
        if problems:
            raise UserError(f"{label} {str(self.root)!r}: {iter_name(chosen)} is damaged: "
                            f"{'; '.join(problems[:3])}; give another --iteration ({', '.join(self.kept())})")
        return chosen, []

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
        if saved.sha256 is None:            # a converted model whose tokenizer shards cannot use: nothing recorded
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


def prepare(root: Path, cfg, tokenizer, manifest: dict[str, Any]) -> None:
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
    tokenizer.copy_to(tok)                 # a `tokdir.TokenizerDir`
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
    """Collective: write iter_N and its checksums, then (rank 0) move `latest` to it and delete
    the oldest; `done` (the last step) also marks the run complete in the manifest."""
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
    write_checksums(tmp)
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
    """Collective: load iter_N into the sharded `state` (any TP/PP/DP layout). A file that cannot
    be read (a damaged checkpoint without checksums.json) is one line naming the dir."""
    import pickle

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException as DCPException

    from domainlm.pretrain.cpu_compat import dist_checkpointing_on_cpu

    path = root / iter_name(step)
    try:
        with dist_checkpointing_on_cpu():
            return dist_checkpointing.load(state, str(path), sharded_strategy=_strategies(path))
    except (EOFError, OSError, pickle.UnpicklingError, CheckpointingException, DCPException) as e:
        # torch DCP wraps each rank's error; name the first one rather than the wrapper.
        cause = next(iter(getattr(e, "failures", {}).values()), e)
        if isinstance(cause, tuple):        # (exception, traceback) in some torch versions
            cause = cause[0]
        detail = str(cause).strip().splitlines()[0][:200] if str(cause).strip() else ""
        raise UserError(f"{path}: cannot be read ({type(cause).__name__}{': ' + detail if detail else ''}); the "
                        f"checkpoint is damaged -- resume from another iteration (move this one away)") from None


# -- checksums ---------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj: Any) -> list:
    import torch.distributed as dist

    rank, world = _world()
    if world == 1:
        return [obj]
    out: list = [None] * world
    dist.all_gather_object(out, obj)
    return out


def write_checksums(path: Path) -> None:
    """Collective: the size and sha256 of every file of a checkpoint dir, into checksums.json.
    Each rank hashes the data files it wrote (__R_*.distcp); rank 0 the rest, and writes."""
    rank, world = _world()
    names = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != CHECKSUMS)
    mine = {}
    for name in names:
        m = _WRITER.match(name)
        owner = int(m.group(1)) % world if m else 0
        if owner == rank:
            f = path / name
            mine[name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    files: dict[str, Any] = {}
    for part in _gather(mine):
        files.update(part)
    if rank == 0:
        _write_atomic(path / CHECKSUMS, {"algorithm": "sha256", "files": dict(sorted(files.items()))})


def verify(path: Path) -> list[str] | None:
    """Collective: what is wrong with a checkpoint dir's files ([] when intact), or None when it
    has no checksums.json (written before domainlm recorded them: nothing to check against).
    Sizes are checked by every rank (cheap), hashes split over the ranks."""
    import json

    f = path / CHECKSUMS
    if not f.is_file():
        return None
    try:
        recorded = json.loads(f.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{CHECKSUMS}: unreadable ({type(e).__name__})"]
    rank, world = _world()
    problems, to_hash = [], []
    for i, (name, rec) in enumerate(sorted(recorded.items())):
        p = path / name
        if not p.is_file():
            problems.append(f"{name}: missing")
        elif p.stat().st_size != rec["bytes"]:
            problems.append(f"{name}: {p.stat().st_size:,} bytes, {rec['bytes']:,} when written")
        elif i % world == rank:
            to_hash.append((name, rec["sha256"]))
    mine = []
    for name, want in to_hash:
        try:
            if _sha256(path / name) != want:
                mine.append(f"{name}: contents differ from when written (sha256)")
        except OSError as e:   # reported, not raised: the other ranks are waiting in the gather
            mine.append(f"{name}: unreadable ({e.strerror or type(e).__name__})")
    for part in _gather(mine):
        problems.extend(part)
    return sorted(set(problems))


def pick_intact(root: Path, step: int, label: str, fix: str) -> tuple[int, list[str]]:
    """Collective: `step` if its checkpoint is intact, else the newest older intact one, with a
    warning per damaged checkpoint skipped; UserError (one line) when none is intact."""
    warnings: list[str] = []
    candidates = [int(n[5:]) for n in kept(root) if int(n[5:]) <= step and (root / n / "metadata.json").is_file()]
    damaged = []
    for s in sorted(candidates, reverse=True):
        problems = verify(root / iter_name(s))
        if not problems:
            return s, warnings
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        damaged.append(f"{iter_name(s)} ({shown})")
        warnings.append(f"{label} {str(root)!r}: {iter_name(s)} is damaged: {shown}")
    raise UserError(f"{label} {str(root)!r} holds no intact checkpoint to load: "
                    f"{', '.join(damaged) or 'no complete iter_* dir'}; restore the files, or {fix}")

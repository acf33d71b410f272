"""The Megatron side of conversion: a whole model in one CPU process (TP=1, PP=1).

megatron-core's distributed checkpoints store every tensor in global coordinates (a layer's
tensors stacked over the global layer index, fc1 as [gate; up] at any TP), so a checkpoint saved
under any TP/PP layout loads into a model built at TP=1/PP=1 in a gloo world of one process.
The model is built on the CPU in fp32 without random init (the weights are loaded next).
"""

from __future__ import annotations

import contextlib
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import MANIFEST
from domainlm.pretrain import checkpoint
from domainlm.pretrain.config import ModelArgs
from domainlm.devices import init_process_group

# The start-up and deprecation warnings megatron-core and torch DCP print on every load, which
# say nothing about the user's checkpoint (the same ones pretrain/trainer.py silences).
for _pattern in (r".*(Transformer Engine|Apex|apex).*", r"full scope is deprecated.*",
                 r".*deprecating ShardedTensor.*", r"`load_state_dict` is deprecated.*"):
    warnings.filterwarnings("ignore", message=_pattern)

# Directories `convert to-hf` reads: pretraining runs and converted HF models.
SOURCE_STAGES = stages.CHECKPOINT_DIRS


@dataclass(slots=True)
class CheckpointInfo:
    """What a checkpoint dir's manifest says, and the iteration chosen."""

    root: Path
    step: int
    manifest: dict[str, Any]
    model: ModelArgs
    vocab: int
    """The tokenizer's vocab size (rows kept in the export)."""
    padded_vocab: int
    """Rows of the stored embedding / output tables."""
    seq_len: int

    @property
    def iter_dir(self) -> Path:
        return self.root / checkpoint.iter_name(self.step)


# (dir, iteration asked, the iter dirs' file stamps) -> the step checked intact, so a second read in
# one process hashes the files once and warns once.
_INTACT: dict[tuple, int] = {}


def _stamp(root: Path) -> tuple:
    return tuple((f.parent.name, f.name, f.stat().st_size, f.stat().st_mtime_ns)
                 for d in sorted(root.glob("iter_*")) if d.is_dir() for f in sorted(d.iterdir()) if f.is_file())


def read_checkpoint_dir(path: str, iteration: int | None, *, verify: bool = True) -> CheckpointInfo:
    """Check DIR is a checkpoint dir holding the wanted iteration, its files intact (a damaged
    `latest` falls back to the newest intact checkpoint, with a warning); UserError otherwise.
    verify=False skips reading the files (what `domainlm run` needs to tell whether it is up to date)."""
    from domainlm.progress import log

    ckpt = checkpoint.open_checkpoint_dir(path, "checkpoint", SOURCE_STAGES)
    if not verify:
        step = ckpt.iteration(iteration, "checkpoint")
    else:
        key = (str(ckpt.root.resolve()), iteration, _stamp(ckpt.root))
        if key not in _INTACT:
            step, damaged = ckpt.intact_iteration(iteration, "checkpoint")
            for line in damaged:
                log.warning("%s", line)
            if damaged:
                log.warning("exporting %s (step %d), the newest intact checkpoint", checkpoint.iter_name(step), step)
            _INTACT[key] = step
        step = _INTACT[key]
    root, manifest = ckpt.root, ckpt.manifest
    try:
        arch, tok = manifest["model"], manifest["tokenizer"]
        model = ModelArgs(**arch)
        info = CheckpointInfo(root=root, step=step, manifest=manifest, model=model,
                              vocab=int(tok["vocab_size"]), padded_vocab=int(manifest["padded_vocab_size"]),
                              seq_len=int(manifest.get("seq_len") or 2048))
    except (KeyError, TypeError) as e:
        raise UserError(f"{root / MANIFEST}: lacks the model/tokenizer fields ({e}); the checkpoint dir is "
                        "damaged") from None
    if not ckpt.tokenizer_dir.is_dir():
        raise UserError(f"checkpoint {path!r} has no tokenizer/ copy; the checkpoint dir is damaged")
    return info


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """A gloo world of one process with megatron's TP=1/PP=1 groups (what its sharded state
    dicts and dist_checkpointing need); torn down afterwards if made here."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    owns_dist = not dist.is_initialized()
    if owns_dist:
        init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("conversion runs in a single process; found a process group of "
                           f"{dist.get_world_size()}")
    owns_mp = not parallel_state.model_parallel_is_initialized()
    if owns_mp:
        parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        if owns_mp:
            parallel_state.destroy_model_parallel()
        if owns_dist:
            dist.destroy_process_group()


def build(m: ModelArgs, padded_vocab: int, seq_len: int) -> torch.nn.Module:
    """The whole LlamaGPT, fp32 on the CPU, eval mode, parameters left uninitialized."""
    import dataclasses

    from domainlm.pretrain.model import build_model, transformer_config

    m = dataclasses.replace(m, kernels="torch")
    config = transformer_config(m, cpu=True)
    config.perform_initialization = False   # the weights are loaded next; skip the random draw
    model = build_model(m, config, vocab_size=padded_vocab, seq_len=seq_len)
    return model.eval()


def load_weights(model: torch.nn.Module, info: CheckpointInfo) -> None:
    """The model part of iter_N (any saved layout) into `model`, cast to its dtype."""
    state = checkpoint.load(info.root, info.step, {"model": model.sharded_state_dict()})
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise UserError(f"{info.iter_dir}: does not hold this model's weights (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); the manifest and the checkpoint disagree")


def stored_dtype(iter_dir: Path) -> torch.dtype:
    """The dtype the checkpoint stores its weights in (fp32 from CPU runs, bf16 from GPU runs)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(iter_dir)).read_metadata().state_dict_metadata
    entry = meta.get("embedding.word_embeddings.weight")
    return entry.properties.dtype if entry is not None else torch.float32


def save(model: torch.nn.Module, root: Path, trainer_state: dict[str, Any]) -> Path:
    """Write the model as iter_0000000 + `latest` under `root` (whose manifest must exist), through
    the same save path as pretraining."""
    state = {"model": model.sharded_state_dict(), "trainer": trainer_state}
    return checkpoint.save(root, 0, state, keep_last=0, done=True)


def set_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy a full TP=1 state dict into `model` in place (cast to its dtype), every weight checked."""
    own = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if sorted(own) != sorted(weights):
        raise RuntimeError(f"weights do not match the model: missing {sorted(set(own) - set(weights))[:3]}, "
                           f"unexpected {sorted(set(weights) - set(own))[:3]}")
    with torch.no_grad():
        for k, t in own.items():
            if t.shape != weights[k].shape:
                raise RuntimeError(f"{k}: model {tuple(t.shape)}, weights {tuple(weights[k].shape)}")
            t.copy_(weights[k])


@torch.no_grad()
def logits(model: torch.nn.Module, ids: list[int], vocab: int) -> torch.Tensor:
    """[len(ids), vocab] fp32 logits of one sequence (padding rows dropped)."""
    tokens = torch.tensor([ids], dtype=torch.long)
    positions = torch.arange(len(ids)).unsqueeze(0)
    return model(tokens, positions, None)[0, :, :vocab].float()


@torch.no_grad()
def greedy(model: torch.nn.Module, ids: list[int], new_tokens: int, vocab: int, stop: set[int]) -> list[int]:
    """Greedy continuation by full forward passes (no KV cache), stopping after a stop id."""
    out = list(ids)
    for _ in range(new_tokens):
        nxt = int(logits(model, out, vocab)[-1].argmax())
        out.append(nxt)
        if nxt in stop:
            break
    return out[len(ids):]

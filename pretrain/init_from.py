"""`domainlm pretrain --init-from DIR`: start pretraining from the weights of another checkpoint.

DIR is a `domainlm convert from-hf` output (an open model to continue pretraining on domain
text) or another run's checkpoint dir. Weights only: the optimizer, the LR schedule, the step and
the data stream start afresh. A run that already has checkpoints of its own resumes from them
and ignores DIR. Everything is checked before any compute: DIR's architecture must equal the
run's model config, and its tokenizer the run's tokenizer (which the shards were made with).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from domainlm import stages
from domainlm.errors import UserError
from domainlm.pretrain import checkpoint
from domainlm.pretrain.checkpoint import open_checkpoint_dir
from domainlm.tokenizer.tokdir import check_same, load_tokenizer_dir

INIT_STAGES = (stages.CONVERT_FROM_HF, stages.PRETRAIN)


@dataclass(slots=True)
class InitFrom:
    root: Path
    step: int
    seq_len: int | None = None
    """The context of the model the weights come from (an HF base's max_position_embeddings): a run
    at a shorter train.seq_len keeps it, so its export does not cut the base's context."""

    def load(self, model, optimizer) -> None:
        """Collective: DIR's weights into `model` (any saved layout), then the optimizer's fp32
        master copies refreshed from them (megatron's reload_model_params; GPU mixed precision)."""
        from domainlm.pretrain.model import unwrap

        inner = unwrap(model)
        state = checkpoint.load(self.root, self.step, {"model": inner.sharded_state_dict()})
        inner.load_state_dict(state["model"])
        optimizer.reload_model_params()
        import torch.distributed as dist

        if dist.get_rank() == 0:
            from domainlm.progress import log

            log.info("initialized the weights from %s (%s); optimizer and schedule start afresh", self.root,
                     checkpoint.iter_name(self.step))


def check(cfg) -> InitFrom | None:
    """None without cfg.init_from; else the checked source (UserError naming the mismatch)."""
    if not cfg.init_from:
        return None
    from domainlm.pretrain.model import padded_vocab

    label = "init_from"
    src = open_checkpoint_dir(cfg.init_from, label, INIT_STAGES)
    step = src.latest()
    if step is None:
        raise UserError(f"{label}: {cfg.init_from!r} holds no complete checkpoint yet")
    root = src.root
    hint = f"--config {root / 'config.yaml'} sets them" if (root / "config.yaml").is_file() else "set them"
    src.check_architecture(cfg.model.architecture(), label, hint)
    tok = src.manifest.get("tokenizer", {})
    if tok.get("pretrainable", tok.get("sentencepiece")) is False:
        why = tok.get("why_not_pretrainable") or tok.get("why_not_sentencepiece")
        fix = ("convert it again with this version of `domainlm convert from-hf`, which imports tokenizer.json too"
               if "pretrainable" not in tok else "it can be converted back to HF but not pretrained further here")
        raise UserError(f"{label}: {cfg.init_from!r} has no tokenizer the shards and pretraining can use ({why}); "
                        f"{fix}")
    mine = load_tokenizer_dir(cfg.tokenizer)
    check_same(src.tokenizer_id, mine.identity, what=f"{label} {cfg.init_from!r}",
               mine_label=f"tokenizer {cfg.tokenizer!r}",
               fix=f"use its tokenizer ({src.tokenizer_dir}) and shards made with it")
    rows = padded_vocab(mine.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor)
    if src.manifest.get("padded_vocab_size") not in (None, rows):
        raise UserError(f"{label}: {cfg.init_from!r} stores {src.manifest['padded_vocab_size']} embedding rows, this "
                        f"run pads the vocab to {rows} at parallel.tensor={cfg.parallel.tensor}; pick a TP size that "
                        f"divides {src.manifest['padded_vocab_size']}")
    return InitFrom(root=root, step=step, seq_len=src.manifest.get("seq_len"))

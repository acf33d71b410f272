"""`domainlm pretrain --init-from DIR`: start pretraining from the weights of another checkpoint.

DIR is a `domainlm convert from-hf` output (an open model to continue pretraining on domain
text) or another run's checkpoint dir. Weights only: the optimizer, the LR schedule, the step and
the data stream start afresh. A run that already has checkpoints of its own resumes from them
and ignores DIR. Everything is checked before any compute: DIR's architecture must equal the
run's model config, and its tokenizer the run's tokenizer (which the shards were made with).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from domainlm.errors import UserError
from domainlm.manifest import MANIFEST

INIT_STAGES = ("convert from-hf", "pretrain")


@dataclass(slots=True)
class InitFrom:
    root: Path
    step: int

    def load(self, model, optimizer) -> None:
        """Collective: DIR's weights into `model` (any saved layout), then the optimizer's fp32
        master copies refreshed from them (megatron's reload_model_params; GPU mixed precision)."""
        from domainlm.pretrain import checkpoint
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
    from domainlm.pretrain import checkpoint
    from domainlm.tokenizer.tokdir import load_tokenizer_dir

    root = Path(cfg.init_from)
    label = "init_from"
    if not (root / MANIFEST).is_file():
        raise UserError(f"{label}: {cfg.init_from!r} has no {MANIFEST}; give a `domainlm convert from-hf` output or "
                        "a `domainlm pretrain` checkpoint dir")
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{label}: {root / MANIFEST} is not valid JSON ({e})") from None
    if manifest.get("stage") not in INIT_STAGES:
        raise UserError(f"{label}: {cfg.init_from!r} was made by `domainlm {manifest.get('stage')}`; give a "
                        "`domainlm convert from-hf` output or a `domainlm pretrain` checkpoint dir")
    step = checkpoint.read_latest(root)
    if step is None:
        raise UserError(f"{label}: {cfg.init_from!r} holds no complete checkpoint yet")
    saved, now = manifest.get("model", {}), cfg.model.architecture()
    diffs = [f"model.{k}: {saved.get(k)!r} there, {now.get(k)!r} here" for k in sorted(set(saved) | set(now))
             if saved.get(k) != now.get(k)]
    if diffs:
        hint = f"--config {root / 'config.yaml'} sets them" if (root / "config.yaml").is_file() else "set them"
        raise UserError(f"{label}: {cfg.init_from!r} holds a model of another architecture ({'; '.join(diffs)}); "
                        f"{hint}")
    tok = manifest.get("tokenizer", {})
    if tok.get("sentencepiece") is False:
        raise UserError(f"{label}: {cfg.init_from!r} has no SentencePiece tokenizer "
                        f"({tok.get('why_not_sentencepiece')}); "
                        "domainlm's shards and pretraining tokenize with SentencePiece, so this model can be "
                        "converted back to HF but not pretrained further here")
    mine = load_tokenizer_dir(cfg.tokenizer)
    if tok.get("sha256") != mine.sha256 or int(tok.get("vocab_size", -1)) != mine.vocab_size:
        raise UserError(f"{label}: {cfg.init_from!r} was trained with another tokenizer (sha256 "
                        f"{str(tok.get('sha256'))[:12]}..., vocab {tok.get('vocab_size')}) than tokenizer "
                        f"{cfg.tokenizer!r} ({mine.sha256[:12]}..., vocab {mine.vocab_size}); use its tokenizer "
                        f"({root / 'tokenizer'}) and shards made with it")
    from domainlm.pretrain.model import padded_vocab

    rows = padded_vocab(mine.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor)
    if manifest.get("padded_vocab_size") not in (None, rows):
        raise UserError(f"{label}: {cfg.init_from!r} stores {manifest['padded_vocab_size']} embedding rows, this run "
                        f"pads the vocab to {rows} at parallel.tensor={cfg.parallel.tensor}; pick a TP size that "
                        f"divides {manifest['padded_vocab_size']}")
    return InitFrom(root=root, step=step)

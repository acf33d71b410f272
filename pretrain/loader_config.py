"""The `data` section of the pretraining config (light: no numpy or torch, so `--help` stays fast).

`domainlm.pretrain.loader.TokenWindowLoader` reads it; this module only declares and checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from domainlm.config import INPUT, RUNTIME
from domainlm.errors import UserError


@dataclass(kw_only=True, slots=True)
class DataArgs:
    """Pretraining data: shards dirs from `domainlm data shard`, blended, shuffled and packed into
    windows of seq_len + 1 tokens with an eos after every document."""

    shards: list[str] = field(default_factory=list, metadata=INPUT)
    """Shards directories (outputs of `domainlm data shard`). Several are blended by `weights`,
    e.g. domain data with general data; all must come from the same tokenizer."""
    weights: list[float] = field(default_factory=list)
    """Blend weight of each shards dir, in the order of `shards` (positive; normalized to sum 1).
    Each window of seq_len + 1 tokens comes from one dir, drawn with these probabilities, and a
    dir that runs out starts its next epoch, so a small domain dir is repeated more often.
    Empty: in proportion to each dir's tokens, as if the dirs were one corpus."""
    shuffle_buffer: int = 10000
    """Documents shuffled together: the loader reads this many documents of its stream, permutes
    them (seeded), and packs them (a block shuffle, so that the state is a position). Larger
    mixes more and costs memory and resume time (a resume re-reads one block)."""
    seed: int = 1234
    """Seed of the training order: shard order in each epoch, document shuffle, blend draws.
    The validation split ignores it (its fixed order is the same in every run)."""
    num_workers: int = field(default=1, metadata=RUNTIME)
    """Loader processes per rank reading shards ahead of training; 0 reads in the training
    process. The order of tokens does not depend on it, so a run may resume with another count."""
    verify_checksums: bool = field(default=False, metadata=RUNTIME)
    """Check each shard's sha256 against the manifest the first time a process reads it (reads
    every shard file once more). Sizes and document counts are always checked."""

    def validate(self) -> None:
        if not self.shards:
            raise UserError("data.shards: give at least one shards directory (from `domainlm data shard`)")
        if self.weights and len(self.weights) != len(self.shards):
            raise UserError(
                f"data.weights has {len(self.weights)} values for {len(self.shards)} shards dirs; give one "
                "weight per dir, in the order of data.shards, or none (proportional to tokens)"
            )
        for i, w in enumerate(self.weights):
            if not w > 0:
                raise UserError(f"data.weights[{i}] is {w}; weights must be positive (drop the dir instead)")
        if self.shuffle_buffer < 1:
            raise UserError(f"data.shuffle_buffer is {self.shuffle_buffer}; give 1 (no shuffle) or more documents")
        if self.seed < 0:
            raise UserError(f"data.seed is {self.seed}; give a seed >= 0")
        if self.num_workers < 0:
            raise UserError(f"data.num_workers is {self.num_workers}; give 0 (read in the training process) or more")

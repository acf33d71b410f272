"""The training and validation samples of a run: read, split, rendered, tokenized, counted.

Records come from --data (records.py) and the training points' examples (points.py); the
validation set is --valid-data, or the records whose seeded content hash falls below
--valid-fraction (points' examples always train). Each conversation is rendered with the chat
template and tokenized with labels (chat.py); one longer than train.seq_len is dropped and
counted as `too_long` (cutting it would cut off the end token the model must learn). Everything
read is accounted for: records = kept + sum(dropped), per split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from domainlm.errors import UserError
from domainlm.progress import log
from domainlm.finetune.chat import ChatEncoder, Encoded
from domainlm.finetune.points import Point, read_points, training_examples
from domainlm.finetune.records import ReadStats, hash_fraction, read_examples


@dataclass(slots=True)
class Prepared:
    train: list[Encoded]
    valid: list[Encoded]
    points: list[Point]
    stats: dict[str, Any]
    """The manifest's `data` entry: per split files, records, kept, dropped by reason, tokens."""
    readers: list[ReadStats] = field(default_factory=list)
    """Whose dead letters go to dead_letter.jsonl."""


def prepare(cfg, encoder: ChatEncoder, max_positions: int | None = None) -> Prepared:
    """`max_positions`: the model's max_position_embeddings; a sample longer than it (or than
    train.seq_len) is dropped as too_long, also when packing (positions restart per sample, so
    rows may be longer than the model's positions, samples not)."""
    train_stats, valid_stats, point_stats = ReadStats(), ReadStats(), ReadStats()
    examples = read_examples(cfg.data, train_stats, "data") if cfg.data else []
    points = read_points(cfg.points, point_stats) if cfg.points else []
    examples, valid = split_valid(cfg, examples, valid_stats)
    train_ex = examples + training_examples(points)
    enc_train = encoder.encode_many([ex.messages for ex in train_ex], desc="tokenizing train")
    enc_valid = encoder.encode_many([ex.messages for ex in valid], desc="tokenizing valid") if valid else []
    limit = min(cfg.train.seq_len, max_positions or cfg.train.seq_len)
    train = [e for e in enc_train if len(e.ids) <= limit]
    valid_kept = [e for e in enc_valid if len(e.ids) <= limit]
    long_train, long_valid = len(enc_train) - len(train), len(enc_valid) - len(valid_kept)
    if long_train:
        train_stats.dropped["too_long"] += long_train
    if long_valid:
        (valid_stats if cfg.valid_data else train_stats).dropped["too_long"] += long_valid
    entry = {"max_sample_tokens": limit,
             "train": {**train_stats.as_dict(), "samples": len(train), **_tokens(train)},
             "valid": valid_source(cfg, valid_stats) | {"samples": len(valid_kept), **_tokens(valid_kept)}}
    if points:
        entry["points"] = {**point_stats.as_dict(), "examples_in_train": len(training_examples(points))}
    if not train:
        read = train_stats.records + point_stats.records
        dropped = train_stats.dropped + point_stats.dropped
        why = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"
        hint = (f"; samples may hold at most {limit} tokens (train.seq_len {cfg.train.seq_len}, the model's "
                f"max_position_embeddings {max_positions})" if dropped.get("too_long") else "")
        raise UserError(f"no usable training record in {', '.join(cfg.data + ([cfg.points] if cfg.points else []))}: "
                        f"{read} read, dropped: {why}{hint}; see the formats in `domainlm finetune sft --help`")
    if cfg.valid_data and not valid_kept:
        refuse_empty_valid(cfg, valid_stats, "record", limit, max_positions, "see the formats in `domainlm finetune "
                           "sft --help`")
    return Prepared(train=train, valid=valid_kept, points=points, stats=entry,
                    readers=[train_stats, valid_stats, point_stats])


def split_valid(cfg, examples: list, valid_stats: ReadStats, convert=None) -> tuple[list, list]:
    """(train, validation) records: --valid-data read with `convert`, else the records of --data
    whose seeded content hash falls below --valid-fraction (`finetune dpo`'s pairs too). Where
    that holds none out (a few dozen records at 0.02), the record of the smallest hash (and its
    copies) is held out, as long as --data has another: a fraction above 0 always validates."""
    if cfg.valid_data:
        return examples, read_examples(cfg.valid_data, valid_stats, "valid_data", convert=convert)
    ranks = [hash_fraction(ex.key(), cfg.split_seed) for ex in examples]
    held = [r < cfg.valid_fraction for r in ranks]
    if cfg.valid_fraction > 0 and not any(held) and len(set(ranks)) >= 2:
        first = min(ranks)
        held = [r == first for r in ranks]
        log.info("--valid-fraction %g held out none of %d records: holding out the one its hash ranks first",
                 cfg.valid_fraction, len(examples))
    return [ex for ex, h in zip(examples, held) if not h], [ex for ex, h in zip(examples, held) if h]


def refuse_empty_valid(cfg, stats: ReadStats, unit: str, limit: int, max_positions: int | None, formats: str) -> None:
    """An explicit --valid-data with nothing usable is an error, as --data's is (never a run
    that silently skips validation)."""
    why = ", ".join(f"{k} {v}" for k, v in sorted(stats.dropped.items())) or "none"
    what = "each side" if unit == "pair" else "samples"
    hint = (f"; {what} may hold at most {limit} tokens (train.seq_len {cfg.train.seq_len}, the model's "
            f"max_position_embeddings {max_positions})" if stats.dropped.get("too_long") else "")
    raise UserError(f"no usable validation {unit} in --valid-data {', '.join(cfg.valid_data)}: {stats.records} read, "
                    f"dropped: {why}{hint}; {formats}, or drop --valid-data to hold out --valid-fraction of --data")


def valid_source(cfg, valid_stats: ReadStats) -> dict[str, Any]:
    """The manifest's account of where the validation records came from."""
    if cfg.valid_data:
        return {**valid_stats.as_dict()}
    return {"from": "data", "valid_fraction": cfg.valid_fraction, "split_seed": cfg.split_seed}


def _tokens(samples: list[Encoded]) -> dict[str, int]:
    return {"tokens": sum(len(s.ids) for s in samples), "supervised_tokens": sum(s.supervised for s in samples)}

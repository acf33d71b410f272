"""Preference pairs in, token ids out: `finetune dpo`'s data, dead letters and counts by reason.

Each JSON line is a pair in the format TRL and the Hugging Face preference datasets use:

    {"prompt": "..." | [messages], "chosen": "..." | [assistant message], "rejected": ...}
    {"messages": [prompt messages, ending with the user's], "chosen": ..., "rejected": ...}

with an optional "system" string beside a string prompt. The prompt's messages follow the chat
rules of `records.py` (an optional system message, user and assistant alternating, ending with the
user); chosen and rejected are the assistant's reply. A record that cannot be a pair goes to the
dead letters with its file, line and reason: the reasons of `records.py`, plus `missing_field`
(no prompt/messages, chosen or rejected) and `chosen_equals_rejected` (nothing to prefer). Each
side is rendered with the chat template as prompt + reply and tokenized with labels on the reply
only (`chat.py`, the same rendering as SFT); a pair with a side longer than train.seq_len is
dropped as `too_long`. Everything read is accounted for: records = kept + sum(dropped).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from domainlm.errors import UserError
from domainlm.finetune.chat import ChatEncoder, Encoded
from domainlm.finetune.records import Bad, ReadStats, _message, _system, _text, check_conversation, read_examples

REASONS = ("missing_field", "chosen_equals_rejected")


@dataclass(slots=True)
class PairExample:
    """One preference pair and where it came from."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str
    format: str
    """prompt | messages"""

    def key(self) -> str:
        """Content hash: the validation split depends on what a pair says, not where it sits."""
        body = json.dumps([self.prompt, self.chosen, self.rejected], sort_keys=True, ensure_ascii=False)
        return hashlib.blake2b(body.encode(), digest_size=8).hexdigest()

    def conversation(self, reply: str) -> list[dict[str, str]]:
        return self.prompt + [{"role": "assistant", "content": reply}]


@dataclass(slots=True)
class EncodedPair:
    chosen: Encoded
    rejected: Encoded
    index: int
    """Position in its split (the row of the reference log-probabilities)."""


def to_pair(rec: dict[str, Any], source: str) -> tuple[PairExample, str]:
    """A pair of one parsed record; Bad naming what is wrong."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list):
            raise Bad("not_a_string", f"field 'messages' is {type(msgs).__name__}, not a list of messages")
        prompt, fmt = [_message(m, i) for i, m in enumerate(msgs)], "messages"
    elif "prompt" in rec:
        p = rec["prompt"]
        prompt = [_message(m, i) for i, m in enumerate(p)] if isinstance(p, list) else \
            _system(rec) + [{"role": "user", "content": _text(rec, "prompt")}]
        fmt = "prompt"
    else:
        raise Bad("missing_field", "no 'prompt' or 'messages' field: a pair is {\"prompt\" | \"messages\", "
                                   "\"chosen\", \"rejected\"}")
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if missing:
        raise Bad("missing_field", f"no {' or '.join(repr(k) for k in missing)} field: a pair is "
                                   "{\"prompt\" | \"messages\", \"chosen\", \"rejected\"}")
    if prompt and prompt[-1]["role"] != "user":
        raise Bad("roles_out_of_order", f"the prompt ends with a {prompt[-1]['role']!r} message; it must end "
                                        "with the user's, which chosen and rejected answer")
    chosen, rejected = _reply(rec, "chosen"), _reply(rec, "rejected")
    check_conversation(prompt + [{"role": "assistant", "content": chosen}])
    check_conversation(prompt + [{"role": "assistant", "content": rejected}])
    if " ".join(chosen.split()) == " ".join(rejected.split()):
        raise Bad("chosen_equals_rejected", "chosen and rejected are the same text: nothing to prefer")
    return PairExample(prompt=prompt, chosen=chosen, rejected=rejected, source=source, format=fmt), fmt


def _reply(rec: dict[str, Any], key: str) -> str:
    v = rec[key]
    if isinstance(v, list):              # TRL's conversational form: [{"role": "assistant", "content": ...}]
        msgs = [_message(m, i) for i, m in enumerate(v)]
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise Bad("bad_role", f"field {key!r} must hold one assistant message (got roles "
                                  f"{[m['role'] for m in msgs]})")
        return msgs[0]["content"]
    return _text(rec, key)


@dataclass(slots=True)
class PreparedPairs:
    train: list[EncodedPair]
    valid: list[EncodedPair]
    points: list
    stats: dict[str, Any]
    readers: list[ReadStats]


def prepare(cfg, encoder: ChatEncoder, max_positions: int | None = None) -> PreparedPairs:
    """The run's train and validation pairs, tokenized; UserError when no pair is usable."""
    from domainlm.finetune.dataset import refuse_empty_valid, split_valid, valid_source
    from domainlm.finetune.points import read_points

    train_stats, valid_stats, point_stats = ReadStats(), ReadStats(), ReadStats()
    examples = read_examples(cfg.data, train_stats, "data", convert=to_pair)
    points = read_points(cfg.points, point_stats) if cfg.points else []
    examples, valid = split_valid(cfg, examples, valid_stats, convert=to_pair)
    limit = min(cfg.train.seq_len, max_positions or cfg.train.seq_len)
    train = _encode(examples, encoder, limit, train_stats, "train")
    valid_enc = _encode(valid, encoder, limit, valid_stats if cfg.valid_data else train_stats, "valid")
    entry = {"max_sample_tokens": limit,
             "train": {**train_stats.as_dict(), "pairs": len(train), **_tokens(train)},
             "valid": valid_source(cfg, valid_stats) | {"pairs": len(valid_enc), **_tokens(valid_enc)}}
    if points:
        entry["points"] = {**point_stats.as_dict(), "examples_in_train": 0}
    if not train:
        why = ", ".join(f"{k} {v}" for k, v in sorted(train_stats.dropped.items())) or "none"
        hint = (f"; each side may hold at most {limit} tokens (train.seq_len {cfg.train.seq_len}, the model's "
                f"max_position_embeddings {max_positions})" if train_stats.dropped.get("too_long") else "")
        held = f", {len(valid_enc)} held out for validation" if valid_enc else ""
        raise UserError(f"no usable preference pair in {', '.join(cfg.data)}: {train_stats.records} read{held}, "
                        f"dropped: {why}{hint}; a pair is {{\"prompt\" | \"messages\", \"chosen\", \"rejected\"}} "
                        "(see `domainlm finetune dpo --help`)")
    if cfg.valid_data and not valid_enc:
        refuse_empty_valid(cfg, valid_stats, "pair", limit, max_positions, "a pair is {\"prompt\" | \"messages\", "
                           "\"chosen\", \"rejected\"}")
    return PreparedPairs(train=train, valid=valid_enc, points=points, stats=entry,
                         readers=[train_stats, valid_stats, point_stats])


def _encode(examples: list[PairExample], encoder: ChatEncoder, limit: int, stats: ReadStats,
            split: str) -> list[EncodedPair]:
    if not examples:
        return []
    chosen = encoder.encode_many([ex.conversation(ex.chosen) for ex in examples], desc=f"tokenizing {split} chosen")
    rejected = encoder.encode_many([ex.conversation(ex.rejected) for ex in examples],
                                   desc=f"tokenizing {split} rejected")
    out: list[EncodedPair] = []
    for c, r in zip(chosen, rejected):
        if len(c.ids) > limit or len(r.ids) > limit:
            stats.dropped["too_long"] += 1
            stats.kept -= 1
            continue
        out.append(EncodedPair(chosen=c, rejected=r, index=len(out)))
    return out


def _tokens(pairs: list[EncodedPair]) -> dict[str, int]:
    return {"tokens": sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs),
            "supervised_tokens": sum(p.chosen.supervised + p.rejected.supervised for p in pairs)}

"""Instruction data in, conversations out: four record formats, dead letters, counts by reason.

Each JSON line is read as one of (the first whose fields it has):

    chat               {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    prompt/completion  {"prompt": "...", "completion": "..."}  (or lists of messages, as TRL writes them)
    alpaca             {"instruction": "...", "input": "..."?, "output": "..."}
    qa                 {"question": "...", "answer": "...", "doc_id"?: "..."}  (pydoc's qa.jsonl: `source`)

and becomes a conversation: an optional system message, then user and assistant turns
alternating, at least one assistant turn. prompt/completion, Alpaca and QA records may carry a
"system" string. A record that cannot be one (bad JSON, no assistant turn, roles out of order,
empty content, a field of the wrong type) is not an error that stops the run: it goes to the
dead letters with its file, line and reason, and is counted, as the shard pipeline does with
bad corpus records. A file named FILE:SPLIT keeps the records whose "split" field is SPLIT.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


from domainlm import corpus
from domainlm.errors import UserError
from domainlm.manifest import expand_inputs, sha256_file
from domainlm.qa import refuse_test_files, split_spec

DATA_SUFFIXES = (".jsonl", ".json")
ROLES = ("system", "user", "assistant")
PAIRS = (("prompt", "completion"), ("instruction", "output"), ("question", "answer"))
"""The field pairs of the formats other than chat."""
EXCERPT_CHARS = 200
# Dead-letter reasons, in the order the checks run.
MALFORMED = ("invalid_utf8", "invalid_json", "not_an_object", "unknown_format", "not_a_string",
             "bad_role", "empty_content", "roles_out_of_order", "no_assistant_turn")


@dataclass(slots=True)
class Example:
    """One training conversation and where it came from."""

    messages: list[dict[str, str]]
    source: str
    """'file:line' (or 'points.yaml:point NAME #i')."""
    format: str
    """chat | prompt_completion | alpaca | qa"""

    def key(self) -> str:
        """Content hash: the validation split depends on what a record says, not where it sits."""
        return hashlib.blake2b(json.dumps(self.messages, sort_keys=True, ensure_ascii=False).encode(),
                               digest_size=8).hexdigest()


# The corpus reader's malformed-record exception and JSON-lines parser: one parser for every
# JSON-lines reader (reason, message, excerpt).
Bad = corpus.Bad


@dataclass(slots=True)
class ReadStats:
    """Records read from a set of files: kept, skipped by split, dropped by reason, dead letters."""

    files: list[dict[str, Any]] = field(default_factory=list)
    records: int = 0
    kept: int = 0
    other_split: int = 0
    by_format: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)

    def drop(self, where_file: str, line: int | None, reason: str, message: str, raw: bytes | str) -> None:
        self.dropped[reason] += 1
        self.dead_letters.append({"file": where_file, "line": line, "reason": reason, "message": message,
                                  "excerpt": excerpt(raw)})

    def as_dict(self) -> dict[str, Any]:
        return {"files": self.files, "records": self.records, "kept": self.kept, "other_split": self.other_split,
                "by_format": dict(sorted(self.by_format.items())), "dropped": dict(sorted(self.dropped.items()))}


def excerpt(raw: bytes | str) -> str:
    if isinstance(raw, bytes):
        raw = raw.rstrip(b"\r\n")[: EXCERPT_CHARS * 4].decode("utf-8", "backslashreplace")
    elif not isinstance(raw, str):
        raw = json.dumps(raw, ensure_ascii=False)
    return raw[:EXCERPT_CHARS]


def read_examples(specs: list[str], stats: ReadStats, what: str = "data", convert=None) -> list:
    """Every usable conversation of `specs` (files, globs, dirs, each optionally FILE:SPLIT).

    `convert(record, source) -> (item, format)` makes an item of a parsed record (raising Bad for
    a dead letter); the default makes an `Example` conversation (`finetune dpo` passes its pairs')."""
    convert = convert or to_example
    refuse_test_files(specs, what, "fine-tuning records", DATA_SUFFIXES)
    out: list = []
    for spec in specs:
        path, split = split_spec(spec)
        try:
            files = expand_inputs([path], DATA_SUFFIXES, "fine-tuning data files")
        except UserError as e:
            raise UserError(f"{what}: {e}") from None
        for f in files:
            if f.is_dir():
                raise UserError(f"{what}: {str(f)!r} is a directory of another kind; give JSON lines files")
            seen_splits: set[str] = set()
            before = stats.kept
            stats.files.append({"path": str(f), "split": split, "bytes": f.stat().st_size, "sha256": sha256_file(f)})
            for ex in _read_file(f, split, stats, seen_splits, convert, what):
                out.append(ex)
            if split is not None and seen_splits and split not in seen_splits and stats.kept == before:
                raise UserError(f"{what}: {f}: no record with split {split!r} (splits: {', '.join(sorted(seen_splits))})")
    return out


def _read_file(path: Path, split: str | None, stats: ReadStats, seen_splits: set[str], convert,
               what: str = "data") -> Iterator:
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror}); check the file is readable") from None
    array = corpus.json_array_file(path)
    if array:
        fh.close()
        raise UserError(f"{what}: {array}")
    with fh:
        for line_no, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            stats.records += 1
            try:
                rec = parse_line(raw)
                rec_split = rec.get("split")
                if rec_split is not None:
                    seen_splits.add(str(rec_split))
                if split is not None and rec_split is not None and str(rec_split) != split:
                    stats.records -= 1
                    stats.other_split += 1
                    continue
                if split is None and str(rec_split) == "test":
                    raise UserError(f"{what}: {path} line {line_no} is a record of the test split (\"split\": \"test\"); "
                                    f"fine-tuning never sees the test split: give {path}:train to keep its train records")
                item, fmt = convert(rec, f"{path}:{line_no}")
            except Bad as bad:
                stats.drop(str(path), line_no, bad.reason, bad.message, raw)
                continue
            stats.kept += 1
            stats.by_format[fmt] += 1
            yield item


parse_line = corpus.load_json_object


def to_example(rec: dict[str, Any], source: str) -> tuple[Example, str]:
    messages, fmt = to_messages(rec)
    return Example(messages=messages, source=source, format=fmt), fmt


def to_messages(rec: dict[str, Any]) -> tuple[list[dict[str, str]], str]:
    """(messages, format) of one record; Bad naming what is wrong."""
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list):
            raise Bad("not_a_string", f"field 'messages' is {type(msgs).__name__}, not a list of messages")
        try:
            return check_conversation([_message(m, i) for i, m in enumerate(msgs)]), "chat"
        except Bad as bad:
            other = next((p for p in PAIRS if all(k in rec for k in p)), None)
            if bad.reason == "no_assistant_turn" and other:
                # `messages` wins over the other fields; say so, or the user sees a QA record dropped
                raise Bad(bad.reason, f"{bad.message} in 'messages'; the record's {'/'.join(other)} fields are "
                                      "read only when it has no 'messages' field: drop 'messages' or end it with "
                                      "the answer as an assistant message") from None
            raise
    if "prompt" in rec and "completion" in rec:
        prompt, completion = rec["prompt"], rec["completion"]
        if isinstance(prompt, list) and isinstance(completion, list):     # TRL's conversational form
            msgs = [_message(m, i) for i, m in enumerate(prompt + completion)]
        else:
            msgs = _system(rec) + [{"role": "user", "content": _text(rec, "prompt")},
                                   {"role": "assistant", "content": _text(rec, "completion")}]
        return check_conversation(msgs), "prompt_completion"
    if "instruction" in rec and "output" in rec:
        instruction = _text(rec, "instruction")
        extra = rec.get("input")
        if extra is not None and not isinstance(extra, str):
            raise Bad("not_a_string", f"field 'input' is {type(extra).__name__}, not a string")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return check_conversation(_system(rec) + [{"role": "user", "content": user},
                                                  {"role": "assistant", "content": _text(rec, "output")}]), "alpaca"
    if "question" in rec and "answer" in rec:
        return check_conversation(_system(rec) + [{"role": "user", "content": _text(rec, "question")},
                                                  {"role": "assistant", "content": _text(rec, "answer")}]), "qa"
    fields = ", ".join(sorted(map(str, rec))) or "none"
    for pair in PAIRS:
        missing = [k for k in pair if k not in rec]
        if len(missing) == 1:
            raise Bad("unknown_format", f"field {missing[0]!r} is missing (fields: {fields}); a {'/'.join(pair)} "
                                        f"record needs both")
    raise Bad("unknown_format", f"no known record format (fields: {fields}); use messages, prompt/completion, "
                                "instruction/output or question/answer")


def _text(rec: dict, key: str) -> str:
    v = rec[key]
    if not isinstance(v, str):
        raise Bad("not_a_string", f"field {key!r} is {type(v).__name__}, not a string")
    return v


def _system(rec: dict) -> list[dict[str, str]]:
    if rec.get("system") is None:
        return []
    return [{"role": "system", "content": _text(rec, "system")}]


def _message(m: Any, i: int) -> dict[str, str]:
    if not isinstance(m, dict):
        raise Bad("not_an_object", f"message {i} is a JSON {type(m).__name__}, not an object with role and content")
    role, content = m.get("role"), m.get("content")
    if not isinstance(role, str) or not isinstance(content, str):
        raise Bad("not_a_string", f"message {i} needs string 'role' and 'content' fields "
                                  f"(got {type(role).__name__}, {type(content).__name__})")
    return {"role": role, "content": content}


def check_conversation(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    """Roles known, content non-empty, [system] user assistant (user assistant)* [user]."""
    if not msgs:
        raise Bad("no_assistant_turn", "no messages")
    for i, m in enumerate(msgs):
        if m["role"] not in ROLES:
            raise Bad("bad_role", f"message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
    for i, m in enumerate(msgs):
        if not m["content"].strip():
            raise Bad("empty_content", f"message {i} ({m['role']}) has empty content")
    body = msgs[1:] if msgs[0]["role"] == "system" else msgs
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            at = i + (len(msgs) - len(body))
            raise Bad("roles_out_of_order", f"message {at} is {m['role']!r} where {want!r} was expected "
                                            "(an optional system message, then user and assistant alternating)")
    if not any(m["role"] == "assistant" for m in body):
        raise Bad("no_assistant_turn", "no assistant message to learn from")
    return msgs


def hash_fraction(key: str, seed: int) -> float:
    """A record's place in [0, 1) by a seeded hash of its content: the validation split."""
    h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def write_dead_letters(path: Path, *stats: ReadStats) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for s in stats:
            for rec in s.dead_letters:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
    return n

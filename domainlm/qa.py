"""QA files (ARCHITECTURE.md, "Contracts"): `{"question", "answer", "doc_id"?}` per JSON line.

`doc_id` names the corpus document that holds the answer (the id the corpus reader, the shards
and the index give it). The pydoc corpus's `qa.jsonl` is such a file with `source` in place of
`doc_id` and a `split` field ("train" / "test"); `read_qa(..., split="test")` keeps one split.
Fine-tuning, retrieval metrics and the approach comparison all read QA files through here, and
score answers with the same exact match and token F1 (SQuAD's normalisation: lower case,
punctuation, the articles a/an/the and extra whitespace removed), so the figures read as the field
reads them.

A path may carry its split after a colon, `qa.jsonl:test`, so that one file serves as both sets
on a command line. Bad records stop the read with the file, the line and the fix: a QA set with
holes gives metrics over a different set than the user thinks.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from domainlm.corpus import encoding_error, json_array_file, without_bom
from domainlm.errors import UserError
from domainlm.manifest import expand_inputs

QA_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True, slots=True)
class QA:
    question: str
    answer: str
    doc_id: str | None
    """The corpus document holding the answer, when known."""
    id: str
    """The record's `id`, else 'file:line'."""
    split: str | None = None
    extra: tuple[tuple[str, Any], ...] = ()
    """Other fields of the record, kept for per-question outputs."""


def split_spec(path: str) -> tuple[str, str | None]:
    """'qa.jsonl:test' -> ('qa.jsonl', 'test'); a path without a split suffix -> (path, None)."""
    head, sep, tail = path.rpartition(":")
    if sep and tail and "/" not in tail and "\\" not in tail and head and not Path(path).exists():
        return head, tail
    return path, None


def read_qa(paths: list[str] | str, split: str | None = None) -> list[QA]:
    """Every QA record of `paths` (files, globs, dirs; each optionally 'path:split'), in order."""
    if isinstance(paths, str):
        paths = [paths]
    if not paths:
        raise UserError("no QA file given; pass JSON lines of {\"question\", \"answer\", \"doc_id\"}")
    out: list[QA] = []
    for spec in paths:
        path, spec_split = split_spec(spec)
        want = spec_split or split
        for f in expand_inputs([path], QA_SUFFIXES, "QA files"):
            got = list(_read_file(f, want))
            out.extend(got)
    if not out:
        raise UserError(f"no QA record in {', '.join(paths)}" + (f" with split {split!r}" if split else ""))
    return out


def test_named_files(specs: list[str], suffixes: tuple[str, ...] = QA_SUFFIXES) -> list[tuple[str, Path]]:
    """(spec, file) for each file a directory or glob of `specs` brings in whose name says it is a
    test split (a word 'test' in its path below the directory: test.jsonl, qa_test.jsonl,
    test/part-0.jsonl). A file named on its own is the user's choice and never listed."""
    out = []
    for spec in specs:
        path, _ = split_spec(spec)
        if Path(path).is_file():
            continue
        base = Path(path) if Path(path).is_dir() else None
        for f in expand_inputs([path], suffixes, "QA files"):
            rel = f.relative_to(base) if base is not None and f.is_relative_to(base) else Path(f.name)
            if "test" in re.split(r"[^a-z0-9]+", str(rel).lower()):
                out.append((spec, f))
    return out


def refuse_test_files(specs: list[str], option: str, purpose: str, suffixes: tuple[str, ...] = QA_SUFFIXES) -> None:
    """UserError when a directory or glob given for training, prompts or pairs brings in a file
    named as the test split (its records carry no "split" field to tell)."""
    named = test_named_files(specs, suffixes)
    if named:
        spec, f = named[0]
        more = f" (and {len(named) - 1:,} more)" if len(named) > 1 else ""
        raise UserError(f"{option}: {spec!r} brings in {f}{more}, whose name says test split; {purpose} come from "
                        "training data only: give the training files by name (or rename the file if it is "
                        "training data)")


def refuse_test_split(items: list[QA], option: str, purpose: str, specs: list[str] | None = None) -> None:
    """UserError when QA records meant for training, prompts or pairs hold test-split records
    (a file given without :train that holds both splits), or when `specs` has a directory or glob
    that brings in a file named as the test split."""
    if specs:
        refuse_test_files(specs, option, purpose)
    test = sum(qa.split == "test" for qa in items)
    if test:
        raise UserError(f"{option}: {test:,} of the {len(items):,} QA records are the test split; {purpose} come "
                        "from the train split only: give FILE:train (e.g. qa.jsonl:train)")


def refuse_train_split(items: list[QA], option: str) -> None:
    """UserError when held-out QA records (scored as a test) say they are the train split (a
    training file given as the test file, or one holding both splits given without :test)."""
    train = sum(qa.split == "train" for qa in items)
    if train:
        raise UserError(f"{option}: {train:,} of the {len(items):,} QA records say \"split\": \"train\"; held-out "
                        "questions must be the test split: give FILE:test (e.g. qa.jsonl:test) or your test file")


def sample(items: list[QA], n: int, seed: int = 0) -> list[QA]:
    """n items drawn with a seeded generator, kept in file order (all of them when n is 0 or more
    than there are): a subset spread over the whole file, not its first documents."""
    if not n or n >= len(items):
        return list(items)
    import random

    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def _read_file(path: Path, split: str | None):
    splits_seen: set[str] = set()
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            raw = without_bom(raw, line_no)
            try:
                rec = orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise UserError(encoding_error(path, where, raw, gz_read=False) or json_array_file(path)
                                or f"{where}: not valid JSON ({e}); each line must be one JSON object") from None
            if not isinstance(rec, dict):
                raise UserError(json_array_file(path)
                                or f"{where}: a JSON {type(rec).__name__}, not an object with question and answer")
            for key in ("question", "answer"):
                if key not in rec:
                    fields = ", ".join(sorted(map(str, rec))) or "none"
                    raise UserError(f"{where}: no {key!r} field (fields: {fields}); a QA record needs "
                                    "\"question\" and \"answer\" (and \"doc_id\" naming the document)")
                if not isinstance(rec[key], str) or not rec[key].strip():
                    raise UserError(f"{where}: field {key!r} must be a non-empty string")
            rec_split = rec.get("split")
            if rec_split is not None:
                splits_seen.add(str(rec_split))
            if split is not None and rec_split is not None and str(rec_split) != split:
                continue
            doc = rec.get("doc_id", rec.get("source"))
            known = {"question", "answer", "doc_id", "source", "id", "split"}
            yield QA(question=rec["question"], answer=rec["answer"], doc_id=None if doc is None else str(doc),
                     id=str(rec.get("id", where)), split=None if rec_split is None else str(rec_split),
                     extra=tuple((k, v) for k, v in rec.items() if k not in known))
    if split is not None and splits_seen and split not in splits_seen:
        raise UserError(f"{path}: no record with split {split!r} (splits: {', '.join(sorted(splits_seen))})")


# -- scoring answers -------------------------------------------------------------------------

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize(prediction) == normalize(answer))


def token_f1(prediction: str, answer: str) -> float:
    pred, gold = normalize(prediction).split(), normalize(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = Counter(pred) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)

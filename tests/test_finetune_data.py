"""Fine-tuning data (domainlm.finetune): record formats, dead letters, labels token by token,
packing, training points. Tokenizer only: no model, fast.

Labels are checked against an independent construction: the ChatML pieces tokenized one by one
with the stock tokenizer (`<|im_start|>`, the role, "\\n", the content, `<|im_end|>`, "\\n"),
supervised exactly where the assistant speaks, its end token included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domainlm.errors import UserError
from domainlm.finetune.batches import Batches, collate, pack_best_fit, supervised_count
from domainlm.finetune.chat import IGNORE, ChatEncoder, Encoded, end_token_ids, pad_id
from domainlm.finetune.points import read_points, run_points
from domainlm.finetune.records import ReadStats, hash_fraction, read_examples


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


@pytest.fixture(scope="module")
def encoder(tok, tokenizer_dir):
    return ChatEncoder(tok, (tokenizer_dir / "chat_template.jinja").read_text())


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


MULTI = [{"role": "system", "content": "You answer questions about Python APIs."},
         {"role": "user", "content": "What does `json.dumps` do?"},
         {"role": "assistant", "content": "Serialize ``obj`` to a JSON formatted ``str``."},
         {"role": "user", "content": "And its signature?"},
         {"role": "assistant", "content": "`json.dumps(obj, *, skipkeys=False, ensure_ascii=True)`"}]


def reference(tok, messages) -> tuple[list[int], list[int]]:
    """ChatML built piece by piece with the stock tokenizer: (ids, labels)."""
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    start, end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    ids, labels = [], []

    def add(piece, learn):
        ids.extend(piece)
        labels.extend(piece if learn else [IGNORE] * len(piece))

    for m in messages:
        add([start] + enc(m["role"]) + enc("\n"), False)
        learn = m["role"] == "assistant"
        add(enc(m["content"]) + [end], learn)
        add(enc("\n"), False)
    return ids, labels


# -- formats and dead letters ------------------------------------------------------------------


def test_four_formats_read_as_conversations(tmp_path):
    f = write_lines(tmp_path / "mixed.jsonl", [
        {"messages": MULTI},
        {"prompt": "Say hi.", "completion": "Hi.", "system": "Be brief."},
        {"prompt": [{"role": "user", "content": "Q?"}], "completion": [{"role": "assistant", "content": "A."}]},
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Name a prime.", "output": "7"},
        {"question": "What is `os.sep`?", "answer": "The path separator.", "source": "os.sep", "split": "train"},
    ])
    stats = ReadStats()
    ex = read_examples([str(f)], stats)
    assert [e.format for e in ex] == ["chat", "prompt_completion", "prompt_completion", "alpaca", "alpaca", "qa"]
    assert ex[1].messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
                              {"role": "assistant", "content": "Hi."}]
    assert ex[3].messages[0]["content"] == "Translate to French.\n\ncat"
    assert ex[4].messages[0]["content"] == "Name a prime."
    assert ex[5].messages == [{"role": "user", "content": "What is `os.sep`?"},
                              {"role": "assistant", "content": "The path separator."}]
    assert ex[0].source == f"{f}:1" and stats.kept == 6 and not stats.dropped


def test_malformed_records_are_dead_letters_counted_by_reason(tmp_path):
    ok = {"question": "q", "answer": "a"}
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b"\n".join([
        json.dumps(ok).encode(),
        b"{not json",                                                             # invalid_json
        b'{"question": "caf\xe9"}',                                               # invalid_utf8
        b"[1, 2]",                                                                # not_an_object
        json.dumps({"text": "plain"}).encode(),                                   # unknown_format
        json.dumps({"question": 3, "answer": "a"}).encode(),                      # not_a_string
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(),  # bad_role
        json.dumps({"question": "q", "answer": "  "}).encode(),                   # empty_content
        json.dumps({"messages": [{"role": "assistant", "content": "a"},
                                 {"role": "user", "content": "q"}]}).encode(),   # roles_out_of_order
        json.dumps({"messages": [{"role": "user", "content": "q"}]}).encode(),   # no_assistant_turn
        json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "system", "content": "t"},
                                 {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}).encode(),
        json.dumps({"question": "q", "doc_id": "d"}).encode(),                    # unknown_format: no answer
        json.dumps({"question": "q", "answer": "a",
                    "messages": [{"role": "user", "content": "q"}]}).encode(),    # no_assistant_turn: messages win
        b"",
    ]))
    stats = ReadStats()
    ex = read_examples([str(f)], stats)
    assert len(ex) == 1
    assert dict(stats.dropped) == {"invalid_json": 1, "invalid_utf8": 1, "not_an_object": 1, "unknown_format": 2,
                                   "not_a_string": 1, "bad_role": 1, "empty_content": 1, "roles_out_of_order": 2,
                                   "no_assistant_turn": 2}
    assert stats.records == stats.kept + sum(stats.dropped.values()) == 13
    lines = {d["line"]: d for d in stats.dead_letters}
    assert lines[2]["reason"] == "invalid_json" and lines[2]["file"] == str(f) and lines[2]["excerpt"] == "{not json"
    assert "fields: text" in lines[5]["message"]
    assert lines[12]["message"].startswith("field 'answer' is missing (fields: doc_id, question); a question/answer")
    # a QA record whose user-only `messages` hides its answer says which field was read and the fix
    assert lines[10]["message"] == "no assistant message to learn from"
    assert lines[13]["message"] == ("no assistant message to learn from in 'messages'; the record's question/answer "
                                    "fields are read only when it has no 'messages' field: drop 'messages' or end it "
                                    "with the answer as an assistant message")


def test_a_directory_that_brings_in_a_test_named_file_is_refused(tmp_path):
    """A QA directory with train.jsonl and test.jsonl given as training data read both (their
    records carry no split field): such a directory or glob is refused naming the file; the files
    named one by one, or a parent directory whose own name holds 'test', are read."""
    from domainlm.qa import test_named_files

    d = tmp_path / "latest_test_run" / "qa"
    (d / "test").mkdir(parents=True)
    row = json.dumps({"question": "q", "answer": "a"}) + "\n"
    for name in ("train.jsonl", "test.jsonl", "qa_test.json", "contest.jsonl", "test/part-0.jsonl"):
        (d / name).write_text(row)
    assert [f.relative_to(d).as_posix() for _, f in test_named_files([str(d)])] == [
        "qa_test.json", "test/part-0.jsonl", "test.jsonl"]
    assert [f.name for _, f in test_named_files([f"{d}/*.jsonl:train"])] == ["test.jsonl"]
    with pytest.raises(UserError, match=rf"^data: '{d}' brings in {d / 'qa_test.json'} \(and 2 more\), whose name "
                                        "says test split; fine-tuning records come from training data only"):
        read_examples([str(d)], ReadStats())
    ok = read_examples([str(d / "train.jsonl"), str(d / "contest.jsonl"), str(d / "test.jsonl")], ReadStats())
    assert len(ok) == 3


def test_split_suffix_and_hash_split(tmp_path, pydoc_corpus):
    stats = ReadStats()
    train = read_examples([f"{pydoc_corpus / 'qa.jsonl'}:train"], stats)
    test = read_examples([f"{pydoc_corpus / 'qa.jsonl'}:test"], ReadStats())
    assert train and test and stats.other_split == len(test)
    assert {e.format for e in train} == {"qa"}
    with pytest.raises(UserError, match="no record with split 'dev'"):
        read_examples([f"{pydoc_corpus / 'qa.jsonl'}:dev"], ReadStats())
    # The validation split is a function of the content, so it is the same whatever the order.
    held = {e.key() for e in train if hash_fraction(e.key(), 0) < 0.1}
    again = {e.key() for e in reversed(train) if hash_fraction(e.key(), 0) < 0.1}
    assert held == again and 0.05 < len(held) / len(train) < 0.15


# -- labels --------------------------------------------------------------------------------------


def test_labels_token_by_token_single_and_multi_turn(encoder, tok, pydoc_corpus):
    qa = [json.loads(x) for x in (pydoc_corpus / "qa.jsonl").read_text().splitlines()[:20]]
    convs = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}] for r in qa]
    convs.append(MULTI)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for conv, got in zip(convs, encoder.encode_many(convs)):
        ids, labels = reference(tok, conv)
        assert got.ids == ids
        assert got.labels == labels
    multi = encoder.encode(MULTI)
    learned = [t for t in multi.labels if t != IGNORE]
    # Both assistant turns, each with its end token; nothing of the system or user turns.
    assert learned.count(end) == 2
    assert tok.decode(learned) == ("Serialize ``obj`` to a JSON formatted ``str``.<|im_end|>"
                                   "`json.dumps(obj, *, skipkeys=False, ensure_ascii=True)`<|im_end|>")


def test_templates_without_generation_markers_give_the_same_labels(encoder, tok):
    plain = encoder.template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    other = ChatEncoder(tok, plain)
    assert not other.marked and encoder.marked
    convs = [MULTI, MULTI[1:3], [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y z"}]]
    for a, b in zip(encoder.encode_many(convs), other.encode_many(convs)):
        assert a.ids == b.ids and a.labels == b.labels


def test_pad_is_never_eos_and_the_end_token_is_learned(tokenizer_dir, encoder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert pad_id(tok) == tok.pad_token_id and pad_id(tok) not in end_token_ids(tok)
    tok.pad_token = tok.eos_token                 # as many Llama fine-tunes set it
    assert pad_id(tok) not in end_token_ids(tok)
    enc = ChatEncoder(tok, encoder.template)
    a, b = enc.encode_many([MULTI[1:3], MULTI])
    mb = collate([[a], [b]], pad_id(tok), packed=False)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert (mb.labels == end).sum() == 3                    # 1 + 2 assistant turns
    assert (mb.input_ids[0, len(a.ids):] == pad_id(tok)).all()
    assert (mb.labels[0, len(a.ids):] == IGNORE).all() and mb.attention_mask[0, len(a.ids):].sum() == 0


# -- packing and the stream ----------------------------------------------------------------------


def fake(n: int, learn: int) -> Encoded:
    ids = list(range(10, 10 + n))
    return Encoded(ids, [IGNORE] * (n - learn) + ids[n - learn:])


def test_best_fit_packing_keeps_samples_whole_and_within_rows():
    lengths = [9, 3, 7, 2, 5, 5, 1, 8, 4]
    rows = pack_best_fit(lengths, list(range(len(lengths))), capacity=10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 5                                     # 44 tokens: the best possible is 5 rows


def test_packed_rows_restart_positions_and_mask_sample_starts():
    a, b = fake(4, 2), fake(3, 3)
    mb = collate([[a, b]], pad_id=0, packed=True)
    assert mb.attention_mask is None
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    # b's first token is never learned from a's last: its label is masked in the packed row.
    assert mb.labels.tolist() == [[IGNORE, IGNORE, 12, 13, IGNORE, 11, 12]]
    two = collate([[a, b], [fake(2, 1)]], pad_id=0, packed=True)
    assert two.position_ids[1].tolist() == [0, 1, 0, 1, 2, 3, 4]      # the pad tail is its own segment
    assert two.labels[1, 2:].eq(IGNORE).all()


def test_stream_is_a_function_of_the_step_and_splits_over_processes():
    samples = [fake(3 + i % 5, 2) for i in range(23)]
    s = Batches(samples, global_batch=8, micro_batch=2, seed=5, packing=False, seq_len=16, pad_id=0)
    steps = [s.step_items(k) for k in range(6)]               # crosses 2 epoch boundaries
    seen = [i for step in steps[:3] for item in step for i in item][:23]
    assert sorted(seen) == list(range(23))                    # epoch 0 visits every sample once
    fresh = Batches(samples, global_batch=8, micro_batch=2, seed=5, packing=False, seq_len=16, pad_id=0)
    assert fresh.step_items(4) == steps[4]                     # no state: resume needs only the step
    one, total = s.step(4, rank=0, world=1)
    halves = [s.step(4, rank=r, world=2) for r in range(2)]
    assert [mb.input_ids.tolist() for mb in one] == [mb.input_ids.tolist() for h, _ in halves for mb in h]
    assert total == halves[0][1] == sum(supervised_count(samples[i].labels) for it in steps[4] for i in it)
    packed = Batches(samples, global_batch=4, micro_batch=2, seed=5, packing=True, seq_len=16, pad_id=0)
    rows = packed.step_items(0)
    assert all(sum(len(samples[i].ids) for i in row) <= 16 for row in rows)


# -- training points -------------------------------------------------------------------------------


POINTS = """
points:
  - name: says_dont_know
    description: admit an unknown symbol
    repeat: 2
    examples:
      - {question: "What does `foo.bar` do?", answer: "I don't know `foo.bar`."}
      - {messages: [{role: user, content: "What is `x.y`?"}, {role: assistant, content: "I don't know `x.y`."}]}
      - {question: "broken"}
    tests:
      - {prompt: "What does `a.b` do?", expect: contains, value: "I don't know"}
      - {prompt: "What does `c.d` do?", expect: regex, value: "^i don't", ignore_case: true}
  - name: stops
    examples: [{prompt: "hi", completion: "hello"}]
    tests:
      - {prompt: [{role: system, content: "s"}, {role: user, content: "hi"}], expect: not_contains, value: "<|im_start|>"}
      - {prompt: "hi", expect: exact, value: "hello"}
"""


def test_points_file_reads_examples_and_scores_tests(tmp_path):
    from domainlm.finetune.points import compare, training_examples

    f = tmp_path / "points.yaml"
    f.write_text(POINTS)
    stats = ReadStats()
    pts = read_points(str(f), stats)
    assert [p.name for p in pts] == ["says_dont_know", "stops"]
    assert len(pts[0].examples) == 2 and stats.dropped == {"unknown_format": 1}
    assert len(training_examples(pts)) == 2 * 2 + 1
    answers = {"What does `a.b` do?": "I don't know `a.b`.", "What does `c.d` do?": "I DON'T KNOW.", "hi": "hello"}
    res = run_points(pts, lambda convs: [answers[c[-1]["content"]] for c in convs])
    assert res["says_dont_know"]["rate"] == 1.0 and res["stops"]["rate"] == 1.0
    worse = run_points(pts, lambda convs: ["no idea" for _ in convs])
    assert worse["says_dont_know"]["rate"] == 0.0 and worse["stops"]["passed"] == 1     # not_contains still passes
    cmp = compare(res, worse)
    assert cmp["says_dont_know"]["fell"] and cmp["stops"]["fell"]


@pytest.mark.parametrize("text, message", [
    ("points: []", "the top level must be `points:`"),
    ("points:\n  - {name: a, tests: [{prompt: p, expect: fuzzy, value: v}]}", "use one of exact, contains"),
    ("points:\n  - {name: a, tests: [{prompt: p, expect: regex, value: '('}]}", "not a valid regular expression"),
    ("points:\n  - {name: a, examples: []}", "give `tests`"),
    ("points:\n  - {name: a, tests: [{prompt: p, expect: exact, value: v}]}\n  - {name: a, tests: []}", "used twice"),
    ("points:\n  - {name: a, oops: 1, tests: []}", "unknown key 'oops'"),
    ("points: [", "invalid YAML"),
])
def test_bad_points_files_are_one_line_errors(tmp_path, text, message):
    f = tmp_path / "p.yaml"
    f.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        read_points(str(f), ReadStats())


def test_example_points_file_for_pydoc_parses():
    from tests.conftest import REPO

    pts = read_points(str(REPO / "configs/points/pydoc.yaml"), stats := ReadStats())
    assert len(pts) >= 3 and not stats.dropped
    assert all(p.tests and p.examples for p in pts)


def test_lora_options_with_method_full_are_named_as_unused(caplog):
    import logging

    from domainlm.finetune.config import LoraArgs, SFTConfig

    with caplog.at_level(logging.WARNING, logger="domainlm"):
        SFTConfig(model="m", data=["d"], output="o", method="full", lora=LoraArgs(r=8, alpha=16)).validate()
        SFTConfig(model="m", data=["d"], output="o", method="full").validate()
        SFTConfig(model="m", data=["d"], output="o", lora=LoraArgs(r=8)).validate()
    warned = [r.getMessage() for r in caplog.records if "not used" in r.getMessage()]
    assert warned == ["method full trains every weight: lora.r, lora.alpha set but not used"]


def test_held_out_qa_that_is_training_data_is_said(tmp_path, caplog):
    """eval.qa naming what --data trains on is a memorisation check, not held-out scores: warned."""
    from domainlm.finetune.config import _warn_training_data_as_held_out

    qa = tmp_path / "qa.jsonl"
    qa.write_text("")
    for data, held_out, said in (([f"{qa}:train"], [str(qa)], True), ([str(qa)], [f"{qa}:test"], True),
                                 ([f"{qa}:train"], [f"{qa}:test"], False), ([f"{qa}:train"], [f"{qa}:train"], True),
                                 ([str(tmp_path / "other.jsonl")], [str(qa)], False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="domainlm"):
            _warn_training_data_as_held_out(data, held_out)
        assert ("its QA scores measure memorisation" in caplog.text) == said, (data, held_out)


def test_a_small_data_set_still_holds_one_record_out(pydoc_corpus):
    """40 QA pairs at --valid-fraction 0.02: the hash may hold none out; then the record it ranks
    first is held out (with its copies), so the before/after validation loss exists. A single
    distinct record, or a fraction of 0, holds nothing out."""
    from types import SimpleNamespace

    from domainlm.finetune.dataset import split_valid

    records = read_examples([f"{pydoc_corpus / 'qa.jsonl'}:train"], ReadStats())
    cfg = SimpleNamespace(valid_data=[], valid_fraction=0.02, split_seed=0)
    small = [e for e in records[:400] if hash_fraction(e.key(), 0) >= 0.02][:40]
    train, valid = split_valid(cfg, small + small[:1], ReadStats())
    first = min(small, key=lambda e: hash_fraction(e.key(), 0))
    assert [e.key() for e in valid] == [first.key()] * (2 if first is small[0] else 1)
    assert len(train) + len(valid) == 41 and first.key() not in {e.key() for e in train}
    # the hash's own choice is kept where it holds something out
    mixed = small + [e for e in records[:400] if hash_fraction(e.key(), 0) < 0.02][:2]
    train, valid = split_valid(cfg, mixed, ReadStats())
    assert len(valid) == 2 and all(hash_fraction(e.key(), 0) < 0.02 for e in valid)
    assert split_valid(cfg, small[:1] * 3, ReadStats()) == (small[:1] * 3, [])
    assert split_valid(SimpleNamespace(valid_data=[], valid_fraction=0.0, split_seed=0), small, ReadStats())[1] == []

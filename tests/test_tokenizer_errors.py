"""Bad input to corpus and tokenizer commands: one line naming what is wrong, exit 2, no traceback."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from domainlm.errors import UserError

from tests.conftest import REPO, run_cli


def _fails(capsys, args, *needles):
    code, out, err = run_cli(args, capsys)
    assert code == 2, (code, out, err)
    lines = [line for line in err.strip().splitlines() if "error:" in line]  # log lines may precede it
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def _train(inp, out, *extra):
    return ["tokenizer", "train", "--input", *([inp] if not isinstance(inp, list) else inp),
            "--output", out, "--vocab-size", "1024", *extra]


def test_missing_input(capsys, tmp_path):
    _fails(capsys, _train(tmp_path / "nope.jsonl", tmp_path / "o"), "nope.jsonl", "does not exist")
    _fails(capsys, _train(str(tmp_path / "*.jsonl"), tmp_path / "o"), "matches no file")
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    _fails(capsys, _train(empty_dir, tmp_path / "o"), "emptydir", "no .jsonl")


def test_unreadable_input(capsys, tmp_path):
    bad = tmp_path / "broken.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"text": "hello"}\n' * 100)[:40])  # truncated gzip
    _fails(capsys, _train(bad, tmp_path / "o"), "broken.jsonl.gz", "cannot be read")
    pq_bad = tmp_path / "bad.parquet"
    pq_bad.write_bytes(b"not parquet at all")
    _fails(capsys, _train(pq_bad, tmp_path / "o"), "bad.parquet", "not a readable Parquet file")


def test_empty_corpus(capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails(capsys, _train(empty, tmp_path / "o"), "the corpus is empty", "empty.jsonl")
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": "   "}\n')
    _fails(capsys, _train(blank, tmp_path / "o"), "no text to train on", "2 documents", "all are empty")


def test_json_line_that_does_not_parse(capsys, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": "broken\n')
    _fails(capsys, _train(f, tmp_path / "o"), f"{f}:4:", "not valid JSON")
    f.write_text('["a list"]\n')
    _fails(capsys, _train(f, tmp_path / "o"), f"{f}:1:", "a JSON list, not an object", "with a 'text' field")


def test_invalid_utf8(capsys, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff\xfe bytes"}\n')
    _fails(capsys, _train(f, tmp_path / "o"), f"{f}:2:", "not valid UTF-8")


def test_missing_text_field(capsys, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"id": 1, "body": "text is here"}) + "\n")
    _fails(capsys, _train(f, tmp_path / "o"), f"{f}:1:", "no 'text' field", "fields: body, id", "--text-field")
    f.write_text(json.dumps({"text": 42}) + "\n")
    _fails(capsys, _train(f, tmp_path / "o"), "field 'text' is int")
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["x"]}), p)
    _fails(capsys, _train(p, tmp_path / "o"), "c.parquet", "no 'text' column (columns: body)")


def test_vocab_too_small_for_special_tokens(capsys, tmp_path, pydoc_corpus):
    _fails(capsys, ["tokenizer", "train", "--input", pydoc_corpus / "corpus.jsonl", "--output", tmp_path / "o",
                    "--vocab-size", "300"], "vocab_size 300 is too small", "use --vocab-size 512")


def test_vocab_too_large_for_the_corpus(capsys, tmp_path):
    f = tmp_path / "small.jsonl"
    f.write_text("".join(json.dumps({"text": f"tiny corpus line {i}"}) + "\n" for i in range(50)))
    _fails(capsys, _train(f, tmp_path / "o", "--vocab-size", "8000", "--heldout-fraction", "0"),
           "SentencePiece training failed", "lower --vocab-size")


def test_output_dir_holding_something_else(capsys, tmp_path, pydoc_corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = ["tokenizer", "train", "--input", pydoc_corpus / "corpus.jsonl", "--output", out,
            "--vocab-size", "512", "--sample-bytes", "200000", "--heldout-max-bytes", "20000"]
    _fails(capsys, args, str(out), "precious.txt", "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"  # nothing touched
    code, _, _ = run_cli(args + ["--overwrite"], capsys)
    assert code == 0 and (out / "tokenizer.model").is_file() and not (out / "precious.txt").exists()
    code, _, _ = run_cli(args, capsys)  # an earlier output of the same command is replaced
    assert code == 0
    assert not list(tmp_path.glob(".out.*")), "no temporary directory left behind"
    # The corpus command refuses the tokenizer's directory: it holds something else.
    _fails(capsys, ["corpus", "pydoc", "--output", out, "--packages", "stdlib"], "already holds something else")


def test_failed_run_leaves_nothing_half_written(capsys, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "one"}\n{"oops": 1}\n')
    _fails(capsys, _train(f, tmp_path / "o"), "no 'text' field")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


def test_other_formats_read(capsys, tmp_path, pydoc_corpus):
    """Parquet, .txt files, a saved `datasets` dir and a directory of JSONL all train."""
    import datasets

    rows = [json.loads(line) for line in (pydoc_corpus / "corpus.jsonl").read_text().splitlines()[:1500]]
    pq.write_table(pa.table({"id": [r["id"] for r in rows[:500]], "text": [r["text"] for r in rows[:500]]}),
                   tmp_path / "a.parquet")
    txt = tmp_path / "txt"
    txt.mkdir()
    for i, r in enumerate(rows[500:600]):
        (txt / f"doc{i}.txt").write_text(r["text"])
    datasets.Dataset.from_dict({"text": [r["text"] for r in rows[600:1500]]}).save_to_disk(str(tmp_path / "ds"))
    code, out, err = run_cli(["tokenizer", "train", "--input", tmp_path / "a.parquet", txt, tmp_path / "ds",
                              "--output", tmp_path / "o", "--vocab-size", "512", "--heldout-fraction", "0.1"], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["counts"]["documents"] == 1500
    assert len(m["inputs"]) == 1 + 100 + 1


def test_unknown_key_in_yaml_via_cli(capsys, tmp_path):
    y = tmp_path / "t.yaml"
    y.write_text("input: [x.jsonl]\noutput: o\nvocab: 8000\n")
    _fails(capsys, ["tokenizer", "train", "--config", y], "unknown config key 'vocab'", "did you mean 'vocab_size'",
           "valid keys: input, output, vocab_size")


def test_console_script_prints_one_line(tmp_path):
    """Through the installed entry point, as a user runs it."""
    exe = REPO / ".venv" / "bin" / "domainlm"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "domainlm.cli"]
    r = subprocess.run(cmd + ["tokenizer", "train", "--input", str(tmp_path / "x.jsonl"), "--output",
                              str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"domainlm tokenizer train: error: input {str(tmp_path / 'x.jsonl')!r} does not exist; "
                                "give a file, a glob or a directory of corpus files")


def test_an_output_that_is_or_holds_the_input_is_refused_even_with_overwrite(capsys, tmp_path, pydoc_corpus):
    """--output equal to the input dir (or above an input file) would replace the corpus when the
    output is moved into place: refused before any work, --overwrite or not, the corpus kept."""
    import shutil

    indir = tmp_path / "indir"
    indir.mkdir()
    shutil.copy(pydoc_corpus / "corpus.jsonl", indir / "corpus.jsonl")
    before = (indir / "corpus.jsonl").read_bytes()
    for out in (indir, tmp_path):
        for extra in ([], ["--overwrite"]):
            line = _fails(capsys, _train(indir, out, *extra), str(out), "holds the input", "choose another --output")
            assert "corpus.jsonl" in line
    assert (indir / "corpus.jsonl").read_bytes() == before and sorted(p.name for p in indir.iterdir()) == ["corpus.jsonl"]


def test_the_commit_refuses_to_replace_a_directory_holding_an_input(tmp_path):
    """The last line of defence for a command that did not name its inputs to StageOutput: the
    manifest's inputs are checked before the output is moved into place."""
    import pytest

    from domainlm.errors import UserError
    from domainlm.manifest import StageOutput

    out = tmp_path / "out"
    out.mkdir()
    (out / "data.jsonl").write_text("keep me")
    with pytest.raises(UserError, match="holds the input"):
        with StageOutput(out, "some stage", overwrite=True) as stage:
            (stage.tmp / "result.txt").write_text("new")
            stage.commit({"stage": "some stage", "inputs": [{"path": str(out / "data.jsonl")}]})
    assert (out / "data.jsonl").read_text() == "keep me" and not list(tmp_path.glob(".out.*"))


def test_tokenizer_report_output_file_checked_before_the_work(capsys, tmp_path, pydoc_corpus):
    """A report --output that is a directory, the input corpus, or a file something else wrote is
    refused in one line before any work, and the file is kept; an earlier report is replaced."""
    import shutil

    tok = tmp_path / "tok"
    code, _, err = run_cli(["tokenizer", "train", "--input", pydoc_corpus / "corpus.jsonl", "--output", tok,
                            "--vocab-size", "512", "--sample-bytes", "200000", "--heldout-max-bytes", "20000"], capsys)
    assert code == 0, err
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(pydoc_corpus / "corpus.jsonl", corpus)
    before = corpus.read_bytes()
    rep = ["tokenizer", "report", "--tokenizer", tok, "--input", corpus, "--split", "all", "--max-bytes", "20000"]
    _fails(capsys, rep + ["--output", corpus], str(corpus), "is the input")
    assert corpus.read_bytes() == before
    _fails(capsys, rep + ["--output", tmp_path], "is a directory", "give a file path")
    other = tmp_path / "notes.txt"
    other.write_text("my notes")
    _fails(capsys, rep + ["--output", other], "not an earlier output of this command")
    assert other.read_text() == "my notes"
    out = tmp_path / "report.json"
    for _ in range(2):                                   # the second run replaces the first's report
        code, _, err = run_cli(rep + ["--output", out], capsys)
        assert code == 0, err
        assert json.loads(out.read_text())["results"][0]["bytes"] > 0


def test_special_tokens_that_share_a_text_are_refused_by_name(capsys, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "one"}\n')
    _fails(capsys, _train(f, tmp_path / "o", "--special.pad", "<|unk|>"), "special.unk and special.pad", "<|unk|>")
    _fails(capsys, _train(f, tmp_path / "o", "--special.eos", " "), "special.eos is empty")


def test_ids_that_are_not_strings_or_integers_are_refused(capsys, tmp_path):
    from domainlm.corpus import read_documents

    f = tmp_path / "c.jsonl"
    for value, shown in ((True, "a boolean (true)"), (1.5, "a float (1.5)"), ({"a": 1}, 'an object ({"a": 1})'),
                         (["x"], 'a list (["x"])')):
        f.write_text(json.dumps({"id": "fine", "text": "one"}) + "\n" + json.dumps({"id": value, "text": "two"}) + "\n")
        _fails(capsys, _train(f, tmp_path / "o"), f"{f}:2: field 'id' is {shown}, not a string or an integer",
               "give each document a string (or integer) id")
    f.write_text("".join(json.dumps(r) + "\n" for r in ({"id": 7, "text": "int"}, {"id": None, "text": "null"},
                                                        {"text": "none"}, {"id": "s", "text": "str"})))
    assert [d.key for d in read_documents([str(f)])] == ["7", f"{f}:2", f"{f}:3", "s"]
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1.0, 2.0], "text": ["one", "two"]}), p)
    _fails(capsys, _train(p, tmp_path / "o"), f"{p}:row 0: field 'id' is a float (1.0)")


def test_a_bom_is_read_and_gzip_data_or_bad_utf8_are_named(capsys, tmp_path):
    """A UTF-8 BOM at the start of a corpus or QA file is dropped; gzip data in a file named
    .jsonl is named as such (with the fix), for the corpus and the QA readers."""
    import pytest

    from domainlm.corpus import read_documents
    from domainlm.errors import UserError
    from domainlm.qa import read_qa

    lines = b'{"id": "a", "text": "first"}\n{"id": "b", "text": "second"}\n'
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + lines)
    assert [(d.key, d.text) for d in read_documents([str(bom)])] == [("a", "first"), ("b", "second")]
    mid = tmp_path / "mid.jsonl"                              # a BOM is only dropped at the start of the file
    mid.write_bytes(lines + b"\xef\xbb\xbf" + lines)
    _fails(capsys, _train(mid, tmp_path / "o"), f"{mid}:3: not valid JSON")
    gz = tmp_path / "c.jsonl"
    gz.write_bytes(gzip.compress(lines * 50))
    _fails(capsys, _train(gz, tmp_path / "o"), f"{gz}: gzip-compressed data", "not named .gz",
           "rename it to c.jsonl.gz (read as gzip) or gunzip it")
    txt = tmp_path / "t" / "doc.txt"
    txt.parent.mkdir()
    txt.write_bytes(gzip.compress(b"a text document\n" * 50))
    _fails(capsys, _train(txt, tmp_path / "o"), "gzip-compressed data", "rename it to doc.txt.gz")

    qa = b'{"question": "q1?", "answer": "a1", "doc_id": "a"}\n{"question": "q2?", "answer": "a2"}\n'
    q = tmp_path / "qa.jsonl"
    q.write_bytes(b"\xef\xbb\xbf" + qa)
    assert [x.question for x in read_qa([str(q)])] == ["q1?", "q2?"]
    q.write_bytes(gzip.compress(qa))
    with pytest.raises(UserError, match=r"qa.jsonl: gzip-compressed data .* not named .gz; gunzip it$"):
        read_qa([str(q)])
    q.write_bytes(qa + b'{"question": "bad \xff", "answer": "x"}\n')
    with pytest.raises(UserError, match=r"qa.jsonl:3: not valid UTF-8 at byte 18 \(invalid start byte\); "
                                        r"re-encode the file as UTF-8"):
        read_qa([str(q)])


def test_a_json_array_is_refused_where_json_lines_are_read(capsys, tmp_path):
    """The corpus reader, QA files and fine-tuning records: a file holding one JSON array names
    itself and the conversion (pretty-printed or on one line; a .jsonl name gets another output)."""
    from domainlm.finetune.records import ReadStats, read_examples
    from domainlm.qa import read_qa

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps([{"id": "a", "text": "one"}, {"id": "b", "text": "two"}], indent=1))
    _fails(capsys, _train(corpus, tmp_path / "o"), f"{corpus}: one JSON array, not JSON lines",
           "jq -c '.[]' corpus.jsonl > corpus.lines.jsonl")
    qa = tmp_path / "qa.json"
    qa.write_text(json.dumps([{"question": "q?", "answer": "a"}]))
    with pytest.raises(UserError, match=r"qa\.json: one JSON array, not JSON lines.*qa\.json > qa\.jsonl"):
        read_qa([str(qa)])
    chats = tmp_path / "chats.json"
    chats.write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"}]}], indent=2))
    with pytest.raises(UserError, match=r"^data: .*chats\.json: one JSON array, not JSON lines"):
        read_examples([str(chats)], ReadStats())
    # JSON lines whose first record starts with a space are still JSON lines
    ok = tmp_path / "ok.jsonl"
    ok.write_text('  {"question": "q?", "answer": "a"}\n')
    assert read_qa([str(ok)])[0].answer == "a"

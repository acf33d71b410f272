"""`domainlm run`: stages in order, skipped when up to date, rerun when config or inputs change."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import run_cli

PIPELINE = """\
# domainlm run pipeline.yaml
workdir: {workdir}
stages:
  corpus:
    command: corpus pydoc
    set: {{output: "${{workdir}}/corpus", packages: [peft]}}
  tokenizer:
    command: tokenizer train
    set:
      input: ["${{workdir}}/corpus/corpus.jsonl"]
      output: ${{workdir}}/tok
      vocab_size: 640
      heldout_fraction: 0.1
"""


def _statuses(out: str) -> dict[str, str]:
    rows = {}
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] in ("corpus", "tokenizer"):
            rows[parts[0]] = parts[1]
    return rows


def test_run_skips_up_to_date_stages(tmp_path, capsys):
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(PIPELINE.format(workdir=tmp_path / "w"))
    code, out, err = run_cli(["run", cfg], capsys)
    assert code == 0, err
    s = _statuses(out)
    assert s["corpus"].startswith("ran") and s["tokenizer"].startswith("ran")
    fp = json.loads((tmp_path / "w/tok/manifest.json").read_text())["fingerprint"]

    code, out, _ = run_cli(["run", cfg], capsys)
    s = _statuses(out)
    assert s["corpus"].startswith("skipped, up to date") and s["tokenizer"].startswith("skipped, up to date")

    # A changed value reruns that stage only.
    code, out, _ = run_cli(["run", cfg, "--set", "tokenizer.vocab_size=768"], capsys)
    s = _statuses(out)
    assert s["corpus"].startswith("skipped") and "config or inputs changed" in s["tokenizer"]
    assert json.loads((tmp_path / "w/tok/manifest.json").read_text())["fingerprint"] != fp

    # A changed input file reruns the stage that reads it.
    corpus = tmp_path / "w/corpus/corpus.jsonl"
    corpus.write_text(corpus.read_text() + json.dumps({"id": "extra", "text": "one more document"}) + "\n")
    code, out, _ = run_cli(["run", cfg, "--set", "tokenizer.vocab_size=768", "--dry-run"], capsys)
    s = _statuses(out)
    assert s["corpus"].startswith("skipped") and s["tokenizer"].startswith("would run: config or inputs changed")

    code, out, _ = run_cli(["run", cfg, "--set", "tokenizer.vocab_size=768", "--force", "corpus", "--only", "corpus"], capsys)
    s = _statuses(out)
    assert s["corpus"].startswith("ran") and "forced" in s["corpus"] and "tokenizer" not in s


def test_pipeline_errors(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("stages:\n  a:\n    command: tokenizer trian\n")
    code, _, err = run_cli(["run", cfg], capsys)
    assert code == 2 and "unknown command 'tokenizer trian'" in err and "did you mean 'tokenizer train'" in err
    cfg.write_text("stages:\n  a:\n    command: tokenizer train\n    set: {input: [x], output: o, vocab: 3}\n")
    code, _, err = run_cli(["run", cfg], capsys)
    assert code == 2 and "stage 'a'" in err and "unknown config key 'vocab'" in err
    cfg.write_text("stages:\n  a:\n    command: corpus pydoc\n    set: {output: '${nowhere}/x'}\n")
    code, _, err = run_cli(["run", cfg], capsys)
    assert code == 2 and "unknown variable ${nowhere}" in err
    cfg.write_text(PIPELINE.format(workdir=tmp_path / "w"))
    code, _, err = run_cli(["run", cfg, "--only", "tokenzer"], capsys)
    assert code == 2 and "no stage 'tokenzer'" in err
    code, _, err = run_cli(["run", cfg, "--only", "corpus", "--force", "tokenizer"], capsys)
    assert code == 2 and "--force tokenizer: not among --only corpus" in err
    code, _, err = run_cli(["run", cfg, "--dry-run", "--set", "tokenizer.input=[broken"], capsys)
    assert code == 2 and "'input'" in err and "not a YAML list" in err and "Traceback" not in err
    cfg.write_text("stages:\n  a:\n    set: {output: o}\n")
    code, _, err = run_cli(["run", cfg], capsys)
    assert code == 2 and "stage 'a' has no command" in err and "--stages" not in err
    two = "    command: tokenizer train\n    set: {input: [x.jsonl], output: '${workdir}/tok'}\n"
    cfg.write_text(f"workdir: {tmp_path / 'w'}\nstages:\n  a:\n{two}  b:\n{two}")
    code, _, err = run_cli(["run", cfg, "--dry-run"], capsys)
    assert code == 2 and "stages 'a' and 'b' both write" in err
    code, _, err = run_cli(["run", tmp_path], capsys)
    assert code == 2 and "is a directory; give a YAML file" in err


def test_a_stage_that_stops_before_it_finishes_stops_the_pipeline(tmp_path, capsys, monkeypatch):
    """Pretraining stopped by SIGTERM returns normally with a checkpoint but no finished output:
    the stages after it must not run on a half-trained model."""
    from domainlm.data import pydoc

    real = pydoc.build

    def interrupted(cfg):            # the stage returns, but its output never gets its manifest
        real(cfg)
        (Path(cfg.output) / "manifest.json").unlink()

    monkeypatch.setattr(pydoc, "build", interrupted)
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(PIPELINE.format(workdir=tmp_path / "w"))
    code, out, err = run_cli(["run", cfg], capsys)
    assert code == 2 and "stage 'corpus' (corpus pydoc) stopped before it finished (no output yet)" in err, err
    assert not (tmp_path / "w/tok").exists()


def test_a_var_that_names_no_file_stops_before_any_stage(tmp_path, capsys):
    """The template's user files (`files:`) must exist: a mistyped --var is one line, exit 2, and
    no stage has run (nothing written)."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "one document about one thing"}) + "\n")
    cfg = tmp_path / "p.yaml"
    cfg.write_text(f"# domainlm run p.yaml\nworkdir: {tmp_path / 'w'}\nvars: {{corpus: data/x.jsonl, qa: data/qa.jsonl}}\n"
                   "files: [corpus, qa]\nstages:\n  tokenizer:\n    command: tokenizer train\n"
                   "    set: {input: ['${corpus}'], output: '${workdir}/tok', vocab_size: 640}\n")
    code, _, err = run_cli(["run", cfg, "--var", f"corpus={corpus}", "--var", f"qa={tmp_path / 'qa_tset.jsonl'}"], capsys)
    assert code == 2 and err.strip().count("\n") == 0, err
    assert f"--var qa={tmp_path / 'qa_tset.jsonl'}: no such file or directory" in err
    assert not (tmp_path / "w").exists()
    # an empty value would be the current directory: the whole tree as a corpus, or a workdir of "."
    for var in ("corpus=", "workdir=", "qa= "):
        code, _, err = run_cli(["run", cfg, "--var", f"corpus={corpus}", "--var", var, "--dry-run"], capsys)
        assert code == 2 and err.strip().count("\n") == 0 and "the value is empty; give one" in err, err
    assert "leave --var corpus out to keep" in run_cli(["run", cfg, "--var", "corpus="], capsys)[2]
    # FILE:SPLIT names the file before the colon
    (tmp_path / "qa.jsonl").write_text("")
    code, out, err = run_cli(["run", cfg, "--var", f"corpus={corpus}", "--var", f"qa={tmp_path / 'qa.jsonl'}:test",
                              "--dry-run"], capsys)
    assert code == 0, err
    cfg.write_text(cfg.read_text().replace("files: [corpus, qa]", "files: [corpus, qaa]"))
    code, _, err = run_cli(["run", cfg], capsys)
    assert code == 2 and "files: 'qaa' is not one of its vars" in err

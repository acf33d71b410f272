"""Config loading: defaults < YAML < CLI flags, and errors that name the key."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from domainlm.config import field_docs, leaves, load_config, normalize_argv
from domainlm.errors import UserError
from tests.conftest import REPO, run_cli


@dataclass(kw_only=True, slots=True)
class Train:
    max_steps: int = 100
    """Optimizer steps."""
    lr: float = 3e-4
    """Peak learning rate."""
    schedule: Literal["cosine", "wsd"] = "cosine"
    """Decay shape."""


@dataclass(kw_only=True, slots=True)
class Example:
    name: str
    """Run name."""
    train: Train = field(default_factory=Train)
    """Training loop."""
    tags: list[str] = field(default_factory=list)
    """Free-form tags."""
    weights: dict[str, float] = field(default_factory=dict)
    """Blend weights."""
    resume: bool = True
    """Resume from the latest checkpoint."""
    limit: int | None = None
    """Optional cap."""


def test_defaults_yaml_then_overrides(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("name: base\ntrain:\n  max_steps: 50\n  lr: 1e-3\ntags: [a, b]\n")
    cfg = load_config(Example, y, {"train.max_steps": "10", "resume": "false", "limit": "7",
                                   "weights": "{x: 0.7, y: 0.3}"})
    assert cfg.name == "base"
    assert cfg.train.max_steps == 10            # flag beats YAML
    assert cfg.train.lr == pytest.approx(1e-3)  # YAML's "1e-3" (a string to YAML) read as float
    assert cfg.train.schedule == "cosine"       # default kept
    assert cfg.tags == ["a", "b"]
    assert cfg.resume is False
    assert cfg.limit == 7
    assert cfg.weights == {"x": 0.7, "y": 0.3}
    assert load_config(Example, None, {"name": "n", "limit": "none"}).limit is None


def test_unknown_key_names_key_and_lists_valid_ones(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("name: x\ntrain:\n  max_step: 5\n")
    with pytest.raises(UserError) as e:
        load_config(Example, y)
    msg = str(e.value)
    assert "'train.max_step'" in msg and "did you mean 'max_steps'" in msg
    assert "max_steps, lr, schedule" in msg and str(y) in msg
    with pytest.raises(UserError, match=r"unknown config key 'trian.max_steps'.*valid keys: name, train, tags"):
        load_config(Example, None, {"name": "x", "trian.max_steps": "3"})


@pytest.mark.parametrize("key,value,expect", [
    ("train.max_steps", "ten", r"'train.max_steps': expected int, got 'ten'"),
    ("train.schedule", "linear", r"'train.schedule': 'linear' is not one of 'cosine', 'wsd'"),
    ("resume", "maybe", r"'resume': expected bool"),
    ("tags", "[broken", r"'tags': expected list\[str\], got '\[broken' \(not a YAML list"),
    ("weights", "{x: ", r"'weights': expected dict"),
])
def test_wrong_type_names_key_and_type(key, value, expect):
    with pytest.raises(UserError, match=expect):
        load_config(Example, None, {"name": "x", key: value})


def test_yaml_type_error_and_missing_required(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("name: x\ntrain: {max_steps: [1, 2]}\n")
    with pytest.raises(UserError, match=r"'train.max_steps': expected int, got \[1, 2\]"):
        load_config(Example, y)
    with pytest.raises(UserError, match=r"missing required config key 'name'.*--name"):
        load_config(Example)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml' line 2: invalid YAML"):
        load_config(Example, bad)


def test_field_docstrings_are_read_for_help():
    docs = field_docs(Example)
    assert docs["tags"] == "Free-form tags."
    paths = [leaf.path for leaf in leaves(Example)]
    assert paths == ["name", "train.max_steps", "train.lr", "train.schedule", "tags", "weights", "resume", "limit"]


def test_argv_spellings_normalized():
    assert normalize_argv(["--train.max_steps=10", "--vocab_size", "8", "--", "--keep_me"]) == [
        "--train.max-steps=10", "--vocab-size", "8", "--", "--keep_me"]


def test_cli_overrides_and_print_config(capsys, tmp_path):
    code, out, _ = run_cli(["tokenizer", "train", "--config", REPO / "configs/tokenizer/pydoc.yaml",
                            "--vocab_size=1234", "--special.reserved", "3", "--no-overwrite", "--print-config"], capsys)
    assert code == 0
    assert re.search(r"^vocab_size: 1234$", out, re.M)
    assert re.search(r"^  reserved: 3$", out, re.M)
    assert "heldout_fraction: 0.02" in out  # from the YAML file


def test_cli_unknown_flag_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["tokenizer", "train", "--vocab-sise", "8"], capsys)
    assert e.value.code == 2
    assert "unrecognized argument --vocab-sise; did you mean --vocab-size?" in capsys.readouterr().err


def _config_class_for(path: Path):
    """The config class a YAML file under configs/ belongs to, from its header command line."""

    header = path.read_text().splitlines()[0]
    m = re.match(r"#\s*domainlm\s+(.+?)\s+(--config\s+)?(\S+\.yaml)\s*$", header)
    assert m, f"{path}: the first line must show the command that runs it, e.g. '# domainlm X --config {path}'"
    cmd, file_arg = m.group(1), m.group(3)
    assert Path(file_arg).as_posix() == path.relative_to(REPO).as_posix(), f"{path}: header names {file_arg}"
    return cmd


def test_every_yaml_under_configs_loads_into_its_dataclass(monkeypatch):
    from domainlm.cli import find_command, resolve
    from domainlm.pipeline import load_pipeline

    monkeypatch.chdir(REPO)
    files = sorted((REPO / "configs").rglob("*.yaml"))
    assert files, "no configs found"
    # Data files, not command configs: each is read by its own loader.
    from domainlm.eval.prompts import load_library
    from domainlm.finetune.points import read_points
    from domainlm.finetune.records import ReadStats

    data = {"points": lambda p: read_points(str(p), ReadStats()), "prompts": load_library}
    for path in files:
        kind = path.relative_to(REPO / "configs").parts[0]
        if kind in data:
            assert data[kind](path), f"{path} is empty"
            continue
        cmd = _config_class_for(path)
        rel = str(path.relative_to(REPO))
        if cmd == "run":
            _, stages = load_pipeline(rel)
            assert stages, f"{rel} has no stages"
        else:
            command = find_command(cmd)
            assert command.config, f"{rel}: command {cmd!r} takes no config"
            load_config(resolve(command.config), rel)


def test_help_at_every_level_shows_defaults(capsys):
    from domainlm.cli import COMMANDS

    for args in (["--help"], ["tokenizer", "--help"]) + tuple(c.name.split() + ["--help"] for c in COMMANDS):
        with pytest.raises(SystemExit) as e:
            run_cli(list(args), capsys)
        assert e.value.code == 0
    with pytest.raises(SystemExit):
        run_cli(["tokenizer", "train", "--help"], capsys)
    text = " ".join(capsys.readouterr().out.split())
    assert "--vocab-size N" in text and "[default: 32000]" in text and "multiple of 128" in text

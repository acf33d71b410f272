"""Shared fixtures: a real pydoc corpus and a tokenizer trained on it, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DOMAINLM_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

# Enough packages for >1 MB of held-out text at heldout_fraction 0.4, built in ~8 s.
TEST_PACKAGES = ["stdlib", "numpy", "datasets", "peft"]


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `domainlm ARGS` in-process; returns (exit code, stdout, stderr)."""
    from domainlm.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def pydoc_corpus(tmp_path_factory) -> Path:
    from domainlm.tokenizer.config import PydocConfig
    from domainlm.tokenizer.pydoc import build

    out = tmp_path_factory.mktemp("pydoc") / "corpus"
    build(PydocConfig(output=str(out), packages=TEST_PACKAGES))
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, pydoc_corpus) -> Path:
    from domainlm.tokenizer.config import TokenizerConfig
    from domainlm.tokenizer.train import train

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train(TokenizerConfig(input=[str(pydoc_corpus / "corpus.jsonl")], output=str(out), vocab_size=4000,
                          heldout_fraction=0.4, heldout_max_bytes=3_000_000))
    return out

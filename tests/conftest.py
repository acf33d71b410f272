"""Shared fixtures: a real pydoc corpus and a tokenizer trained on it, built once per session."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("DOMAINLM_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

# Enough packages for >1 MB of held-out text at heldout_fraction 0.4, built in ~8 s.
TEST_PACKAGES = ["stdlib", "numpy", "datasets", "peft"]


@contextlib.contextmanager
def triton_interpreter_env():
    """TRITON_INTERPRET=1 for the block (Triton's CPU interpreter runs the kernels); the old value after."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run `domainlm ARGS` in-process; returns (exit code, stdout, stderr)."""
    from domainlm.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="session")
def pydoc_corpus(tmp_path_factory) -> Path:
    from domainlm.data.config import PydocConfig
    from domainlm.data.pydoc import build

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


def token_shards(root: Path, tokenizer_dir: Path, corpus: Path, *, train: list[int], valid: int) -> Path:
    """The first documents of a pydoc corpus, tokenized into a shards dir (real format, real tars):
    one train shard per entry of `train` (documents each) and one valid shard. Faster than the
    Beam pipeline, for tests of the stages after it."""
    import json

    import numpy as np

    from domainlm.tokenizer.tokdir import load_tokenizer_dir
    from tests.test_loader import make_shards

    tok = load_tokenizer_dir(tokenizer_dir)
    sp = tok.processor()
    need = sum(train) + valid
    docs = []
    with open(corpus / "corpus.jsonl", encoding="utf-8") as f:
        for line in f:
            ids = sp.encode(json.loads(line)["text"])
            if ids:
                docs.append(np.asarray(ids, np.int64))
            if len(docs) == need:
                break
    splits, at = [], 0
    for n in train:
        splits.append(docs[at:at + n])
        at += n
    root = make_shards(root, {"train": splits, "valid": [docs[at:]]}, vocab_size=tok.vocab_size, sha=tok.sha256)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["fingerprint"] = "test-shards"
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def tiny_llama(path: Path, tokenizer_dir: Path, *, seed: int = 0, **overrides) -> Path:
    """A random tiny stock `LlamaForCausalLM` with the session tokenizer (its HF files, the ChatML
    chat template and tokenizer.model), saved as safetensors: the HF dir contract as later stages
    read it, without running pretraining."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from domainlm.tokenizer.tokdir import load_tokenizer_dir

    tok = load_tokenizer_dir(tokenizer_dir)
    torch.manual_seed(seed)
    kw = dict(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
              bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, rope_theta=10000.0,
              tie_word_embeddings=False)
    kw.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    model.save_pretrained(str(path))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "tokenizer.model"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


def lora_model(hf_dir: Path, *, dropout: float = 0.0, seed: int = 0, dtype=None, attn: str = "sdpa",
               kernels: bool = False, device: str = "cpu", r: int = 8):
    """peft LoRA on every projection of the HF model in `hf_dir` (alpha 2r), its B matrices drawn
    from N(0, 0.05): B = 0 at init would hide every LoRA gradient path but B's own. `kernels`: our
    HF-module kernels put in before peft wraps the projections (so its LoRA layers stay peft's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from domainlm.finetune.kernels import apply_kernels

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype or torch.float32,
                                                attn_implementation=attn).to(device)
    if kernels:
        apply_kernels(base)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Llama HF dir with the session tokenizer (see `tiny_llama`)."""
    return tiny_llama(tmp_path_factory.mktemp("hf") / "model", tokenizer_dir)


def pydoc_subset(corpus: Path, out: Path, *, symbols: int = 100, documents: int = 600, seed: int = 0):
    """A part of a pydoc corpus for retrieval tests, and the test-split QA pairs it answers.

    `symbols` test-split symbols (by seeded hash) with their documents, plus distractors: first
    the documents of the same class or module (the hardest to tell apart), then others by hash,
    up to `documents`. Lines keep the corpus's order. Returns (corpus.jsonl, [QA])."""
    import hashlib
    import json

    from domainlm.qa import read_qa

    def h(s: str) -> str:
        return hashlib.sha256(f"{seed}:{s}".encode()).hexdigest()

    test = read_qa([str(corpus / "qa.jsonl")], split="test")
    gold = sorted({q.doc_id for q in test}, key=h)[:symbols]
    lines = (corpus / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    keep = set(gold)
    parents = {g.rsplit(".", 1)[0] for g in gold if "." in g}
    for i in sorted(ids, key=h):
        if len(keep) >= documents // 2:
            break
        if "." in i and i.rsplit(".", 1)[0] in parents:
            keep.add(i)
    for i in sorted(ids, key=h):
        if len(keep) >= documents:
            break
        keep.add(i)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(line + "\n" for line, i in zip(lines, ids) if i in keep), encoding="utf-8")
    chosen = set(gold)
    return out, [q for q in test if q.doc_id in chosen]


@pytest.fixture(scope="session")
def pydoc_index(tmp_path_factory, pydoc_corpus):
    """An index (`domainlm index build`, default embedder) of `pydoc_subset` of the session corpus;
    returns (index dir, [QA] whose gold documents it holds)."""
    from domainlm.serve.config import IndexBuildConfig
    from domainlm.serve.index_build import build

    root = tmp_path_factory.mktemp("index")
    corpus, qas = pydoc_subset(pydoc_corpus, root / "subset" / "corpus.jsonl")
    build(IndexBuildConfig(input=[str(corpus)], output=str(root / "index")))
    return root / "index", qas

"""The inputs of the GPU check (bench/gpu_check.sh), built on a CPU machine beforehand.

    .venv/bin/python bench/gpu_inputs.py            # -> bench/work/gpu/inputs/{tokenizer,shards,finetune}
    (or `make gpu-inputs`)

The GPU machines have no webdataset-free way to build them and no `datasets`, Beam or network: the
tokenizer and shards travel with the repo (bench/work/ is git-ignored; the device tool's `carry`
takes bench/work/gpu). They are made exactly as the tests make theirs (tests/conftest.py): the
pydoc corpus of the test packages, a 4000-token SentencePiece tokenizer, and the first documents
tokenized into real shards (train: 2 shards, valid: 1), large enough for the check's runs
(seq 2048 windows for throughput, seq 512 with validation for the CLI run).

The fine-tuning benchmark (part c; bench/finetune.py --gpu) builds its ~2000-token conversations
from text: finetune/corpus.jsonl holds the first documents of that corpus, about 1 MB (some
300k tokens, more than its 64 conversations use). Inputs built before it existed gain it alone
(the tokenizer and shards stay as they are).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
OUT = HERE / "work" / "gpu" / "inputs"
TRAIN_DOCS, VALID_DOCS = [1500, 1500], 400
FINETUNE_TEXT = Path("finetune") / "corpus.jsonl"
FINETUNE_TEXT_BYTES = 1_000_000


def _corpus(dest: Path) -> Path:
    from domainlm.data.config import PydocConfig
    from domainlm.data.pydoc import build as build_corpus
    from tests.conftest import TEST_PACKAGES

    build_corpus(PydocConfig(output=str(dest), packages=TEST_PACKAGES))
    return dest


def finetune_text(corpus: Path, out: Path) -> None:
    """The corpus's first documents, about FINETUNE_TEXT_BYTES of text, as corpus JSON lines."""
    out.parent.mkdir(parents=True, exist_ok=True)
    size, lines = 0, []
    with (corpus / "corpus.jsonl").open(encoding="utf-8") as f:
        for line in f:
            lines.append(line if line.endswith("\n") else line + "\n")
            size += len(json.loads(line)["text"].encode())
            if size >= FINETUNE_TEXT_BYTES:
                break
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(out)


def build(out: Path) -> dict:
    from domainlm.tokenizer.config import TokenizerConfig
    from domainlm.tokenizer.train import train
    from tests.conftest import token_shards

    work = out.parent / "inputs.tmp"
    shutil.rmtree(work, ignore_errors=True)
    corpus = _corpus(work / "corpus")
    train(TokenizerConfig(input=[str(corpus / "corpus.jsonl")], output=str(work / "tokenizer"), vocab_size=4000,
                          heldout_fraction=0.4, heldout_max_bytes=3_000_000))
    token_shards(work / "shards", work / "tokenizer", corpus, train=TRAIN_DOCS, valid=VALID_DOCS)
    finetune_text(corpus, work / FINETUNE_TEXT)
    shutil.rmtree(corpus)              # the corpus itself is not needed there (7+ MB)
    shutil.rmtree(out, ignore_errors=True)
    work.rename(out)
    return describe(out)


def add_finetune_text(out: Path) -> dict:
    """Inputs made before the fine-tuning benchmark's text: that text alone, from the same corpus."""
    work = out.parent / "corpus.tmp"
    shutil.rmtree(work, ignore_errors=True)
    try:
        finetune_text(_corpus(work), out / FINETUNE_TEXT)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return describe(out)


def describe(out: Path) -> dict:
    m = json.loads((out / "shards" / "manifest.json").read_text())
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    text = out / FINETUNE_TEXT
    return {"path": str(out), "bytes": size,
            "train_tokens": m["splits"]["train"]["tokens"], "valid_tokens": m["splits"]["valid"]["tokens"],
            "tokenizer_sha256": m["tokenizer"]["sha256"],
            "finetune_docs": sum(1 for _ in text.open(encoding="utf-8")) if text.is_file() else 0,
            "finetune_bytes": text.stat().st_size if text.is_file() else 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--force", action="store_true", help="rebuild even when present")
    a = ap.parse_args()
    out = Path(a.out)
    if (out / "shards" / "manifest.json").is_file() and not a.force:
        info = describe(out) if (out / FINETUNE_TEXT).is_file() else add_finetune_text(out)
    else:
        info = build(out)
    print(f"gpu inputs: {info['path']}: {info['bytes'] / 2**20:.1f} MiB, train {info['train_tokens']:,} tokens, "
          f"valid {info['valid_tokens']:,} tokens, tokenizer {info['tokenizer_sha256'][:12]}; fine-tuning text "
          f"{FINETUNE_TEXT}: {info['finetune_docs']:,} documents, {info['finetune_bytes'] / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

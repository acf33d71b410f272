"""`domainlm data shard` benchmark (issue 3): tokens per second against two references.

For each corpus (the pydoc corpus, and a >= 200 MB corpus made from it):
  shard     `domainlm data shard` as a user runs it (a fresh process, DirectRunner, its own choice
            of workers: W processes, or one in-memory process under 16 MB of input; --workers W
            imposes W),
            wall clock from start to exit, tokens written / seconds. It also reads, normalizes,
            filters, deduplicates (exact + MinHash) and writes shards; the references do not.
  ceiling   raw SentencePieceProcessor.encode over the same texts in one process, one thread,
            tokens/s x W (the cores the pipeline uses).
  megatron  what Megatron-LM's tools/preprocess_data.py does: a multiprocessing.Pool of W
            workers (json.loads + encode, imap chunks of 32) feeding megatron-core's
            IndexedDatasetBuilder in the main process; wall clock, tokens/s.
Goals: shard >= 0.7 x ceiling, and shard >= megatron.

Repeats: the three are run --repeats times (default 5) interleaved, the order rotating each round
(shard, ceiling, megatron; then ceiling, megatron, shard; ...), so a disturbance of the machine
hits all three alike; min and median of each are reported and the ratios are taken median to
median (and best to best). The ceiling encodes exactly the texts the pipeline tokenizes: every
record's text after the pipeline's own cleaning (data/beam/clean.py), from the same file. The
1-minute load average is recorded before every run: on a shared machine figures taken at a
load above ~0.7 measure the neighbours too.

The big corpus is the pydoc corpus plus copies of it under new ids, each copy's words shuffled
within every line (seeded): the copies tokenize like the original but are not near duplicates
of it, so deduplication keeps them and every pipeline stage sees the full volume.

    .venv/bin/python bench/shard.py                   # pydoc and 200 MB, all cores
    .venv/bin/python bench/shard.py --only pydoc      # smoke run
    .venv/bin/python bench/shard.py --size-mb 50 --workers 2
    .venv/bin/python bench/shard.py --only big --size-mb 5 --repeats 3   # check the harness

--runners (issue 20) compares the runners instead: `data shard` on the DirectRunner (W worker
processes) against the same on dask (`--beam.runner dask --beam.dask-address local:W`, a
LocalCluster of W worker processes started and stopped by the command, so its start-up is in
the wall clock), interleaved rounds with the order alternating, medians. On the pydoc corpus
(~5 MB) the wall clock is mostly fixed cost (process, Beam, cluster start, graph); on the big
corpus tokens/s is the throughput. Each round also checks the two wrote the same shards.

    .venv/bin/python bench/shard.py --runners --workers 2                  # pydoc and 200 MB
    .venv/bin/python bench/shard.py --runners --workers 2 --only big --size-mb 3 --repeats 1   # check it

--encoders (issue 21) measures the tokenizing alone, one process, one thread, over the cleaned
texts in the pipeline's blocks: SentencePiece encoding each text whole (the ceiling's way)
against `DocumentEncoder.flat` through the segment cache (tokenizer/segment_cache.py, what each
`data shard` worker runs), a fresh cache each round (every segment met for the first time once),
interleaved rounds, medians; the hit rate, and a check that both give the same ids.

    .venv/bin/python bench/shard.py --encoders                  # pydoc and 200 MB
    .venv/bin/python bench/shard.py --cache-ab --only big       # `data shard` with / without the cache

Work files go to bench/work/shard/ (gitignored); the results are printed and written to
bench/results/shard.txt (or --out).
"""

from __future__ import annotations

import argparse
import warnings
import json
import multiprocessing
import os
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from machine import describe  # noqa: E402

WORK = HERE / "work" / "shard"
EXE = [sys.executable, "-m", "domainlm.cli"]


def sh(cmd: list[str], env: dict | None = None, **kw) -> tuple[float, float]:
    """Run a command; (wall seconds, CPU seconds of the child)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "DOMAINLM_PROGRESS": "0", **(env or {})}, **kw)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def pydoc_corpus() -> Path:
    demo = REPO / "runs" / "demo" / "corpus" / "corpus.jsonl"
    if demo.exists():
        return demo
    out = WORK / "pydoc"
    if not (out / "manifest.json").exists():
        sh(EXE + ["corpus", "pydoc", "--output", str(out), "--overwrite"], stdout=subprocess.DEVNULL)
    return out / "corpus.jsonl"


def tokenizer(corpus: Path) -> Path:
    demo = REPO / "runs" / "demo" / "tokenizer"
    if (demo / "manifest.json").exists():
        return demo
    out = WORK / "tokenizer"
    if not (out / "manifest.json").exists():
        sh(EXE + ["tokenizer", "train", "--config", str(REPO / "configs/tokenizer/pydoc.yaml"),
                  "--input", str(corpus), "--output", str(out), "--overwrite"], stdout=subprocess.DEVNULL)
    return out


def big_corpus(src: Path, size_mb: int) -> Path:
    out = WORK / f"pydoc_{size_mb}mb.jsonl"
    if out.exists():
        return out
    lines = src.read_bytes().splitlines()
    target = size_mb * 1_000_000
    tmp = out.with_suffix(".tmp")
    written, copy = 0, 0
    with open(tmp, "wb") as f:
        while written < target:
            for line in lines:
                rec = json.loads(line)
                if copy:
                    rng = random.Random(f"{copy}:{rec['id']}")
                    shuffled = []
                    for text_line in rec["text"].split("\n"):
                        words = text_line.split(" ")
                        rng.shuffle(words)
                        shuffled.append(" ".join(words))
                    rec = {"id": f"{rec['id']}#copy{copy}", "text": "\n".join(shuffled)}
                data = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
                f.write(data)
                written += len(data)
                if written >= target:
                    break
            copy += 1
    tmp.rename(out)
    return out


def texts_of(corpus: Path) -> list[str]:
    """The texts the pipeline tokenizes: each record's text after its cleaning (NFC, control
    characters dropped); records it drops as duplicates or by filter are ~1.5% here."""
    from domainlm.data.beam.clean import clean

    with open(corpus, "rb") as f:
        return [clean(json.loads(line)["text"])[0] for line in f if line.strip()]


def run_shard(corpus: Path, tok: Path, workers: int, name: str, runner: str = "direct",
              explicit: bool = True, env: dict | None = None) -> dict:
    """One `data shard` run; runner "direct" (DirectRunner, `workers` processes; with
    `explicit` False no worker flag, the command's own choice as a user gets it) or "dask" (a
    local dask cluster of `workers` processes). "engine": what the command said it ran on."""
    out = WORK / (f"out_{name}" if runner == "direct" else f"out_{name}_{runner}")
    how = ((["--beam.direct-num-workers", str(workers)] if explicit else []) if runner == "direct"
           else ["--beam.runner", "dask", "--beam.dask-address", f"local:{workers}"])
    log = WORK / f"out_{name}.log"
    with open(log, "w") as err:
        wall, cpu = sh(EXE + ["data", "shard", "--input", str(corpus), "--tokenizer", str(tok), "--output", str(out),
                              "--overwrite", *how], env=env, stdout=subprocess.DEVNULL, stderr=err)
    engine = re.findall(r"Beam: ((?:DirectRunner|dask).*)", log.read_text())
    m = json.loads((out / "manifest.json").read_text())
    tokens = sum(s["tokens"] for s in m["splits"].values())
    # the children's CPU: the dask workers are the command's grandchildren, not counted here
    return {"seconds": wall, "cpu_seconds": cpu, "tokens": tokens, "tokens_per_s": tokens / wall,
            "kept": m["counts"]["kept"], "records": m["counts"]["records"], "engine": engine[-1] if engine else "?",
            "shards": [x["sha256"] for sp in m["splits"].values() for x in sp["shards"]], "dropped": m["dropped"]}


def measure_runners(name: str, corpus: Path, tok: Path, workers: int, repeats: int) -> list[str]:
    """DirectRunner and dask (local:W) `repeats` times each, interleaved, the order alternating
    each round; medians. Every round checks both wrote the same shards and drop counts."""
    kinds = ["direct", "dask"]
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    loads, same = [], True
    for r in range(repeats):
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            loads.append(os.getloadavg()[0])
            runs[kind].append(run_shard(corpus, tok, workers, name, kind))
            print(f"  [{name} round {r + 1}/{repeats}] {kind:<6} {runs[kind][-1]['seconds']:7.1f} s "
                  f"{runs[kind][-1]['tokens_per_s'] / 1e6:6.3f} M tokens/s (load {loads[-1]:.2f})", flush=True)
        a, b = runs["direct"][-1], runs["dask"][-1]
        same = same and a["shards"] == b["shards"] and a["dropped"] == b["dropped"]
    rate = {k: _stats([x["tokens_per_s"] for x in v]) for k, v in runs.items()}
    secs = {k: _stats([x["seconds"] for x in v]) for k, v in runs.items()}
    best = {k: max(x["tokens_per_s"] for x in runs[k]) for k in kinds}
    first = runs["direct"][0]
    label = {"direct": f"direct:{workers}", "dask": f"dask:{workers}"}
    return [
        f"{name}: {corpus.stat().st_size / 1e6:.1f} MB, {first['records']:,} documents ({first['kept']:,} kept), "
        f"{first['tokens'] / 1e6:.2f}M tokens written; {repeats} interleaved rounds, load average "
        f"{min(loads):.2f}-{max(loads):.2f} over the runs",
        f"  {'':<11} {'median':>8} {'best':>8} M tokens/s   seconds min / median   runs (s)",
        *[f"  {label[k]:<11} {rate[k][1] / 1e6:8.3f} {best[k] / 1e6:8.3f}              "
          f"{secs[k][0]:6.1f} / {secs[k][1]:6.1f}   " + " ".join(f"{x['seconds']:.1f}" for x in runs[k])
          for k in kinds],
        f"  dask / direct = {rate['dask'][1] / rate['direct'][1]:.2f} tokens/s by median; dask takes "
        f"{secs['dask'][1] - secs['direct'][1]:+.1f} s wall by median",
        f"  same shards (sha256) and drop counts on both runners in every round: {'yes' if same else 'NO'}",
    ]


def ceiling(texts: list[str], tok: Path, workers: int) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model"))
    tokens, t0 = 0, time.perf_counter()
    for i in range(0, len(texts), 1000):
        tokens += sum(map(len, sp.encode(texts[i:i + 1000], num_threads=1)))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s_1core": tokens / seconds,
            "tokens_per_s": tokens / seconds * workers}


class _Encoder:
    """Megatron-LM tools/preprocess_data.py's Encoder, with SentencePiece as the tokenizer."""

    def __init__(self, model: str):
        self.model = model

    def initializer(self):
        import sentencepiece as spm

        _Encoder.sp = spm.SentencePieceProcessor(model_file=self.model)

    def encode(self, json_line: bytes):
        text = json.loads(json_line)["text"]
        ids = _Encoder.sp.encode(text)
        return ids, [len(ids)], len(json_line)


def megatron(corpus: Path, tok: Path, workers: int) -> dict:
    import numpy as np

    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed"
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = WORK / "megatron_text_document"
    enc = _Encoder(str(tok / "tokenizer.model"))
    t0 = time.perf_counter()
    tokens = 0
    with open(corpus, "rb") as fin, multiprocessing.Pool(workers, initializer=enc.initializer) as pool:
        builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
        for ids, lens, _ in pool.imap(enc.encode, fin, 32):
            builder.add_document(ids, lens)
            tokens += len(ids)
        builder.finalize(str(prefix) + ".idx")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def measure_cache_ab(name: str, corpus: Path, tok: Path, workers: int, repeats: int) -> list[str]:
    """`data shard` as a user runs it with the segment cache (default) and without it
    (DOMAINLM_SEGMENT_CACHE=0), interleaved, the order alternating; medians; the same shards?"""
    runs: dict[str, list[dict]] = {"cache": [], "no cache": []}
    same = True
    for r in range(repeats):
        for kind in (("cache", "no cache") if r % 2 == 0 else ("no cache", "cache")):
            runs[kind].append(run_shard(corpus, tok, workers, name, explicit=False,
                                        env={"DOMAINLM_SEGMENT_CACHE": "1" if kind == "cache" else "0"}))
            print(f"  [{name} round {r + 1}/{repeats}] {kind:<8} {runs[kind][-1]['seconds']:6.1f} s wall, "
                  f"{runs[kind][-1]['cpu_seconds']:6.1f} s CPU (load {os.getloadavg()[0]:.2f})", flush=True)
        same = same and runs["cache"][-1]["shards"] == runs["no cache"][-1]["shards"]
    wall = {k: _stats([x["seconds"] for x in v])[1] for k, v in runs.items()}
    cpu = {k: _stats([x["cpu_seconds"] for x in v])[1] for k, v in runs.items()}
    tokens = runs["cache"][0]["tokens"]
    return [
        f"{name}: `data shard` with and without the segment cache, {repeats} interleaved rounds, {tokens / 1e6:.2f}M tokens",
        *[f"  {k:<9} {wall[k]:6.1f} s wall ({tokens / wall[k] / 1e6:.3f} M tokens/s), {cpu[k]:6.1f} s CPU median; runs "
          + " ".join(f"{x['seconds']:.1f}" for x in runs[k]) for k in runs],
        f"  cache / no cache: {wall['no cache'] / wall['cache']:.2f}x tokens/s, {cpu['cache'] / cpu['no cache']:.2f} of the CPU",
        f"  the same shards (sha256) in every round: {'yes' if same else 'NO'}",
    ]


def measure_encoders(name: str, corpus: Path, tok: Path, repeats: int, block_bytes: int = 4_000_000) -> list[str]:
    """Bare SentencePiece against the segment cache, `repeats` interleaved rounds, each cold."""
    import numpy as np

    from domainlm.tokenizer.tokdir import SENTENCEPIECE, DocumentEncoder

    texts = texts_of(corpus)
    blocks, at, size = [], 0, 0
    for i, t in enumerate(texts):  # blocks of ~4 MB of text, as the read stage cuts them
        size += len(t)
        if size >= block_bytes:
            blocks.append(texts[at:i + 1])
            at, size = i + 1, 0
    blocks.append(texts[at:])
    blob = (tok / "tokenizer.model").read_bytes()
    runs: dict[str, list[float]] = {"whole": [], "cached": []}
    same, hit = True, []
    for r in range(repeats):
        for kind in (("whole", "cached") if r % 2 == 0 else ("cached", "whole")):
            enc = DocumentEncoder(SENTENCEPIECE, blob, threads=1, cache=kind == "cached")
            enc([])  # loaded outside the clock, as a worker does in setup
            t0 = time.perf_counter()
            out = [enc.flat(b, np.uint16) for b in blocks]
            runs[kind].append(time.perf_counter() - t0)
            if kind == "cached":
                c = enc.segment_cache
                hit.append(c.hits / c.segments)
                cached = out
            else:
                whole = out
        same = same and all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(whole, cached))
        print(f"  [{name} round {r + 1}/{repeats}] whole {runs['whole'][-1]:.2f} s, cached {runs['cached'][-1]:.2f} s",
              flush=True)
    tokens = sum(int(b[1].sum()) for b in whole)
    med = {k: _stats(v)[1] for k, v in runs.items()}
    return [
        f"{name}: {len(texts):,} texts in {len(blocks)} blocks, {tokens / 1e6:.2f}M tokens; {repeats} interleaved rounds, "
        f"one process, one thread, a fresh cache each round",
        f"  SentencePiece, each text whole: {med['whole']:.2f} s median, {tokens / med['whole'] / 1e6:.3f} M tokens/s",
        f"  segment cache (flat):           {med['cached']:.2f} s median, {tokens / med['cached'] / 1e6:.3f} M tokens/s "
        f"= {med['whole'] / med['cached']:.2f}x; {hit[0]:.1%} of segments found in the cache",
        f"  the same ids and counts in every round: {'yes' if same else 'NO'}",
    ]


def _stats(xs: list[float]) -> tuple[float, float]:
    import statistics

    return min(xs), statistics.median(xs)


def measure(name: str, corpus: Path, tok: Path, workers: int, repeats: int, explicit: bool) -> list[str]:
    """The three measurements `repeats` times, interleaved with a rotating order. `explicit`:
    `data shard` gets --beam.direct-num-workers W (else it chooses, as for a user)."""
    texts = texts_of(corpus)
    runs: dict[str, list[dict]] = {"shard": [], "ceiling": [], "megatron": []}
    kinds = list(runs)
    loads = []
    for r in range(repeats):
        for kind in kinds[r % 3:] + kinds[:r % 3]:
            loads.append(os.getloadavg()[0])
            if kind == "shard":
                runs[kind].append(run_shard(corpus, tok, workers, name, explicit=explicit))
            elif kind == "ceiling":
                runs[kind].append(ceiling(texts, tok, workers))
            else:
                runs[kind].append(megatron(corpus, tok, workers))
            print(f"  [{name} round {r + 1}/{repeats}] {kind:<8} {runs[kind][-1]['tokens_per_s'] / 1e6:6.3f} M tokens/s "
                  f"(load {loads[-1]:.2f})", flush=True)
    rate = {k: _stats([x["tokens_per_s"] for x in v]) for k, v in runs.items()}
    secs = {k: _stats([x["seconds"] for x in v]) for k, v in runs.items()}
    first = runs["shard"][0]
    cpu = _stats([x["cpu_seconds"] for x in runs["shard"]])
    one_core = _stats([x["tokens_per_s_1core"] for x in runs["ceiling"]])
    best = {k: max(x["tokens_per_s"] for x in runs[k]) for k in kinds}
    size = corpus.stat().st_size
    return [
        f"{name}: {size / 1e6:.1f} MB, {first['records']:,} documents ({first['kept']:,} kept), "
        f"{first['tokens'] / 1e6:.2f}M tokens written; {repeats} interleaved rounds, load average "
        f"{min(loads):.2f}-{max(loads):.2f} over the runs; data shard ran on: {first['engine']}",
        f"  {'':<11} {'median':>8} {'best':>8} M tokens/s   seconds min / median   runs (M tokens/s)",
        *[f"  {k:<11} {rate[k][1] / 1e6:8.3f} {best[k] / 1e6:8.3f}              {secs[k][0]:6.1f} / {secs[k][1]:6.1f}   "
          + " ".join(f"{x['tokens_per_s'] / 1e6:.3f}" for x in runs[k]) for k in kinds],
        f"  ceiling = 1 core x {workers}: 1 core {one_core[1] / 1e6:.3f} M/s median over "
        f"{runs['ceiling'][0]['tokens'] / 1e6:.2f}M tokens of the cleaned texts",
        f"  data shard / ceiling = {rate['shard'][1] / rate['ceiling'][1]:.2f} by median, "
        f"{best['shard'] / best['ceiling']:.2f} best to best (goal >= 0.7)",
        f"  data shard / megatron = {rate['shard'][1] / rate['megatron'][1]:.2f} by median, "
        f"{best['shard'] / best['megatron']:.2f} best to best (goal >= 1)",
        f"  CPU: data shard {cpu[1]:.1f} s median for {first['tokens'] / 1e6:.1f}M tokens = "
        f"{cpu[1] / first['tokens'] * 1e6:.2f} s per M tokens; raw encode {1e6 / one_core[1]:.2f} s per M tokens",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["pydoc", "big"], default=None)
    ap.add_argument("--size-mb", type=int, default=200)
    ap.add_argument("--workers", type=int, default=0,
                    help="0: every core for the references, and `data shard` chooses its own workers as for a "
                         "user (one in-memory process under 16 MB of input); N: N each")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds of the three measurements")
    ap.add_argument("--out", default=None, help="default: bench/results/shard.txt (shard_NNmb.txt for --size-mb; "
                                                "shard_runners*.txt with --runners)")
    ap.add_argument("--runners", action="store_true",
                    help="compare the DirectRunner with dask (local:W) instead of the ceiling and Megatron")
    ap.add_argument("--encoders", action="store_true",
                    help="time the tokenizing alone: SentencePiece on whole texts against the segment cache")
    ap.add_argument("--cache-ab", action="store_true",
                    help="`data shard` with the segment cache against without it (DOMAINLM_SEGMENT_CACHE=0)")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    workers = args.workers or len(os.sched_getaffinity(0))
    src = pydoc_corpus()
    tok = tokenizer(src)
    corpora = []
    if args.only in (None, "pydoc"):
        corpora.append(("pydoc", src))
    if args.only in (None, "big"):
        corpora.append((f"{args.size_mb}MB", big_corpus(src, args.size_mb)))
    lines = [describe(), f"command: python bench/shard.py {' '.join(sys.argv[1:])}".rstrip(),
             f"workers: {workers}; tokenizer: {tok}; load average at start (1, 5, 15 min): "
             + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + " (other processes share these cores when over 0)", ""]
    print("\n".join(lines), flush=True)
    mode = ("cache_ab" if args.cache_ab else "encoders" if args.encoders else "runners" if args.runners else None)
    if mode:
        for name, corpus in corpora:
            rows = (measure_cache_ab(name, corpus, tok, workers, args.repeats) if mode == "cache_ab"
                    else measure_encoders(name, corpus, tok, args.repeats) if mode == "encoders"
                    else measure_runners(name, corpus, tok, workers, args.repeats))
            print("\n".join(rows), flush=True)
            lines += rows
        lines.append(f"load average at the end: {os.getloadavg()[0]:.2f}")
        default = {"cache_ab": "shard_cache_ab.txt", "encoders": "shard_encoders.txt",
                   "runners": "shard_runners.txt" if args.size_mb == 200 else f"shard_runners_{args.size_mb}mb.txt"}
        out = Path(args.out or HERE / "results" / default[mode])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")
        print(f"written to {out}")
        return
    tiny = WORK / "tiny.jsonl"
    tiny.write_bytes(b"".join(src.read_bytes().splitlines(keepends=True)[:50]))
    fixed = [run_shard(tiny, tok, workers, "tiny", explicit=bool(args.workers))
             for _ in range(max(1, min(3, args.repeats)))]
    row = (f"fixed cost (50 documents, {len(fixed)} runs): {_stats([f['seconds'] for f in fixed])[1]:.2f} s wall, "
           f"{_stats([f['cpu_seconds'] for f in fixed])[1]:.2f} s CPU (medians); ran on: {fixed[0]['engine']}")
    print(row, flush=True)
    lines.append(row)
    for name, corpus in corpora:
        rows = measure(name, corpus, tok, workers, args.repeats, bool(args.workers))
        print("\n".join(rows), flush=True)
        lines += rows
    lines.append(f"load average at the end: {os.getloadavg()[0]:.2f}")
    out = Path(args.out or HERE / "results" / ("shard.txt" if args.size_mb == 200 else f"shard_{args.size_mb}mb.txt"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()

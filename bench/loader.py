"""Loader throughput: tokens per second that TokenWindowLoader feeds from one process.

    .venv/bin/python bench/loader.py                       # 64M tokens, workers 0 and 2
    .venv/bin/python bench/loader.py --tokens 8e6 --seconds 2 --repeats 1 --out /tmp/l.txt   # smoke run

Writes a synthetic shards dir once under bench/work/ (uint16 token ids, log-normal document
lengths, the real shard format and manifest), then for each worker count times the loader at
seq_len 2048 and micro batch 8 from a fresh start (the first batch's latency reported apart),
plus the cost of a resume deep into the stream. The reference is stock `webdataset` doing the
same work: the same shards, documents shuffled in a buffer of the same size, decoded, joined with
an eos after each and cut into [micro batch, seq_len + 1] LongTensor batches every seq_len
tokens (Megatron's windows, as the loader cuts them) -- in the same process, alternating with the
loader, median of --repeats. (An earlier reference decoded documents only, without the shuffle,
the packing or the batches, and was not comparable.) The shards were just written, so they are
read from the page cache: this measures the readers, not the disk. Goal (issue 3): >= 2M
tokens/s. Prints the machine and the load average, and appends the table to
bench/results/loader.txt.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VOCAB = 32000
EOS = 2


def machine() -> str:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.node()} | {cpu} | {os.cpu_count()} cores visible | {platform.system()} {platform.release()} | "
            f"python {platform.python_version()} numpy {np.__version__} torch {torch.__version__}")


def write_synthetic(root: Path, tokens: int, shard_tokens: int, seed: int = 0) -> Path:
    """A shards dir of random documents (log-normal lengths, median ~400 tokens)."""
    from domainlm.data.shards import SHARD_PATTERN, ShardWriter, sample_key

    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        m = json.loads(manifest_path.read_text())
        if m.get("bench", {}).get("tokens") == tokens and m["bench"].get("seed") == seed:
            return root
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    shards, total, doc = [], 0, 0
    t0 = time.perf_counter()
    while total < tokens:
        name = f"train/{SHARD_PATTERN.format(index=len(shards))}"
        n_docs = n_tok = 0
        with open(root / name, "wb") as f, ShardWriter(f) as w:
            while n_tok < shard_tokens and total + n_tok < tokens:
                n = int(min(max(1, rng.lognormal(6.0, 1.0)), 200_000))
                ids = rng.integers(4, VOCAB, n, dtype=np.uint16)
                w.write(sample_key(f"doc{doc}", "synthetic.jsonl"), ids, {"id": f"doc{doc}", "source": f"synthetic.jsonl:{doc}", "tokens": n})
                n_docs, n_tok, doc = n_docs + 1, n_tok + n, doc + 1
        data = (root / name).read_bytes()
        shards.append({"name": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                       "documents": n_docs, "tokens": n_tok})
        total += n_tok
        print(f"  wrote {name}: {n_docs} docs, {n_tok / 1e6:.1f}M tokens ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    manifest = {
        "stage": "data shard",
        "tokenizer": {"sha256": "synthetic", "vocab_size": VOCAB, "eos_id": EOS, "bos_id": 1, "pad_id": 3, "path": ""},
        "token_dtype": "uint16",
        "splits": {"train": {"documents": doc, "tokens": total, "shards": shards}},
        "bench": {"tokens": tokens, "seed": seed},
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return root


def time_loader(root: Path, workers: int, seq_len: int, mbs: int, seconds: float, buffer: int) -> dict:
    from domainlm.pretrain.loader import DataArgs, TokenWindowLoader

    args = DataArgs(shards=[str(root)], num_workers=workers, shuffle_buffer=buffer)
    loader = TokenWindowLoader(args, split="train", seq_len=seq_len, micro_batch_size=mbs)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    while time.perf_counter() - t1 < seconds:
        for _ in range(64):
            batch = next(it)
        n += 64
    dt = time.perf_counter() - t1
    state = loader.state_dict()
    del it
    # Resume deep in the stream: a new loader, the saved state, one batch.
    t2 = time.perf_counter()
    again = TokenWindowLoader(args, split="train", seq_len=seq_len, micro_batch_size=mbs)
    again.load_state_dict(state)
    next(iter(again))
    resume = time.perf_counter() - t2
    assert batch.shape == (mbs, seq_len + 1)
    return {"workers": workers, "batches": n, "seconds": dt, "tokens_per_s": n * mbs * seq_len / dt,
            "first_batch_s": first, "resume_s": resume, "epoch": state["sources"][0]["epoch"],
            "epoch_tokens": state["sources"][0]["epoch_tokens"]}


def time_webdataset(root: Path, seq_len: int, mbs: int, buffer: int, seconds: float) -> float:
    """Tokens/s of stock webdataset producing the loader's batches (see the module docstring)."""
    import torch
    import webdataset as wds

    m = json.loads((root / "manifest.json").read_text())
    eos = m["tokenizer"]["eos_id"]
    urls = [str(root / s["name"]) for s in m["splits"]["train"]["shards"]]
    need = mbs * seq_len + 1              # mbs windows of seq_len + 1, each starting seq_len after the last
    stream = np.empty(0, dtype=np.int64)
    parts: list[np.ndarray] = []
    held = batches = 0
    t0 = time.perf_counter()
    while True:                           # epochs
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(buffer).decode():
            parts += [sample["npy"].astype(np.int64), np.array([eos], dtype=np.int64)]
            held += len(sample["npy"]) + 1
            while held + len(stream) >= need:
                stream = np.concatenate([stream, *parts])
                parts, held = [], 0
                starts = np.arange(mbs) * seq_len
                batch = torch.from_numpy(stream[starts[:, None] + np.arange(seq_len + 1)])
                assert batch.shape == (mbs, seq_len + 1)
                stream = stream[mbs * seq_len:]
                batches += 1
            if time.perf_counter() - t0 > seconds:
                return batches * mbs * seq_len / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=64e6, help="tokens in the synthetic shards dir")
    p.add_argument("--shard-tokens", type=float, default=8e6, help="tokens per shard")
    p.add_argument("--workdir", default=str(HERE / "work" / "loader"), help="where the shards dir goes")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts to time")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--shuffle-buffer", type=int, default=10000)
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per configuration and round")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds (median reported)")
    p.add_argument("--out", default=str(HERE / "results" / "loader.txt"), help="append the results here")
    a = p.parse_args()

    root = write_synthetic(Path(a.workdir) / f"synthetic-{int(a.tokens)}", int(a.tokens), int(a.shard_tokens))
    m = json.loads((root / "manifest.json").read_text())["splits"]["train"]
    lines = [
        f"# bench/loader.py  {time.strftime('%Y-%m-%d %H:%M:%S')}",
        f"command: {' '.join([Path(sys.executable).name] + sys.argv)}",
        f"machine: {machine()}",
        "load average at start (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        f"data: {m['tokens'] / 1e6:.1f}M tokens, {m['documents']} documents, {len(m['shards'])} shards "
        f"(uint16, page cache warm); seq_len {a.seq_len}, micro batch {a.micro_batch_size}, "
        f"shuffle_buffer {a.shuffle_buffer}; {a.repeats} rounds of {a.seconds:.0f} s each, alternating",
        f"{'reader':>22} {'tokens/s (median)':>18}  runs (M tokens/s)   first batch   resume  position reached",
    ]
    print("\n".join(lines))
    import statistics

    results: dict[str, list] = {f"loader workers={w}": [] for w in a.workers}
    results["webdataset, same work"] = []
    for _ in range(a.repeats):
        for w in a.workers:
            results[f"loader workers={w}"].append(
                time_loader(root, w, a.seq_len, a.micro_batch_size, a.seconds, a.shuffle_buffer))
        results["webdataset, same work"].append(
            {"tokens_per_s": time_webdataset(root, a.seq_len, a.micro_batch_size, a.shuffle_buffer, a.seconds)})
    ref = statistics.median(r["tokens_per_s"] for r in results["webdataset, same work"])
    for name, runs in results.items():
        med = statistics.median(r["tokens_per_s"] for r in runs)
        extra = ""
        if "first_batch_s" in runs[0]:
            r = runs[-1]
            extra = (f"   {statistics.median(x['first_batch_s'] for x in runs):>9.2f}s "
                     f"{statistics.median(x['resume_s'] for x in runs):>7.2f}s  epoch {r['epoch']} "
                     f"+{r['epoch_tokens'] / 1e6:.1f}M tokens")
        line = (f"{name:>22} {med / 1e6:>16.1f}M  " + " ".join(f"{x['tokens_per_s'] / 1e6:.1f}" for x in runs)
                + extra + (f"   ({med / ref:.1f}x webdataset)" if name != "webdataset, same work" else ""))
        print(line)
        lines.append(line)
    lines.append(f"load average at the end: {os.getloadavg()[0]:.2f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()

"""`domainlm data shard` at scale (issue 20): peak memory and tokens/s against corpus size, and
what an interrupted run (SIGKILL) leaves behind and costs.

    --make SIZE     synthesize a corpus of SIZE bytes (20MB, 200MB, 2GB, ...) under
                    bench/work/scale/ (git-ignored), reproducibly from --seed: the pydoc corpus
                    (bench/shard.py builds it) as copy 0, then copies under new ids in which each
                    line's words are shuffled and one word in ten (--replace) is replaced by a
                    word drawn from the whole corpus's words (frequency-weighted). The copies
                    tokenize like the original but are rarely exact or near duplicates of it or
                    of each other (a shuffle alone leaves a short document only a few orders,
                    which many copies exhaust; the replaced words break most of those ties), so
                    deduplication keeps 98-99% (99.3% at 200 MB, 98.0% at 2 GB: 150 copies of the
                    shortest documents still collide) and every stage sees the full volume.
    --run           run `domainlm data shard` on it as a user does (the real CLI in a fresh
                    process, DirectRunner, --workers worker processes, the config of
                    bench/shard.py: the tokenizer bench/shard.py trains, every other setting the
                    default) while sampling every --interval s the RSS of the whole process tree
                    (the driver and Beam's worker processes): the sum over the tree, the largest
                    single process, the driver alone; and every 2 s the bytes under the run's
                    temporary output directory (spill files, shards). Records wall seconds, CPU
                    seconds of the tree, tokens written (from the manifest), tokens/s, the peaks
                    and when they happened (with what the spill directory held then, which tells
                    the stage), and the sha256 of every shard file. The tree's RSS sum counts
                    pages the processes share (libraries) once per process. Disk: a run takes
                    about 6x the corpus under bench/work/scale/ at its peak (spill files ~2.5x,
                    shards ~3.8x for this corpus of short documents); 2 GB: ~13 GB.
    --kill-at F     the interruption test: a reference run from scratch (or --ref JSON of an
                    earlier --run on the same corpus), then a run into a fresh output directory
                    killed with SIGKILL (its whole process group: driver and workers) at F x the
                    reference's wall time, an inventory of what the killed run left on disk (the
                    output directory, its temporary siblings, new entries in the temp directory),
                    then the same command rerun to completion: its wall time and CPU seconds
                    against the reference's, and its shard bytes against the reference's. What
                    the killed run left is removed at the end (its temporary output directory,
                    its domainlm-progress-* and beam-pipeline-temp* in the temp directory)
                    unless --keep-leftovers.

Results are printed as one line per run and written as JSON to bench/results/shard_scale_NAME.json
(the per-sample time series included) and appended to bench/results/shard_scale.txt.

    .venv/bin/python bench/shard_scale.py --make 200MB --run
    .venv/bin/python bench/shard_scale.py --make 2GB --run
    .venv/bin/python bench/shard_scale.py --make 200MB --kill-at 0.6
    .venv/bin/python bench/shard_scale.py --make 200MB --kill-at 0.6 --ref bench/results/shard_scale_200MB.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import shard as shard_bench  # noqa: E402  (bench/shard.py: the pydoc corpus and tokenizer)
from machine import describe  # noqa: E402

WORK = HERE / "work" / "scale"
RESULTS = HERE / "results"
EXE = [sys.executable, "-m", "domainlm.cli"]


# ----------------------------------------------------------------------------------------------
# The corpus.


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmg]?)b?\s*", s.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {s!r} (e.g. 20MB, 200MB, 2GB)")
    return int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2)])


def size_name(n: int) -> str:
    return f"{n / 1e9:g}GB" if n >= 10**9 and n % 10**8 == 0 else f"{n / 1e6:g}MB"


def make_corpus(size: int, seed: int, replace: float) -> Path:
    """The corpus of `size` bytes (see the module doc); made once, then reused."""
    import orjson

    out = WORK / f"corpus_{size_name(size)}_s{seed}_r{replace:g}.jsonl"
    if out.exists():
        return out
    WORK.mkdir(parents=True, exist_ok=True)
    src = shard_bench.pydoc_corpus()
    records = [orjson.loads(line) for line in src.read_bytes().splitlines() if line.strip()]
    # each document as an object array of words (split at " " as bench/shard.py does, so line
    # structure and empty words survive) and each word's line number
    docs = []
    for rec in records:
        lines = rec["text"].split("\n")
        words = [w.split(" ") for w in lines]
        flat = np.array([w for ws in words for w in ws], dtype=object)
        line = np.repeat(np.arange(len(words)), [len(ws) for ws in words])
        seps = np.array(["\n" if a != b else " " for a, b in zip(line[1:].tolist(), line[:-1].tolist())], dtype=object)
        docs.append((rec["id"], flat, line, seps))
    vocab = np.concatenate([d[1] for d in docs])
    vocab = vocab[vocab != ""]
    t0, written, copy = time.perf_counter(), 0, 0
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        while written < size:
            rng = np.random.default_rng([seed, copy])
            for rec, (doc_id, words, line, seps) in zip(records, docs):
                if copy:
                    order = np.lexsort((rng.random(len(words)), line))  # shuffled within each line
                    w = words[order]
                    swap = (rng.random(len(w)) < replace) & (w != "")
                    if swap.any():
                        w[swap] = vocab[rng.integers(0, len(vocab), int(swap.sum()))]
                    parts = np.empty(2 * len(w) - 1, dtype=object)
                    parts[0::2], parts[1::2] = w, seps
                    rec = {"id": f"{doc_id}#copy{copy}", "text": "".join(parts.tolist())}
                data = orjson.dumps(rec) + b"\n"
                f.write(data)
                written += len(data)
                if written >= size:
                    break
            copy += 1
            if copy % 20 == 0:
                print(f"  make: {written / 1e6:.0f} MB, {copy} copies, {time.perf_counter() - t0:.0f} s", flush=True)
    tmp.rename(out)
    print(f"made {out} ({written / 1e6:.1f} MB, {copy} copies incl. the original) in {time.perf_counter() - t0:.0f} s")
    return out


# ----------------------------------------------------------------------------------------------
# One run, sampled.


def tree(proc) -> list:
    import psutil

    try:
        return [proc] + proc.children(recursive=True)
    except psutil.Error:
        return []


def dir_usage(path: Path) -> tuple[int, dict[str, int]]:
    """(bytes under path, count of spill files by kind) without following links."""
    total, kinds = 0, {}
    stack = [path]
    while stack:
        p = stack.pop()
        try:
            with os.scandir(p) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(Path(e.path))
                        else:
                            total += e.stat(follow_symlinks=False).st_size
                            if p.name == ".spill":
                                k = e.name.split("-")[0]
                                kinds[k] = kinds.get(k, 0) + 1
                            elif e.name.endswith(".tar"):
                                kinds["shards"] = kinds.get("shards", 0) + 1
                    except OSError:
                        pass
        except OSError:
            pass
    return total, kinds


class Sampler(threading.Thread):
    """RSS of the process tree every `interval` s; the run's temporary output every 2 s."""

    def __init__(self, pid: int, out: Path, interval: float):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process(pid)
        self.out, self.interval = out, interval
        self.stop = threading.Event()
        self.samples: list[dict] = []
        self.t0 = time.perf_counter()
        self.disk = (0, {})
        self.disk_peak = (0, 0.0, {})
        self.procs_seen: dict[int, dict] = {}

    def tmp_dirs(self) -> list[Path]:
        return list(self.out.parent.glob(f".{self.out.name}.tmp-*"))

    def run(self) -> None:
        import psutil

        last_disk = -10.0
        while not self.stop.is_set():
            t = time.perf_counter() - self.t0
            procs = tree(self.proc)
            rss = {}
            for p in procs:
                try:
                    rss[p.pid] = p.memory_info().rss
                    if p.pid not in self.procs_seen:
                        self.procs_seen[p.pid] = {"cmd": " ".join(p.cmdline()[-3:]), "peak": 0}
                except psutil.Error:
                    continue
                self.procs_seen[p.pid]["peak"] = max(self.procs_seen[p.pid]["peak"], rss[p.pid])
            if t - last_disk >= 2.0:
                last_disk = t
                total, kinds = 0, {}
                for d in self.tmp_dirs():
                    b, k = dir_usage(d)
                    total += b
                    for x, n in k.items():
                        kinds[x] = kinds.get(x, 0) + n
                self.disk = (total, kinds)
                if total > self.disk_peak[0]:
                    self.disk_peak = (total, t, kinds)
            if rss:
                driver = rss.get(self.proc.pid, 0)
                workers = [v for k, v in rss.items() if k != self.proc.pid]
                self.samples.append({"t": round(t, 2), "tree": sum(rss.values()), "driver": driver,
                                     "max_worker": max(workers, default=0), "procs": len(rss),
                                     "max_proc": max(rss.values()), "disk": self.disk[0], "spill": self.disk[1]})
            self.stop.wait(self.interval)

    def peaks(self) -> dict:
        out = {}
        for key in ("tree", "driver", "max_worker", "max_proc"):
            if self.samples:
                s = max(self.samples, key=lambda x: x[key])
                out[key] = {"bytes": s[key], "t": s["t"], "spill_then": s["spill"]}
        out["disk"] = {"bytes": self.disk_peak[0], "t": round(self.disk_peak[1], 2), "spill_then": self.disk_peak[2]}
        return out


def sha_shards(out: Path) -> dict[str, str]:
    shas = {}
    for p in sorted(out.rglob("*")):
        if p.is_file() and (p.suffix == ".tar" or p.name == "dead_letter.jsonl"):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            shas[str(p.relative_to(out))] = h.hexdigest()
    return shas


def temp_entries() -> set[str]:
    d = Path(tempfile.gettempdir())
    try:
        return {e.name for e in os.scandir(d)}
    except OSError:
        return set()


def shard_cmd(corpus: Path, tok: Path, out: Path, workers: int, extra: list[str]) -> list[str]:
    return EXE + ["data", "shard", "--input", str(corpus), "--tokenizer", str(tok), "--output", str(out),
                  "--overwrite", "--beam.direct-num-workers", str(workers)] + extra


def run_once(corpus: Path, tok: Path, out: Path, workers: int, interval: float, kill_after: float | None = None,
             log: Path | None = None, extra: list[str] = (), env: dict | None = None) -> dict:
    """One `data shard` run into `out`, sampled; killed (SIGKILL to its process group) after
    `kill_after` seconds when given."""
    cmd = shard_cmd(corpus, tok, out, workers, list(extra))
    log = log or out.parent / f"{out.name}.log"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    with open(log, "wb") as lf:
        t0 = time.perf_counter()
        # its own session and process group: Beam's worker processes inherit it, so one
        # killpg reaches the whole tree
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "DOMAINLM_PROGRESS": "0", **(env or {})})
        sampler = Sampler(proc.pid, out, interval)
        sampler.t0 = t0
        sampler.start()
        killed = False
        try:
            if kill_after is not None:
                try:
                    proc.wait(timeout=kill_after)
                except subprocess.TimeoutExpired:
                    pids = [p.pid for p in tree(sampler.proc)]
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
            rc = proc.wait()
        finally:
            wall = time.perf_counter() - t0
            sampler.stop.set()
            sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = {"command": " ".join(cmd), "env": env or {}, "wall_s": round(wall, 2), "rc": rc, "killed": killed,
           "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
           "load_start": round(load0, 2), "load_end": round(os.getloadavg()[0], 2),
           "interval_s": interval, "peaks": sampler.peaks(), "log": str(log),
           "processes": [{"pid": k, **v} for k, v in sampler.procs_seen.items()],
           "samples": sampler.samples}
    if killed:
        import psutil

        time.sleep(0.5)
        res["killed_pids"] = pids
        res["survivors"] = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    if rc == 0:
        m = json.loads((out / "manifest.json").read_text())
        tokens = sum(s["tokens"] for s in m["splits"].values())
        res.update(tokens=tokens, tokens_per_s=round(tokens / wall), records=m["counts"]["records"],
                   kept=m["counts"]["kept"], dropped={k: v for k, v in m["dropped"].items() if v},
                   shards=sum(len(s["shards"]) for s in m["splits"].values()), shas=sha_shards(out))
    elif not killed:
        raise SystemExit(f"data shard failed (exit {rc}); see {log}")
    return res


def line_of(name: str, corpus: Path, r: dict) -> str:
    mib = 2**20
    p = r["peaks"]
    s = (f"{name}: {corpus.stat().st_size / 1e6:.0f} MB, ")
    if r.get("tokens"):
        s += (f"{r['records']:,} docs ({r['kept']:,} kept), {r['tokens'] / 1e6:.1f}M tokens, {r['wall_s']:.1f} s, "
              f"{r['tokens_per_s'] / 1e6:.3f}M tok/s, CPU {r['cpu_s']:.0f} s; ")
    else:
        s += f"killed at {r['wall_s']:.1f} s; "
    s += (f"peak RSS tree {p['tree']['bytes'] / mib:.0f} MiB at {p['tree']['t']:.0f} s, largest process "
          f"{p['max_proc']['bytes'] / mib:.0f} MiB, driver {p['driver']['bytes'] / mib:.0f} MiB, worker "
          f"{p['max_worker']['bytes'] / mib:.0f} MiB; temp output peak {p['disk']['bytes'] / 1e6:.0f} MB; "
          f"load {r['load_start']:.2f}->{r['load_end']:.2f}")
    return s


def save(name: str, payload: dict, line: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"shard_scale_{name}.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    with open(RESULTS / "shard_scale.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M')} {line}\n")
    return path


# ----------------------------------------------------------------------------------------------
# The interruption test.


def leftovers(out: Path, temp_before: set[str]) -> dict:
    found = {"output_dir_exists": out.exists(),
             "output_dir_contents": sorted(p.name for p in out.iterdir()) if out.exists() else [],
             "tmp_siblings": {}, "new_temp_entries": {}}
    for d in out.parent.glob(f".{out.name}.*"):
        b, kinds = dir_usage(d)
        found["tmp_siblings"][str(d)] = {"bytes": b, "files": kinds}
    tmpdir = Path(tempfile.gettempdir())
    for name in sorted(temp_entries() - temp_before):
        p = tmpdir / name
        b = dir_usage(p)[0] if p.is_dir() else (p.stat().st_size if p.exists() else 0)
        found["new_temp_entries"][str(p)] = b
    return found


def kill_test(args, corpus: Path, tok: Path, name: str) -> None:
    import shutil

    lines = []
    if args.ref:
        ref = json.loads(Path(args.ref).read_text())["run"]
        if ref.get("corpus") and ref["corpus"] != str(corpus):
            raise SystemExit(f"--ref was run on {ref['corpus']}, not {corpus}")
    else:
        ref = run_once(corpus, tok, WORK / f"out_{name}", args.workers, args.interval)
        ref["corpus"] = str(corpus)
        lines.append(line_of(f"{name} scratch (reference)", corpus, ref))
        print(lines[-1], flush=True)
    out = WORK / f"out_{name}_killed"
    if out.exists():
        shutil.rmtree(out)
    for d in out.parent.glob(f".{out.name}.*"):
        shutil.rmtree(d)
    temp_before = temp_entries()
    kill_after = args.kill_at * ref["wall_s"]
    killed = run_once(corpus, tok, out, args.workers, args.interval, kill_after=kill_after)
    lines.append(line_of(f"{name} killed at {args.kill_at:g} x {ref['wall_s']:.1f} s", corpus, killed))
    print(lines[-1], flush=True)
    left = leftovers(out, temp_before)
    progress = {p: b for p, b in left["new_temp_entries"].items() if "domainlm-progress-" in p or "beam-pipeline-temp" in p}
    row = (f"  left by the killed run: output dir {'exists' if left['output_dir_exists'] else 'absent'}"
           f"{' ' + str(left['output_dir_contents']) if left['output_dir_exists'] else ''}; "
           + "; ".join(f"{p} {v['bytes'] / 1e6:.0f} MB ({v['files']})" for p, v in left["tmp_siblings"].items())
           + f"; {len(left['new_temp_entries'])} new entries in {tempfile.gettempdir()}"
           + (f" (ours: {', '.join(sorted(progress))})" if progress else "")
           + f"; processes surviving the kill: {killed.get('survivors')}")
    lines.append(row)
    print(row, flush=True)
    temp_before2 = temp_entries()
    rerun = run_once(corpus, tok, out, args.workers, args.interval, log=out.parent / f"{out.name}.rerun.log")
    lines.append(line_of(f"{name} rerun after the kill", corpus, rerun))
    print(lines[-1], flush=True)
    after = leftovers(out, temp_before2)
    same = rerun["shas"] == ref["shas"]
    row = (f"  rerun {rerun['wall_s']:.1f} s vs scratch {ref['wall_s']:.1f} s ({rerun['wall_s'] / ref['wall_s']:.2f}x), "
           f"CPU {rerun['cpu_s']:.0f} s vs {ref['cpu_s']:.0f} s ({rerun['cpu_s'] / ref['cpu_s']:.2f}x; "
           f"the killed run spent {killed['wall_s']:.1f} s more, total {killed['wall_s'] + rerun['wall_s']:.1f} s); "
           f"shards and dead letters byte-identical to the scratch run: {same} ({len(rerun['shas'])} files); "
           f"the killed run's temporary output still there after the rerun: "
           + (", ".join(f"{p} ({v['bytes'] / 1e6:.0f} MB)" for p, v in after["tmp_siblings"].items()) or "none"))
    lines.append(row)
    print(row, flush=True)
    for r in (killed, rerun):
        r.pop("samples", None)
    save(f"{name}_kill", {"machine": describe(), "corpus": str(corpus), "kill_at": args.kill_at,
                          "reference": {k: v for k, v in ref.items() if k != "samples"}, "killed": killed,
                          "left_by_kill": left, "rerun": rerun, "left_after_rerun": after,
                          "byte_identical": same}, "\n".join(lines))
    if not args.keep_leftovers:
        for p in after["tmp_siblings"]:
            shutil.rmtree(p, ignore_errors=True)
        for p in list(left["new_temp_entries"]):  # what the killed run made there (not other programs')
            if "domainlm-progress-" in p or "beam-pipeline-temp" in p:
                shutil.rmtree(p, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--make", type=parse_size, metavar="SIZE", required=True,
                    help="corpus size: 20MB, 200MB, 2GB, ... (made once under bench/work/scale/, then reused)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthesized copies")
    ap.add_argument("--replace", type=float, default=0.1, help="share of words replaced in each copy")
    ap.add_argument("--run", action="store_true", help="run data shard on it, sampled")
    ap.add_argument("--kill-at", type=float, default=None, metavar="F",
                    help="the interruption test: SIGKILL at F x the reference's wall time, then rerun")
    ap.add_argument("--ref", default=None, help="with --kill-at: a shard_scale_NAME.json of an earlier --run "
                    "on the same corpus, instead of a reference run now")
    ap.add_argument("--keep-leftovers", action="store_true", help="keep what the killed run left on disk")
    ap.add_argument("--workers", type=int, default=2, help="DirectRunner worker processes (default 2)")
    ap.add_argument("--interval", type=float, default=0.25, help="seconds between RSS samples")
    ap.add_argument("--name", default=None, help="result name (default: the size, e.g. 200MB)")
    ap.add_argument("--shard-option", action="append", default=[], metavar="ARG",
                    help="an extra argument for data shard (repeat), e.g. --shard-option=--shard-bytes=64000000")
    ap.add_argument("--env", action="append", default=[], metavar="K=V",
                    help="an environment variable for the run (repeat), e.g. --env MALLOC_ARENA_MAX=2")
    args = ap.parse_args()
    corpus = make_corpus(args.make, args.seed, args.replace)
    name = args.name or size_name(args.make)
    if not (args.run or args.kill_at):
        return
    tok = shard_bench.tokenizer(shard_bench.pydoc_corpus())
    print(describe(), flush=True)
    if args.run:
        env = dict(kv.split("=", 1) for kv in args.env)
        r = run_once(corpus, tok, WORK / f"out_{name}", args.workers, args.interval, extra=args.shard_option, env=env)
        r["corpus"] = str(corpus)
        line = line_of(name, corpus, r)
        print(line, flush=True)
        path = save(name, {"machine": describe(), "corpus": str(corpus), "corpus_bytes": corpus.stat().st_size,
                           "run": r}, line)
        print(f"written to {path}")
    if args.kill_at:
        kill_test(args, corpus, tok, name)


if __name__ == "__main__":
    main()

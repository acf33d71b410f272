"""The Beam pipeline of `domainlm data shard`: its graph, its runner options, its progress.

    chunks - Read -+- docs --------------------------------------- Tokenize - GBK(split, shard) - Write
                   +- keys - GBK(kind, bucket) - Dedup -+- exact drops ---> |            |
                   |                                    +- dropped sizes -> | side       |
                   |                                    +- pairs ---+       | inputs     |
                   +- sigs ------------------------ AttachFirst <--+-----> | (by chunk) |
                   +- units (lines per chunk), sizes (estimated bytes) ---> |            |
                   +- dead, stats ----------------------------------------------------- Summary

Every element is a block of documents or an array of refs, so Beam's per-element cost stays
far below the tokenizing cost. The text moves once (Read to Tokenize, no shuffle); what is
grouped is small (hashes, band keys, candidate pairs, then the tokens by shard), and the small
results reach Tokenize as side inputs keyed by chunk (multimap side inputs are read per key, so
they need not fit in a worker's memory on a cluster). The manifest's numbers come from the
pipeline's own data (written as a small summary file the driver reads), not from runner
metrics, so they are the same on every runner and worker count.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import threading
import time
from pathlib import Path

from domainlm.progress import bars_enabled, human_bytes, human_count, log, progress
from domainlm.data.beam import worker as beam_worker
from domainlm.data.beam.read import Plan
from domainlm.data.beam.write import DEAD_LETTER, SUMMARY  # noqa: F401 (re-exported)
from domainlm.data.config import BeamArgs, ShardConfig
from domainlm.tokenizer.tokdir import DocumentEncoder

DIRECT = ("DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner", "FnApiRunner")


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def is_direct(b: BeamArgs) -> bool:
    return b.runner.split(".")[-1] in DIRECT


def direct_workers(b: BeamArgs) -> tuple[int, str]:
    n = b.direct_num_workers or available_cores()
    mode = b.direct_running_mode
    if mode == "auto":
        mode = "in_memory" if n == 1 else "multi_processing"
    return n, mode


def pipeline_flags(b: BeamArgs) -> list[str]:
    """The flags given to PipelineOptions: DirectRunner's workers, then the user's
    --beam.options unchanged (so they win)."""
    flags = [] if is_direct(b) else [f"--runner={b.runner}"]
    if is_direct(b):
        n, mode = direct_workers(b)
        # multi_processing is done by our own environment (make_runner), which Beam only
        # keeps under the in_memory mode name
        flags += [f"--direct_num_workers={n}",
                  f"--direct_running_mode={'in_memory' if mode == 'multi_processing' else mode}",
                  # the SDK workers log every bundle at INFO; warnings and errors still show
                  "--default_sdk_harness_log_level=WARNING"]
    for item in b.options:
        flags += shlex.split(item)
    return flags


def spill_directory(cfg: ShardConfig, root: str) -> str | None:
    """Where bulk bytes between stages go (beam_spill.py): a folder in the output when the
    DirectRunner's workers share this disk with it; None (the bytes travel as elements) else."""
    return os.path.join(root, ".spill") if is_direct(cfg.beam) and "://" not in root else None


def make_runner(b: BeamArgs, options):
    """The runner object: for DirectRunner, Beam's FnApiRunner, set up as DirectRunner sets it
    up for a batch pipeline, minus DirectRunner's first attempt to download and start the Prism
    runner from GitHub (a network call, and another engine, on every run). Worker processes run
    beam_worker.py, Beam's SDK worker with its start-up chatter filtered. Other runners: None
    (Beam makes them from --runner)."""
    if not is_direct(b):
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle
    from apache_beam.transforms import environments

    n, mode = direct_workers(b)
    env = None
    if mode == "multi_processing":
        env = environments.SubprocessSDKEnvironment.from_command_string(
            f"{shlex.quote(sys.executable)} -m domainlm.data.beam.worker")
    provision = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(
        pipeline_options=JobServiceHandle.encode_pipeline_options(options.get_all_options())))
    return fn_runner.FnApiRunner(default_environment=env, provision_info=provision)


def build(p, cfg: ShardConfig, plan: Plan, encoder: DocumentEncoder, dtype: str, bytes_per_token: float, root: str,
          progress_dir: str | None, spill_dir: str | None = None) -> None:
    """Add the pipeline's transforms to `p`; outputs go under `root`.

    Small global facts (line counts, split sizes, shard keys, counts) reach their consumers as
    AsList side inputs rather than through global combines: a combine costs two more stages
    of the FnApiRunner each, and Beam's fixed cost per stage is most of a small run's time.
    """
    import apache_beam as beam
    import numpy as np
    from apache_beam.pvalue import AsList, AsMultiMap

    KV = tuple[int, bytes]  # (chunk, pickled arrays): what multimap side inputs need to know

    from domainlm.data.beam.dedup import AttachFirst, DedupGroups
    from domainlm.data.beam.docs import ReadChunk
    from domainlm.data.beam.spill import Spill
    from domainlm.data.beam.write import Tokenize, WriteShard, write_summary

    spill = Spill(spill_dir)
    n_buckets = max(2, min(64, len(plan.chunks)))
    read = (p
            | "Chunks" >> beam.Create(list(range(len(plan.chunks))))  # reshuffled by Create
            | "Read" >> beam.ParDo(ReadChunk(cfg, plan, n_buckets, bytes_per_token, np.dtype(dtype).itemsize,
                                             progress_dir, spill)).with_outputs(
                "stats", "units", "dead", "keys", "sigs", "sizes", main="docs"))
    dedup = (read.keys
             | "GroupKeys" >> beam.GroupByKey()
             | "Dedup" >> beam.ParDo(DedupGroups(spill)).with_output_types(KV).with_outputs("pairs", "dropped",
                                                                                      main="exact"))
    candidates = (read.sigs
                  | "AttachFirst" >> beam.ParDo(AttachFirst(spill), AsMultiMap(dedup.pairs)).with_output_types(KV))
    tok = (read.docs
           # the blocks spread over the workers one by one (without it the DirectRunner hands
           # each worker the blocks one Read worker made, as they arrived in one buffer)
           | "Spread" >> beam.Reshuffle()
           | "Tokenize" >> beam.ParDo(Tokenize(cfg, plan, encoder, dtype, progress_dir, spill),
                                      AsMultiMap(dedup.exact), AsMultiMap(candidates), AsList(read.units),
                                      AsList(read.sizes), AsList(dedup.dropped))
           .with_outputs("stats", main="pieces"))
    shards = (tok.pieces
              | "GroupShards" >> beam.GroupByKey()
              | "Write" >> beam.ParDo(WriteShard(root, progress_dir, spill),
                                      AsList(tok.pieces | "ShardKeys" >> beam.Keys())))
    stats = (read.stats, tok.stats) | "AllStats" >> beam.Flatten()
    (p
     | "Once" >> beam.Create([None])
     | "Summary" >> beam.Map(write_summary, plan, root, AsList(stats), AsList(shards), AsList(read.dead),
                             AsList(read.units)))


def run(cfg: ShardConfig, plan: Plan, encoder: DocumentEncoder, dtype: str, bytes_per_token: float,
        root: str) -> dict:
    """Run the pipeline to the end; return the summary it wrote (read back and removed)."""
    import json

    beam_worker.install()  # before Beam's imports log their first warnings
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    flags = pipeline_flags(cfg.beam)
    options = PipelineOptions(flags)
    runner = make_runner(cfg.beam, options)
    if runner is not None:
        n, mode = direct_workers(cfg.beam)
        log.info("Beam: DirectRunner (FnApiRunner), %d worker%s (%s)", n, "s" * (n > 1), mode)
    else:
        log.info("Beam: %s", " ".join(flags))
    local = is_direct(cfg.beam) and "://" not in root
    spill_dir = spill_directory(cfg, root)
    if spill_dir:
        os.makedirs(spill_dir, exist_ok=True)
    with _Progress(plan, local) as prog:
        p = beam.Pipeline(runner=runner, options=options)
        build(p, cfg, plan, encoder, dtype, bytes_per_token, root, prog.directory, spill_dir)
        p.run().wait_until_finish()
    if spill_dir:
        shutil.rmtree(spill_dir)
    path = f"{root}/{SUMMARY}"
    with FileSystems.open(path, compression_type="uncompressed") as f:
        summary = json.loads(f.read().decode("utf-8"))
    FileSystems.delete([path])
    return summary


class _Progress:
    """Bars for reading (bytes), tokenizing (documents) and writing (shards), fed by the lines
    the workers append to files in a temporary directory; a heartbeat line every 30 s where
    bars are off. Only for runners on this machine."""

    def __init__(self, plan: Plan, local: bool):
        self.total = sum(c.nbytes for c in plan.chunks)
        self.local = local
        self.directory: str | None = None
        self.stop = threading.Event()

    def __enter__(self) -> "_Progress":
        import tempfile

        if self.local:
            self.tmp = tempfile.TemporaryDirectory(prefix="domainlm-progress-")
            self.directory = self.tmp.name
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.t0 = time.perf_counter()
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.directory:
            self.stop.set()
            self.thread.join()
            self.tmp.cleanup()

    def _totals(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for f in Path(self.directory).iterdir():
            try:
                text = f.read_text()
            except OSError:
                continue
            stage = f.name.split("-")[0]
            for line in text.splitlines():
                for kv in line.split():
                    k, _, v = kv.partition("=")
                    if v.isdigit():
                        totals[f"{stage}.{k}"] = totals.get(f"{stage}.{k}", 0) + int(v)
        return totals

    def _loop(self) -> None:
        bars = bars_enabled()
        read = progress(total=self.total or None, desc="read", unit="B", unit_scale=True) if bars else None
        tok = progress(desc="tokenize", unit=" tok", unit_scale=True) if bars else None
        last_log = time.perf_counter()
        seen = {}
        while not self.stop.wait(0.5):
            t = self._totals()
            if bars:
                read.update(t.get("read.bytes", 0) - read.n)
                tok.update(t.get("tokenize.tokens", 0) - tok.n)
                tok.set_postfix_str(f"{human_count(t.get('tokenize.documents', 0))} docs, "
                                    f"{t.get('write.shards', 0)} shards written", refresh=False)
            elif time.perf_counter() - last_log >= 30 and t != seen:
                last_log, seen = time.perf_counter(), t
                log.info("data shard: %.0fs, read %s of %s, tokenized %s documents (%s tokens), %d shards written",
                         time.perf_counter() - self.t0, human_bytes(t.get("read.bytes", 0)),
                         human_bytes(self.total), human_count(t.get("tokenize.documents", 0)),
                         human_count(t.get("tokenize.tokens", 0)), t.get("write.shards", 0))
        if bars:
            t = self._totals()
            read.update(t.get("read.bytes", 0) - read.n)
            tok.update(t.get("tokenize.tokens", 0) - tok.n)
            read.close()
            tok.close()

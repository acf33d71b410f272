"""The Beam pipeline of `domainlm data shard`: its graph, its runner options, its progress.

    chunks - Read -+- docs --------------------------------------- Tokenize - GBK(split, shard) - Write
                   +- keys - GBK(kind, bucket) - Dedup -+- exact drops ---> |            |
                   |                                    +- dropped sizes -> | side       |
                   |                                    +- pairs ---+       | inputs     |
                   +- sigs ------------------------ AttachFirst <--+-----> | (by chunk) |
                   +- units (lines per chunk), sizes (est. bytes, valid) -> |            |
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

import contextlib
import dataclasses
import os
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainlm.progress import bars_enabled, human_bytes, human_count, log, progress
from domainlm.data.beam import worker as beam_worker
from domainlm.data.beam.read import Plan
from domainlm.data.beam.write import DEAD_LETTER, SUMMARY  # noqa: F401 (re-exported)
from domainlm.data.config import BeamArgs, ShardConfig, runner_name
from domainlm.errors import UserError
from domainlm.tokenizer.tokdir import DocumentEncoder

DIRECT = ("DirectRunner", "SwitchingDirectRunner", "BundleBasedDirectRunner", "FnApiRunner")
DASK_CONNECT_TIMEOUT = 10
"""Seconds to wait for a dask scheduler to answer before the run is refused."""


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def is_direct(b: BeamArgs) -> bool:
    return b.runner.split(".")[-1] in DIRECT


def is_dask(b: BeamArgs) -> bool:
    return runner_name(b.runner) == "DaskRunner"


def dask_address(b: BeamArgs) -> str:
    """--beam.dask-address, or local:<cores> where it is not given."""
    return b.dask_address.strip() or f"local:{available_cores()}"


def dask_local_workers(b: BeamArgs) -> int:
    """N of a local:N dask cluster (whose workers share this disk); 0 for a remote scheduler."""
    address = dask_address(b)
    return int(address.split(":", 1)[1]) if address.startswith("local:") else 0


# Below this many input bytes the DirectRunner's automatic choice is one in-memory process (its
# tokenizer on every core): starting the worker processes costs more than they save there
# (bench/RESULTS.md, "fixed cost").
SMALL_INPUT_BYTES = 16_000_000


def direct_workers(b: BeamArgs) -> tuple[int, str]:
    n = b.direct_num_workers or available_cores()
    mode = b.direct_running_mode
    if mode == "auto":
        mode = "in_memory" if n == 1 else "multi_processing"
    return n, mode


def for_input_size(b: BeamArgs, input_bytes: int) -> tuple[BeamArgs, str]:
    """The DirectRunner's settings for an input of `input_bytes`: one in-memory process under
    SMALL_INPUT_BYTES where neither the workers nor the mode were given; (args, why) where
    that changed them, (b, "") else."""
    if (not is_direct(b) or b.direct_num_workers or b.direct_running_mode != "auto"
            or available_cores() == 1 or input_bytes >= SMALL_INPUT_BYTES):
        return b, ""
    why = (f"{human_bytes(input_bytes)} of input is under the {human_bytes(SMALL_INPUT_BYTES)} where worker "
           "processes start paying for themselves; --beam.direct-num-workers N to choose")
    return dataclasses.replace(b, direct_num_workers=1), why


def encode_threads(b: BeamArgs) -> int:
    """Tokenizer threads per batch: every core where one in-memory process does all the work,
    one where each core runs a worker."""
    return available_cores() if is_direct(b) and direct_workers(b)[1] == "in_memory" else 1


def pipeline_flags(b: BeamArgs) -> list[str]:
    """The flags given to PipelineOptions: DirectRunner's workers, then the user's
    --beam.options unchanged (so they win)."""
    flags = [] if is_direct(b) or is_dask(b) else [f"--runner={runner_name(b.runner)}"]
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


def check_options(b: BeamArgs) -> None:
    """--beam.runner and --beam.options, checked before any work: a runner Beam does not know, an
    option it does not know (Beam itself only warns and runs without it: a typo in --flink_master
    would run elsewhere than meant) and a value its parser refuses are one-line UserErrors."""
    import difflib
    import io

    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    if not (is_direct(b) or is_dask(b)):
        from apache_beam.runners.runner import create_runner

        try:
            create_runner(runner_name(b.runner))      # imports the runner's module: its options register
        except (ValueError, ImportError) as e:
            raise UserError(f"--beam.runner {b.runner}: {str(e).splitlines()[0]}") from None
    elif is_dask(b):
        with contextlib.suppress(ImportError):      # its DaskOptions (--dask_npartitions ...) register
            import apache_beam.runners.dask.dask_runner  # noqa: F401
    flags = pipeline_flags(b)
    parser = _BeamArgumentParser(allow_abbrev=False)
    for cls in PipelineOptions.__subclasses__():
        cls._add_argparse_args(parser)  # noqa: SLF001 - how PipelineOptions itself builds its parser
    known = sorted(o for a in parser._actions for o in a.option_strings)  # noqa: SLF001
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            _, unknown = parser.parse_known_args(flags)
    except SystemExit:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        why = next((line.split("error: ", 1)[1] for line in reversed(lines) if "error: " in line),
                   lines[-1] if lines else "refused by Beam's option parser")
        raise UserError(f"--beam.options: {why}") from None
    for arg in unknown:
        name = arg.split("=", 1)[0]
        if not name.startswith("-"):
            continue
        close = difflib.get_close_matches(name, known, n=1)
        raise UserError(f"--beam.options: Beam knows no option {name}" + (f" (did you mean {close[0]}?)" if close else "")
                        + f" for --beam.runner {b.runner}; see `python -m apache_beam.examples.wordcount --help` "
                        "for the options Beam takes")


def shares_disk(b: BeamArgs) -> bool:
    """Whether every worker certainly runs on this machine: the DirectRunner's, a local:N dask
    cluster's."""
    return is_direct(b) or (is_dask(b) and dask_local_workers(b) > 0)


def spill_directory(cfg: ShardConfig, root: str) -> str | None:
    """Where bulk bytes between stages go (beam_spill.py): a folder in the output when the
    workers certainly share this disk with it (DirectRunner, dask local:N); None (the bytes
    travel as elements) else."""
    return os.path.join(root, ".spill") if shares_disk(cfg.beam) and "://" not in root else None


@dataclass
class Session:
    """What a run needs from its engine, set up before anything is written: for dask, a
    connected client (and the local cluster it runs on, stopped when the session ends)."""

    client: Any = None
    address: str = ""
    workers: int = 0


@contextlib.contextmanager
def session(b: BeamArgs):
    """Check the runner can start, and start what it runs on, before any output is written:
    for dask a client of the scheduler (a refusal in one line when none answers) or of a
    LocalCluster of local:N; for Flink, the refusal where Beam would download its job server.
    The cluster and the client are closed on the way out, on errors and Ctrl-C too."""
    if is_dask(b):
        with _dask_client(b) as s:
            yield s
        return
    if runner_name(b.runner) == "FlinkRunner":
        check_flink(pipeline_flags(b))
    yield Session()


def flink_jar_name(flags: list[str] = ()) -> str:
    """The job server jar Beam would fetch for these flags (--flink_version, default the newest
    Flink that Beam publishes one for)."""
    from apache_beam.options.pipeline_options import FlinkRunnerOptions, PipelineOptions
    from apache_beam.version import __version__

    flink = PipelineOptions(list(flags)).view_as(FlinkRunnerOptions).flink_version
    return f"beam-runners-flink-{flink}-job-server-{__version__}.jar"


def check_flink(flags: list[str]) -> None:
    """Refuse a FlinkRunner run for which Beam would download the job server jar from Maven
    Central at run time: one needs --job_endpoint (a running job service) or
    --flink_job_server_jar naming a file here."""
    from apache_beam.options.pipeline_options import FlinkRunnerOptions, PipelineOptions, PortableOptions

    options = PipelineOptions(flags)
    if options.view_as(PortableOptions).job_endpoint:
        return
    jar = options.view_as(FlinkRunnerOptions).flink_job_server_jar
    if jar and os.path.isfile(jar):
        return
    name = flink_jar_name(flags)
    if jar:
        raise UserError(f"--flink_job_server_jar={jar}: no such file; download {name} (Maven: "
                        f"org.apache.beam:{name.rsplit('-', 1)[0]}:{name.rsplit('-', 1)[1][:-4]}) and give its path")
    raise UserError(f"--beam.runner flink needs the Flink job server, which Beam would download at run time; "
                    f"download {name} and pass --beam.options='--flink_job_server_jar=PATH' (with "
                    "--flink_master=HOST:8081 for a cluster), or give a running job service with "
                    "--beam.options='--job_endpoint=HOST:8099'")


def _unreachable(address: str, why: str) -> UserError:
    return UserError(f"no dask scheduler answers at {address} ({why}); start one there (`dask scheduler` on that "
                     f"host, then `dask worker {address}` on each worker host), or use --beam.dask-address "
                     "local:N for a local cluster of N worker processes")


def _reachable(address: str) -> None:
    """A TCP connection to HOST:PORT of a tcp:// or tls:// address within a few seconds (a refused
    or silent address is a one-line UserError at once, not dask's retries until its timeout)."""
    import socket
    from urllib.parse import urlsplit

    scheme = address.split("://", 1)[0]
    if scheme not in ("tcp", "tls"):
        return  # inproc://, ucx://, ...: left to dask
    try:
        parts = urlsplit(address)
        host, port = parts.hostname, parts.port or 8786
    except ValueError as e:
        raise UserError(f"beam.dask_address {address!r}: {e}; give tcp://HOST:PORT") from None
    try:
        socket.create_connection((host, port), timeout=min(5, DASK_CONNECT_TIMEOUT)).close()
    except OSError as e:
        raise _unreachable(address, e.strerror or type(e).__name__) from None


@contextlib.contextmanager
def _dask_client(b: BeamArgs):
    import logging

    beam_worker.install()
    try:
        import distributed
    except ImportError:
        raise UserError("--beam.runner dask needs dask.distributed; install domainlm with the dask extra: "
                        "pip install -e '.[dask]' (or pip install 'dask[distributed]')") from None
    address = dask_address(b)
    n = dask_local_workers(b)
    quiet = logging.getLogger("distributed")
    level = quiet.level
    with contextlib.ExitStack() as stack:
        # dask logs every worker's start and stop at INFO; warnings and errors still show
        quiet.setLevel(max(logging.WARNING, level))
        stack.callback(quiet.setLevel, level)
        if n:
            cluster = stack.enter_context(distributed.LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                silence_logs=logging.WARNING, worker_class=distributed.Nanny,
                preload=["domainlm.data.beam.worker"]))
            target = cluster.scheduler_address
        else:
            target = address
            _reachable(address)
        try:
            client = distributed.Client(target, timeout=DASK_CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            raise _unreachable(address, f"no dask handshake within {DASK_CONNECT_TIMEOUT}s: "
                                        f"{str(e).splitlines()[0][:120] if str(e) else type(e).__name__}") from None
        except Exception as e:  # something answers, but not dask's protocol
            raise _unreachable(address, f"what answers there is not a dask scheduler: {type(e).__name__}") from None
        stack.enter_context(client)
        workers = len(client.scheduler_info()["workers"]) if not n else n
        if not n and not workers:
            log.warning("dask scheduler %s has no workers yet; the run waits for some to join", address)
        yield Session(client, address, workers)


def make_runner(b: BeamArgs, options, client=None):
    """The runner object: for DirectRunner, Beam's FnApiRunner, set up as DirectRunner sets it
    up for a batch pipeline, minus DirectRunner's first attempt to download and start the Prism
    runner from GitHub (a network call, and another engine, on every run). Worker processes run
    beam_worker.py, Beam's SDK worker with its start-up chatter filtered. For dask, `DaskRunner`
    below on the session's client. Other runners: None (Beam makes them from --runner)."""
    if is_dask(b):
        return dask_runner_class()(client)
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


# -- Beam on dask ------------------------------------------------------------------------------
#
# Beam's own DaskRunner (apache_beam.runners.dask, 2.77) translates a pipeline into dask bags
# but cannot run this one: it computes only the bag of the last transform visited (other
# branches never run), hands every output of a multi-output ParDo to each consumer of any of
# them, drops what a DoFn emits in finish_bundle, and evaluates a side input by computing its
# bag again inside every task that reads it. `dask_runner_class()` keeps its options
# (DaskOptions: --dask_npartitions, ...) and its result object and translates the graph anew:
# a bag per PCollection (the outputs of a ParDo split by tag from one computed bag), side
# inputs as graph dependencies (computed once, passed whole to the tasks that read them),
# GroupByKey as a task shuffle on a process-independent hash of the key, and every leaf
# computed. Elements are WindowedValues in the global window (the only windowing here).


def _dofn_tasks(items, spec: bytes, label: str, views: list, *sides):
    """One bundle (a bag partition) through a DoFn: [(tag, WindowedValue)] of its outputs."""
    from apache_beam.internal import pickler
    from apache_beam.runners.common import DoFnContext, DoFnInvoker, DoFnSignature, Receiver, _OutputHandler
    from apache_beam.transforms.core import DoFn
    from apache_beam.transforms.sideinputs import SideInputMap
    from apache_beam.transforms.window import GlobalWindows

    fn, args, kwargs = pickler.loads(spec)  # a DoFn of its own per bundle, as Beam's DaskRunner
    out: list = []

    class Tagged(Receiver):
        def __init__(self, tag):
            self.tag = tag

        def receive(self, windowed_value):
            out.append((self.tag, windowed_value))

    class ByTag(dict):
        def __missing__(self, tag):
            self[tag] = Tagged(tag)
            return self[tag]

    receivers = ByTag()
    handler = _OutputHandler(window_fn=GlobalWindows(), main_receivers=receivers[None],
                             tagged_receivers=receivers, per_element_output_counter=None,
                             output_batch_converter=None, process_yields_batches=False,
                             process_batch_yields_elements=False)
    side_maps = [SideInputMap(view, options, values) for (view, options), values in zip(views, sides)]
    invoker = DoFnInvoker.create_invoker(
        DoFnSignature(fn), handler, context=DoFnContext(label, state=None), side_inputs=side_maps,
        input_args=args, input_kwargs=kwargs, user_state_context=None,
        bundle_finalizer_param=DoFn.BundleFinalizerParam())
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(item)
    invoker.invoke_finish_bundle()
    invoker.invoke_teardown()
    return out


def _select(pairs, tag) -> list:
    return [wv for t, wv in pairs if t == tag]


def _concat(*parts) -> list:
    return [x for part in parts for x in part]


def _stable_hash(wv) -> int:
    """A hash of an element's key that is the same in every process (Python's hash of a str is
    salted per process, and the shuffle hashes in many)."""
    import hashlib
    import pickle

    return int.from_bytes(hashlib.blake2b(pickle.dumps(wv.value[0], protocol=4), digest_size=8).digest(), "little")


def _regroup(groups) -> list:
    """(hash, [WindowedValue((key, value))]) groups -> WindowedValue((key, [values])), keys
    that share a hash apart."""
    from apache_beam.transforms.window import GlobalWindow
    from apache_beam.utils.timestamp import MIN_TIMESTAMP
    from apache_beam.utils.windowed_value import WindowedValue

    out = []
    for _, members in groups:
        by_key: dict = {}
        for wv in members:
            k, v = wv.value
            by_key.setdefault(k, []).append(v)
        out += [WindowedValue((k, vs), MIN_TIMESTAMP, (GlobalWindow(),)) for k, vs in by_key.items()]
    return out


def _nothing(_) -> list:
    return []


def _task_name(label: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_]+", "_", label).strip("_") or "step"


def dask_runner_class():
    """The runner class (made on first use: it imports dask and Beam's DaskRunner)."""
    global _DASK_RUNNER
    if _DASK_RUNNER is not None:
        return _DASK_RUNNER
    import apache_beam as beam
    import dask.bag as db
    from apache_beam.internal import pickler
    from apache_beam.pipeline import PipelineVisitor
    from apache_beam.runners.dask.dask_runner import DaskOptions, DaskRunner, DaskRunnerResult
    from apache_beam.runners.dask.overrides import _Create, _Flatten, _Reshuffle, dask_overrides
    from apache_beam.transforms.window import GlobalWindow, GlobalWindows
    from apache_beam.utils.timestamp import MIN_TIMESTAMP
    from apache_beam.utils.windowed_value import WindowedValue
    from dask import delayed

    class Translate(PipelineVisitor):
        def __init__(self, bag_kwargs: dict):
            self.bag_kwargs = bag_kwargs
            self.bags: dict = {}  # PCollection -> bag of WindowedValues
            self.consumed: set = set()

        def visit_transform(self, node) -> None:
            t = node.transform
            name = _task_name(node.full_label)
            mains = [pc for pc in node.inputs if isinstance(pc, beam.pvalue.PCollection)]
            self.consumed.update(mains)
            self.consumed.update(si.pvalue for si in node.side_inputs)
            for pc in mains:
                if not isinstance(pc.windowing.windowfn, GlobalWindows):
                    raise NotImplementedError(f"{node.full_label}: domainlm's dask runner runs only the "
                                              "global window")
            if isinstance(t, _Create):
                values = [WindowedValue(v, MIN_TIMESTAMP, (GlobalWindow(),)) for v in t.values]
                kw = self.bag_kwargs or {"npartitions": max(1, len(values))}  # one task per element
                bag = db.from_sequence(values, **kw)
            elif isinstance(t, (_Reshuffle,)):
                bag = self.bags[mains[0]]
            elif isinstance(t, _Flatten):
                bag = db.concat([self.bags[pc] for pc in mains])
            elif isinstance(t, beam.GroupByKey):
                bag = (self.bags[mains[0]]
                       .groupby(_stable_hash, shuffle="tasks")
                       .map_partitions(_regroup, token=name))
            elif isinstance(t, beam.ParDo):
                args, kwargs = t.raw_side_inputs
                spec = delayed(pickler.dumps((t.fn, list(args), kwargs)), pure=True)
                views = [(type(si), si._view_options()) for si in node.side_inputs]
                sides = [delayed(_concat, pure=True)(*self.bags[si.pvalue].to_delayed(optimize_graph=False))
                         for si in node.side_inputs]
                raw = self.bags[mains[0]].map_partitions(_dofn_tasks, spec, node.full_label, views, *sides,
                                                         token=name)
                for pc in node.outputs.values():
                    self.bags[pc] = raw.map_partitions(_select, pc.tag, token=f"{name}-{pc.tag}")
                return
            else:
                raise NotImplementedError(f"domainlm's dask runner does not run {type(t).__name__} "
                                          f"({node.full_label})")
            for pc in node.outputs.values():
                self.bags[pc] = bag

    class Runner(DaskRunner):
        """Beam's DaskRunner with the translation above, on a given dask client."""

        def __init__(self, client):
            super().__init__()
            self.client = client

        def run_pipeline(self, pipeline, options):
            dask_options = options.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True)
            bag_kwargs = DaskOptions._extract_bag_kwargs(dask_options)
            pipeline.replace_all([o for o in dask_overrides()
                                  if type(o).__name__ in ("CreateOverride", "ReshuffleOverride", "FlattenOverride")])
            visitor = Translate(bag_kwargs)
            pipeline.visit(visitor)
            leaves = [bag.map_partitions(_nothing) for pc, bag in visitor.bags.items() if pc not in visitor.consumed]
            futures = self.client.compute(leaves)
            return DaskRunnerResult(self.client, futures)

    _DASK_RUNNER = Runner
    return Runner


_DASK_RUNNER = None


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
        root: str, sess: Session | None = None) -> dict:
    """Run the pipeline to the end; return the summary it wrote (read back and removed).
    `sess`: from `session(cfg.beam)`, opened by the caller before it made the output directory
    (one is opened here where it is not given)."""
    if sess is None:
        with session(cfg.beam) as sess:
            return run(cfg, plan, encoder, dtype, bytes_per_token, root, sess)
    import json

    beam_worker.install()  # before Beam's imports log their first warnings
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    flags = pipeline_flags(cfg.beam)
    options = PipelineOptions(flags)
    runner = make_runner(cfg.beam, options, sess.client)
    if is_dask(cfg.beam):
        log.info("Beam: dask at %s, %d worker%s", sess.address, sess.workers, "s" * (sess.workers != 1))
    elif runner is not None:
        n, mode = direct_workers(cfg.beam)
        log.info("Beam: DirectRunner (FnApiRunner), %d worker%s (%s)", n, "s" * (n > 1), mode)
    else:
        log.info("Beam: %s", " ".join(flags))
    local = shares_disk(cfg.beam) and "://" not in root
    spill_dir = spill_directory(cfg, root)
    if spill_dir:
        os.makedirs(spill_dir, exist_ok=True)
    with _Progress(plan, local) as prog:
        p = beam.Pipeline(runner=runner, options=options)
        build(p, cfg, plan, encoder, dtype, bytes_per_token, root, prog.directory, spill_dir)
        if is_dask(cfg.beam):
            _wait_dask(p.run(), sess)
        else:
            p.run().wait_until_finish()
    if spill_dir:
        shutil.rmtree(spill_dir)
    path = f"{root}/{SUMMARY}"
    with FileSystems.open(path, compression_type="uncompressed") as f:
        summary = json.loads(f.read().decode("utf-8"))
    FileSystems.delete([path])
    return summary


def _wait_dask(result, sess: Session) -> None:
    """Wait for a dask run; a worker lost for good or a lost scheduler is one line (the output
    directory is then removed by the caller). Cancelled on the way out if it did not finish
    (an error, Ctrl-C), so a shared scheduler drops the run's tasks."""
    import distributed

    try:
        result.wait_until_finish()
    except distributed.KilledWorker as e:
        task, worker, allowed = (list(e.args) + [None, None, None])[:3]
        address = getattr(worker, "address", worker)
        tries = f"{allowed + 1} worker{'s' * (allowed > 0)}" if isinstance(allowed, int) else "its workers"
        raise UserError(f"dask worker {address} died while running task {task!r} (it died on {tries}, the "
                        "limit set by distributed.scheduler.allowed-failures); see that worker's log (out of "
                        "memory?); nothing was written") from None
    except (distributed.client.FutureCancelledError, distributed.comm.CommClosedError) as e:
        raise UserError(f"lost the dask scheduler at {sess.address} during the run ({type(e).__name__}: "
                        f"{str(e)[:200]}); nothing was written") from None
    finally:
        if result.state != "DONE":
            with contextlib.suppress(Exception):
                sess.client.cancel(result.futures, force=True)


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

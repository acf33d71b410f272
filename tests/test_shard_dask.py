"""`domainlm data shard --beam.runner dask` (and the Flink refusal).

The crafted corpus of test_shard.py (pydoc documents, duplicates, malformed records) is sharded
with the DirectRunner (2 workers) and on dask: a local cluster of 2 worker processes that the
command starts itself (`local:2`, blocks through spill files), then a cluster the test starts
(`tcp://`, blocks as elements) with one of its workers SIGKILLed while the Tokenize stage runs.
Every run must write the same bytes, manifest and dead letters included. With
distributed.scheduler.allowed-failures 0 the same kill fails the run in one line naming the
lost worker, with nothing written.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.test_shard import Corpus, _args, _files

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, pydoc_corpus) -> Corpus:
    return Corpus(tmp_path_factory.mktemp("dask-corpus") / "corpus", pydoc_corpus)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dask-runs")


def _shard(corpus, tokenizer_dir, out: Path, *extra) -> int:
    from domainlm.cli import main

    return main([str(a) for a in _args(corpus, tokenizer_dir, out, "--beam.chunk-bytes", "16384", *extra)])


@pytest.fixture(scope="module")
def direct(base, corpus, tokenizer_dir) -> Path:
    """The DirectRunner's output (2 workers), written to base/shards (as every run here, so the
    manifests record the same path) and moved aside."""
    assert _shard(corpus, tokenizer_dir, base / "shards", "--beam.direct-num-workers", "2") == 0
    return (base / "shards").rename(base / "direct")


@pytest.fixture(scope="module")
def cluster():
    """A dask cluster of 2 worker processes (1 thread each, nanny-restarted) and a client."""
    import distributed

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=40) as c, distributed.Client(c.scheduler_address) as client:
        yield c, client


def _same_output(a: Path, b: Path) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    assert any(k.startswith("train/shard-") for k in fa) and "dead_letter.jsonl" in fa
    for name in fa:
        assert fa[name] == fb[name], f"{name} differs"


# The one-line refusals run before the module's cluster exists: its scheduler lives in this process,
# and a line it logs while another test captures stderr would land in that test's output.
def test_unreachable_scheduler_is_refused_before_anything_is_written(tmp_path, corpus, tokenizer_dir, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    t0 = time.perf_counter()
    code, _, err = run_cli(_args(corpus, tokenizer_dir, out, "--beam.runner", "dask",
                                 "--beam.dask-address", f"tcp://127.0.0.1:{port}"), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"tcp://127.0.0.1:{port}" in lines[0] and "dask scheduler" in lines[0] and "local:N" in lines[0]
    assert time.perf_counter() - t0 < 10
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_dask_address_is_checked(tmp_path, corpus, tokenizer_dir, capsys):
    out = tmp_path / "out"
    for extra, words in ((["--beam.dask-address", "local:2"], "--beam.runner dask"),
                         (["--beam.runner", "dask", "--beam.dask-address", "local:0"], "local:N"),
                         (["--beam.runner", "dask", "--beam.dask-address", "myhost"], "tcp://HOST:8786")):
        code, _, err = run_cli(_args(corpus, tokenizer_dir, out, *extra), capsys)
        assert code == 2 and words in err and "Traceback" not in err, err
    assert not out.exists()


def test_flink_without_its_job_server_is_refused_before_anything_is_written(tmp_path, corpus, tokenizer_dir,
                                                                          capsys):
    from domainlm.data.beam.pipeline import check_flink, flink_jar_name

    out = tmp_path / "out"
    jar = flink_jar_name()
    assert jar.startswith("beam-runners-flink-") and "-job-server-" in jar and jar.endswith(".jar")
    code, _, err = run_cli(_args(corpus, tokenizer_dir, out, "--beam.runner", "flink"), capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert jar in lines[0] and "--flink_job_server_jar=PATH" in lines[0] and "--job_endpoint" in lines[0]
    code, _, err = run_cli(_args(corpus, tokenizer_dir, out, "--beam.runner", "FlinkRunner",
                                 f"--beam.options=--flink_job_server_jar={tmp_path / 'missing.jar'}"), capsys)
    assert code == 2 and "missing.jar: no such file" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    # what passes the check (the run itself would then need Flink): a jar here, or a job service
    (tmp_path / "server.jar").write_bytes(b"")
    check_flink([f"--flink_job_server_jar={tmp_path / 'server.jar'}", "--flink_master=host:8081"])
    check_flink(["--job_endpoint=host:8099"])
    assert "flink-1.19-" in flink_jar_name(["--flink_version=1.19"])


def test_local_cluster_writes_the_direct_runners_bytes(base, direct, corpus, tokenizer_dir):
    t0 = time.perf_counter()
    assert _shard(corpus, tokenizer_dir, base / "shards", "--beam.runner", "dask",
                  "--beam.dask-address", "local:2") == 0
    out = (base / "shards").rename(base / "dask-local")
    _same_output(direct, out)  # shards, dead letters and manifest (counts by reason), byte for byte
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["beam"] == {}  # how it ran is not what it made
    for reason, n in corpus.malformed.items():
        assert m["dropped"][reason] == n, reason
    assert m["dropped"]["duplicate_exact"] >= 1 and m["dropped"]["duplicate_near"] >= 1
    dead = [json.loads(x) for x in (out / "dead_letter.jsonl").read_text().splitlines()]
    assert len(dead) == m["counts"]["dead_letters"] == sum(corpus.malformed.values())
    assert not list(base.glob(".shards*"))  # no stage or spill directory left behind
    print(f"dask local:2 run {time.perf_counter() - t0:.1f}s")


def _run_killing_a_worker(cluster, args: list[str]) -> tuple[int, str, str]:
    """Run `domainlm ARGS` in a thread and SIGKILL the worker process that holds a Tokenize
    task as soon as one is seen (its PID from client.run(os.getpid)); returns (exit code, the
    killed worker's address, stderr's last line)."""
    import io
    from contextlib import redirect_stderr

    from domainlm.cli import main

    c, client = cluster
    client.wait_for_workers(2, timeout=60)
    pids = client.run(os.getpid)
    result, err = {}, io.StringIO()

    def go():
        with redirect_stderr(err):
            result["code"] = main([str(a) for a in args])

    thread = threading.Thread(target=go)
    thread.start()
    killed = ""
    while thread.is_alive() and not killed:
        for worker, keys in client.processing().items():
            if worker in pids and any("Tokenize" in str(k) for k in keys):
                os.kill(pids[worker], signal.SIGKILL)
                killed = worker
                break
        time.sleep(0.005)
    thread.join()
    assert killed, "the run ended before a Tokenize task was seen on a worker"
    lines = err.getvalue().strip().splitlines()
    return result["code"], killed, lines[-1] if lines else ""


def test_a_killed_worker_is_replaced_and_the_bytes_are_the_same(base, direct, corpus, tokenizer_dir, cluster):
    """The nanny restarts the killed worker and the scheduler reruns the tasks it held and the
    results it had (Read's too): the run completes with the DirectRunner's bytes. The blocks
    travel as elements here (a tcp:// scheduler: no spill files)."""
    c, _ = cluster
    code, killed, last = _run_killing_a_worker(cluster, _args(
        corpus, tokenizer_dir, base / "shards", "--beam.chunk-bytes", "16384", "--beam.runner", "DaskRunner",
        "--beam.dask-address", c.scheduler_address))
    assert code == 0, last
    _same_output(direct, (base / "shards").rename(base / "dask-killed"))


def test_a_worker_lost_for_good_fails_in_one_line_with_nothing_written(base, corpus, tokenizer_dir, cluster):
    c, _ = cluster
    old = c.scheduler.allowed_failures
    c.scheduler.allowed_failures = 0  # no retry on another worker: the first death fails the run
    try:
        out = base / "lost"
        code, killed, last = _run_killing_a_worker(cluster, _args(
            corpus, tokenizer_dir, out, "--beam.chunk-bytes", "16384", "--beam.runner", "dask",
            "--beam.dask-address", c.scheduler_address))
    finally:
        c.scheduler.allowed_failures = old
    assert code == 2 and last.startswith("domainlm data shard: error: dask worker"), last
    # the line names the worker and the task that was running there (a Tokenize task was held, but
    # the one executing when the process died may be another stage's)
    assert killed in last and "nothing was written" in last
    assert not out.exists() and not list(base.glob(".lost*"))


def test_runner_names_and_flags():
    from domainlm.data.beam.pipeline import dask_local_workers, pipeline_flags, spill_directory
    from domainlm.data.config import BeamArgs, ShardConfig, runner_name

    assert runner_name("dask") == runner_name("DaskRunner") == "DaskRunner"
    assert runner_name("flink") == runner_name("FlinkRunner") == "FlinkRunner"
    assert runner_name("DirectRunner") == "DirectRunner" and runner_name("SparkRunner") == "SparkRunner"
    assert pipeline_flags(BeamArgs(runner="flink")) == ["--runner=FlinkRunner"]
    assert pipeline_flags(BeamArgs(runner="dask", options=["--dask_npartitions=8"])) == ["--dask_npartitions=8"]
    cfg = lambda addr: ShardConfig(input=["x"], tokenizer="t", output="o",  # noqa: E731
                                   beam=BeamArgs(runner="dask", dask_address=addr))
    assert dask_local_workers(cfg("local:3").beam) == 3 and dask_local_workers(cfg("").beam) >= 1
    # the spill files only where the workers certainly share this disk
    assert spill_directory(cfg("local:3"), "/tmp/out") == "/tmp/out/.spill"
    assert spill_directory(cfg("tcp://host:8786"), "/tmp/out") is None


def test_a_runner_or_option_beam_does_not_know_is_one_line_before_any_work(corpus, tokenizer_dir, tmp_path,
                                                                           capsys):
    """Beam itself raises on an unknown runner after the inputs are read, only warns on an unknown
    option (and runs without it) and prints its whole usage for a bad value: each is one line here."""
    out = tmp_path / "out"
    cases = [(("--beam.runner", "Bogus"), ["--beam.runner Bogus", "Valid values are", "DirectRunner"]),
             (("--beam.options=--direct_num_workers=abc",), ["--direct_num_workers", "invalid int value: 'abc'"]),
             (("--beam.runner", "FlinkRunner", "--beam.options=--flink_mastr=jm:8081"),
              ["no option --flink_mastr", "did you mean --flink_master?"]),
             (("--beam.options=--foo=bar",), ["no option --foo", "DirectRunner"])]
    for extra, needles in cases:
        code, _, err = run_cli(_args(corpus, tokenizer_dir, out, *extra), capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        for n in needles:
            assert n in lines[0], (n, lines[0])
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    from domainlm.data.beam.pipeline import check_options
    from domainlm.data.config import BeamArgs

    check_options(BeamArgs(runner="dask", options=["--dask_npartitions=8"]))   # the runner's own options pass
    check_options(BeamArgs(runner="FlinkRunner", options=["--flink_master=jm:8081 --parallelism=4"]))

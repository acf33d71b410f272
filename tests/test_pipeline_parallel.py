"""Pipeline, virtual pipeline and sequence parallelism of `domainlm pretrain` on CPU (gloo).

megatron-core's own schedules (1F1B, interleaved 1F1B) and p2p exchange run on CPU ranks through the
stand-ins of pretrain/cpu_compat.py; every layout must train the losses of one process: PP=2,
PP=2 x DP=2, PP=2 with 2 virtual chunks per stage, TP=2 with sequence parallelism. A PP=2 run
killed with SIGKILL resumes to the uninterrupted losses; PP=2 and virtual-pipeline checkpoints
resume under PP=1 and TP=2, and --init-from loads into virtual chunks. Bad layouts are refused
in one line before compute.

The model is the tiny size with 4 layers (so PP=2 x VPP=2 gives one layer per chunk), fp32, a
learning rate high enough that the loss moves. Losses are compared to LOSS_ABS (the same ~8.0
nats to 1e-5; observed: 0 for PP and VPP, <1e-6 for TP/SP, whose all-reduces round differently)
and grad norms (summed over every stage and TP rank) to GNORM_REL. One PP=1 reference run serves
most comparisons (module-scoped fixtures).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from domainlm.launch.command import worker_pids
from tests.conftest import run_cli
from tests.test_pretrain import args as pretrain_args
from tests.test_pretrain import torchrun as pretrain_torchrun
from tests.test_pretrain import shards  # noqa: F401 (fixture: the same token shards)

STEPS = 10
COMMON = ["--model.size", "tiny", "--model.num-layers", "4", "--train.seq-len", "32", "--train.micro-batch-size", "2",
          "--train.global-batch-size", "4", "--train.max-steps", str(STEPS), "--train.precision", "fp32",
          "--optim.lr", "3e-3", "--optim.min-lr", "3e-4", "--schedule.warmup-steps", "2",
          "--eval.every", "5", "--eval.batches", "2", "--log.every", "1", "--log.tensorboard", "false",
          "--data.num-workers", "0", "--checkpoint.keep-last", "0", "--checkpoint.save-every", "5"]
LOSS_ABS = 1e-5
GNORM_REL = 1e-4


def args(tokenizer_dir, shards, ckpt, *extra) -> list[str]:
    return pretrain_args(tokenizer_dir, shards, ckpt, *extra, common=COMMON)


def records(ckpt: Path, kind: str = "train") -> dict[int, dict]:
    """step -> the last record of that kind in DIR/logs/metrics.jsonl (a resumed step's wins)."""
    out = {}
    for line in (ckpt / "logs" / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == kind:
            out[rec["step"]] = rec
    return out


def assert_same_run(ref: Path, got: Path, steps=range(1, STEPS + 1)) -> float:
    """Training losses and grad norms of `got` equal `ref`'s on `steps` (validation losses too,
    where both have them); returns the largest loss difference."""
    a, b = records(ref), records(got)
    assert sorted(b) == list(steps), sorted(b)
    diff = max(abs(a[s]["loss"] - b[s]["loss"]) for s in steps)
    assert diff <= LOSS_ABS, [(s, a[s]["loss"], b[s]["loss"]) for s in steps]
    for s in steps:
        assert b[s]["grad_norm"] == pytest.approx(a[s]["grad_norm"], rel=GNORM_REL), s
    va, vb = records(ref, "eval"), records(got, "eval")
    for s in set(va) & set(vb):
        assert abs(va[s]["val_loss"] - vb[s]["val_loss"]) <= LOSS_ABS, s
    return diff


def torchrun(cli_args: list[str], *, nproc: int, log: Path) -> subprocess.Popen:
    """test_pretrain's torchrun with a standalone rendezvous (a free port per run)."""
    return pretrain_torchrun(cli_args, nproc=nproc, extra=["--standalone"], log=log)


def _wait_gone(pid: int, timeout: float = 30) -> None:
    """Until process `pid` has exited (gone, or a zombie not yet reaped)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except OSError:
            return
        time.sleep(0.02)
    raise AssertionError(f"rank {pid} outlived SIGKILL")


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    """Wait for a torchrun started by `torchrun`; its output (it must exit 0)."""
    code = proc.wait(timeout=timeout)
    assert code == 0, log.read_text()[-3000:]
    return log.read_text()


def run_ranks(cli_args: list[str], *, nproc: int, log: Path) -> str:
    return finish(torchrun(cli_args, nproc=nproc, log=log), log)


def resume_at(src: Path, dst: Path, step: int) -> Path:
    """A copy of checkpoint dir `src` whose `latest` is iter_{step} (later ones and the metrics dropped)."""
    shutil.copytree(src, dst)
    for d in dst.glob("iter_*"):
        if int(d.name[5:]) > step:
            shutil.rmtree(d)
    (dst / "latest").write_text(f"iter_{step:07d}\n")
    (dst / "logs/metrics.jsonl").unlink()
    return dst


# -- shared runs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tokenizer_dir, shards, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """The shared runs, at once (the machine's cores are idle through much of each run's start):
    'ref' PP=1 in this process, the losses every layout must give; 'pp2' PP=2 over 2 ranks;
    'vpp' PP=2 x 2 virtual chunks per stage (the interleaved schedule, one layer per chunk).
    Checkpoints at steps 5 and 10."""
    root = tmp_path_factory.mktemp("runs")
    started = {
        "pp2": torchrun(args(tokenizer_dir, shards, root / "pp2", "--parallel.pipeline", 2), nproc=2,
                        log=root / "pp2.log"),
        "vpp": torchrun(args(tokenizer_dir, shards, root / "vpp", "--parallel.pipeline", 2,
                             "--parallel.virtual-pipeline", 2), nproc=2, log=root / "vpp.log"),
    }
    assert _run_in_process(args(tokenizer_dir, shards, root / "ref")) == 0
    out = {name: (root / name, finish(proc, root / f"{name}.log")) for name, proc in started.items()}
    return {"ref": (root / "ref", ""), **out}


@pytest.fixture(scope="module")
def reference(runs) -> Path:
    return runs["ref"][0]


@pytest.fixture(scope="module")
def pp2(runs) -> tuple[Path, str]:
    return runs["pp2"]


@pytest.fixture(scope="module")
def vpp(runs) -> tuple[Path, str]:
    return runs["vpp"]


def _run_in_process(cli_args: list[str]) -> int:
    from domainlm.cli import main

    return main([str(a) for a in cli_args])


# -- equal losses ---------------------------------------------------------------------------


def test_pp2_gives_the_losses_of_pp1(reference, pp2):
    ckpt, out = pp2
    assert "TP=1 PP=2 DP=1, 2 micro-batches of 2 per step" in out
    assert_same_run(reference, ckpt)
    # The summary (rank 0, the first stage) reports the last stage's loss.
    last = records(reference)[STEPS]["loss"]
    assert f"-> {last:.4f}" in out


def test_virtual_pipeline_gives_the_losses_of_pp1(reference, vpp):
    ckpt, out = vpp
    assert "TP=1 PP=2 DP=1 VPP=2" in out
    assert_same_run(reference, ckpt)
    # The chunks (model0, model1 in the state dict, as Megatron-LM names them) save their layers
    # in global coordinates: one tensor per weight, the 4 layers of both stages' 2 chunks stacked.
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(ckpt / "iter_0000010")).read_metadata().state_dict_metadata
    assert meta["decoder.layers.self_attention.linear_qkv.weight"].size[0] == 4
    assert "model0" not in meta and "embedding.word_embeddings.weight" in meta and "output_layer.weight" in meta


def test_pp2_dp2_gives_the_losses_of_one_process_with_the_same_global_batch(tokenizer_dir, shards, tmp_path):
    """4 ranks: 2 pipeline stages x 2 data-parallel replicas, 1 micro-batch each; one process
    reading the same windows (DP rank 0's, then DP rank 1's) in 2 micro-batches gives the losses."""
    from domainlm.config import load_config
    from domainlm.pretrain.config import PretrainConfig
    from domainlm.pretrain.loader import TokenWindowLoader
    from domainlm.pretrain.trainer import Trainer

    ckpt, log = tmp_path / "pp2dp2", tmp_path / "log"
    proc = torchrun(args(tokenizer_dir, shards, ckpt, "--parallel.pipeline", 2, "--eval.every", 0), nproc=4, log=log)

    overrides = {"tokenizer": str(tokenizer_dir), "data.shards": [str(shards)], "checkpoint.dir": str(tmp_path / "ref"),
                 **{k.lstrip("-").replace("-", "_"): v for k, v in zip(COMMON[::2], COMMON[1::2])},
                 "eval.every": "0"}
    trainer = Trainer(load_config(PretrainConfig, None, overrides))
    try:
        trainer.setup()
        assert trainer.num_micro == 2
        t = trainer.cfg.train
        ranks = [iter(TokenWindowLoader(trainer.cfg.data, split="train", seq_len=t.seq_len,
                                        micro_batch_size=t.micro_batch_size, dp_rank=r, dp_size=2)) for r in range(2)]
        trainer.train_iter = (next(ranks[i % 2]) for i in range(10**9))
        trainer.train()
        ref = {h["step"]: h for h in trainer.history}
    finally:
        trainer.close()
    assert "TP=1 PP=2 DP=2, 1 micro-batches of 2 per step" in finish(proc, log)
    got = records(ckpt)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert max(abs(ref[s]["loss"] - got[s]["loss"]) for s in got) <= LOSS_ABS
    for s in got:
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=GNORM_REL)


def test_sequence_parallel_gives_the_losses_of_tp2_and_tp1(reference, tokenizer_dir, shards, tmp_path):
    sp, tp2 = tmp_path / "sp", tmp_path / "tp2"
    procs = [torchrun(args(tokenizer_dir, shards, sp, "--parallel.tensor", 2, "--parallel.sequence-parallel", "true"),
                      nproc=2, log=tmp_path / "sp.log"),
             torchrun(args(tokenizer_dir, shards, tp2, "--parallel.tensor", 2), nproc=2, log=tmp_path / "tp2.log")]
    assert "TP=2 PP=1 DP=1 SP" in finish(procs[0], tmp_path / "sp.log")
    assert "TP=2 PP=1 DP=1," in finish(procs[1], tmp_path / "tp2.log")
    assert_same_run(tp2, sp)
    assert_same_run(reference, sp)


# -- kill and resume, resharding --------------------------------------------------------------


def test_pp2_killed_after_a_checkpoint_resumes_to_the_uninterrupted_losses(reference, tokenizer_dir, shards,
                                                                          tmp_path):
    ckpt, log = tmp_path / "killed", tmp_path / "killed.log"
    cli = args(tokenizer_dir, shards, ckpt, "--parallel.pipeline", 2, "--checkpoint.save-every", 3)
    proc = torchrun(cli, nproc=2, log=log)
    deadline = time.time() + 240
    while not (ckpt / "latest").is_file():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    ranks = worker_pids(proc.pid)              # torchrun starts each rank in a session of its own
    assert len(ranks) == 2
    for pid in ranks:                         # both ranks mid-run, no chance to save, with the processes
        os.killpg(pid, signal.SIGKILL)        # they spawned (their process groups), then torchrun
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    for pid in ranks:
        _wait_gone(pid)
    stopped_at = int((ckpt / "latest").read_text().strip()[5:])
    assert stopped_at < STEPS, "the run finished before the kill landed"
    assert "domainlm pretrain" not in log.read_text()     # no summary: it did not finish
    out = run_ranks(cli, nproc=2, log=tmp_path / "resumed.log")
    assert f"resumed from iter_{stopped_at:07d}" in out
    assert_same_run(reference, ckpt)


def test_pp2_checkpoint_resumes_under_pp1_and_tp2(reference, pp2, tokenizer_dir, shards, tmp_path):
    ckpt, _ = pp2
    pp1, tp2 = resume_at(ckpt, tmp_path / "pp1", 5), resume_at(ckpt, tmp_path / "tp2", 5)
    proc = torchrun(args(tokenizer_dir, shards, tp2, "--parallel.tensor", 2), nproc=2, log=tmp_path / "tp2.log")
    assert _run_in_process(args(tokenizer_dir, shards, pp1)) == 0
    assert "resumed from iter_0000005 (layout {'tensor': 1, 'pipeline': 2" in finish(proc, tmp_path / "tp2.log")
    assert_same_run(reference, pp1, steps=range(6, STEPS + 1))
    assert_same_run(reference, tp2, steps=range(6, STEPS + 1))


def test_virtual_pipeline_checkpoint_resumes_under_pp1(reference, vpp, tokenizer_dir, shards, tmp_path):
    ckpt, _ = vpp
    pp1 = resume_at(ckpt, tmp_path / "pp1", 5)
    assert _run_in_process(args(tokenizer_dir, shards, pp1)) == 0
    assert_same_run(reference, pp1, steps=range(6, STEPS + 1))


def test_init_from_loads_into_virtual_pipeline_chunks(reference, tokenizer_dir, shards, tmp_path):
    """--init-from a PP=1 run: the 2 x 2 chunks read their layers from it in one load and train
    the losses of a PP=1 run started from the same weights."""
    vpp, pp1 = tmp_path / "vpp", tmp_path / "pp1"
    short = ["--init-from", reference, "--train.max-steps", 3, "--eval.every", 0]
    proc = torchrun(args(tokenizer_dir, shards, vpp, "--parallel.pipeline", 2, "--parallel.virtual-pipeline", 2,
                         *short), nproc=2, log=tmp_path / "vpp.log")
    assert _run_in_process(args(tokenizer_dir, shards, pp1, *short)) == 0
    assert "initialized the weights from" in finish(proc, tmp_path / "vpp.log")
    assert_same_run(pp1, vpp, steps=range(1, 4))
    assert records(vpp)[1]["loss"] < records(reference)[1]["loss"] - 0.2     # trained weights, not a fresh init


# -- refusals: one line, exit 2, before any compute --------------------------------------------


BAD = {
    "pp_layers": (["--parallel.pipeline", "3"], "parallel.pipeline=3 does not divide model.num_layers=4"),
    "vpp_without_pp": (["--parallel.virtual-pipeline", "2"],
                       "parallel.virtual_pipeline=2 needs parallel.pipeline > 1 (it interleaves chunks of the "
                       "pipeline stages); set parallel.pipeline to 2 or more, or parallel.virtual_pipeline=1"),
    "vpp_layers": (["--parallel.pipeline", "2", "--parallel.virtual-pipeline", "4"],
                   "parallel.pipeline x parallel.virtual_pipeline = 2 x 4 does not divide model.num_layers=4"),
    "vpp_micro": (["--parallel.pipeline", "2", "--parallel.virtual-pipeline", "2", "--train.global-batch-size", "6"],
                  "= 3, to be a multiple of parallel.pipeline=2; make train.global_batch_size a multiple of 4"),
    "vpp_eval": (["--parallel.pipeline", "2", "--parallel.virtual-pipeline", "2", "--eval.batches", "3"],
                 "eval.batches=3 is not one: use 2"),
    "vpp_zero": (["--parallel.virtual-pipeline", "0"], "parallel.virtual_pipeline must be >= 1"),
    "sp_tp1": (["--parallel.sequence-parallel", "true"], "parallel.sequence_parallel needs parallel.tensor > 1"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_layout_is_refused_before_compute(case, tokenizer_dir, shards, tmp_path, capsys, monkeypatch):
    import torch.distributed as dist

    extra, message = BAD[case]
    # As torchrun sets it for 2 processes: every layout above fits 2 ranks but for what is named.
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_cli(args(tokenizer_dir, shards, tmp_path / "ck", *extra), capsys)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "ck").exists() and not dist.is_initialized()

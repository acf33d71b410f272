"""`domainlm pretrain` on a GPU: megatron-core's own DDP, optimizers and schedules against the CPU
stand-ins of pretrain/cpu_compat.py, the distributed optimizer's resume, and one CLI run with the
Triton kernels through a kill, a resume and the HF export. Skipped (with the reason) where CUDA is
absent; bench/gpu_check.sh runs them on a GPU machine.

Inputs: the session's tokenizer and shards (tests/conftest.py), or, where DOMAINLM_GPU_INPUTS
names a dir (bench/gpu_inputs.py builds it on a CPU machine: GPU machines lack what builds them),
its tokenizer/ and shards/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli
from tests.test_pretrain import args, losses, shards  # noqa: F401 (fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def inputs(request) -> tuple[Path, Path]:
    prebuilt = os.environ.get("DOMAINLM_GPU_INPUTS")
    if prebuilt:
        return Path(prebuilt) / "tokenizer", Path(prebuilt) / "shards"
    return request.getfixturevalue("tokenizer_dir"), request.getfixturevalue("shards")


def test_cpu_checkpoint_continues_on_gpu_with_the_same_losses(inputs, tmp_path, capsys):
    """fp32 on both: the CPU run's checkpoint at step 3, resumed on the GPU with megatron's DDP and
    FP32Optimizer, gives the CPU run's losses for steps 4-6 (TF32 off). The RNG streams were
    drawn on the CPU: the resume says so and re-seeds the GPU's."""
    tok, data = inputs
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    code, _, err = run_cli(args(tok, data, cpu, "--train.max-steps", 6, "--checkpoint.save-every", 3,
                                "--train.device", "cpu"), capsys)
    assert code == 0, err
    shutil.copytree(cpu, gpu)
    shutil.rmtree(gpu / "iter_0000006")
    (gpu / "latest").write_text("iter_0000003\n")
    (gpu / "logs/metrics.jsonl").unlink()
    code, _, err = run_cli(args(tok, data, gpu, "--train.max-steps", 6, "--train.device", "cuda",
                                "--train.precision", "fp32", "--parallel.distributed-optimizer", "false"), capsys)
    assert code == 0, err
    assert "saved on cpu and this run is on cuda" in err
    a, b = losses(cpu), losses(gpu)
    assert sorted(b) == [4, 5, 6]
    assert max(abs(a[s] - b[s]) for s in b) <= 1e-4


def test_bf16_distributed_optimizer_trains_and_resumes_exactly(inputs, tmp_path, capsys):
    tok, data = inputs
    full, split = tmp_path / "full", tmp_path / "split"
    common = ("--train.device", "cuda", "--train.precision", "bf16", "--optim.lr", 3e-3)
    code, _, err = run_cli(args(tok, data, full, "--train.max-steps", 20, *common), capsys)
    assert code == 0, err
    a = losses(full)
    assert a[20] < a[1] - 1.0
    code, _, err = run_cli(args(tok, data, split, "--train.max-steps", 20, "--checkpoint.save-every", 10,
                                *common), capsys)
    assert code == 0, err
    shutil.rmtree(split / "iter_0000020")
    (split / "latest").write_text("iter_0000010\n")
    code, _, err = run_cli(args(tok, data, split, "--train.max-steps", 20, *common), capsys)
    assert code == 0, err
    b = losses(split)
    assert max(abs(a[s] - b[s]) for s in range(11, 21)) <= 1e-3   # GPU kernels are not bitwise deterministic


def test_distributed_optimizer_resume_counts_each_step_once(inputs, tmp_path):
    """The GPU default optimizer (megatron's DistributedOptimizer; torch AdamW where neither TE nor
    Apex is installed): after a resume every parameter has its own Adam step, equal to the step."""
    from domainlm.config import load_config
    from domainlm.pretrain import optimizer
    from domainlm.pretrain.config import PretrainConfig
    from domainlm.pretrain.trainer import Trainer

    tok, data = inputs
    overrides = {"tokenizer": str(tok), "data.shards": [str(data)], "checkpoint.dir": str(tmp_path / "ck"),
                 "model.size": "tiny", "train.seq_len": "32", "train.micro_batch_size": "2",
                 "train.global_batch_size": "4", "train.max_steps": "10", "schedule.warmup_steps": "2",
                 "eval.every": "0", "log.tensorboard": "false", "data.num_workers": "0",
                 "train.device": "cuda", "train.precision": "bf16"}

    def trainer() -> Trainer:
        t = Trainer(load_config(PretrainConfig, None, overrides))
        t.setup()
        return t

    t = trainer()
    try:
        inner = optimizer.parts(t.optimizer)[0]
        kind = type(inner).__name__
        for _ in range(3):
            t.train_step()
        t.save()
    finally:
        t.close()
    t = trainer()
    try:
        assert t.step == 3
        if optimizer.torch_adam_inside():
            assert kind == "TorchAdamDistributedOptimizer"
            steps = optimizer.adam_steps(t.optimizer)
            assert steps and set(steps) == {3.0}
            t.train_step()
            assert set(optimizer.adam_steps(t.optimizer)) == {4.0}
        else:   # FusedAdam keeps one step in its param groups: megatron's own path, unchanged
            assert kind == "DistributedOptimizer"
            t.train_step()
    finally:
        t.close()


def test_triton_cli_run_killed_resumed_and_exported(inputs, tmp_path, capsys):
    """`--model.kernels triton`, bf16, validation on: SIGTERM mid-run saves a checkpoint; the rerun
    resumes it with the uninterrupted run's losses; `convert to-hf --dtype bf16` of it verifies."""
    tok, data = inputs
    run = ("--model.size", "125M", "--train.seq-len", "512", "--train.micro-batch-size", "4",
           "--train.global-batch-size", "8", "--train.max-steps", "24", "--model.kernels", "triton",
           "--train.precision", "bf16", "--eval.every", "8", "--eval.batches", "2", "--optim.lr", "1e-3")
    from domainlm.pretrain import kernels

    full, killed = tmp_path / "full", tmp_path / "killed"
    kernels._SAID.clear()   # the kernel choice is logged once per process; this test reads it
    code, _, err = run_cli(args(tok, data, full, *run), capsys)
    assert code == 0, err
    assert "kernels: triton (compiled for" in err
    log = tmp_path / "killed.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "domainlm.cli", *args(tok, data, killed, *run)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=REPO, env=env)
    metrics = killed / "logs/metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and sum('"train"' in x for x in metrics.read_text().splitlines()) >= 10):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    stopped = int((killed / "latest").read_text().strip()[5:])
    assert 10 <= stopped < 24 and "stopped by SIGTERM" in log.read_text()
    code, _, err = run_cli(args(tok, data, killed, *run), capsys)
    assert code == 0, err
    a, b = losses(full), losses(killed)
    assert sorted(b) == list(range(1, 25))
    # GPU kernels (flash attention's backward) are not bitwise deterministic, so two runs need not
    # agree exactly; a resume that lost optimizer, schedule or data state is off by far more (the
    # CPU test of the same resume holds 1e-6).
    assert max(abs(a[s] - b[s]) for s in range(stopped + 1, 25)) <= 5e-3
    evals = lambda d: {r["step"]: r["val_loss"] for r in map(json.loads, (d / "logs/metrics.jsonl").read_text().splitlines())
                       if r["kind"] == "eval"}  # noqa: E731
    va, vb = evals(full), evals(killed)
    assert sorted(va) == [0, 8, 16, 24] and abs(va[24] - vb[24]) <= 5e-3
    out = tmp_path / "hf"
    code, _, err = run_cli(["convert", "to-hf", "--checkpoint", str(killed), "--output", str(out), "--dtype", "bf16"],
                           capsys)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and manifest["dtype"] == "bfloat16"
    assert manifest["source"]["iteration"] == 24

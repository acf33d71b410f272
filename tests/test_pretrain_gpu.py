"""`domainlm pretrain` on a GPU: megatron-core's own DDP, optimizers and schedules against the CPU
stand-ins of pretrain/cpu_compat.py. Skipped (with the reason) where CUDA is absent."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.conftest import run_cli
from tests.test_pretrain import args, losses, shards  # noqa: F401 (fixture)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cpu_checkpoint_continues_on_gpu_with_the_same_losses(tokenizer_dir, shards, tmp_path, capsys):  # noqa: F811
    """fp32 on both: the CPU run's checkpoint at step 3, resumed on the GPU with megatron's DDP and
    FP32Optimizer, gives the CPU run's losses for steps 4-6 (TF32 off)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu, gpu = tmp_path / "cpu", tmp_path / "gpu"
    code, _, err = run_cli(args(tokenizer_dir, shards, cpu, "--train.max-steps", 6, "--checkpoint.save-every", 3,
                                "--train.device", "cpu"), capsys)
    assert code == 0, err
    shutil.copytree(cpu, gpu)
    shutil.rmtree(gpu / "iter_0000006")
    (gpu / "latest").write_text("iter_0000003\n")
    (gpu / "logs/metrics.jsonl").unlink()
    code, _, err = run_cli(args(tokenizer_dir, shards, gpu, "--train.max-steps", 6, "--train.device", "cuda",
                                "--train.precision", "fp32", "--parallel.distributed-optimizer", "false"), capsys)
    assert code == 0, err
    a, b = losses(cpu), losses(gpu)
    assert sorted(b) == [4, 5, 6]
    assert max(abs(a[s] - b[s]) for s in b) <= 1e-4


def test_bf16_distributed_optimizer_trains_and_resumes_exactly(tokenizer_dir, shards, tmp_path, capsys):  # noqa: F811
    full, split = tmp_path / "full", tmp_path / "split"
    common = ("--train.device", "cuda", "--train.precision", "bf16", "--optim.lr", 3e-3)
    code, _, err = run_cli(args(tokenizer_dir, shards, full, "--train.max-steps", 20, *common), capsys)
    assert code == 0, err
    a = losses(full)
    assert a[20] < a[1] - 1.0
    code, _, err = run_cli(args(tokenizer_dir, shards, split, "--train.max-steps", 20, "--checkpoint.save-every", 10,
                                *common), capsys)
    assert code == 0, err
    shutil.rmtree(split / "iter_0000020")
    (split / "latest").write_text("iter_0000010\n")
    code, _, err = run_cli(args(tokenizer_dir, shards, split, "--train.max-steps", 20, *common), capsys)
    assert code == 0, err
    b = losses(split)
    assert max(abs(a[s] - b[s]) for s in range(11, 21)) <= 1e-3   # GPU kernels are not bitwise deterministic

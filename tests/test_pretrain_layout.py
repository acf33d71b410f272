"""Layout checks of GPU runs that need no GPU to test: sequence parallelism's seq_len % TP (a megatron
assert at the first forward otherwise) and CUDA_DEVICE_MAX_CONNECTIONS for tensor parallelism."""

from __future__ import annotations

import logging

import pytest

from domainlm.errors import UserError


def _cfg(**sections):
    from domainlm.config import load_config
    from domainlm.pretrain.config import PretrainConfig

    overrides = {"model.size": "125M", "train.micro_batch_size": "1", "train.global_batch_size": "8", **sections}
    return load_config(PretrainConfig, None, overrides)


def test_sequence_parallel_needs_seq_len_divisible_by_tp():
    cfg = _cfg(**{"parallel.tensor": "4", "parallel.sequence_parallel": "true", "train.seq_len": "2050"})
    with pytest.raises(UserError) as e:
        cfg.check_layout(8, "cuda")
    msg = str(e.value)
    assert "train.seq_len=2050 is not a multiple of it" in msg and "parallel.tensor=4" in msg and "2052" in msg
    assert len(msg.splitlines()) == 1
    assert _cfg(**{"parallel.tensor": "4", "parallel.sequence_parallel": "true",
                   "train.seq_len": "2048"}).check_layout(8, "cuda") == 2
    # Without sequence parallelism the sequence is not split: any length.
    assert _cfg(**{"parallel.tensor": "4", "train.seq_len": "2050"}).check_layout(8, "cuda") == 2


def test_tensor_parallel_gpu_runs_get_one_cuda_connection(caplog):
    from domainlm.pretrain.trainer import cuda_connections

    tp2, tp1 = _cfg(**{"parallel.tensor": "2"}), _cfg()
    env: dict[str, str] = {}
    cuda_connections(tp2, "cuda", env)
    assert env == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    for cfg, device in ((tp1, "cuda"), (tp2, "cpu")):
        env = {}
        cuda_connections(cfg, device, env)
        assert env == {}       # TP=1 keeps CUDA's default (more queues overlap data-parallel comms)
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}
    with caplog.at_level(logging.WARNING):
        cuda_connections(tp2, "cuda", env)
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "8" and "CUDA_DEVICE_MAX_CONNECTIONS=8" in caplog.text

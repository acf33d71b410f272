"""RNG streams of a pretraining rank: the CPU stand-in stays out of GPU runs, and a checkpoint's
streams record the device they were drawn on.

Without CUDA the GPU seeding is run with torch.cuda.get_rng_state answered by the CPU generator
(the one call of megatron's CudaRNGStatesTracker that needs a device; torch queues the others
until CUDA starts), which is enough to see which tracker class and hooks megatron ends up with.
"""

from __future__ import annotations

import socket

import pytest
import torch


@pytest.fixture
def world():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from domainlm.pretrain import cpu_compat

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        cpu_compat.restore_megatron_rng()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_cpu_stand_in_does_not_leak_into_the_gpu_seeding(world, monkeypatch):
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as mp_random

    from domainlm.pretrain import cpu_compat, rng

    megatron_hooks = (mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state())

    # A CPU run in this process installs the stand-in; what megatron's own seeding then does.
    rng.seed(5, "cpu")
    assert cpu_compat.cpu_rng_installed()
    assert isinstance(mp_random.get_cuda_rng_tracker(), cpu_compat.CpuRNGStatesTracker)
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    assert isinstance(mp_random.get_cuda_rng_tracker(), cpu_compat.CpuRNGStatesTracker), \
        "megatron returns early onto an installed tracker (why the stand-in must be taken out)"

    # The trainer's close takes it out again ...
    rng.close("cpu")
    assert not cpu_compat.cpu_rng_installed() and not mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED
    assert (mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state) == megatron_hooks

    # ... and the GPU seeding builds megatron's own tracker even when a CPU run left it installed.
    rng.seed(5, "cpu")
    rng.seed(5, "cuda")
    tracker = mp_random.get_cuda_rng_tracker()
    assert type(tracker) is mp_random.CudaRNGStatesTracker
    assert (mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state) == megatron_hooks
    tp_rank = 0
    assert tracker.seeds_ == {5, 5 + 2718 + tp_rank, 5 + 1024}   # the TP stream differs per TP rank


def test_saved_streams_carry_their_device_and_a_mismatch_is_converted(world):
    from megatron.core.tensor_parallel import random as mp_random

    from domainlm.pretrain import rng

    cpu = torch.device("cpu")
    rng.seed(11, "cpu")
    saved = rng.rank_state(cpu)
    assert saved["rng_device"] == "cpu" and saved["rng_cuda"] is None
    with mp_random.get_cuda_rng_tracker().fork():
        expected_tp = torch.rand(4)
    expected_cpu = torch.rand(4)

    # Same device: every stream continues exactly.
    rng.seed(99, "cpu")
    assert rng.restore(saved, cpu, seed_value=11, step=3) is None
    with mp_random.get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), expected_tp)
    assert torch.equal(torch.rand(4), expected_cpu)

    # Streams drawn on a GPU (a CUDA generator state is 16 bytes) resumed on the CPU: the CPU
    # generator continues, the tracker is re-seeded from seed + step, with a message.
    from_gpu = {**saved, "rng_device": "cuda", "rng_cuda": torch.zeros(16, dtype=torch.uint8),
                "rng_tracker": {k: torch.zeros(16, dtype=torch.uint8) for k in saved["rng_tracker"]}}
    message = rng.restore(from_gpu, cpu, seed_value=11, step=3)
    assert message and "saved on cuda and this run is on cpu" in message and "seed 14" in message
    assert torch.equal(torch.rand(4), expected_cpu)
    with mp_random.get_cuda_rng_tracker().fork():   # a usable CPU stream, not the GPU bytes
        torch.rand(4)
    assert mp_random.get_cuda_rng_tracker().seeds_ == {14, 14 + 2718, 14 + 1024}

    # Checkpoints written before the device was recorded: told apart by the CUDA generator state.
    legacy = {k: v for k, v in from_gpu.items() if k != "rng_device"}
    assert rng.saved_device(legacy) == "cuda"
    assert rng.saved_device({**legacy, "rng_cuda": None}) == "cpu"

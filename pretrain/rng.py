"""Random number streams of a pretraining rank: seeding, what a checkpoint records, resuming them.

A rank draws from three places: torch's CPU generator, the CUDA generator (GPU runs), and
megatron's RNG tracker (named streams that tensor-parallel init, dropout and activation
recomputation fork into). GPU runs seed megatron's own tracker; CPU runs install the stand-in of
cpu_compat.py, which keeps the same streams on the CPU generator. A checkpoint records each
rank's states *and the device they were drawn on*: a CPU generator state (mt19937, 5056 bytes)
and a CUDA one (Philox, 16 bytes) are not interchangeable, and loading one into the other's
tracker either fails at the first fork or draws from garbage.
"""

from __future__ import annotations

import torch


def seed(seed: int, device_type: str) -> None:
    """Seed every stream of this rank (parallel_state must be initialized)."""
    from domainlm.pretrain import cpu_compat

    if device_type == "cpu":
        cpu_compat.model_parallel_manual_seed(seed)
        return
    from megatron.core import tensor_parallel

    # A CPU run earlier in this process may have left its stand-in in megatron's module: take
    # it out, and have megatron build a fresh tracker of its own class (force_reset_rng), so
    # each TP rank gets its own init stream on the CUDA generator.
    cpu_compat.restore_megatron_rng()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def close(device_type: str) -> None:
    """At the end of a run: take the CPU stand-in out of megatron again."""
    if device_type == "cpu":
        from domainlm.pretrain import cpu_compat

        cpu_compat.restore_megatron_rng()


def rank_state(device: torch.device) -> dict:
    """What a checkpoint keeps of this rank's streams (tensors on the CPU)."""
    from megatron.core.tensor_parallel import random as mp_random

    return {"rng_device": device.type,
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None,
            "rng_tracker": {k: v.cpu() for k, v in mp_random.get_cuda_rng_tracker().get_states().items()}}


def saved_device(saved: dict) -> str:
    """The device a rank's saved streams were drawn on. Checkpoints written before the device
    was recorded are told apart by the CUDA generator state, saved only by GPU runs."""
    return saved.get("rng_device") or ("cuda" if saved.get("rng_cuda") is not None else "cpu")


def restore(saved: dict, device: torch.device, *, seed_value: int, step: int) -> str | None:
    """Resume this rank's streams from `saved`; returns a warning when they cannot be resumed.

    Same device: every stream continues exactly. Another device: the CPU generator continues
    (it is the same generator on both), and the CUDA generator and megatron's tracker are
    re-seeded from seed + step (a state of one generator kind cannot seed the other; + step
    keeps the new streams from replaying the first steps'). The Llama model has no dropout, so
    the losses are the same either way; only random draws inside the model would differ.
    """
    from megatron.core.tensor_parallel import random as mp_random

    torch.set_rng_state(saved["rng_cpu"])
    was = saved_device(saved)
    if was == device.type:
        if device.type == "cuda" and saved.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(saved["rng_cuda"])
        mp_random.get_cuda_rng_tracker().set_states(dict(saved["rng_tracker"]))
        return None
    cpu_state = torch.get_rng_state()
    seed(seed_value + step, device.type)
    torch.set_rng_state(cpu_state)
    return (f"the checkpoint's RNG streams were saved on {was} and this run is on {device.type}: the "
            f"CPU generator continues, the {device.type} generator and megatron's RNG tracker are "
            f"re-seeded (seed {seed_value + step}); losses are unaffected (the model has no dropout)")

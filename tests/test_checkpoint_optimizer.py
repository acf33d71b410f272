"""The GPU default optimizer -- megatron-core's DistributedOptimizer over torch AdamW (no Transformer
Engine, no Apex) -- saved and resumed through domainlm's checkpoint code, run on the CPU.

megatron's DDP and DistributedOptimizer allocate with device='cuda' and check tensor types named
'torch.cuda.*'; `gpu_code_on_cpu` points those at the CPU for the test only (a TorchFunctionMode),
so megatron's own classes run their real bookkeeping (grad buffers, shards, state dicts) on gloo.
What it cannot show (NCCL, CUDA kernels) the GPU check covers (tests/test_pretrain_gpu.py).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

# megatron's DDP reads .grad of its buffers' views, torch DCP announces its ShardedTensor API's end.
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf",
                                        "ignore:Please use DTensor instead", "ignore::DeprecationWarning")


class _CudaOnCpu(TorchFunctionMode):
    """device='cuda' (or a CUDA index) -> 'cpu'; Tensor.cuda() -> the tensor; Tensor.type() of a
    CPU tensor reads as its 'torch.cuda.*' name, which megatron's optimizer checks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        device = kwargs.get("device")
        if device is not None and (isinstance(device, int) or str(device).startswith("cuda")):
            kwargs["device"] = "cpu"
        name = getattr(func, "__name__", "")
        if name == "cuda":
            return args[0]
        if name == "type" and len(args) == 1 and not kwargs:
            t = func(*args)
            return t if t.startswith("torch.cuda.") else t.replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


@pytest.fixture
def gpu_code_on_cpu(monkeypatch):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from domainlm.pretrain import cpu_compat

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        with _CudaOnCpu():
            yield
    finally:
        cpu_compat.restore_megatron_rng()
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _build(fixed: bool = True):
    """The tiny model in megatron's DDP with the distributed optimizer, as the GPU trainer builds
    them (fp32 here: the bug is in the optimizer's bookkeeping, not in the precision)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from domainlm.pretrain import cpu_compat, optimizer
    from domainlm.pretrain.config import ModelArgs, OptimArgs, resolve_model
    from domainlm.pretrain.model import build_model, transformer_config

    cpu_compat.model_parallel_manual_seed(7)
    m = resolve_model(ModelArgs(size="tiny"))
    config = transformer_config(m, cpu=True)
    model = build_model(m, config, vocab_size=256, seq_len=16)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=True), model)
    if fixed:
        opt = optimizer.build(OptimArgs(lr=3e-3), bf16=False, distributed=True, cpu=False, model_chunks=[ddp])
    else:
        opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=3e-3, use_distributed_optimizer=True,
                                                     clip_grad=1.0), [ddp])
    return model, ddp, opt


def _batches(n: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 17), generator=g) for _ in range(n)]


def _train(ddp, opt, batches) -> list[float]:
    """Optimizer steps; the loss of each, averaged over the data-parallel ranks."""
    import torch.distributed as dist

    out = []
    for b in batches:
        ddp.zero_grad_buffer()
        opt.zero_grad()
        pos = torch.arange(16)[None].expand(b.shape[0], 16)
        loss = ddp(b[:, :-1], pos, None, labels=b[:, 1:]).float().mean()
        loss.backward()
        ddp.finish_grad_sync()
        ok, _, _ = opt.step()
        assert ok
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        out.append(mean.item() / dist.get_world_size())
    return out


def _state(model, opt, loading: bool) -> dict:
    from domainlm.pretrain import optimizer

    model_sd = model.sharded_state_dict()
    return {"model": model_sd, "optimizer": optimizer.sharded_state_dict(opt, model_sd, loading=loading)}


def test_megatron_distributed_optimizer_over_torch_adamw_resumes_exactly(gpu_code_on_cpu, tmp_path):
    from megatron.core.optimizer import USING_PYTORCH_OPTIMIZER

    from domainlm.pretrain import checkpoint, optimizer

    assert USING_PYTORCH_OPTIMIZER and optimizer.torch_adam_inside()   # this venv has no TE/Apex
    # megatron's own class, as get_megatron_optimizer builds it: a resume fails at the first call.
    model, _, opt = _build(fixed=False)
    with pytest.raises(AssertionError):
        opt.sharded_state_dict(model.sharded_state_dict(), is_loading=True,
                               metadata=dict(optimizer.SHARDING_METADATA))

    batches = _batches(6)
    model, ddp, opt = _build()
    assert type(optimizer.parts(opt)[0]).__name__ == "TorchAdamDistributedOptimizer"
    full = _train(ddp, opt, batches)
    full_moments = [s["exp_avg_sq"].clone() for s in optimizer.parts(opt)[0].optimizer.state.values()]

    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"stage": "pretrain"}))
    model, ddp, opt = _build()
    first = _train(ddp, opt, batches[:3])
    checkpoint.save(root, 3, _state(model, opt, loading=False), keep_last=0)
    assert checkpoint.verify(root / "iter_0000003") == []

    model, ddp, opt = _build()           # a fresh process: empty AdamW state before the load
    state = checkpoint.load(root, 3, _state(model, opt, loading=True))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    steps = [s["step"] for s in optimizer.parts(opt)[0].optimizer.state.values()]
    assert len({id(t) for t in steps}) == len(steps) > 10          # one step tensor per parameter
    assert optimizer.adam_steps(opt) == [3.0] * len(steps)
    rest = _train(ddp, opt, batches[3:])
    # The same losses and moments as the uninterrupted run, and the step counted once per step
    # (megatron's shared tensor would read 3 + 3 x len(steps) here).
    assert first + rest == pytest.approx(full, abs=1e-6)
    assert optimizer.adam_steps(opt) == [6.0] * len(steps)
    moments = [s["exp_avg_sq"] for s in optimizer.parts(opt)[0].optimizer.state.values()]
    for a, b in zip(moments, full_moments):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


def _dp2_worker(rank: int, port: int, root: str, queue) -> None:
    """One of two data-parallel ranks: 3 steps, a save, 2 more steps (the uninterrupted run)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from domainlm.pretrain import checkpoint

    torch.cuda.current_device = lambda: "cpu"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    parallel_state.initialize_model_parallel(1, 1)
    try:
        with _CudaOnCpu():
            model, ddp, opt = _build()
            mine = _batches(5, seed=10 + rank)      # each rank its own micro-batches
            first = _train(ddp, opt, mine[:3])
            checkpoint.save(Path(root), 3, _state(model, opt, loading=False), keep_last=0)
            rest = _train(ddp, opt, mine[3:])
        queue.put((rank, first + rest))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_a_dp2_distributed_optimizer_checkpoint_resumes_at_dp1(gpu_code_on_cpu, tmp_path):
    """Saved by two data-parallel ranks (each holding half the optimizer state; megatron gathers it
    on DP rank 0 in the fully reshardable format), loaded by one: the next steps on both ranks'
    micro-batches give the two ranks' losses (DP=2 averages the ranks' gradients; one rank
    averaging the four samples computes the same update)."""
    import torch.multiprocessing as mp

    from domainlm.pretrain import checkpoint, optimizer

    root = tmp_path / "ckpt"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"stage": "pretrain"}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_dp2_worker, args=(r, port, str(root), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]                   # both ranks report the global mean loss
    assert checkpoint.verify(root / "iter_0000003") == []

    model, ddp, opt = _build()
    state = checkpoint.load(root, 3, _state(model, opt, loading=True))
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    both = [torch.cat(pair) for pair in zip(_batches(5, seed=10), _batches(5, seed=11))]
    rest = _train(ddp, opt, both[3:])
    assert rest == pytest.approx(results[0][3:], abs=1e-5)
    assert set(optimizer.adam_steps(opt)) == {5.0}

"""Every CPU stand-in for megatron-core's hard-coded CUDA, in one place.

megatron-core 0.16 assumes CUDA in a few calls the CPU path (gloo, tests, laptops) goes through.
Each stand-in below names the megatron call it replaces, says why, and keeps its math, so the CPU
and GPU paths compute the same thing (tests/test_pretrain_gpu.py compares them where a GPU is):

    CpuRotaryEmbedding        RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device()
    model_parallel_manual_seed  tensor_parallel.model_parallel_cuda_manual_seed / its RNG tracker
                              use torch.cuda RNG states (also used by activation recomputation);
                              installed for CPU runs only and taken out by restore_megatron_rng
    forward_backward_no_pipelining  schedules.forward_backward_no_pipelining counts tokens in a
                              tensor made with device="cuda"
    megatron_steps_on_cpu     around megatron's own pipeline schedules
                              (forward_backward_pipelining_without_interleaving and _with_interleaving)
                              and every forward/backward of a CPU run: (1) the schedules' token
                              counter, torch.zeros(..., device="cuda"), is made on the CPU; (2)
                              torch.cuda.current_device(), where p2p_communication allocates the
                              tensors it receives from the neighbouring stage and where sequence
                              parallelism allocates its all-gather / reduce-scatter outputs
                              (tensor_parallel.mappings, LinearWithGradAccumulation..., the global
                              memory buffer), names the CPU; (3) torch.cuda.synchronize(), which
                              p2p_communication calls after batch_isend_irecv, waits for nothing
                              (gloo's requests are waited on before it). The p2p exchange itself is
                              megatron's (batch_isend_irecv, which gloo runs), as are the schedules
    shared_embedding_on_cpu   LanguageModule.setup_embeddings_and_output_layer moves the last
                              stage's copy of a tied embedding to CUDA (.cuda()) before it
                              all-reduces it from the first stage; on CPU it stays where it is
    skip_init_draws           with PP > 1 each stage would draw its layers' initial weights from
                              the start of the CPU generator, so stage 1 got the weights stage 0's
                              layers get. Megatron's CPU init draws the full matrices on every rank
                              so the weights do not depend on TP; this does the same for PP/VPP:
                              each rank draws (and drops) the other stages' chunks, all chunks in
                              the layer order of a one-stage model (model.build_model_chunks), so
                              every layout starts from the weights of PP=1 (CPU init only)
    CpuDataParallel           distributed.DistributedDataParallel keeps grad buffers on CUDA
    CpuFP32Optimizer          optimizer.FP32Optimizer / clip_grads put scale, norm and overflow
                              buffers on CUDA (get_megatron_optimizer builds it otherwise as is);
                              its grad norm is summed over the model-parallel group (TP x PP)
    dist_checkpointing_on_cpu dist_checkpointing's torch_dist save calls torch.cuda.synchronize()
                              and makes a status flag on torch.cuda.current_device(); its
                              fully-parallel load exchanges shards through CUDA (not used on CPU)

Nothing here runs on the GPU path, which uses megatron-core's own classes; the one stand-in that
outlives its call (the RNG tracker) is removed before a GPU run seeds megatron's own.
"""

from __future__ import annotations

import contextlib
import types

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.optimizer import OptimizerConfig, _get_param_groups
from megatron.core.optimizer.optimizer import FP32Optimizer, MegatronOptimizer
from megatron.core.pipeline_parallel import schedules
from megatron.core.tensor_parallel import random as mp_random
from megatron.core.transformer.enums import ModelType
from megatron.core.utils import get_model_config
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


# RoPE ------------------------------------------------------------------------------------------


class CpuRotaryEmbedding(RotaryEmbedding):
    """Replaces RotaryEmbedding.get_emb, which moves `inv_freq` to the current CUDA device on
    the first call; the frequencies are computed exactly as there, on the CPU."""

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        assert not self.rotary_interleaved
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


def use_cpu_rope(model: torch.nn.Module) -> None:
    """Swap the class of the GPTModel's rotary embedding (its state stays as built)."""
    if hasattr(model, "rotary_pos_emb"):
        model.rotary_pos_emb.__class__ = CpuRotaryEmbedding


# RNG -------------------------------------------------------------------------------------------


class CpuRNGStatesTracker(mp_random.CudaRNGStatesTracker):
    """megatron's CudaRNGStatesTracker (named RNG streams that layers `fork()` into, e.g. for
    tensor-parallel dropout) over the torch CPU generator instead of torch.cuda's."""

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG stream {name!r} / seed {seed} already added")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name: str = mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
        orig = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)


# megatron's own RNG hooks, kept so the stand-in can be taken out again (restore_megatron_rng).
_MEGATRON_RNG_HOOKS = (mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state)


def model_parallel_manual_seed(seed: int) -> None:
    """Replaces tensor_parallel.model_parallel_cuda_manual_seed: the same three named streams
    (data parallel: seed; tensor parallel: seed + 2718 + tp_rank; expert: seed + 1024) on the CPU
    generator. Also points megatron's private `_get/_set_cuda_rng_state`, which activation
    recomputation (CheckpointFunction) calls to replay a layer's RNG, at the CPU generator.

    Process-wide: until `restore_megatron_rng()` every megatron RNG call in this process goes to
    the CPU generator, so a GPU run later in the same process must undo it first (the trainer
    does, at close and before its CUDA seeding)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tracker = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.manual_seed(seed)
    tracker.add(mp_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mp_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024)


def cpu_rng_installed() -> bool:
    """Whether model_parallel_manual_seed's stand-in is what megatron's RNG calls reach now."""
    return (isinstance(mp_random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker)
            or (mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state) != _MEGATRON_RNG_HOOKS)


def restore_megatron_rng() -> None:
    """Undo model_parallel_manual_seed: megatron's own `_get/_set_cuda_rng_state` again, and no
    tracker, so megatron's next `model_parallel_cuda_manual_seed` builds its own
    CudaRNGStatesTracker instead of returning early onto the CPU one (with that one, TP ranks
    would draw their weights from the same CUDA stream). A no-op when nothing is installed."""
    mp_random._get_cuda_rng_state, mp_random._set_cuda_rng_state = _MEGATRON_RNG_HOOKS
    if isinstance(mp_random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mp_random._CUDA_RNG_STATE_TRACKER = None
        mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = False


# Schedule --------------------------------------------------------------------------------------


def forward_backward_no_pipelining(*, forward_step_func, data_iterator, model, num_microbatches: int,
                                   seq_length: int, micro_batch_size: int, forward_only: bool = False,
                                   **_unused) -> list:
    """Replaces schedules.forward_backward_no_pipelining (its token counter is created with
    device="cuda"). Same loop: megatron's own forward_step / backward_step per micro-batch, the
    grad sync held back (no_sync) until the last one, then config.finalize_model_grads_func."""
    config = get_model_config(model)
    store: list = []
    for i in range(num_microbatches):
        last = i == num_microbatches - 1
        hold = config.no_sync_func if (config.no_sync_func and not last and not forward_only) else contextlib.nullcontext
        with hold():
            output, _ = schedules.forward_step(
                forward_step_func, data_iterator, model, num_microbatches, None, store, config,
                1, is_first_microbatch=i == 0, current_microbatch=i)
            if not forward_only:
                schedules.backward_step(None, output, None, ModelType.encoder_or_decoder, config)
    if config.finalize_model_grads_func is not None and not forward_only:
        config.finalize_model_grads_func([model], None)
    return store


class _SchedulesTorch(types.ModuleType):
    """torch as megatron's schedules module sees it inside megatron_steps_on_cpu: torch itself,
    except that zeros(..., device="cuda") -- each schedule's token counter -- is made on the CPU."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type == "cuda":
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)


_SCHEDULES_TORCH = _SchedulesTorch()


@contextlib.contextmanager
def megatron_steps_on_cpu():
    """Around megatron's schedules (pipelined or not) and so every forward/backward of a CPU run.

    Replaces, for the duration of the call only: the schedules' `torch.zeros(device="cuda")`
    token counter (made on the CPU, same zeros); `torch.cuda.current_device()` (the CPU), where
    p2p_communication allocates the activations / gradients it receives from the neighbouring
    stage and where sequence parallelism allocates its all-gather / reduce-scatter outputs; and
    `torch.cuda.synchronize()` (nothing to wait for: gloo's p2p requests are waited on before
    p2p_communication calls it). The schedules, the p2p exchange (batch_isend_irecv, which gloo
    runs) and the sequence-parallel collectives are megatron's own."""
    saved = torch.cuda.current_device, torch.cuda.synchronize, schedules.torch
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    schedules.torch = _SCHEDULES_TORCH
    try:
        yield
    finally:
        torch.cuda.current_device, torch.cuda.synchronize, schedules.torch = saved


# Pipeline stages: building ---------------------------------------------------------------------


@contextlib.contextmanager
def shared_embedding_on_cpu():
    """Around building the model chunks of a CPU run: LanguageModule.setup_embeddings_and_output_layer
    moves the last stage's copy of a tied embedding to CUDA (`weight.data.cuda()`) before it
    all-reduces it from the first stage (PP > 1, tied embeddings). On the CPU the copy stays on
    the CPU; the all-reduce is megatron's."""
    saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = saved


@torch.no_grad()
def skip_init_draws(config, layer_spec, *, embedding: bool, layers: int, vocab_size: int, seq_len: int) -> None:
    """Draw and drop what a one-stage model draws for an embedding (when `embedding`) and
    `layers` transformer layers, from the CPU generator, in that order.

    megatron's CPU initialization draws every weight from the CPU generator, whole matrices on
    every TP rank (so TP does not change the weights), but each pipeline stage starts drawing at
    its own first layer, so with PP > 1 stage 1's layers would get the numbers stage 0's layers
    get. The caller builds the chunks of all stages in layer order and calls this for the chunks
    of other stages; each stage's weights are then those of a PP=1 model with the same seed.
    Nothing is kept; the modules are built the way GPTModel builds them, so the draws match."""
    from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
    from megatron.core.transformer.spec_utils import build_module

    if embedding:
        LanguageModelEmbedding(config=config, vocab_size=vocab_size, max_sequence_length=seq_len,
                               position_embedding_type="rope")
    vp_stage = 0 if config.virtual_pipeline_model_parallel_size else None   # only the offset reads it
    for i in range(layers):
        build_module(layer_spec, config=config, layer_number=i + 1, vp_stage=vp_stage)


# Data parallel ---------------------------------------------------------------------------------


class CpuDataParallel(torch.nn.Module):
    """Replaces distributed.DistributedDataParallel, whose contiguous grad buffers are allocated
    on CUDA. Gradients stay in `param.grad`; `finish_grad_sync` (called by megatron's
    finalize_model_grads after the last micro-batch) scales them by 1/DP and all-reduces them
    over the data-parallel group, which is what megatron's DDP does to its buffers."""

    def __init__(self, config, module: torch.nn.Module):
        super().__init__()
        self.config = config
        self.module = module
        self.ddp_config = DistributedDataParallelConfig()
        self.dp_group = parallel_state.get_data_parallel_group()

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def no_sync(self):
        return contextlib.nullcontext()

    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        size = torch.distributed.get_world_size(self.dp_group)
        grads = [p.grad for p in self.module.parameters() if p.requires_grad and p.grad is not None]
        if size == 1 or not grads:
            return
        flat = _flatten_dense_tensors(grads)
        flat.mul_(1.0 / size)
        torch.distributed.all_reduce(flat, group=self.dp_group)
        for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)

    def scale_gradients(self, scaling: float) -> None:
        for p in self.module.parameters():
            if p.grad is not None:
                p.grad.mul_(scaling)

    def zero_grad_buffer(self) -> None:
        for p in self.module.parameters():
            p.grad = None

    def sharded_state_dict(self, *args, **kwargs):
        return self.module.sharded_state_dict(*args, **kwargs)


# Optimizer -------------------------------------------------------------------------------------


class CpuFP32Optimizer(FP32Optimizer):
    """megatron's FP32Optimizer (its step, sharded_state_dict and load_state_dict are used as
    they are) with the two pieces that allocate CUDA tensors replaced: the constant loss scale
    made in __init__, and get_grad_norm_fp32 / clip_grad_by_total_norm_fp32. The norm is the
    same: the L2 norm of all gradients, each counted once (shared and TP-duplicate parameters
    skipped), summed over the model-parallel group."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: OptimizerConfig, init_state_fn):
        MegatronOptimizer.__init__(self, optimizer, config, init_state_fn)
        self._scale = torch.ones(1)
        self.is_stub_optimizer = optimizer is None

    @torch.no_grad()
    def get_grad_norm(self) -> float:
        grads = self.get_main_grads_for_grad_norm()
        total = torch.zeros(1, dtype=torch.float64)
        for g in grads:
            total += g.double().pow(2).sum()
        torch.distributed.all_reduce(total, group=self.get_grad_stats_parallel_group())
        return float(total.sqrt().item())

    @torch.no_grad()
    def clip_grad_norm(self, clip_grad: float) -> float:
        norm = self.get_grad_norm()
        coeff = clip_grad / (norm + 1.0e-6)
        if coeff < 1.0:
            for p in self.get_parameters():
                if p.grad is not None:
                    p.grad.mul_(coeff)
        return norm


def _init_adam_state(opt: torch.optim.Optimizer, config=None) -> None:
    """Empty Adam moments, so a checkpoint's state has somewhere to load into (as megatron's
    init_state_fn for Adam)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if len(opt.state[p]) == 0:
                opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


def cpu_optimizer(config: OptimizerConfig, model_chunks: list) -> CpuFP32Optimizer:
    """What get_megatron_optimizer builds for fp32 without the distributed optimizer: megatron's
    parameter groups (no weight decay on 1-D parameters), torch AdamW, FP32Optimizer."""
    groups = _get_param_groups(model_chunks, config, None)
    adam = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay,
                             betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    opt = CpuFP32Optimizer(adam, config, _init_adam_state)
    opt.grad_stats_parallel_group = parallel_state.get_model_parallel_group()
    opt.tp_group = parallel_state.get_tensor_model_parallel_group()
    return opt


# Distributed checkpointing --------------------------------------------------------------------


@contextlib.contextmanager
def dist_checkpointing_on_cpu():
    """Around dist_checkpointing.save/load on a machine without CUDA: its torch_dist strategy
    calls torch.cuda.synchronize() after the device-to-host copies (nothing to wait for on CPU)
    and creates its write-failure flag on torch.cuda.current_device() (the CPU here). Both are
    pointed at the CPU for the duration of the call only; with CUDA present this does nothing."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize, torch.cuda.current_device
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    try:
        yield
    finally:
        torch.cuda.synchronize, torch.cuda.current_device = saved

"""The optimizer of `domainlm pretrain`: megatron-core's, built and checkpointed so resume is exact.

GPU: `get_megatron_optimizer` builds megatron's DistributedOptimizer (ZeRO-1) around an Adam.
Which Adam depends on what is installed (megatron.core.optimizer.USING_PYTORCH_OPTIMIZER):
Transformer Engine's or Apex's FusedAdam, else `torch.optim.AdamW`. megatron-core 0.16.1's
DistributedOptimizer checkpoints the torch AdamW wrongly in three places (read in
megatron/core/optimizer/distrib_optimizer.py; each reproduced on CPU by
tests/test_checkpoint_optimizer.py with megatron's own classes):

1. `state_dict()` asserts that every parameter's AdamW state holds one shared `step`; before the
   first step the state is empty, so `sharded_state_dict(is_loading=True)` -- which calls
   `state_dict()` -- fails with a bare AssertionError on every resume.
2. `load_state_dict()` gives every parameter the *same* `step` tensor, and torch AdamW adds 1
   to each parameter's step in place, so after a resume the step grows by the number of
   parameters per optimizer step: bias correction as if thousands of steps had passed.
3. `load_parameter_state_from_*` copies every entry of a parameter's state from the checkpoint
   but skips `step` in the source, so with torch AdamW (whose state has a `step`) it raises
   KeyError: 'step'.

`TorchAdamDistributedOptimizer` is DistributedOptimizer with those three methods corrected; it
replaces the class of megatron's instances only when torch AdamW is the inner optimizer
(FusedAdam keeps its step in the param groups and takes megatron's own path unchanged).

Checkpoint format: megatron-core 0.16.1 rejects its default distributed-optimizer format
('fully_sharded_model_space': "ShardedTensor.flattened_range is not supported" at the first
save), so the state is saved as 'fully_reshardable' (model-space tensors gathered on DP rank 0):
the one format that loads under another TP/PP/DP layout, as the checkpoint dir promises; and in
megatron's memory-efficient variant of it (see SHARDING_METADATA).

CPU: cpu_compat.cpu_optimizer (megatron's FP32Optimizer over torch AdamW), untouched here.
"""

from __future__ import annotations

import torch

# How the distributed optimizer's state is laid out in a checkpoint (see the module docstring).
# mem_efficient: the state is gathered on DP rank 0 only (over gloo), not on every rank: a full
# fp32 copy of params + moments is 12 bytes per parameter of host memory (84 GB at 7B), which
# every rank of a node holding one at once would exhaust. Saves are slower, never out of memory.
SHARDING_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                     "distrib_optim_fully_reshardable_mem_efficient": True}


def build(optim_args, *, bf16: bool, distributed: bool, cpu: bool, model_chunks: list):
    """megatron's optimizer for the run: AdamW (no decay on 1-D parameters) with clipping;
    the distributed optimizer on GPU unless turned off; the CPU stand-in on CPU."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = optim_args
    config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
        adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad, bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed and not cpu)
    if cpu:
        from domainlm.pretrain.cpu_compat import cpu_optimizer

        return cpu_optimizer(config, model_chunks)
    return fix_torch_adam(get_megatron_optimizer(config, model_chunks))


def parts(optimizer) -> list:
    """The optimizers inside megatron's ChainedOptimizer (or the one given)."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def torch_adam_inside() -> bool:
    """True when megatron's DistributedOptimizer wraps torch's Adam/AdamW (no TE, no Apex)."""
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def fix_torch_adam(optimizer):
    """Swap the class of each megatron DistributedOptimizer wrapping torch AdamW for
    TorchAdamDistributedOptimizer (state as built); anything else is returned as it is."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not torch_adam_inside():
        return optimizer
    for part in parts(optimizer):
        if type(part) is DistributedOptimizer and isinstance(part.optimizer, torch.optim.Adam | torch.optim.AdamW):
            part.__class__ = _torch_adam_class()
    return optimizer


def sharded_state_dict(optimizer, model_sharded_state_dict, *, loading: bool):
    """The optimizer's part of a checkpoint, in the format every layout can load."""
    return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=loading,
                                        metadata=dict(SHARDING_METADATA))


_CLASS = None


def _torch_adam_class():
    """Built on first use so importing this module does not import megatron-core."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    class TorchAdamDistributedOptimizer(DistributedOptimizer):
        """megatron's DistributedOptimizer over torch AdamW with its checkpoint bugs fixed
        (the module docstring says which); training steps are megatron's own."""

        def _seed_adam_state(self) -> None:
            # What torch AdamW creates lazily at its first step (step 0, zero moments), made
            # now so state_dict() finds one step value to record (bug 1). The update that
            # follows is the same as from a lazily created state.
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    state = self.optimizer.state[p]
                    if len(state) == 0:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

        def state_dict(self):
            self._seed_adam_state()
            return super().state_dict()

        def load_state_dict(self, state_dict):
            self._seed_adam_state()
            super().load_state_dict(state_dict)
            # megatron hands all parameters one `step` tensor (bug 2): give each its own.
            for state in self.optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].detach().clone()

        def _set_main_param_and_optimizer_states(self, model_param, tensors):
            # megatron copies every state entry but leaves `step` out of the source (bug 3);
            # the step comes from the param groups in load_state_dict, so skip it here.
            if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                return super()._set_main_param_and_optimizer_states(model_param, tensors)
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            for key, dst in {"param": main_param, **self.optimizer.state[main_param]}.items():
                if key != "step":
                    dst.copy_(tensors[key])

    _CLASS = TorchAdamDistributedOptimizer
    return _CLASS


def adam_steps(optimizer) -> list[float]:
    """Every parameter's Adam step (for checks and tests)."""
    out = []
    for part in parts(optimizer):
        inner = getattr(part, "optimizer", None)
        if inner is None:
            continue
        for state in inner.state.values():
            if "step" in state:
                out.append(float(state["step"]))
    return out

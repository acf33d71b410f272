"""GPU memory of a pretraining layout, estimated from the config (no GPU, no model built).

    python -m domainlm.pretrain.memory --size 7B --vocab 32000 --tp 2 --pp 2 --dp 4 --seq-len 4096

What it counts, per GPU of the busiest pipeline stage (the first: it holds the embedding and the
most activations in flight), with bf16 training as `domainlm pretrain` runs it on GPUs:

- Parameters of the stage: its L/P layers (attention 2d^2 + 2d*(d*g/a), SwiGLU MLP 3*d*f, two
  norms 2d), the embedding on the first stage and the output layer + final norm on the last (both
  V_padded x d, split over TP). Matrices are split over TP, norms are not.
- Model states: bf16 weights (2 bytes/parameter) + fp32 gradient buffer (4: megatron-core's DDP
  with grad_reduce_in_fp32) + fp32 main weights and Adam's two moments (12), which megatron's
  distributed optimizer (parallel.distributed_optimizer, on by default) shards over DP: 6 + 12/DP.
- Activations kept for the backward, per layer and micro-batch (bf16, 2 bytes a value; the
  accounting of Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", redone for a Llama layer: no dropout, flash/SDPA attention that keeps no s x s scores):
  norm inputs 2 x 2sbh, QKV and MLP inputs 2 x 2sbh, q/k/v 2sbh(1 + 2g/a), attention output 2sbh,
  gate + up 4sbf, down-projection input 2sbf; so sbh(12 + 4g/a) + 6sbf bytes with `kernels: triton`
  (the fused SwiGLU keeps fc1's output alone). Megatron's eager gated linear unit (`kernels:
  torch`) also keeps silu(gate) and `up + glu_linear_offset` (a new tensor even at offset 0):
  10sbf for the MLP (counted with autograd's saved-tensor hooks, tests/test_kernels.py). Sequence parallelism
  divides all of it by TP; without it the norm and linear inputs (8sbh) are whole on every TP rank.
  Full recomputation keeps only each layer's input (2sbh, / TP with SP). Selective recomputation
  recomputes the attention core, which flash attention already does not store: counted as none.
- Pipeline schedule: with 1F1B the first stage holds P micro-batches of its L/P layers in flight
  (L layers' worth, at most the micro-batches of a step); the interleaved schedule with V chunks
  holds (1 + (P - 1) / (P V)) times that (Narayanan et al. 2021).
- The last stage's logits for the loss: bf16 logits and their fp32 copy, 6 s b V / TP bytes.

Not counted: the CUDA context, NCCL buffers, the allocator's fragmentation and temporary buffers
(a few GB in practice; the estimate says so), and the optimizer's communication buffers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import warnings

from domainlm.errors import UserError

GB = 1024**3


@dataclasses.dataclass(frozen=True)
class Estimate:
    params_total: int            # the whole model (padded vocab)
    params_per_gpu: int          # one GPU of the first stage
    params_per_gpu_last: int     # one GPU of the last stage
    states_gb: float             # weights + grads + optimizer on that GPU
    activations_gb: float        # kept for the backward, the schedule's micro-batches in flight
    logits_gb: float             # the last stage's logits (on the first when P = 1)
    total_gb: float              # the larger of the first and the last stage's sum

    def table(self) -> str:
        return (f"parameters: {self.params_total / 1e9:.2f}B in all; per GPU {self.params_per_gpu / 1e9:.3f}B "
                f"(first stage), {self.params_per_gpu_last / 1e9:.3f}B (last)\n"
                f"model states (bf16 weights, fp32 grads, fp32 main + Adam over DP): {self.states_gb:.1f} GiB\n"
                f"activations in flight (first stage): {self.activations_gb:.1f} GiB\n"
                f"logits (last stage): {self.logits_gb:.1f} GiB\n"
                f"estimate per GPU: {self.total_gb:.1f} GiB, plus a few GiB of CUDA context, NCCL buffers "
                f"and allocator fragmentation")


def layer_params(d: int, heads: int, groups: int, ffn: int) -> int:
    kv = d * groups // heads
    return 2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d


def estimate(model, *, vocab: int, tp: int = 1, pp: int = 1, vpp: int = 1, dp: int = 1, seq_len: int,
             micro_batch_size: int = 1, micro_batches: int | None = None, sequence_parallel: bool = True,
             distributed_optimizer: bool = True, recompute: str = "none") -> Estimate:
    """`model`: a resolved ModelArgs (pretrain.config.resolve_model). `micro_batches`: per step and
    DP rank (global / (micro x DP)); None takes the schedule's worst case (P in flight)."""
    from domainlm.pretrain.model import padded_vocab

    d, L, f = model.hidden_size, model.num_layers, model.ffn_hidden_size
    a, g = model.num_attention_heads, model.num_query_groups
    if L % (pp * vpp):
        raise UserError(f"pipeline {pp} x virtual pipeline {vpp} does not divide model.num_layers={L}")
    V = padded_vocab(vocab, model.make_vocab_size_divisible_by, tp)
    per_layer = layer_params(d, a, g, f)
    total = L * per_layer + V * d + d + (0 if model.tie_embeddings else V * d)
    stage_layers = (L // pp) * ((per_layer - 2 * d) // tp + 2 * d)
    head = V * d // tp      # the output layer; tied, the last stage still holds a copy of the embedding
    first = stage_layers + V * d // tp + (d + (0 if model.tie_embeddings else head) if pp == 1 else 0)
    last = first if pp == 1 else stage_layers + d + head
    per_param = 6 + (12 / dp if distributed_optimizer else 12)

    s, b = seq_len, micro_batch_size
    if recompute == "full":
        layer_act = 2 * s * b * d / (tp if sequence_parallel else 1)
    else:
        mlp = (6 if model.kernels == "triton" else 10) * s * b * f
        split = s * b * d * (4 + 4 * g / a) + mlp                             # q/k/v, attention out, MLP
        whole = 8 * s * b * d                                                  # norm + linear inputs
        layer_act = (split + whole) / tp if sequence_parallel else split / tp + whole
    in_flight = min(pp, micro_batches) if micro_batches else pp
    factor = 1 + (pp - 1) / (pp * vpp) if vpp > 1 else 1.0
    activations = layer_act * (L // pp) * in_flight * factor
    logits = 6 * s * b * V / tp
    first_total = first * per_param + activations + (logits if pp == 1 else 0)
    last_total = last * per_param + layer_act * (L // pp) + logits
    return Estimate(params_total=total, params_per_gpu=first, params_per_gpu_last=last,
                    states_gb=first * per_param / GB, activations_gb=activations / GB, logits_gb=logits / GB,
                    total_gb=max(first_total, last_total) / GB)


def saved_for_backward_bytes(forward, exclude=()) -> int:
    """Bytes autograd keeps for backward while `forward()` runs: every storage a saved tensor lives
    in, counted once however many views of it are saved, those of `exclude` (parameters) left
    out. Measures, on any device, what the activation count above assumes (bench/activations.py,
    tests/test_kernels.py)."""
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m domainlm.pretrain.memory",
                                     description=__doc__.split("\n\n")[0],
                                     epilog="How it counts: see this module's docstring (pretrain/memory.py).")
    parser.add_argument("--size", required=True, help="named size (tiny, 125M, 350M, 1B, 3B, 7B) or a model YAML")
    parser.add_argument("--vocab", type=int, required=True, help="tokenizer vocab size")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=1)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--no-sequence-parallel", action="store_true")
    parser.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    parser.add_argument("--kernels", choices=["torch", "triton"], default="torch",
                        help="model.kernels: the triton path's SwiGLU keeps 4sbf bytes a layer less (default: torch, "
                             "as domainlm pretrain)")
    ns = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")   # megatron's, on import
    from domainlm.pretrain.config import ModelArgs, resolve_model

    try:
        model = resolve_model(ModelArgs(size=ns.size, kernels=ns.kernels))
        est = estimate(model, vocab=ns.vocab, tp=ns.tp, pp=ns.pp, vpp=ns.vpp, dp=ns.dp, seq_len=ns.seq_len,
                       micro_batch_size=ns.micro_batch_size, sequence_parallel=not ns.no_sequence_parallel,
                       recompute=ns.recompute)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{ns.size}, vocab {ns.vocab}, TP={ns.tp} PP={ns.pp} VPP={ns.vpp} DP={ns.dp}, seq {ns.seq_len} x micro "
          f"{ns.micro_batch_size}, sequence parallel {'off' if ns.no_sequence_parallel else 'on'}, "
          f"recompute {ns.recompute}, kernels {ns.kernels}")
    print(est.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a layer keeps for backward, per token, under each `model.kernels` path (issue 21).

The 1B run with the Triton kernels peaked 5.2 GiB above the torch path on an H100. This counts,
on CPU, the bytes autograd keeps for backward (`pretrain/memory.py: saved_for_backward_bytes`,
each storage once, parameters left out) in a forward of the named model shape with 2 layers
minus one with 1, so the embedding, final norm and loss cancel out; the Triton kernels run under
Triton's interpreter. fp32 on CPU: bf16 on a GPU halves every figure but the few fp32 buffers
(the norms' 1/rms), and SDPA's CPU math backend keeps the attention weights (seq x heads values
a token, in all three paths alike), which flash attention on a GPU does not.

    .venv/bin/python bench/activations.py                      # 1B shape, 64 tokens (~2 min)
    .venv/bin/python bench/activations.py --size 125M --seq 128

Prints the table and writes it to bench/results/activations.txt (or --out).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PATHS = (("torch", "torch"), ("triton", "torch"), ("triton", "triton"))


def per_token_and_layer(size: str, kernels: str, norm_kernel: str, seq: int, vocab: int) -> float:
    import torch

    from domainlm.pretrain import cpu_compat
    from domainlm.pretrain.config import ModelArgs, resolve_model
    from domainlm.pretrain.memory import saved_for_backward_bytes
    from domainlm.pretrain.model import build_model, transformer_config

    def saved(n_layers: int) -> int:
        m = resolve_model(ModelArgs(size=size, kernels=kernels, norm_kernel=norm_kernel, num_layers=n_layers))
        cpu_compat.model_parallel_manual_seed(1234)
        model = build_model(m, transformer_config(m, cpu=True), vocab_size=vocab, seq_len=seq)
        g = torch.Generator().manual_seed(1)
        tokens, labels = torch.randint(0, vocab, (1, seq), generator=g), torch.randint(0, vocab, (1, seq), generator=g)
        return saved_for_backward_bytes(lambda: model(tokens, torch.arange(seq)[None], None, labels=labels),
                                        exclude=list(model.parameters()))

    return (saved(2) - saved(1)) / seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1B", help="named model size (configs/model/NAME.yaml)")
    ap.add_argument("--seq", type=int, default=64, help="tokens in the forward")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--out", default=str(REPO / "bench/results/activations.txt"))
    ns = ap.parse_args()
    os.environ["TRITON_INTERPRET"] = "1"
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    lines = [f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
             f"command: python bench/activations.py {' '.join(sys.argv[1:])}".rstrip(),
             f"{ns.size} shape, fp32 on CPU, {ns.seq} tokens, vocab {ns.vocab}: bytes kept for backward per token "
             "and layer (2 layers minus 1)", ""]
    print("\n".join(lines), flush=True)
    base = None
    for kernels, norm in PATHS:
        t0 = time.perf_counter()
        b = per_token_and_layer(ns.size, kernels, norm, ns.seq, ns.vocab)
        base = base or b
        name = f"kernels {kernels}" + (f", norm_kernel {norm}" if kernels == "triton" else "")
        line = f"{name:<36} {b / 1024:8.1f} KiB  ({b / base:.2f} of torch; {time.perf_counter() - t0:.0f} s)"
        print(line, flush=True)
        lines.append(line)
    Path(ns.out).write_text("\n".join(lines) + "\n")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""One LoRA projection forward + backward, three ways (issue 21, LoRA speed).

Each projection width of the 1B shape (q/o 2048 -> 2048, k/v 2048 -> 512, gate/up 2048 -> 8192,
down 8192 -> 2048) as a peft `lora.Linear` (r=16, alpha 32, dropout 0, frozen base), timed as
`domainlm finetune` runs it:

- `peft`: peft's forward as TRL trains it (the input cast to the adapters' fp32, then back by
  autocast; B's output, a scaled copy, the sum);
- `no cast`: the same with peft's input cast off (`finetune/model.py: keep_input_dtype`);
- `addmm`: `finetune/kernels.py: FusedLoraLinear`, the adapter added inside one `torch.addmm`
  (what `--kernels triton` runs).

On a GPU: bf16 base, fp32 adapters, bf16 autocast, 8,192 tokens (micro 4 x seq 2048), CUDA events.
On a CPU (no bf16 there unless the CPU has it natively): fp32, 1,024 tokens, wall clock. Rounds
interleave the three ways; each figure is the median of the rounds. The gradient of the input is
taken too (as in a network, where the layer below needs it).

    .venv/bin/python bench/lora_linear.py [--tokens N] [--rounds N] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAYS = ("peft", "no cast", "addmm")


def shapes(size: str = "1B") -> dict[str, tuple[int, int, int]]:
    """Each projection kind of the model size (configs/model/SIZE.yaml): (in, out, how many a layer)."""
    from domainlm.config import read_yaml

    m = read_yaml(REPO / f"configs/model/{size}.yaml")["model"]
    h, f = m["hidden_size"], m["ffn_hidden_size"]
    kv = m["num_query_groups"] * h // m["num_attention_heads"]
    return {"q_proj/o_proj": (h, h, 2), "k_proj/v_proj": (h, kv, 2), "gate_proj/up_proj": (h, f, 2),
            "down_proj": (f, h, 1)}


def layer(way: str, d_in: int, d_out: int, device, dtype):
    import torch
    from peft import LoraConfig, get_peft_model

    from domainlm.finetune.kernels import apply_kernels
    from domainlm.finetune.model import keep_input_dtype

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(d_in, d_out, bias=False)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = get_peft_model(One().to(device=device, dtype=dtype),
                           LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    if way != "peft":
        keep_input_dtype(model)
    if way == "addmm":
        assert apply_kernels(model)["lora_addmm"] == 1
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=0, help="default: 8192 on a GPU, 1024 on a CPU")
    ap.add_argument("--rounds", type=int, default=0, help="default: 30 on a GPU, 5 on a CPU")
    ap.add_argument("--out", default=None, help="also write the table here")
    ns = ap.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens = ns.tokens or (8192 if cuda else 1024)
    rounds = ns.rounds or (30 if cuda else 5)
    name = torch.cuda.get_device_name(0) if cuda else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    lines = [f"device: {name}; torch {torch.__version__}",
             f"LoRA r=16 projection forward + backward, {tokens:,} tokens, "
             f"{'bf16 base, fp32 adapters, bf16 autocast' if cuda else 'fp32'}; median of {rounds} interleaved rounds", ""]
    print("\n".join(lines), flush=True)

    def timed(model, x) -> float:
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        with amp:
            y = model(x)
        y.backward(torch.ones_like(y))
        if cuda:
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3
        return time.perf_counter() - t0

    header = f"{'projection (in -> out)':28s}" + "".join(f"{w:>12s}" for w in WAYS) + "   addmm/peft  no cast/peft"
    lines.append(header)
    print(header, flush=True)
    totals = {w: 0.0 for w in WAYS}
    for proj, (d_in, d_out, per_layer) in shapes().items():
        models = {w: layer(w, d_in, d_out, device, dtype) for w in WAYS}
        x = torch.randn(tokens, d_in, device=device, dtype=dtype, requires_grad=True)
        times = {w: [] for w in WAYS}
        for r in range(rounds + 2):
            for w in WAYS:
                t = timed(models[w], x)
                x.grad = None
                if r >= 2:                  # two warm-up rounds
                    times[w].append(t)
        med = {w: statistics.median(times[w]) for w in WAYS}
        for w in WAYS:
            totals[w] += per_layer * med[w]
        line = (f"{proj + f' ({d_in} -> {d_out})':28s}" + "".join(f"{med[w] * 1e3:10.3f}ms" for w in WAYS)
                + f"   {med['addmm'] / med['peft']:10.3f}  {med['no cast'] / med['peft']:12.3f}")
        lines.append(line)
        print(line, flush=True)
        del models, x
    line = (f"{'one layer (7 projections)':28s}" + "".join(f"{totals[w] * 1e3:10.3f}ms" for w in WAYS)
            + f"   {totals['addmm'] / totals['peft']:10.3f}  {totals['no cast'] / totals['peft']:12.3f}")
    lines.append(line)
    print(line, flush=True)
    if ns.out:
        Path(ns.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

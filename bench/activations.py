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
    .venv/bin/python bench/activations.py --qlora      # QLoRA's base: peft's preparation against ours
    .venv/bin/python bench/activations.py --lora       # LoRA: stock transformers against --kernels triton

--lora counts ours three ways, each step of issue 21 on its own: the kernels with peft's cast of
each LoRA input to fp32 (each LoRA A then keeps its own bf16 copy); without it
(`finetune/model.py: keep_input_dtype`); and with the norms' and SwiGLU's outputs recomputed in
backward, not kept (`recompute_elementwise`, finetune/kernels.py): what `domainlm finetune
--kernels triton` runs in bf16.

--qlora counts the same for fine-tuning's QLoRA base (a transformers LlamaForCausalLM of the shape,
bf16, LoRA r=16 on every projection, under bf16 autocast as `domainlm finetune` runs it), prepared
two ways: peft's `prepare_model_for_kbit_training` (which casts the embedding, norms and output
layer to fp32) and ours (`finetune/model.py: prepare_quantized`, which leaves them bf16). There
is no 4-bit layer on CPU: each projection is a bf16 linear that, as bitsandbytes' Linear4bit
does, computes in bf16 and returns its input's dtype, so the fp32 that peft's cast lets into the
residual stream flows on as it would on a GPU.

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


HF_VARIANTS = {
    "qlora": (("qlora-peft", "peft prepare_model_for_kbit_training"), ("qlora-ours-cast", "ours (prepare_quantized)"),
              ("qlora-ours", "ours, no input cast (as finetune)")),
    "lora": (("lora-stock", "stock transformers + peft (as TRL)"),
             ("lora-ours-cast", "kernels, peft's input cast, kept"),
             ("lora-ours-kept", "kernels, no input cast, kept"),
             ("lora-ours", "ours: kernels, no cast, recomputed")),
}


def hf_per_token_and_layer(size: str, variant: str, seq: int, vocab: int) -> float:
    """Fine-tuning's model (transformers Llama + peft LoRA r=16 on every projection, bf16 base, bf16
    autocast): bytes kept for backward per token and layer, from 2 layers minus 1 at 2*seq tokens
    minus the same at seq tokens, so what does not grow with the tokens (the LoRA weights' bf16
    copies that autocast keeps) cancels out too."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import LlamaConfig, LlamaForCausalLM

    from domainlm.config import read_yaml
    from domainlm.finetune.kernels import apply_kernels
    from domainlm.finetune.model import LossModel, keep_input_dtype, prepare_quantized
    from domainlm.pretrain.memory import saved_for_backward_bytes

    m = read_yaml(REPO / f"configs/model/{size}.yaml")["model"]

    class Like4bit(torch.nn.Linear):
        """Linear4bit's dtype behaviour: bf16 compute, the input's dtype out."""

        def forward(self, x):
            return torch.nn.functional.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)

    def saved(n_layers: int, tokens: int) -> int:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=m["hidden_size"], intermediate_size=m["ffn_hidden_size"],
                          num_hidden_layers=n_layers, num_attention_heads=m["num_attention_heads"],
                          num_key_value_heads=m["num_query_groups"], tie_word_embeddings=False)
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        if variant.startswith("qlora"):
            for layer in model.model.layers:
                for mod in list(layer.modules()):
                    for child in mod.children():
                        if type(child) is torch.nn.Linear:
                            child.__class__ = Like4bit
        if variant == "qlora-peft":
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            for mod in model.modules():   # the projections stay 4-bit on a GPU: not cast
                if isinstance(mod, Like4bit):
                    mod.weight.data = mod.weight.data.to(torch.bfloat16)
        elif variant.startswith("qlora-ours"):
            prepare_quantized(model)
        elif variant.startswith("lora-ours"):
            apply_kernels(model)
        ours = variant.startswith("lora-ours")
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
        model.train()
        ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
        if variant in ("lora-ours-kept", "lora-ours", "qlora-ours"):
            keep_input_dtype(model)
        loss = LossModel(model, fused=ours, recompute=variant == "lora-ours")

        def forward():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return loss(ids, ids)

        return saved_for_backward_bytes(forward, exclude=list(model.parameters()))

    per_layer = {t: saved(2, t) - saved(1, t) for t in (seq, 2 * seq)}
    return (per_layer[2 * seq] - per_layer[seq]) / seq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1B", help="named model size (configs/model/NAME.yaml)")
    ap.add_argument("--seq", type=int, default=64, help="tokens in the forward")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--qlora", action="store_true", help="QLoRA's base prepared by peft against ours (see above)")
    ap.add_argument("--lora", action="store_true", help="fine-tuning's LoRA: stock transformers against ours")
    ap.add_argument("--out", default=None,
                    help="default: bench/results/activations.txt (activations_qlora.txt, activations_lora.txt)")
    ns = ap.parse_args()
    mode = "qlora" if ns.qlora else "lora" if ns.lora else ""
    out = Path(ns.out or REPO / f"bench/results/activations{'_' + mode if mode else ''}.txt")
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
    if mode:
        lines[2] = (f"{ns.size} shape, LoRA r=16 on a bf16 base under bf16 autocast, vocab {ns.vocab}: bytes kept for "
                    f"backward per token and layer (2 layers minus 1, {2 * ns.seq} tokens minus {ns.seq})")
    print("\n".join(lines), flush=True)
    base = None
    if mode:
        for variant, name in HF_VARIANTS[mode]:
            t0 = time.perf_counter()
            b = hf_per_token_and_layer(ns.size, variant, ns.seq, ns.vocab)
            base = base or b
            line = f"{name:<40} {b / 1024:8.1f} KiB  ({b / base:.2f} of the first; {time.perf_counter() - t0:.0f} s)"
            print(line, flush=True)
            lines.append(line)
        out.write_text("\n".join(lines) + "\n")
        return
    for kernels, norm in PATHS:
        t0 = time.perf_counter()
        b = per_token_and_layer(ns.size, kernels, norm, ns.seq, ns.vocab)
        base = base or b
        name = f"kernels {kernels}" + (f", norm_kernel {norm}" if kernels == "triton" else "")
        line = f"{name:<36} {b / 1024:8.1f} KiB  ({b / base:.2f} of torch; {time.perf_counter() - t0:.0f} s)"
        print(line, flush=True)
        lines.append(line)
    out.write_text("\n".join(lines) + "\n")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Pretraining throughput: tokens/s and MFU of `domainlm pretrain`'s training step.

    python bench/pretrain.py                      # CPU: tiny config vs stock transformers Llama
    python bench/pretrain.py --gpu-sizes 125M 1B  # GPU (when CUDA is present): bf16, one GPU, kernels torch and triton

CPU: the real Trainer (megatron-core GPTModel, its schedule, the CPU optimizer) runs the tiny
config, and an equally sized stock `transformers.LlamaForCausalLM` runs the same training step
(the same windows from the same loader, micro-batches, gradient accumulation, AdamW, clipping),
in this process, alternating, median of --repeats. Goal: ours >= 0.9x.

GPU: the 125M and 1B configs, bf16, one GPU, megatron DDP + distributed optimizer, each with
`model.kernels` torch and triton (--gpu-kernels); whole optimizer steps (forward, backward,
gradient sync, AdamW, clipping) timed after warm-up; tokens/s and MFU = tokens/s x (6N + 12 L d T)
/ peak dense bf16 FLOP/s (table in domainlm/pretrain/metrics.py: H100/H200 989 TFLOP/s, A100 312
TFLOP/s). No credit for recomputation. The ratio of the two kernel settings is printed per size.

Data: the demo's tokenizer (runs/demo/tokenizer) and shards (runs/demo/shards); where the shards
are missing, random-token shards for that tokenizer are written to bench/work/ (speed does not
depend on the text).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
warnings.filterwarnings("ignore")


def synthetic_shards(tokenizer_dir: Path, out: Path, tokens: int = 400_000) -> Path:
    """Random-token shards in the real format for `tokenizer_dir` (speed does not depend on text)."""
    import hashlib

    import numpy as np

    from domainlm.data.shards import SHARD_PATTERN, ShardWriter, sample_key, token_dtype
    from domainlm.tokenizer.tokdir import load_tokenizer_dir

    tok = load_tokenizer_dir(tokenizer_dir)
    if (out / "manifest.json").is_file() and json.loads((out / "manifest.json").read_text())["tokenizer"]["sha256"] == tok.sha256:
        return out
    rng = np.random.default_rng(0)
    dtype = token_dtype(tok.vocab_size)
    manifest = {"stage": "data shard", "fingerprint": "bench-synthetic", "token_dtype": dtype.name, "splits": {},
                "tokenizer": {"sha256": tok.sha256, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                              "bos_id": tok.bos_id, "pad_id": tok.pad_id, "path": str(tokenizer_dir)}, "dropped": {}}
    for split, n in (("train", tokens), ("valid", tokens // 10)):
        (out / split).mkdir(parents=True, exist_ok=True)
        name = f"{split}/{SHARD_PATTERN.format(index=0)}"
        docs = 0
        with open(out / name, "wb") as f, ShardWriter(f) as w:
            left = n
            while left > 0:
                k = int(min(left, rng.integers(50, 2000)))
                w.write(sample_key(f"{split}-{docs}", "synthetic"), rng.integers(4, tok.vocab_size, k).astype(dtype),
                        {"id": f"{split}-{docs}", "source": "synthetic", "tokens": k})
                left -= k
                docs += 1
        data = (out / name).read_bytes()
        manifest["splits"][split] = {"documents": docs, "tokens": n, "shards": [
            {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "documents": docs, "tokens": n}]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out


def trainer_for(overrides: dict):
    from domainlm.config import load_config
    from domainlm.pretrain.config import PretrainConfig
    from domainlm.pretrain.trainer import Trainer

    cfg = load_config(PretrainConfig, None, {k: str(v) if not isinstance(v, list) else v for k, v in overrides.items()})
    trainer = Trainer(cfg)
    trainer.setup()
    return trainer


class HFLoop:
    """The same training step on stock transformers' LlamaForCausalLM."""

    def __init__(self, trainer):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        m, t, o = trainer.cfg.model, trainer.cfg.train, trainer.cfg.optim
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(
            vocab_size=trainer.vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_query_groups, rms_norm_eps=m.norm_eps, rope_theta=m.rotary_base,
            max_position_embeddings=t.seq_len, tie_word_embeddings=m.tie_embeddings,
            attention_bias=False, mlp_bias=False, attn_implementation="sdpa"))
        decay = [p for p in self.model.parameters() if p.ndim > 1]
        no_decay = [p for p in self.model.parameters() if p.ndim <= 1]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        self.clip, self.num_micro = o.clip_grad, trainer.num_micro
        # Same windows as the trainer: a loader with the same data settings.
        from domainlm.pretrain.loader import TokenWindowLoader

        self.it = iter(TokenWindowLoader(trainer.cfg.data, split="train", seq_len=t.seq_len,
                                         micro_batch_size=t.micro_batch_size))

    def step(self) -> float:
        import torch
        import torch.nn.functional as F

        total = 0.0
        for _ in range(self.num_micro):
            batch = next(self.it)
            x, y = batch[:, :-1], batch[:, 1:]
            logits = self.model(input_ids=x).logits
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1)) / self.num_micro
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return total


def timed(step, n: int, warmup: int, sync=lambda: None) -> float:
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    sync()
    return time.perf_counter() - t0


def device_line() -> str:
    import torch

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return f"device: {p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"device: CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def bench_cpu(base: dict, ns) -> None:
    from domainlm.pretrain.trainer import Trainer  # noqa: F401 (import cost outside the timing)

    t = {"train.seq_len": ns.seq_len, "train.micro_batch_size": ns.micro_batch_size,
         "train.global_batch_size": ns.global_batch_size, "train.max_steps": 10**6, "model.size": "tiny",
         "train.device": "cpu", "checkpoint.dir": str(REPO / "bench/work/ckpt-cpu"), "checkpoint.overwrite": "true",
         "schedule.warmup_steps": 10}
    trainer = trainer_for({**base, **t})
    hf = HFLoop(trainer)
    tokens = ns.steps * ns.global_batch_size * ns.seq_len
    ours, theirs = [], []
    try:
        for _ in range(ns.repeats):
            ours.append(tokens / timed(trainer.train_step, ns.steps, ns.warmup))
            theirs.append(tokens / timed(hf.step, ns.steps, ns.warmup))
    finally:
        trainer.close()
    m = trainer.cfg.model
    print(f"config: tiny (L={m.num_layers} d={m.hidden_size} heads={m.num_attention_heads}/{m.num_query_groups} "
          f"ffn={m.ffn_hidden_size}) vocab {trainer.vocab}, seq {ns.seq_len}, micro {ns.micro_batch_size} x "
          f"{trainer.num_micro} = global {ns.global_batch_size}, fp32, AdamW, clip 1.0; {ns.steps} steps after "
          f"{ns.warmup} warm-up, {ns.repeats} repeats (median)")
    print(f"{'implementation':<44} {'tokens/s':>10}  runs")
    print(f"{'domainlm pretrain (megatron-core GPTModel)':<44} {statistics.median(ours):>10,.0f}  "
          + " ".join(f"{x:,.0f}" for x in ours))
    print(f"{'transformers LlamaForCausalLM (sdpa)':<44} {statistics.median(theirs):>10,.0f}  "
          + " ".join(f"{x:,.0f}" for x in theirs))
    ratio = statistics.median(ours) / statistics.median(theirs)
    print(f"ratio ours / transformers: {ratio:.2f}x (goal >= 0.9x)  MFU: n/a on CPU (no dense peak to divide by)")


def bench_gpu(base: dict, ns) -> None:
    import torch

    for size in ns.gpu_sizes:
        tok_s = {}
        for kernels in ns.gpu_kernels:
            # triton-norm: kernels triton with our RMSNorm (and the residual add fused into it) in place
            # of torch's F.rms_norm, the default norm_kernel since the H100 kernel timings
            t = {"model.size": size, "model.kernels": kernels.split("-")[0],
                 "model.norm_kernel": "triton" if kernels == "triton-norm" else "torch", "train.seq_len": ns.gpu_seq_len,
                 "train.micro_batch_size": ns.gpu_micro_batch_size,
                 "train.global_batch_size": ns.gpu_micro_batch_size * ns.gpu_accumulation, "train.max_steps": 10**6,
                 "train.precision": "bf16", "train.recompute": ns.recompute, "train.device": "cuda",
                 "checkpoint.dir": str(REPO / f"bench/work/ckpt-{size}-{kernels}"), "checkpoint.overwrite": "true",
                 "schedule.warmup_steps": 10}
            # what an earlier run in this process left allocated (its model, grads and optimizer
            # states are freed by the cyclic GC, not by `trainer = None`) would count in this
            # run's peak: collected first, and what is still held is printed beside the peak
            gc.collect()
            torch.cuda.empty_cache()
            held = torch.cuda.memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
            trainer = trainer_for({**base, **t})
            try:
                steps = ns.gpu_steps
                seconds = timed(trainer.train_step, steps, ns.warmup, torch.cuda.synchronize)
                tok_s[kernels] = steps * trainer.cfg.train.global_batch_size * ns.gpu_seq_len / seconds
                mfu = tok_s[kernels] * trainer.metrics.flops_per_token / trainer.metrics.peak if trainer.metrics.peak else None
                mem = torch.cuda.max_memory_allocated() / 2**30
            finally:
                trainer.close()
                trainer = None
                gc.collect()
                torch.cuda.empty_cache()
            print(f"{size:>5} kernels={kernels:<6}: {tok_s[kernels] / 1e3:,.1f}k tokens/s, MFU "
                  f"{'%.1f%%' % (100 * mfu) if mfu else 'n/a (unknown GPU peak)'}, peak memory {mem:.1f} GiB "
                  f"(held before the run {held:.2f} GiB) "
                  f"({steps} steps after {ns.warmup} warm-up; seq {ns.gpu_seq_len}, micro {ns.gpu_micro_batch_size} x "
                  f"{ns.gpu_accumulation}, bf16, recompute {ns.recompute})", flush=True)
        if {"torch", "triton"} <= set(tok_s):
            print(f"{size:>5}: kernels triton / torch = {tok_s['triton'] / tok_s['torch']:.2f}x tokens/s (goal >= 1.1x)",
                  flush=True)
        if {"triton", "triton-norm"} <= set(tok_s):
            print(f"{size:>5}: norms F.rms_norm / ours under kernels triton = "
                  f"{tok_s['triton'] / tok_s['triton-norm']:.2f}x tokens/s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=str(REPO / "runs/demo/tokenizer"))
    ap.add_argument("--shards", default=str(REPO / "runs/demo/shards"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--global-batch-size", type=int, default=16)
    ap.add_argument("--gpu-sizes", nargs="*", default=["125M", "1B"])
    ap.add_argument("--gpu-seq-len", type=int, default=2048)
    ap.add_argument("--gpu-micro-batch-size", type=int, default=8)
    ap.add_argument("--gpu-accumulation", type=int, default=2)
    ap.add_argument("--gpu-steps", type=int, default=10)
    ap.add_argument("--gpu-kernels", nargs="*", default=["torch", "triton"], choices=["torch", "triton", "triton-norm"],
                    help="triton-norm: kernels triton with model.norm_kernel triton (our RMSNorm)")
    ap.add_argument("--recompute", default="none", choices=["none", "selective", "full"])
    ns = ap.parse_args()

    import torch

    from domainlm.progress import setup_logging

    setup_logging()
    shards = Path(ns.shards)
    if not (shards / "manifest.json").is_file():
        shards = synthetic_shards(Path(ns.tokenizer), REPO / "bench/work/shards")
    base = {"tokenizer": ns.tokenizer, "data.shards": [str(shards)], "data.num_workers": 0, "eval.every": 0,
            "log.tensorboard": "false", "log.every": 10**6}
    print(device_line())
    print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"command: python bench/pretrain.py {' '.join(sys.argv[1:])}".rstrip())
    if torch.cuda.is_available():
        bench_gpu(base, ns)
    else:
        bench_cpu(base, ns)


if __name__ == "__main__":
    main()

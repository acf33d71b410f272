"""Fine-tuning: our LoRA SFT step against stock TRL SFTTrainer + peft, LoRA's share, memory.

    python bench/finetune.py                       # CPU: the demo model (runs/demo/hf), pydoc QA
    python bench/finetune.py --model DIR --data QA.jsonl
    python bench/finetune.py --gpu --tokenizer DIR --corpus TEXT.jsonl
                                                   # GPU: 1B LoRA bf16 seq 2048, kernels triton vs TRL; QLoRA memory
    python bench/finetune.py --gpu --dry-run [...] # checks the GPU configs, inputs and packages, runs nothing (no CUDA)
    python bench/finetune.py --gpu --gpu-on-cpu --gpu-shape tiny --gpu-seq 256 ...   # the GPU runs rehearsed on CPU

CPU (the same process, interleaved repeats, min and median reported):
- ours: `domainlm finetune sft`'s Trainer.train_step (peft LoRA r=16 on every linear projection,
  answer-only loss from the chat template, AdamW, clipping, warmup + cosine);
- TRL: `trl.SFTTrainer` with the same peft LoraConfig on the same model dir, the same
  conversations (`messages`, assistant_only_loss=True), micro-batch, gradient accumulation,
  max length, optimizer (adamw_torch), learning rate, schedule and clipping.
  Throughput counts the non-pad tokens each forward received (a forward pre-hook on TRL's model;
  our step returns them), over whole optimizer steps after warm-up steps.
- LoRA r=16 on the 1B shape (configs/model/1B.yaml): the real LlamaForCausalLM and peft's
  get_peft_model built on the meta device (no memory), parameters counted.
- Peak memory (max RSS of a fresh process): our trainer with LoRA and with full fine-tuning, a few
  steps each, on the demo model and on the 125M shape (random weights).

GPU (when CUDA is present): a random 1B Llama (configs/model/1B.yaml shape, bf16) with the given
tokenizer (--tokenizer, else --model's; the GPU check carries bench/work/gpu/inputs/tokenizer),
64 conversations of ~2000 tokens cut from --corpus text, micro-batch 4 x 2, LoRA r=16: ours with
--kernels triton vs TRL + peft (sdpa, its own fused LM head); tokens/s and
torch.cuda.max_memory_allocated, each run in a fresh process. QLoRA (ours, NF4 base via
bitsandbytes): peak memory, or the reason it did not run (bitsandbytes not carried). Goal: >= 1.3x
the tokens/s at <= 0.6x the peak memory of TRL + peft. bench/gpu_check.sh --part c runs it on a
bare GPU machine, TRL, datasets and bitsandbytes coming from carried wheels.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- the shared workload --------------------------------------------------------------------------


def conversations(qa_file: Path, n: int, min_chars: int = 0) -> list[list[dict]]:
    out = []
    for line in qa_file.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if r.get("split", "train") != "train":
            continue
        out.append([{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}])
        if len(out) == n:
            break
    return out


def ours_trainer(model: str, data: Path, out: Path, w: dict, extra: dict | None = None):
    from domainlm.config import load_config
    from domainlm.finetune.config import SFTConfig
    from domainlm.finetune.trainer import Trainer

    o = {"model": model, "data": [str(data)], "output": str(out / "adapter"), "overwrite": "true",
         "checkpoint.dir": str(out / "run"), "valid_fraction": "0", "log.tensorboard": "false",
         "train.seq_len": str(w["seq"]), "train.micro_batch_size": str(w["micro"]),
         "train.global_batch_size": str(w["micro"] * w["accum"]), "train.max_steps": str(w["steps"] + w["warmup"] + 5),
         "lora.r": "16", "lora.alpha": "32", "lora.dropout": str(w["dropout"]), "optim.lr": "2e-4",
         "schedule.warmup_steps": "2", **(extra or {})}
    t = Trainer(load_config(SFTConfig, None, o))
    t.setup()
    return t


def rate(steps: list[tuple[int, float]]) -> float:
    """Tokens/s of timed steps [(tokens, seconds)]: all tokens over n x the median step time, so a
    burst of another job on a shared machine does not decide the figure (the mean is printed too)."""
    tokens = sum(n for n, _ in steps)
    return tokens / (len(steps) * statistics.median(sec for _, sec in steps))


def time_ours(t, w: dict) -> list[tuple[int, float]]:
    import torch

    sync = torch.cuda.synchronize if t.device.type == "cuda" else (lambda: None)
    for _ in range(w["warmup"]):
        t.train_step()
    steps = []
    for _ in range(w["steps"]):
        sync()
        t0 = time.perf_counter()
        n = t.train_step()[2]
        sync()
        steps.append((n, time.perf_counter() - t0))
    return steps


def trl_args(w: dict, out: Path, bf16: bool) -> dict:
    """TRL's SFTConfig for the same work as ours (the fields that differ from its defaults)."""
    import torch

    return dict(
        output_dir=str(out / "trl"), per_device_train_batch_size=w["micro"], gradient_accumulation_steps=w["accum"],
        max_length=w["seq"], assistant_only_loss=True, packing=False, learning_rate=2e-4, lr_scheduler_type="cosine",
        warmup_steps=2, max_grad_norm=1.0, optim="adamw_torch", weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
        max_steps=w["steps"] + w["warmup"], logging_steps=10_000, save_strategy="no", report_to="none",
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), bf16=bf16, seed=1234, dataset_num_proc=None,
        disable_tqdm=True, gradient_checkpointing=False)


SMOLLM2_TRAINING_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def trl_trainer(model_dir: str, convs: list, out: Path, w: dict, bf16: bool = False):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if "{% generation %}" not in (tok.chat_template or "") and "SmolLM" in (tok.chat_template or ""):
        # TRL's assistant_only_loss needs {% generation %} markers; SmolLM2's template has none (ours
        # renders turn by turn instead). The same ChatML text with the markers, for TRL only.
        tok.chat_template = SMOLLM2_TRAINING_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                 attn_implementation="sdpa")
    cfg = SFTConfig(**trl_args(w, out, bf16))
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=w["dropout"], target_modules=TARGETS, bias="none",
                          task_type="CAUSAL_LM")
    import datasets
    from transformers import PrinterCallback

    datasets.disable_progress_bars()
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list([{"messages": c} for c in convs]),
                         processing_class=tok, peft_config=peft_cfg)
    trainer.remove_callback(PrinterCallback)          # its end-of-train dict would land in the results
    counter = {"tokens": 0}

    def count(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids")
        counter["tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())

    trainer.model.register_forward_pre_hook(count, with_kwargs=True)

    class Clock(TrainerCallback):
        """Times each optimizer step after the warm-up (begin: before its first micro-batch's forward)."""

        steps: list = []

        def on_step_begin(self, args, state, control, **kw):
            if bf16 and torch.cuda.is_available():
                torch.cuda.synchronize()
            self.t0, self.tok0 = time.perf_counter(), counter["tokens"]

        def on_step_end(self, args, state, control, **kw):
            if bf16 and torch.cuda.is_available():
                torch.cuda.synchronize()
            if state.global_step > w["warmup"]:
                self.steps.append((counter["tokens"] - self.tok0, time.perf_counter() - self.t0))

    clock = Clock()
    clock.steps = []
    trainer.add_callback(clock)
    return trainer, clock


def time_trl(trainer, clock) -> list[tuple[int, float]]:
    trainer.train()
    return clock.steps


# -- CPU ------------------------------------------------------------------------------------------------


def cpu_throughput(args) -> list[str]:
    import torch

    w = {"seq": 256, "micro": 8, "accum": 2, "steps": args.steps, "warmup": 3, "dropout": 0.05}
    bf16 = args.precision == "bf16"
    data = Path(args.work) / "qa_bench.jsonl"
    convs = conversations(Path(args.data), args.samples)
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    ours, theirs, means = [], [], {"ours": [], "trl": []}
    for rep in range(args.repeats):
        t = ours_trainer(args.model, data, Path(args.work) / "ours", w, {"train.precision": args.precision})
        try:
            steps = time_ours(t, w)
        finally:
            t.close()
        ours.append(rate(steps))
        means["ours"].append(sum(n for n, _ in steps) / sum(s for _, s in steps))
        trainer, clock = trl_trainer(args.model, convs, Path(args.work), w, bf16=bf16)
        steps = time_trl(trainer, clock)
        theirs.append(rate(steps))
        means["trl"].append(sum(n for n, _ in steps) / sum(s for _, s in steps))
        del trainer
        print(f"  repeat {rep + 1}: ours {ours[-1]:,.0f} tok/s, TRL {theirs[-1]:,.0f} tok/s", file=sys.stderr, flush=True)
    mo, mt = statistics.median(ours), statistics.median(theirs)
    lines = [f"workload: {args.model}, {len(convs)} pydoc QA conversations, LoRA r=16 alpha=32 dropout 0.05 on "
             f"{' '.join(TARGETS)}, seq {w['seq']}, micro {w['micro']} x accum {w['accum']}, AdamW lr 2e-4, clip 1.0, "
             f"warmup+cosine, {args.precision} (bf16: autocast on the CPU, both sides), {torch.get_num_threads()} torch threads; {w['steps']} steps timed after "
             f"{w['warmup']}, {args.repeats} interleaved repeats; tokens/s of a repeat = its non-pad tokens / "
             "(steps x median step time)",
             f"{'implementation':44s} {'min':>9s} {'median':>9s}  runs (tokens/s; mean-based in brackets)",
             f"{'domainlm finetune sft (Trainer.train_step)':44s} {min(ours):9,.0f} {mo:9,.0f}  "
             + " ".join(f"{x:,.0f} [{m:,.0f}]" for x, m in zip(ours, means["ours"])),
             f"{'TRL SFTTrainer + peft':44s} {min(theirs):9,.0f} {mt:9,.0f}  "
             + " ".join(f"{x:,.0f} [{m:,.0f}]" for x, m in zip(theirs, means["trl"])),
             f"ratio ours / TRL: median {mo / mt:.2f}x, min {min(ours) / min(theirs):.2f}x (goal >= 1.0)"]
    return lines


def lora_share_1b() -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from domainlm.config import read_yaml

    m = read_yaml(REPO / "configs/model/1B.yaml")["model"]
    lines = []
    for vocab, what in ((32768, "a 32k domain vocab"), (128256, "Llama 3.2's 128,256 vocab")):
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=m["hidden_size"], intermediate_size=m["ffn_hidden_size"],
                          num_hidden_layers=m["num_layers"], num_attention_heads=m["num_attention_heads"],
                          num_key_value_heads=m["num_query_groups"], tie_word_embeddings=m["tie_embeddings"])
        with torch.device("meta"):
            model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        lines.append(f"LoRA r=16 on the 1B shape ({m['num_layers']} layers, d {m['hidden_size']}, {what}): "
                     f"{trainable:,} of {total:,} parameters trainable = {100 * trainable / total:.3f}% (goal <= 1%)")
    return lines


def memory_child(args) -> None:
    """One fresh process: build our trainer, run a few steps, print RSS after setup and peak."""
    import torch

    torch.manual_seed(0)
    w = {"seq": 256, "micro": 4, "accum": 1, "steps": 3, "warmup": 0, "dropout": 0.0}
    extra = {"method": args.memory_child}
    t = ours_trainer(args.model, Path(args.data), Path(args.work) / f"mem-{args.memory_child}", w, extra)
    base = _rss_now()
    for _ in range(w["steps"]):
        t.train_step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"after_setup": base, "peak": peak, "params": t.params}))
    t.close()


def _rss_now() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    return 0


def random_model(shape: str, tokenizer_model: Path, out: Path, dtype: str = "float32", device: str = "cpu") -> Path:
    """A random Llama of a configs/model shape (a name there, or a YAML file) with the demo model's
    tokenizer files (speed and memory do not depend on the weights); built on `device`."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from domainlm.config import read_yaml

    if (out / "config.json").is_file():
        return out
    m = read_yaml(Path(shape) if shape.endswith((".yaml", ".yml")) else REPO / f"configs/model/{shape}.yaml")["model"]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_model))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=m["hidden_size"], intermediate_size=m["ffn_hidden_size"],
                      num_hidden_layers=m["num_layers"], num_attention_heads=m["num_attention_heads"],
                      num_key_value_heads=m["num_query_groups"], rope_theta=float(m["rotary_base"]),
                      rms_norm_eps=m["norm_eps"], tie_word_embeddings=m["tie_embeddings"], max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()          # the runs are other processes: leave them the memory
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "tokenizer.model"):
        if (tokenizer_model / name).is_file():
            shutil.copy(tokenizer_model / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def memory(args) -> list[str]:
    data = Path(args.work) / "qa_bench.jsonl"
    models = [("demo model", args.model), ("125M shape", str(random_model("125M", Path(args.model),
                                                                         Path(args.work) / "llama125m")))]
    lines = [f"{'peak memory (max RSS, fresh process, 3 steps, micro 4, seq 256)':64s} {'after setup':>12s} "
             f"{'peak':>10s} {'trainable':>14s}"]
    for name, model in models:
        for method in ("lora", "full"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", method, "--model", model, "--data",
                                  str(data), "--work", args.work], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(out.stderr[-2000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            lines.append(f"  {name + ', ' + method:62s} {r['after_setup'] / 2**30:10.2f} GiB {r['peak'] / 2**30:7.2f} GiB "
                         f"{r['params']['trainable']:14,}")
    return lines


# -- GPU ------------------------------------------------------------------------------------------------

GPU_RUNS = {"ours": "ours (kernels triton)", "trl": "TRL SFTTrainer + peft", "qlora": "ours QLoRA (kernels triton)",
            "kept": "ours, norm/SwiGLU outputs kept"}   # the ablation of recompute_elementwise (issue 21)
CARRIED = ("trl", "datasets", "bitsandbytes")   # what a bare GPU machine gets from bench/work/gpu/wheels/finetune


def gpu_workload(args) -> dict:
    return {"seq": args.gpu_seq, "micro": 4, "accum": 2, "steps": args.gpu_steps, "warmup": args.gpu_warmup,
            "dropout": 0.0}


def gpu_plan(args) -> dict:
    """The GPU runs' configs, checked (with --dry-run nothing else happens)."""
    from domainlm.config import load_config
    from domainlm.finetune.config import SFTConfig

    w = gpu_workload(args)
    common = {"model": "bench/work/llama1b", "data": ["bench/work/long_conversations.jsonl"], "output": "bench/work/o",
              "train.seq_len": str(w["seq"]), "train.micro_batch_size": str(w["micro"]),
              "train.global_batch_size": str(w["micro"] * w["accum"]), "train.max_steps": str(w["steps"] + w["warmup"] + 5),
              "train.precision": "bf16", "lora.r": "16", "lora.alpha": "32", "lora.dropout": "0", "valid_fraction": "0"}
    ours = load_config(SFTConfig, None, {**common, "kernels": "triton"})
    qlora = load_config(SFTConfig, None, {**common, "method": "qlora", "kernels": "triton"})
    # TRL's config is checked too (in fp32: transformers refuses bf16 without a GPU)
    from trl import SFTConfig as TRLConfig

    TRLConfig(**trl_args(w, Path(args.work), bf16=False))
    return {"workload": w, "ours": ours, "qlora": qlora}


def load_tokenizer(tok_dir: Path):
    from transformers import AutoTokenizer

    if not (tok_dir / "tokenizer_config.json").is_file():
        raise SystemExit(f"--tokenizer {tok_dir}: not a Hugging Face tokenizer dir (bench/gpu_inputs.py builds one)")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    if not tok.chat_template or "generation" not in tok.chat_template:
        raise SystemExit(f"--tokenizer {tok_dir}: its chat template has no {{% generation %}} marks, which TRL's "
                         "assistant_only_loss needs")
    return tok


def long_conversations(tok, corpus: Path | None, n: int, seq: int, margin: int = 16) -> tuple[list, list[int]]:
    """n conversations, a long user text and a long answer of corpus text (numbered filler where no
    corpus is at hand; speed does not depend on the words), each cut to seq - margin tokens with the
    chat template applied (a longer one would be dropped by ours and cut by TRL). Returns them and
    their templated lengths."""
    texts, size = [], 0
    if corpus is not None and corpus.is_file():
        with corpus.open(encoding="utf-8") as f:
            for line in f:
                texts.append(json.loads(line)["text"])
                size += len(texts[-1])
                if size >= n * seq * 6:          # some 3-4 characters a token on pydoc text
                    break
    text = " ".join(" ".join(texts).split()) or " ".join(f"word{i}" for i in range(100_000))
    ids = tok(text, add_special_tokens=False)["input_ids"]

    def templated(conv) -> int:
        return len(tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"])

    limit = seq - margin
    side = (limit - templated([{"role": "user", "content": ""}, {"role": "assistant", "content": ""}])) // 2
    out, lengths, at = [], [], 0
    for _ in range(n):
        cut = side
        while True:
            parts = [tok.decode(ids[(at + k * side) % max(1, len(ids) - side):][:cut]) for k in range(2)]
            conv = [{"role": "user", "content": parts[0]}, {"role": "assistant", "content": parts[1]}]
            length = templated(conv)
            if length <= limit or cut <= 16:
                break
            cut -= (length - limit + 1) // 2 + 1       # decoding and re-encoding can merge or split a few tokens
        at = (at + 2 * side) % max(1, len(ids) - side)
        out.append(conv)
        lengths.append(length)
    return out, lengths


def carried_packages() -> str:
    """Where trl, datasets and bitsandbytes come from (found, not imported)."""
    import importlib.util
    from importlib import metadata

    out = []
    for name in CARRIED:
        spec = importlib.util.find_spec(name)
        if spec is None:
            out.append(f"{name} absent")
            continue
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "?"
        out.append(f"{name} {version} ({Path(spec.origin).parent})")
    return "packages: " + "; ".join(out)


def bnb_missing() -> str | None:
    """Why QLoRA cannot run here, or None."""
    import importlib.util

    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None:
        return "bitsandbytes not carried (no bitsandbytes on the path: no wheel in bench/work/gpu/wheels/finetune)"
    if not (Path(spec.origin).parent / "libbitsandbytes_cuda130.so").is_file():
        libs = sorted(f.name for f in Path(spec.origin).parent.glob("libbitsandbytes_*.so"))
        return f"bitsandbytes carried without a CUDA 13.0 library ({', '.join(libs) or 'none'})"
    return None


def quiet_bars() -> None:
    """No progress bars of transformers (loading, writing weights) in a benchmark's log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def gpu_child(args) -> None:
    """One run in a fresh process (peak memory its own, a failure its own): prints RESULT {json}."""
    import torch

    quiet_bars()

    name, w = args.gpu_child, gpu_workload(args)
    cuda = torch.cuda.is_available()
    work = Path(args.work)
    data = work / "long_conversations.jsonl"
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    kernels = None
    if name == "trl":
        convs = [json.loads(line)["messages"] for line in data.read_text(encoding="utf-8").splitlines()]
        trainer, clock = trl_trainer(args.model, convs, work / "run-trl", w, bf16=cuda)
        steps = time_trl(trainer, clock)
    else:
        extra = {"kernels": "triton", "train.device": "cuda" if cuda else "cpu",
                 "train.precision": "bf16" if cuda else "fp32", "method": "qlora" if name == "qlora" else "lora",
                 "recompute_elementwise": "false" if name == "kept" else "true"}
        t = ours_trainer(args.model, data, work / f"run-{name}", w, extra)
        try:
            kernels = t.kernel_counts
            steps = time_ours(t, w)
        finally:
            t.close()
    if not steps:
        raise SystemExit(f"{name}: no step was timed")
    res = {"name": name, "tok_s": rate(steps), "mean_tok_s": sum(n for n, _ in steps) / sum(s for _, s in steps),
           "steps": len(steps), "tokens_per_step": statistics.median(n for n, _ in steps),
           "step_s": statistics.median(s for _, s in steps), "wall_s": time.perf_counter() - t0,
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
           "kernels": kernels}
    print("RESULT " + json.dumps(res), flush=True)


def run_child(args, name: str, model: Path, timeout: float) -> tuple[dict | None, str]:
    """Runs `gpu_child` in a fresh process; (result, '') or (None, what went wrong)."""
    cmd = [sys.executable, __file__, "--gpu-child", name, "--model", str(model), "--work", args.work,
           "--gpu-seq", str(args.gpu_seq), "--gpu-steps", str(args.gpu_steps), "--gpu-warmup", str(args.gpu_warmup)]
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"TIMED OUT after {timeout:.0f}s"
    res = None
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
        else:
            print(f"    [{name}] {line}", file=sys.stderr, flush=True)
    if out.returncode or res is None:
        return None, f"FAILED (exit {out.returncode} after {time.perf_counter() - t0:.0f}s; its error is above)"
    return res, ""


def gpu(args, emit) -> int:
    """--gpu: the plan and inputs checked (all of it with --dry-run, or where no CUDA is), then the
    model made and each run in its own process. Lines go to `emit` as they come; returns the exit code."""
    import torch

    quiet_bars()
    plan = gpu_plan(args)
    w = plan["workload"]
    cuda = torch.cuda.is_available()
    rehearsal = not cuda and args.gpu_on_cpu and not args.dry_run
    emit(f"GPU plan ({'dry run, nothing executed' if args.dry_run else 'checked'}): {args.gpu_shape} shape "
         f"{'fp32 (on CPU: a rehearsal)' if rehearsal else 'bf16'}, seq {w['seq']}, micro {w['micro']} x accum "
         f"{w['accum']}, LoRA r=16 on {' '.join(TARGETS)}; ours kernels={plan['ours'].kernels} "
         f"precision={plan['ours'].train.precision}; TRL SFTTrainer + peft (sdpa, bf16); QLoRA "
         f"method={plan['qlora'].method}; {w['steps']} steps timed after {w['warmup']}")
    emit(carried_packages())
    tok_dir = Path(args.tokenizer or args.model)
    if args.tokenizer is None and not tok_dir.is_dir():
        emit(f"inputs: no tokenizer at {tok_dir} (--tokenizer DIR), not checked")
        tok = None
    else:
        tok = load_tokenizer(tok_dir)
        corpus = Path(args.corpus) if args.corpus else None
        if args.tokenizer is not None and args.corpus and not corpus.is_file():
            raise SystemExit(f"--corpus {corpus}: not found (bench/gpu_inputs.py writes one)")
        convs, lengths = long_conversations(tok, corpus, args.gpu_samples, w["seq"])
        emit(f"inputs: tokenizer {tok_dir} (vocab {len(tok):,}, chat template with generation marks); "
             f"{len(convs)} conversations from {corpus if corpus and corpus.is_file() else 'numbered filler'}, "
             f"{min(lengths):,}-{max(lengths):,} tokens with the template (seq {w['seq']})")
    qlora_note = bnb_missing()
    emit(f"QLoRA: {qlora_note or 'bitsandbytes found with its CUDA 13.0 library'}")
    if args.dry_run:
        return 0
    if not cuda and not args.gpu_on_cpu:
        emit("GPU: no CUDA device here; run `python bench/finetune.py --gpu` on a GPU machine")
        return 0
    if tok is None:
        raise SystemExit(f"--gpu needs a tokenizer: no HF tokenizer dir at {tok_dir} (--tokenizer DIR)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = random_model(args.gpu_shape, tok_dir, work / f"llama-{Path(args.gpu_shape).stem}",
                         dtype="bfloat16" if cuda else "float32", device="cuda" if cuda else "cpu")
    params = json.loads((model / "config.json").read_text())
    emit(f"model: random {args.gpu_shape} shape, {params['num_hidden_layers']} layers, d {params['hidden_size']}, vocab "
         f"{params['vocab_size']:,}, {'bf16' if cuda else 'fp32'} ({model}; {time.perf_counter() - t0:.0f}s)")
    (work / "long_conversations.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    emit(f"GPU: {torch.cuda.get_device_name(0) if cuda else 'none (CPU rehearsal)'}; ~{w['seq']}-token conversations, "
         f"micro {w['micro']} x accum {w['accum']}, LoRA r=16; {w['steps']} steps timed after {w['warmup']}, each run in "
         "a fresh process; tokens/s = non-pad tokens / (steps x median step time), peak = torch.cuda.max_memory_allocated")
    results, failed = {}, False
    for name, label in GPU_RUNS.items():
        if name == "qlora" and (not cuda or qlora_note):
            emit(f"  {label:32s} skipped: {'needs CUDA' if not cuda else qlora_note}")
            continue
        res, problem = run_child(args, name, model, args.gpu_child_timeout)
        if res is None:
            failed = True
            emit(f"  {label:32s} {problem}")
            continue
        results[name] = res
        peak = f"peak {res['peak_gib']:6.2f} GiB (reserved {res['reserved_gib']:.2f})" if cuda else "peak n/a on CPU"
        emit(f"  {label:32s} {res['tok_s']:12,.0f} tok/s [mean {res['mean_tok_s']:,.0f}]   {peak};  "
             f"{res['tokens_per_step']:,.0f} tokens/step, median step {res['step_s']:.3f}s, {res['wall_s']:.0f}s in all"
             + (f"; kernels {res['kernels']}" if res.get("kernels") else ""))
    if "ours" in results and "trl" in results:
        a, b = results["ours"], results["trl"]
        line = f"  ours / TRL: {a['tok_s'] / b['tok_s']:.2f}x tokens/s (goal >= 1.3)"
        if cuda:
            line += f", {a['peak_gib'] / b['peak_gib']:.2f}x peak memory (goal <= 0.6)"
        emit(line)
    if "kept" in results and "ours" in results and cuda:
        a, b = results["ours"], results["kept"]
        emit(f"  recomputed / kept: {a['tok_s'] / b['tok_s']:.3f}x tokens/s, {a['peak_gib'] / b['peak_gib']:.3f}x peak memory")
    if "qlora" in results and "trl" in results and cuda:
        emit(f"  ours QLoRA / TRL: {results['qlora']['peak_gib'] / results['trl']['peak_gib']:.2f}x peak memory, "
             f"{results['qlora']['tok_s'] / results['trl']['tok_s']:.2f}x tokens/s")
    return 1 if failed else 0


def main() -> None:
    from machine import describe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "runs/demo/hf"), help="HF dir (default: the demo model)")
    p.add_argument("--data", default=str(REPO / "runs/demo/corpus/qa.jsonl"), help="pydoc qa.jsonl")
    p.add_argument("--corpus", default=str(REPO / "runs/demo/corpus/corpus.jsonl"), help="text for --gpu's long samples")
    p.add_argument("--tokenizer", help="--gpu: HF tokenizer dir with a chat template for the random model "
                                       "(default: --model's)")
    p.add_argument("--work", default=str(REPO / "bench/work/finetune"))
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="CPU: both sides in this precision (bf16: ours train.precision=bf16, TRL bf16=True)")
    p.add_argument("--throughput-only", action="store_true", help="CPU: only ours against TRL (no LoRA share, no memory)")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--gpu-shape", default="1B", help="--gpu: configs/model shape of the random model")
    p.add_argument("--gpu-seq", type=int, default=2048)
    p.add_argument("--gpu-steps", type=int, default=20, help="--gpu: steps timed per run")
    p.add_argument("--gpu-warmup", type=int, default=3, help="--gpu: steps before the timed ones")
    p.add_argument("--gpu-samples", type=int, default=64, help="--gpu: conversations")
    p.add_argument("--gpu-child-timeout", type=float, default=240, help="--gpu: seconds each run may take")
    p.add_argument("--gpu-on-cpu", action="store_true", help="--gpu where no CUDA is: the same runs in fp32 (a rehearsal; "
                                                             "use a small --gpu-shape and --gpu-seq)")
    p.add_argument("--memory-child", choices=["lora", "full"], help=argparse.SUPPRESS)
    p.add_argument("--gpu-child", choices=list(GPU_RUNS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    if args.gpu_child:
        gpu_child(args)
        return
    print(describe(("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "triton",
                    "huggingface-hub", "pyarrow", "fsspec", "pandas")))
    print(f"command: python bench/finetune.py {' '.join(sys.argv[1:])}".rstrip(), flush=True)
    if args.gpu:
        sys.exit(gpu(args, lambda line: print(line, flush=True)))
    if not Path(args.model).is_dir() or not Path(args.data).is_file():
        sys.exit(f"needs the demo model and QA file ({args.model}, {args.data}): run `domainlm run configs/demo.yaml` "
                 "first, or give --model and --data")
    lines = cpu_throughput(args) + ([] if args.throughput_only else lora_share_1b() + memory(args))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

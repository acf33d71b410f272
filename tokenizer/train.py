"""`domainlm tokenizer train`: sample the corpus, train SentencePiece, export for Hugging Face.

The corpus is streamed once. Each document gets a seeded 64-bit hash of its key; a share of
documents (by hash) is held out for the report, and of the rest the documents with the smallest
hashes are kept up to the byte budget (a bottom-k sample: deterministic, independent of file
order, memory bounded by the budget). The sample is written one line per text line, which is how
SentencePiece reads, and trained with options chosen so the HF export encodes identically
(see hf_export.py).
"""

from __future__ import annotations

import heapq
from collections import Counter
import math
import multiprocessing
import os
import pickle
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from operator import itemgetter
from pathlib import Path

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import (StageOutput, describe_inputs, library_versions, make_manifest, sha256_file,
                               write_json)
from domainlm.progress import human_bytes, log, progress, summary
from domainlm.tokenizer.config import TokenizerConfig
from domainlm.corpus import corpus_files, jsonl_ranges, read_file, splittable
from domainlm.tokenizer.hf_export import CHAT_END, CHAT_START, parity, write_hf_files
from domainlm.tokenizer.report import Measurer, key_hashes
from domainlm.tokenizer.spm_proto import with_model_prefix

VOCAB_MULTIPLE = 128
BYTE_PIECES = 256
# SentencePiece skips longer lines; longer lines are cut into pieces of this many characters.
MAX_LINE_CHARS = 1 << 15


def padded_vocab(n: int) -> int:
    return int(math.ceil(n / VOCAB_MULTIPLE) * VOCAB_MULTIPLE)


def user_symbols(cfg: TokenizerConfig) -> list[str]:
    """User-defined symbols in id order after unk/bos/eos/pad: chat, reserved, newline."""
    return [CHAT_START, CHAT_END] + [f"<|reserved_{i}|>" for i in range(cfg.special.reserved)] + ["\n"]


class Sampler:
    """Bottom-k by hash under a byte budget: keeps the documents with the smallest hashes.

    Holds at most the budget plus one document; the result does not depend on input order.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.heap: list[tuple[int, str, int, str]] = []  # (-hash, key, bytes, text): largest hash on top
        self.bytes = 0

    def offer(self, h: int, key: str, text: str, size: int) -> None:
        if self.bytes >= self.budget and self.heap and (-self.heap[0][0], self.heap[0][1]) < (h, key):
            return  # it would be the first to go
        heapq.heappush(self.heap, (-h, key, size, text))
        self.bytes += size
        while len(self.heap) > 1 and self.bytes - self.heap[0][2] >= self.budget:
            self.bytes -= heapq.heappop(self.heap)[2]

    def merge(self, heap: list[tuple[int, str, int, str]]) -> None:
        """Offer every document another Sampler kept (its `heap`): the bottom-k of a union is the
        bottom-k of the parts' bottom-ks, so reading in parts gives the one-pass sample."""
        for neg_h, key, size, text in heap:
            self.offer(-neg_h, key, text, size)

    def texts(self) -> list[str]:
        """The kept texts by ascending hash. (Sorted on the hash alone, 4x faster than on
        (hash, key): two keys share a 64-bit hash with odds of ~n^2/2^65; equal keys keep
        their heap order, as a stable sort on (hash, key) would.)"""
        return [item[3] for item in sorted(self.heap, key=itemgetter(0), reverse=True)]


# Below this many corpus bytes the corpus is read in one process (a reading process costs ~20 ms).
PARALLEL_MIN_BYTES = 16 << 20
MAX_READERS = 4
MIN_SPLIT_BYTES = 1 << 20  # a JSON-lines file under this is read whole by one reader


def reading_parts(files: list[Path], readers: int) -> list[list[tuple[Path, tuple[int, int] | None]]]:
    """The corpus as up to `readers` groups of (file, byte range or None for the whole file), each
    a contiguous stretch of the corpus in file order with about equal bytes. Uncompressed
    JSON-lines files are cut at line starts; other files stay whole."""
    items: list[tuple[Path, tuple[int, int] | None, int]] = []
    for f in files:
        size = f.stat().st_size if f.is_file() else sum(g.stat().st_size for g in f.rglob("*") if g.is_file())
        if readers > 1 and splittable(f) and size > MIN_SPLIT_BYTES:
            items += [(f, r, r[1] - r[0]) for r in jsonl_ranges(f, readers)]
        else:
            items.append((f, None, size))
    total = sum(size for _, _, size in items) or 1
    groups: list[list] = [[] for _ in range(readers)]
    done = 0
    for f, r, size in items:
        groups[min(int((done + size / 2) * readers / total), readers - 1)].append((f, r))
        done += size
    return [g for g in groups if g]


def _sample_part(cfg: TokenizerConfig, part, bar=None) -> tuple[Sampler, Sampler, dict]:
    """One pass over a group of `reading_parts`: the train and held-out samplers and counts."""
    train, held = Sampler(cfg.sample_bytes), Sampler(cfg.heldout_max_bytes)
    counts = {"documents": 0, "bytes": 0, "empty": 0, "heldout_documents": 0}
    threshold = cfg.heldout_fraction * 2**64
    for path, byte_range in part:
        for doc in read_file(path, cfg.text_field, cfg.id_field, byte_range):
            text = doc.text
            size = len(text.encode("utf-8"))
            counts["documents"] += 1
            counts["bytes"] += size
            if bar is not None:
                bar.update(size)
            if not text or text.isspace():
                counts["empty"] += 1
                continue
            h_split, h_rank = key_hashes(cfg.seed, doc.key)
            if h_split < threshold:
                counts["heldout_documents"] += 1
                held.offer(h_rank, doc.key, text, size)
            else:
                train.offer(h_rank, doc.key, text, size)
    return train, held, counts


def first_bytes(texts: list[str], limit: int) -> list[str]:
    """The first of `texts` up to `limit` UTF-8 bytes (at least one)."""
    out, size = [], 0
    for t in texts:
        if out and size >= limit:
            break
        out.append(t)
        size += len(t.encode("utf-8"))
    return out


def _reader(cfg: TokenizerConfig, part, conn) -> None:
    """A reading process (forked): samples its part and sends the result, or the user error."""
    try:
        train, held, counts = _sample_part(cfg, part)
        msg = ("ok", train.heap, held.heap, counts)
    except UserError as e:
        msg = ("error", str(e))
    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
    conn.close()


def reading_processes(cfg: TokenizerConfig, files: list[Path]) -> int:
    """How many processes read the corpus: one per core up to MAX_READERS (--threads caps it);
    one for a small corpus, or where processes cannot be forked (they inherit the config)."""
    if not sys.platform.startswith("linux"):
        return 1
    total = sum(f.stat().st_size for f in files if f.is_file())
    if total < PARALLEL_MIN_BYTES:
        return 1
    return max(1, min(cfg.threads or os.cpu_count() or 1, MAX_READERS))


def sample_corpus(cfg: TokenizerConfig, files: list[Path]) -> dict:
    """Read the corpus once; return the training sample, the held-out texts and counts.

    Every document's key gives two hashes (one digest): the first holds out `heldout_fraction`
    of documents, the second ranks the rest, and the lowest-ranked up to `sample_bytes` are the
    sample, whatever the order of files and records. A large corpus is read by one process per
    core (`reading_parts`), each sampling its stretch; merged, the parts give the same sample.
    """
    total = sum(f.stat().st_size for f in files if f.is_file()) or None
    parts = reading_parts(files, reading_processes(cfg, files))
    bar = progress(total=total, desc="reading corpus", unit="B", unit_scale=True)
    children = []
    if len(parts) > 1:
        ctx = multiprocessing.get_context("fork")
        for part in parts[1:]:
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_reader, args=(cfg, part, send), daemon=True, name="domainlm-read")
            proc.start()
            send.close()
            children.append((proc, recv))
    try:
        train, held, counts = _sample_part(cfg, parts[0], bar)
        for proc, recv in children:  # in corpus order, so the first bad line is the one reported
            try:
                msg = pickle.loads(recv.recv_bytes())
            except EOFError:
                proc.join()
                raise UserError(f"a corpus reading process died (exit code {proc.exitcode}); "
                                "rerun with --threads 1 to read in one process") from None
            if msg[0] == "error":
                raise UserError(msg[1])
            _, train_heap, held_heap, part_counts = msg
            del msg
            train.merge(train_heap)
            held.merge(held_heap)
            del train_heap, held_heap
            for k, v in part_counts.items():
                counts[k] += v
            bar.update(part_counts["bytes"])
            proc.join()
    finally:
        for proc, recv in children:
            recv.close()
            if proc.is_alive():
                proc.kill()
                proc.join()
    bar.close()
    if counts["documents"] == 0:
        raise UserError(f"the corpus is empty: no documents in {', '.join(map(str, files))}")
    if not train.heap:
        why = "all are empty" if counts["empty"] == counts["documents"] else "all were held out"
        raise UserError(
            f"no text to train on: {counts['documents']:,} documents read and {why}; "
            "check --text-field and the inputs (or lower --heldout-fraction)"
        )
    return {"train": train.texts(), "heldout": held.texts(), "counts": counts,
            "sample_bytes": train.bytes, "heldout_bytes": held.bytes}


def sample_lines(text: str) -> list[str]:
    """A document as SentencePiece sentences: one per text line, blank lines dropped, long lines cut."""
    kept = [line for line in text.split("\n") if line and not line.isspace()]
    if len(text) > MAX_LINE_CHARS:
        kept = [line[i:i + MAX_LINE_CHARS] for line in kept for i in range(0, len(line), MAX_LINE_CHARS)]
    return kept


class SampleSentences:
    """The sample as SentencePiece's `sentence_iterator` (no sample file is written). `lines`
    counts the sentences given, `distinct` the different ones.

    BPE: each distinct line once, with its count, in SentencePiece's "tsv" input format
    (`input_format() == "tsv"`: "sentence<TAB>count"). SentencePiece's BPE trainer weighs every
    sentence by its count (characters, then words: it splits sentences into words and sorts the
    word counts before training, so neither order nor repetition matters beyond the counts) and
    gives the same model, while loading and normalizing each distinct line once: the pydoc sample
    has 384k distinct lines among 1.03M, and trains in 4.95 s instead of 6.75 s. Not for a sample
    holding a tab (the format's separator) and not for unigram (its seed pieces count a sentence
    once whatever its count, so the model differs): there every line goes as itself.
    (tests/test_tokenizer.py checks both ways give the same vocabulary and scores.)

    The texts are dropped from `texts` as they are used, so the sample is not held twice."""

    def __init__(self, texts: list[str], counted: bool):
        self.texts, self.lines, self.distinct = texts, 0, 0
        self.counts = self._count() if counted else None

    @property
    def input_format(self) -> str:
        return "tsv" if self.counts is not None else "text"

    def _count(self) -> dict[str, int] | None:
        counts: Counter = Counter()
        update = counts.update  # counts an iterable in C
        for t in self.texts:
            if "\t" in t:
                return None
            update(sample_lines(t) if len(t) > MAX_LINE_CHARS else t.split("\n"))
        for line in [line for line in counts if not line or line.isspace()]:  # as sample_lines drops
            del counts[line]
        self.texts.clear()
        self.lines, self.distinct = sum(counts.values()), len(counts)
        return counts

    def __iter__(self):
        if self.counts is not None:
            counts, self.counts = self.counts, None
            for line, n in counts.items():
                yield f"{line}\t{n}"
            return
        texts = self.texts
        for i in range(len(texts)):
            kept = sample_lines(texts[i])
            texts[i] = None
            self.lines += len(kept)
            yield from kept
        texts.clear()
        self.distinct = self.lines  # not counted


def write_sample(texts: list[str], path: Path) -> int:
    """The sample as a file SentencePiece reads (`input=`), the same sentences as SampleSentences."""
    lines = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for t in texts:
            kept = sample_lines(t)
            if kept:
                f.write("\n".join(kept))
                f.write("\n")
                lines += len(kept)
    return lines


def spm_options(cfg: TokenizerConfig, sample: Path | None, prefix: Path, vocab_size: int) -> dict:
    """SentencePieceTrainer options; the ones marked (*) are what the HF export relies on.
    `sample`: the sample file, or None when the sentences come through `sentence_iterator`."""
    s = cfg.special
    return dict(
        **({"input": str(sample)} if sample is not None else {}), model_prefix=str(prefix), vocab_size=vocab_size, model_type=cfg.model_type,
        byte_fallback=True,                    # no <unk> for text: unseen characters become bytes
        split_digits=True,                     # numbers tokenize digit by digit
        normalization_rule_name="identity",    # (*) text kept as is; the shard pipeline does NFC
        remove_extra_whitespaces=False,        # (*) runs of spaces are code and tables
        add_dummy_prefix=False,                # (*) no invented leading space
        allow_whitespace_only_pieces=True,     # indentation can be one piece
        split_by_whitespace=True,
        character_coverage=cfg.character_coverage,
        max_sentencepiece_length=cfg.max_piece_length,
        max_sentence_length=4 * MAX_LINE_CHARS,  # bytes; lines are cut to MAX_LINE_CHARS chars
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece=s.unk, bos_piece=s.bos, eos_piece=s.eos, pad_piece=s.pad,
        user_defined_symbols=user_symbols(cfg),
        input_sentence_size=0, shuffle_input_sentence=False,  # we sampled already
        num_threads=cfg.threads or os.cpu_count() or 1,
        minloglevel=2,
    )


def check_vocab(cfg: TokenizerConfig) -> int:
    vocab = padded_vocab(cfg.vocab_size)
    fixed = 4 + len(user_symbols(cfg)) + BYTE_PIECES
    need = padded_vocab(fixed + 128)
    if vocab < need:
        raise UserError(
            f"vocab_size {cfg.vocab_size} is too small: the 4 special tokens, "
            f"{len(user_symbols(cfg))} chat/reserved/newline symbols and {BYTE_PIECES} byte-fallback "
            f"pieces alone take {fixed}; use --vocab-size {need} or more (or fewer --special.reserved)"
        )
    return vocab


def train_spm(options: dict, sentences: SampleSentences | None = None) -> float:
    import sentencepiece as spm

    t0 = time.perf_counter()
    try:
        if sentences is not None:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), **options)
        else:
            spm.SentencePieceTrainer.train(**options)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        msg = re.sub(r"^\w+: \S+\(\d+\) \[.*?\] ", "", msg)  # drop "INTERNAL: file.cc(678) [check] "
        hint = ""
        if "Vocabulary size" in msg or "vocab_size" in msg:
            hint = "; lower --vocab-size or give more text (--sample-bytes, more input)"
        raise UserError(f"SentencePiece training failed: {msg}{hint}") from None
    return time.perf_counter() - t0


def inputs(cfg: TokenizerConfig) -> list[dict]:
    """The corpus files with their checksums, as the manifest records them."""
    return describe_inputs(corpus_files(cfg.input))


def train(cfg: TokenizerConfig) -> dict:
    vocab_size = check_vocab(cfg)
    files = corpus_files(cfg.input)
    with StageOutput(cfg.output, stages.TOKENIZER_TRAIN, overwrite=cfg.overwrite, inputs=files) as out:
        t0 = time.perf_counter()
        data = sample_corpus(cfg, files)
        # SentencePiece's BPE trainer runs on one core with the GIL released: what the manifest
        # needs and does not depend on the model (the inputs' checksums, the library versions)
        # is computed on another thread meanwhile rather than added to the run's time. (Started
        # after the reading processes are gone: they are forked, and a fork copies no threads.)
        background = ThreadPoolExecutor(1, thread_name_prefix="tokenizer-manifest")
        pending_inputs = background.submit(describe_inputs, files)
        background.submit(library_versions)  # cached for make_manifest
        background.shutdown(wait=False)
        n_sample_docs = len(data["train"])
        # a small corpus holds no document out: the export is checked on training text instead
        train_sample = [] if data["heldout"] else first_bytes(data["train"], cfg.heldout_max_bytes)
        sentences = SampleSentences(data.pop("train"), counted=cfg.model_type == "bpe")
        t_sample = time.perf_counter() - t0
        log.info("training SentencePiece %s, vocab %d, on %s (%d documents)",
                 cfg.model_type, vocab_size, human_bytes(data["sample_bytes"]), n_sample_docs)
        options = spm_options(cfg, None, out.tmp / "tokenizer", vocab_size)
        options["input_format"] = sentences.input_format
        t_train = train_spm(options, sentences)
        # SentencePiece records the temporary path it wrote to (named after the host and the
        # process): the file's own name instead, so identical trainings write identical models.
        model_file = out.tmp / "tokenizer.model"
        model_file.write_bytes(with_model_prefix(model_file.read_bytes(), "tokenizer"))
        lines = sentences.lines
        inputs = pending_inputs.result()

        import sentencepiece as spm

        t1 = time.perf_counter()
        sp = spm.SentencePieceProcessor(model_file=str(out.tmp / "tokenizer.model"))
        heldout, measured_on = (data["heldout"], "heldout") if data["heldout"] else (train_sample, "train")
        with ThreadPoolExecutor(1, thread_name_prefix="tokenizer-heldout") as pool:
            # SentencePiece encodes the held-out texts (C++, GIL released) while Python builds the
            # HF files; checked with the `tokenizers` object transformers wraps (AutoTokenizer
            # loading it is tested; importing transformers here would cost seconds on every run).
            pending_ids = pool.submit(sp.encode, heldout, num_threads=-1)
            s = cfg.special
            hf = write_hf_files(sp, cfg.model_type, out.tmp, {"unk": s.unk, "bos": s.bos, "eos": s.eos, "pad": s.pad},
                                user_symbols(cfg))
            ids = pending_ids.result()
        check = parity(sp, hf, heldout, expected=ids) if heldout else None
        metrics = Measurer.for_processor(sp, cfg.output).measure(heldout, ids) if heldout else None
        t_export = time.perf_counter() - t1
        if check and cfg.model_type == "bpe" and (check["id_mismatches"] or check["decode_mismatches"]):
            log.warning("HF export differs from SentencePiece on %d of %d %s documents: %s",
                        check["id_mismatches"], check["documents"],
                        "held-out" if measured_on == "heldout" else "training-sample", check["first_mismatch"])
        tok_info = {
            "model_type": cfg.model_type, "vocab_size": sp.get_piece_size(),
            "requested_vocab_size": cfg.vocab_size, "sha256": sha256_file(out.tmp / "tokenizer.model"),
            "unk_id": sp.unk_id(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id(),
            "user_defined": user_symbols(cfg),
        }
        counts = {**data["counts"], "sample_documents": n_sample_docs, "sample_bytes": data["sample_bytes"],
                  "sample_lines": lines, "sample_distinct_lines": sentences.distinct, "report_documents": len(heldout),
                  "report_bytes": data["heldout_bytes"] if measured_on == "heldout" else
                  sum(len(t.encode("utf-8")) for t in heldout)}
        # a measure on training text says so under its own key: consumers of "heldout" (bytes
        # per token for shard sizes, the model card) fall back to it knowingly
        report = ({"heldout": metrics, "hf_parity": check} if measured_on == "heldout" else
                  {"heldout": None, "train_sample": metrics, "hf_parity": check and {**check, "on": "train"}})
        # Timings go to report.json only: the manifest says what was made, not how fast.
        write_json(out.tmp / "report.json", {**report, "timings": {
            "read_and_sample_s": round(t_sample, 3), "sentencepiece_s": round(t_train, 3),
            "export_and_checks_s": round(time.perf_counter() - t1, 3)}})
        manifest = make_manifest(stages.TOKENIZER_TRAIN, cfg, inputs, tokenizer=tok_info, counts=counts,
                                 report=report, spm_options={k: v for k, v in options.items()
                                                             if k not in ("input", "input_format", "model_prefix", "num_threads")})
        out.commit(manifest)
    timings = {"sample_s": t_sample, "spm_train_s": t_train, "export_s": t_export}
    manifest["timings"] = timings
    rows = [
        ("output", cfg.output),
        ("corpus", f"{counts['documents']:,} documents, {human_bytes(counts['bytes'])} "
                   f"({counts['empty']:,} empty, {counts['heldout_documents']:,} held out)"),
        ("trained on", f"{counts['sample_documents']:,} documents, {human_bytes(counts['sample_bytes'])}"),
        ("vocab", f"{tok_info['vocab_size']:,} ({cfg.model_type}; asked {cfg.vocab_size:,}, padded to x{VOCAB_MULTIPLE})"),
        ("time", f"sample {t_sample:.1f}s, SentencePiece {t_train:.1f}s, export+checks {t_export:.1f}s"),
    ]
    on = "" if measured_on == "heldout" else " (training documents: none held out)"
    if metrics:
        rows.append(("held-out" if not on else "train sample",
                     f"{metrics['bytes_per_token']:.3f} bytes/token, {metrics['tokens_per_word']:.3f} "
                     f"tokens/word, {100 * metrics['byte_fallback_rate']:.3f}% byte fallback{on}"))
    if check:
        rows.append(("HF parity", f"{check['documents'] - check['id_mismatches']:,}/{check['documents']:,} documents "
                                  f"identical ids, {check['decode_mismatches']} decode mismatches "
                                  f"({human_bytes(check['bytes'])}){on}"))
    summary("domainlm tokenizer train", rows)
    return manifest

"""`domainlm tokenizer train`: sample the corpus, train SentencePiece, export for Hugging Face.

The corpus is streamed once. Each document gets a seeded 64-bit hash of its key; a share of
documents (by hash) is held out for the report, and of the rest the documents with the smallest
hashes are kept up to the byte budget (a bottom-k sample: deterministic, independent of file
order, memory bounded by the budget). The sample is written one line per text line, which is how
SentencePiece reads, and trained with options chosen so the HF export encodes identically
(see hf_export.py).
"""

from __future__ import annotations

import gc
import heapq
import math
import os
import re
import time
from pathlib import Path

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import StageOutput, describe_inputs, make_manifest, sha256_file, write_json
from domainlm.progress import human_bytes, log, progress, summary
from domainlm.tokenizer.config import TokenizerConfig
from domainlm.corpus import corpus_files, read_file
from domainlm.tokenizer.hf_export import CHAT_END, CHAT_START, parity, write_hf_files
from domainlm.tokenizer.report import Measurer, key_hashes

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

    def texts(self) -> list[str]:
        return [t for _, _, _, t in sorted(self.heap, key=lambda x: (-x[0], x[1]))]


def sample_corpus(cfg: TokenizerConfig, files: list[Path]) -> dict:
    """Read the corpus once; return the training sample, the held-out texts and counts.

    Every document's key gives two hashes (one digest): the first holds out `heldout_fraction`
    of documents, the second ranks the rest, and the lowest-ranked up to `sample_bytes` are the
    sample, whatever the order of files and records. (Reading is one process: on the 50 MB
    benchmark, splitting it over processes cost more in moving texts than it saved in parsing.)
    """
    train, held = Sampler(cfg.sample_bytes), Sampler(cfg.heldout_max_bytes)
    counts = {"documents": 0, "bytes": 0, "empty": 0, "heldout_documents": 0}
    total = sum(f.stat().st_size for f in files if f.is_file()) or None
    threshold = cfg.heldout_fraction * 2**64
    bar = progress(total=total, desc="reading corpus", unit="B", unit_scale=True)
    for path in files:
        for doc in read_file(path, cfg.text_field, cfg.id_field):
            text = doc.text
            size = len(text.encode("utf-8"))
            counts["documents"] += 1
            counts["bytes"] += size
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


def write_sample(texts: list[str], path: Path) -> int:
    """One SentencePiece sentence per text line; blank lines dropped, long lines cut."""
    lines = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for t in texts:
            kept = [line for line in t.split("\n") if line and not line.isspace()]
            if len(t) > MAX_LINE_CHARS:
                kept = [line[i:i + MAX_LINE_CHARS] for line in kept for i in range(0, len(line), MAX_LINE_CHARS)]
            if kept:
                f.write("\n".join(kept))
                f.write("\n")
                lines += len(kept)
    return lines


def spm_options(cfg: TokenizerConfig, sample: Path, prefix: Path, vocab_size: int) -> dict:
    """SentencePieceTrainer options; the ones marked (*) are what the HF export relies on."""
    s = cfg.special
    return dict(
        input=str(sample), model_prefix=str(prefix), vocab_size=vocab_size, model_type=cfg.model_type,
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


def train_spm(options: dict) -> float:
    import sentencepiece as spm

    t0 = time.perf_counter()
    try:
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
    inputs = describe_inputs(files)
    with StageOutput(cfg.output, stages.TOKENIZER_TRAIN, overwrite=cfg.overwrite) as out:
        t0 = time.perf_counter()
        data = sample_corpus(cfg, files)
        sample = out.tmp / "sample.txt"
        lines = write_sample(data["train"], sample)
        n_sample_docs = len(data.pop("train"))
        gc.collect()  # hand the sample's memory back before SentencePiece loads its own copy
        t_sample = time.perf_counter() - t0
        log.info("training SentencePiece %s, vocab %d, on %s (%d documents, %d lines)",
                 cfg.model_type, vocab_size, human_bytes(data["sample_bytes"]), n_sample_docs, lines)
        options = spm_options(cfg, sample, out.tmp / "tokenizer", vocab_size)
        t_train = train_spm(options)
        sample.unlink()

        import sentencepiece as spm

        t1 = time.perf_counter()
        sp = spm.SentencePieceProcessor(model_file=str(out.tmp / "tokenizer.model"))
        s = cfg.special
        # Checked with the `tokenizers` object transformers wraps (AutoTokenizer loading it is
        # tested; importing transformers here would cost seconds on every run).
        hf = write_hf_files(sp, cfg.model_type, out.tmp, {"unk": s.unk, "bos": s.bos, "eos": s.eos, "pad": s.pad},
                            user_symbols(cfg))
        heldout = data["heldout"]
        ids = sp.encode(heldout, num_threads=0) if heldout else []
        check = parity(sp, hf, heldout, expected=ids) if heldout else None
        metrics = Measurer.for_processor(sp, cfg.output).measure(heldout, ids) if heldout else None
        t_export = time.perf_counter() - t1
        if check and cfg.model_type == "bpe" and (check["id_mismatches"] or check["decode_mismatches"]):
            log.warning("HF export differs from SentencePiece on %d of %d held-out documents: %s",
                        check["id_mismatches"], check["documents"], check["first_mismatch"])
        tok_info = {
            "model_type": cfg.model_type, "vocab_size": sp.get_piece_size(),
            "requested_vocab_size": cfg.vocab_size, "sha256": sha256_file(out.tmp / "tokenizer.model"),
            "unk_id": sp.unk_id(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id(), "pad_id": sp.pad_id(),
            "user_defined": user_symbols(cfg),
        }
        counts = {**data["counts"], "sample_documents": n_sample_docs, "sample_bytes": data["sample_bytes"],
                  "sample_lines": lines, "report_documents": len(heldout), "report_bytes": data["heldout_bytes"]}
        report = {"heldout": metrics, "hf_parity": check}
        # Timings go to report.json only: the manifest says what was made, not how fast.
        write_json(out.tmp / "report.json", {**report, "timings": {
            "read_and_sample_s": round(t_sample, 3), "sentencepiece_s": round(t_train, 3),
            "export_and_checks_s": round(time.perf_counter() - t1, 3)}})
        manifest = make_manifest(stages.TOKENIZER_TRAIN, cfg, inputs, tokenizer=tok_info, counts=counts,
                                 report=report, spm_options={k: v for k, v in options.items()
                                                             if k not in ("input", "model_prefix", "num_threads")})
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
    if metrics:
        rows.append(("held-out", f"{metrics['bytes_per_token']:.3f} bytes/token, {metrics['tokens_per_word']:.3f} "
                                 f"tokens/word, {100 * metrics['byte_fallback_rate']:.3f}% byte fallback"))
    if check:
        rows.append(("HF parity", f"{check['documents'] - check['id_mismatches']:,}/{check['documents']:,} documents "
                                  f"identical ids, {check['decode_mismatches']} decode mismatches "
                                  f"({human_bytes(check['bytes'])})"))
    summary("domainlm tokenizer train", rows)
    return manifest

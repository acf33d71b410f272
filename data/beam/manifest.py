"""The manifest and the end-of-run summary of `domainlm data shard`, from the pipeline's own
counts; and the output directory on a remote Beam filesystem."""

from __future__ import annotations

import json

from domainlm import stages
from domainlm.errors import UserError
from domainlm.progress import human_bytes, human_count, log, summary
from domainlm.data.beam.read import MALFORMED, Plan
from domainlm.data.config import ShardConfig
from domainlm.data.shards import SPLITS, no_valid_document
from domainlm.tokenizer.tokdir import measured_bytes_per_token

STAGE = stages.DATA_SHARD
DROP_REASONS = MALFORMED + ("empty", "too_short", "too_long", "low_alnum", "repeated_lines",
                            "duplicate_exact", "duplicate_near")


def bytes_per_token(tok) -> float:
    """The tokenizer's measured bytes per token (its report: held-out documents, else a sample of
    its training text), to estimate shard sizes before tokenizing; 3.5 where it has none."""
    return measured_bytes_per_token(tok.manifest) or 3.5


def manifest_fields(result: dict, tok, dtype: str, n_files: int) -> dict:
    stats = result["stats"]
    splits = {}
    for split in SPLITS:
        shards = [{k: s[k] for k in ("name", "sha256", "bytes", "documents", "tokens")}
                  for s in result["shards"] if s["name"].startswith(split + "/")]
        splits[split] = {"documents": sum(s["documents"] for s in shards),
                         "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    dropped = {reason: int(stats.get(reason, 0)) for reason in DROP_REASONS}
    counts = {
        "files": n_files, "records": int(stats.get("records", 0)), "kept": int(stats.get("kept", 0)),
        "blank_lines": int(stats.get("blank_lines", 0)), "dead_letters": int(result["dead_letters"]),
        "unreadable_files": int(stats.get("unreadable_files", 0)),
        "near_candidate_pairs": int(stats.get("near_candidate_pairs", 0)),
        "near_duplicate_pairs": int(stats.get("near_duplicate_pairs", 0)),
        "renamed_duplicate_keys": sum(s["renamed_keys"] for s in result["shards"]),
        "moved_to_valid": int(stats.get("moved_to_valid", 0)),
        "moved_to_valid_tokens": int(stats.get("moved_to_valid_tokens", 0)),
    }
    tokenizer = tok.entry()
    return {"tokenizer": tokenizer, "token_dtype": dtype, "splits": splits, "dropped": dropped, "counts": counts}


def check_something_kept(fields: dict, plan: Plan, dead_path: str) -> None:
    c = fields["counts"]
    if c["kept"]:
        return
    files = ", ".join(f.label for f in plan.files[:3]) + (", ..." if len(plan.files) > 3 else "")
    if not c["records"]:
        raise UserError(f"the input is empty: no records in {files}")
    why = ", ".join(f"{n:,} {r}" for r, n in fields["dropped"].items() if n)
    first = ""
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(dead_path, compression_type="uncompressed") as f:
        line = f.readline().decode("utf-8").strip()
    if line:
        first = f"; first dead letter: {line[:300]}"
    raise UserError(f"nothing to shard: all {c['records']:,} records of {files} were dropped ({why}){first}; "
                    "check --text-field and the filters")


def print_summary(cfg: ShardConfig, f: dict, seconds: float) -> None:
    c, sp = f["counts"], f["splits"]
    tokens = sum(s["tokens"] for s in sp.values())
    dropped = ", ".join(f"{r} {n:,}" for r, n in f["dropped"].items() if n) or "none"
    rows = [("output", cfg.output),
            ("documents", f"{c['records']:,} records in {c['files']} files; kept {c['kept']:,}"),
            ("dropped", dropped),
            *[(split, f"{s['documents']:,} documents, {human_count(s['tokens'])} tokens, "
                      f"{len(s['shards'])} shards ({human_bytes(sum(x['bytes'] for x in s['shards']))})")
              for split, s in sp.items()],
            ("dead letters", f"{c['dead_letters']:,} in {cfg.output}/dead_letter.jsonl"),
            ("time", f"{seconds:.1f}s, {human_count(tokens / max(seconds, 1e-9))} tokens/s")]
    if c["unreadable_files"]:
        names = unreadable_files(f"{cfg.output}/dead_letter.jsonl", 3)
        shown = ", ".join(names) + (", ..." if c["unreadable_files"] > len(names) else "")
        note = (f"{c['unreadable_files']:,} file(s) cut short or corrupt ({shown}): their records after the damage "
                "are missing; repair or copy them again and rerun")
        log.warning("data shard: %s", note)
        rows.insert(3, ("UNREADABLE", note))
    if c.get("moved_to_valid"):
        note = (f"--valid-fraction {cfg.valid_fraction:g} gave valid/ under --valid-min-tokens "
                f"{cfg.valid_min_tokens:,} tokens, so 1 train document ({c['moved_to_valid_tokens']:,} tokens: the shortest "
                "that reaches it, else the longest) moved there")
        log.info("data shard: %s", note)
        rows.insert(len(rows) - 2, ("moved to valid", note))
    valid, documents = sp["valid"], sum(s["documents"] for s in sp.values())
    if cfg.valid_fraction > 0 and documents and not (valid["documents"] and valid["tokens"]):
        cause, fix = no_valid_document(cfg.valid_fraction, documents)
        note = f"no validation document: {cause}; pretraining validates on valid/ and needs one: rerun {fix}"
        log.warning("data shard: %s", note)
        rows.insert(len(rows) - 2, ("NO VALID", note))
    summary("domainlm data shard", rows)


def unreadable_files(dead_path: str, limit: int) -> list[str]:
    """The first `limit` files the dead letters name as unreadable (a truncated gzip, a corrupt
    Parquet file)."""
    import json

    from apache_beam.io.filesystems import FileSystems

    out: list[str] = []
    with FileSystems.open(dead_path, compression_type="uncompressed") as fh:
        for line in fh:
            if b'"unreadable_file"' in line:
                rec = json.loads(line)
                if rec.get("reason") == "unreadable_file" and rec.get("file") not in out:
                    out.append(rec.get("file"))
                    if len(out) >= limit:
                        break
    return out


class RemoteOutput:
    """StageOutput's interface for an output on a Beam filesystem: written in place (object
    stores have no atomic directory rename), the manifest last. Like StageOutput it refuses a
    directory holding something else unless --overwrite, and clears an earlier output first so
    no shard of an older run is left behind."""

    def __init__(self, path: str, overwrite: bool):
        from apache_beam.io.filesystems import FileSystems

        self.tmp = path.rstrip("/")
        try:
            old = [m.path for m in FileSystems.match([self.tmp + "/**"])[0].metadata_list]
        except Exception:  # BeamIOError: nothing there
            old = []
        if old and not overwrite:
            owner = None
            if FileSystems.exists(f"{self.tmp}/manifest.json"):
                with FileSystems.open(f"{self.tmp}/manifest.json", compression_type="uncompressed") as f:
                    try:
                        owner = json.loads(f.read().decode("utf-8")).get("stage")
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        owner = None
            if owner != STAGE:
                raise UserError(f"output {path!r} already holds something else ({len(old)} files); choose "
                                "an empty or new location, or pass --overwrite to replace it")
        if old:
            FileSystems.delete(old)

    def __enter__(self) -> "RemoteOutput":
        return self

    def commit(self, manifest: dict) -> None:
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.create(f"{self.tmp}/manifest.json", compression_type="uncompressed") as f:
            f.write((json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))

    def __exit__(self, *exc) -> None:
        pass

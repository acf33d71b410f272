"""`domainlm data shard`: corpus -> clean, deduplicated, tokenized WebDataset shards (Beam).

The work is in the pipeline (beam_pipeline.py and the stages it names); this entry checks the
inputs and the tokenizer, runs it into an atomic output directory and writes the manifest.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from domainlm.errors import UserError
from domainlm.progress import log
from domainlm.manifest import StageOutput, describe_inputs, make_manifest
from domainlm.data.beam import worker as beam_worker
from domainlm.data.beam.manifest import (STAGE, RemoteOutput, bytes_per_token, check_something_kept,
                                              manifest_fields, print_summary)
from domainlm.data.beam.read import list_inputs, make_plan
from domainlm.data.config import ShardConfig
from domainlm.data.shards import SPLITS, token_dtype
from domainlm.tokenizer.tokdir import describe_input, load_tokenizer_dir


def inputs(cfg: ShardConfig) -> list[dict]:
    """The corpus files (path, size, checksum) and the tokenizer (its fingerprint)."""
    beam_worker.install()  # before the first Beam import logs its start-up warnings
    out = []
    for path, size in list_inputs(cfg.input):
        if "://" in path:
            from apache_beam.io.filesystems import FileSystems

            out.append({"path": path, "bytes": size, "checksum": FileSystems.checksum(path)})
        else:
            out.extend(describe_inputs([Path(path)]))
    return out + [describe_input(cfg.tokenizer)]


def shard(cfg: ShardConfig) -> dict:
    beam_worker.install()
    from domainlm.data.beam.pipeline import (DEAD_LETTER, check_options, dask_local_workers, direct_workers,
                                             encode_threads, for_input_size, is_dask, is_direct, run, session)

    check_options(cfg.beam)
    tok = load_tokenizer_dir(cfg.tokenizer)
    workers = (direct_workers(cfg.beam)[0] if is_direct(cfg.beam)
               else dask_local_workers(cfg.beam) if is_dask(cfg.beam) else 0)
    plan = make_plan(cfg.input, cfg.beam.chunk_bytes, workers)
    beam_args, why = for_input_size(cfg.beam, sum(f.size for f in plan.files))
    if why:  # a run-time choice (not in the manifest): the shards are the same bytes either way
        log.info("Beam: one in-memory process: %s", why)
        cfg = dataclasses.replace(cfg, beam=beam_args)
        plan = make_plan(cfg.input, cfg.beam.chunk_bytes, 1)
    if all(f.size == 0 for f in plan.files):
        raise UserError(f"the input is empty: {', '.join(f.path for f in plan.files)} hold no bytes")
    described = inputs(cfg)
    dtype = token_dtype(tok.vocab_size).name
    t0 = time.perf_counter()
    remote = "://" in cfg.output
    local_out = None if remote else StageOutput(cfg.output, STAGE, overwrite=cfg.overwrite,
                                                     inputs=described)  # checks it
    # then the runner's engine (a dask cluster, or a refusal) before anything is written
    with session(cfg.beam) as engine, (local_out or RemoteOutput(cfg.output, cfg.overwrite)) as out:
        root = str(out.tmp)
        for split in SPLITS:
            if not remote:
                (out.tmp / split).mkdir(parents=True, exist_ok=True)
        result = run(cfg, plan, tok.encoder(encode_threads(cfg.beam)), dtype, bytes_per_token(tok), root, engine)
        fields = manifest_fields(result, tok, dtype, len(plan.files))
        check_something_kept(fields, plan, f"{root}/{DEAD_LETTER}")
        manifest = make_manifest(STAGE, cfg, described, **fields)
        out.commit(manifest)
    seconds = time.perf_counter() - t0
    print_summary(cfg, fields, seconds)
    return {**manifest, "seconds": seconds}

"""`domainlm convert to-hf` and `domainlm convert from-hf`: Megatron <-> Hugging Face Llama
(and the entry point of `domainlm convert from-gguf`, whose work is in convert/gguf.py).

to-hf:   checkpoint dir (any TP/PP layout) -> one CPU process at TP=1 -> LlamaForCausalLM files
         -> both models on the same prompts (logits within the dtype's tolerance) -> commit.
from-hf: HF Llama / Mistral dir -> checks -> megatron checkpoint dir (the pretraining layout)
         -> loaded back and compared with the HF model -> commit.
Both write into a hidden directory that only becomes the output once everything passed
(StageOutput), so a refused or failed conversion leaves nothing behind. The work is in
convert_mapping (names and fused layouts), convert_megatron, convert_hf, convert_verify and
convert_card.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import StageOutput, describe_inputs, make_manifest, sha256_file, sha256_json, write_json
from domainlm.progress import log, summary
from domainlm.pretrain.convert.config import ConvertFromHFConfig, ConvertToHFConfig, FromGGUFConfig, parse_size

TO_HF = stages.CONVERT_TO_HF
FROM_HF = stages.CONVERT_FROM_HF
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def inputs_to_hf(cfg: ConvertToHFConfig) -> list[dict]:
    """The checkpoint as the manifest records it: its run's fingerprint, the iteration, and the
    iteration's files (names, sizes, the tensor index's checksum) -- not a hash of every weight,
    so `domainlm run` can tell a new `latest` without reading a multi-GB checkpoint."""
    from domainlm.pretrain.convert.megatron import read_checkpoint_dir

    info = read_checkpoint_dir(cfg.checkpoint, cfg.iteration, verify=False)
    m, it = info.manifest, info.iter_dir
    files = sorted(f for f in it.iterdir() if f.is_file())
    return [{"path": cfg.checkpoint, "run": m.get("fingerprint") or m.get("fingerprint_when_done"),
             "iteration": it.name, "files": sha256_json([[f.name, f.stat().st_size] for f in files]),
             "index_sha256": sha256_file(it / ".metadata") if (it / ".metadata").is_file() else None}]


def inputs_from_hf(cfg: ConvertFromHFConfig) -> list[dict]:
    from domainlm.pretrain.convert.hfdir import read_config

    read_config(Path(cfg.model))
    return describe_inputs([Path(cfg.model)])


# -- to-hf ----------------------------------------------------------------------------------------


def to_hf(cfg: ConvertToHFConfig) -> dict:
    """Entry point of `domainlm convert to-hf`."""
    from domainlm.pretrain.convert import hfdir
    from domainlm.pretrain.convert import megatron as meg
    from domainlm.pretrain.convert.card import model_card, training_summary
    from domainlm.pretrain.convert.mapping import hf_config, to_hf as map_to_hf
    from domainlm.pretrain.convert.verify import compare, describe

    t0 = time.perf_counter()
    info = meg.read_checkpoint_dir(cfg.checkpoint, cfg.iteration)
    max_shard = parse_size(cfg.max_shard_size, "max_shard_size")
    described = inputs_to_hf(cfg)
    with StageOutput(cfg.output, TO_HF, overwrite=cfg.overwrite, inputs=described) as out, \
            meg.single_process():
        log.info("convert: loading %s (%s layers, width %d)", info.iter_dir, info.model.num_layers,
                 info.model.hidden_size)
        model = meg.build(info.model, info.padded_vocab, info.seq_len)
        meg.load_weights(model, info)
        dtype = meg.stored_dtype(info.iter_dir) if cfg.dtype == "auto" else DTYPES[cfg.dtype]
        hfdir.copy_tokenizer(info.root / "tokenizer", out.tmp)
        tok = hfdir.load_tokenizer(out.tmp, f"checkpoint {cfg.checkpoint!r}: tokenizer/")
        if len(tok) > info.vocab:
            raise UserError(f"checkpoint {cfg.checkpoint!r}: its tokenizer has {len(tok)} tokens but the model "
                            f"{info.vocab} rows; the tokenizer/ copy does not belong to this model")
        hf_cfg = hf_config(info.model, vocab=info.vocab, seq_len=info.seq_len, dtype=dtype, bos_id=tok.bos_token_id,
                           eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        write_json(out.tmp / "config.json", hf_cfg)
        write_json(out.tmp / "generation_config.json", hfdir.generation_config(tok))
        weights = map_to_hf(model.state_dict(), info.model, info.vocab)
        files = hfdir.write_safetensors(weights, out.tmp, dtype, max_shard)
        params = sum(t.numel() for t in weights.values())
        del weights
        report = None
        if cfg.verify:
            hf_model = load_hf_model(out.tmp, dtype)
            report = compare(model, hf_model, tok, cfg.checks.prompts, cfg.checks.new_tokens, info.vocab, dtype)
            log.info("verify: %s", describe(report))
            if not report["passed"]:
                raise UserError(f"verification failed, nothing written to {cfg.output!r}: {describe(report)}")
        training = training_summary(info)
        (out.tmp / "README.md").write_text(
            model_card(Path(cfg.output).name, cfg.output, info, hf_cfg, params, hf_cfg["torch_dtype"], training,
                       report),
            encoding="utf-8")
        manifest = make_manifest(TO_HF, cfg, described, source={"checkpoint": cfg.checkpoint, "iteration": info.step,
                                                                 "stage": info.manifest.get("stage")},
                                 model=info.model.architecture(), parameters=params, dtype=hf_cfg["torch_dtype"],
                                 hf_config=hf_cfg, files=files, training=training, verification=report)
        out.commit(manifest)
    _summary_to_hf(cfg, info, params, hf_cfg, files, report, time.perf_counter() - t0)
    return manifest


def load_hf_model(path: Path, dtype: torch.dtype):
    """Stock transformers' AutoModelForCausalLM on the written files; every weight must load."""
    from transformers import AutoModelForCausalLM

    model, loading = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    bad = {k: v for k, v in loading.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"transformers did not load every weight of {path}: {bad}")
    return model.eval()


def _summary_to_hf(cfg, info, params, hf_cfg, files, report, seconds) -> None:
    from domainlm.pretrain.convert.verify import describe

    rows = [("checkpoint", f"{info.iter_dir} ({info.manifest.get('stage')})"),
            ("model", f"LlamaForCausalLM, {params:,} parameters, {hf_cfg['torch_dtype']}, vocab {hf_cfg['vocab_size']} "
                      f"(megatron rows {info.padded_vocab}), tied embeddings {hf_cfg['tie_word_embeddings']}"),
            ("weights", f"{len(files)} safetensors file(s), {sum(f['bytes'] for f in files) / 1e6:,.1f} MB"),
            ("verification", describe(report) if report else "skipped (--no-verify)")]
    for r in (report or {}).get("prompts", []):
        rows.append((f"sample {r['prompt'][:24]!r}", repr(r["sample"][:100])))
    rows += [("output", cfg.output), ("time", f"{seconds:.1f}s")]
    summary("domainlm convert to-hf", rows)


# -- from-hf --------------------------------------------------------------------------------------


def from_hf(cfg: ConvertFromHFConfig) -> dict:
    """Entry point of `domainlm convert from-hf`."""
    from domainlm.pretrain import checkpoint
    from domainlm.pretrain.convert import hf, hfdir
    from domainlm.pretrain.convert import megatron as meg
    from domainlm.pretrain.convert.mapping import auto_divisible_by, from_hf as map_from_hf, model_args_from_hf
    from domainlm.pretrain.convert.verify import compare, describe
    from domainlm.pretrain.model import padded_vocab

    t0 = time.perf_counter()
    src = Path(cfg.model)
    hf_cfg = hfdir.read_config(src)
    arch = (hf_cfg.get("architectures") or ["?"])[0]
    m = model_args_from_hf(hf_cfg, f"{src / 'config.json'}")
    _check_layout(m, cfg.tp, cfg.pp)
    hfdir.weight_files(src)                        # pickle-only / missing weights: refused before any work
    described = inputs_from_hf(cfg)
    with StageOutput(cfg.output, FROM_HF, overwrite=cfg.overwrite, inputs=described) as out:
        tok_entry = hf.import_tokenizer(src, out.tmp / "tokenizer")
        vocab, hf_rows = tok_entry["vocab_size"], int(hf_cfg["vocab_size"])
        if vocab > hf_rows:
            raise UserError(f"model {cfg.model!r}: its tokenizer has {vocab} tokens but the model only {hf_rows} "
                            "embedding rows; the tokenizer files do not belong to this model")
        divisor = cfg.make_vocab_size_divisible_by or auto_divisible_by(vocab)
        m = dataclasses.replace(m, make_vocab_size_divisible_by=divisor)
        padded = padded_vocab(vocab, m.make_vocab_size_divisible_by, cfg.tp)
        weights, read_info = hf.read_weights(src, m, hf_rows, arch)
        seq_len = int(hf_cfg.get("max_position_embeddings") or 2048)
        save_dtype = weights["model.norm.weight"].dtype if len(read_info["dtypes"]) == 1 else torch.float32
        source = {"path": cfg.model, "architecture": arch, "hf_vocab_rows": hf_rows,
                  "rows_dropped": max(0, hf_rows - padded), "ignored": read_info["ignored"],
                  "weights_dtype": read_info["dtypes"]}
        manifest = make_manifest(FROM_HF, cfg, described, model=m.architecture(), tokenizer=tok_entry,
                                 padded_vocab_size=padded, seq_len=seq_len, source=source,
                                 dtype=str(save_dtype).removeprefix("torch."))
        report = None
        with meg.single_process():
            model = meg.build(m, padded, seq_len)
            meg.set_weights(model, map_from_hf(weights, m, padded))
            del weights
            model.to(save_dtype)            # stored as the HF weights were: nothing rounded, nothing inflated
            manifest["fingerprint_when_done"] = manifest["fingerprint"]
            write_json(out.tmp / "manifest.json", manifest)
            meg.save(model, out.tmp, {"step": 0, "model": m.architecture(), "converted_from": cfg.model})
            del model
            _write_run_config(out.tmp / "config.yaml", cfg, m, tok_entry)
            if cfg.verify:
                info = meg.CheckpointInfo(root=out.tmp, step=0, manifest=manifest, model=m, vocab=vocab,
                                          padded_vocab=padded, seq_len=seq_len)
                reloaded = meg.build(m, padded, seq_len)
                meg.load_weights(reloaded, info)
                report = compare(reloaded, load_hf_model(src, torch.float32),
                                 hfdir.load_tokenizer(out.tmp / "tokenizer", "tokenizer"), cfg.checks.prompts,
                                 cfg.checks.new_tokens, vocab, torch.float32)
                log.info("verify: %s", describe(report))
                if not report["passed"]:
                    raise UserError(f"verification failed, nothing written to {cfg.output!r}: {describe(report)}")
        manifest.update(checkpoints=checkpoint.kept(out.tmp), latest=checkpoint.iter_name(0), verification=report)
        manifest.pop("fingerprint_when_done", None)
        out.commit(manifest)
    _summary_from_hf(cfg, m, tok_entry, padded, source, save_dtype, report, time.perf_counter() - t0)
    return manifest


def _check_layout(m, tp: int, pp: int) -> None:
    if m.num_attention_heads % tp or m.num_query_groups % tp or m.ffn_hidden_size % tp:
        raise UserError(f"--tp {tp} does not divide the model's heads ({m.num_attention_heads}), key/value heads "
                        f"({m.num_query_groups}) and MLP width ({m.ffn_hidden_size}); pick a TP size that does")
    if m.num_layers % pp:
        raise UserError(f"--pp {pp} does not divide the model's {m.num_layers} layers")


def _write_run_config(path: Path, cfg: ConvertFromHFConfig, m, tok: dict) -> None:
    """config.yaml: the pretrain config that continues from this checkpoint (add data and a dir)."""
    import yaml

    out = Path(cfg.output)
    model = {k: v for k, v in dataclasses.asdict(m).items() if k not in ("size",)}
    data = {"tokenizer": str(out / "tokenizer"), "init_from": str(out), "model": model,
            "parallel": {"tensor": cfg.tp, "pipeline": cfg.pp}}
    note = ("# Make shards with this model's tokenizer first:\n"
            f"#   domainlm data shard --tokenizer {out / 'tokenizer'} --input CORPUS --output SHARDS\n"
            if _pretrainable(tok) else
            f"# NOTE: shards and pretraining cannot use this tokenizer ({_why_not(tok)}),\n"
            "# so pretraining refuses this checkpoint; it still converts back to HF.\n")
    path.write_text(
        f"# domainlm pretrain --config {out / 'config.yaml'} --data.shards SHARDS --checkpoint.dir NEW_DIR\n"
        f"# Continue pretraining {cfg.model} (converted by `domainlm convert from-hf`): weights from\n"
        "# init_from; optimizer, schedule and step start afresh. Set train/optim/schedule as for any run.\n"
        + note + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _pretrainable(tok: dict) -> bool:
    """Whether shards and pretraining can use the imported tokenizer (entries written before HF
    tokenizers were supported only say "sentencepiece")."""
    return bool(tok.get("pretrainable", tok.get("sentencepiece")))


def _why_not(tok: dict) -> str:
    return str(tok.get("why_not_pretrainable") or tok.get("why_not_sentencepiece") or "unknown")


def _describe_tokenizer(tok: dict) -> str:
    if not _pretrainable(tok):
        return f"HF files only ({_why_not(tok)}): converts back to HF; pretraining cannot continue from it"
    if tok.get("kind") == "hf":
        return "HF tokenizer.json (tokenizers library): shards and pretraining can use it"
    return "SentencePiece: shards and pretraining can use it"


def _summary_from_hf(cfg, m, tok, padded, source, dtype, report, seconds) -> None:
    from domainlm.pretrain.convert.verify import describe

    out = Path(cfg.output)
    rows = [("source", f"{cfg.model} ({source['architecture']})"),
            ("model", f"{m.num_layers} layers, width {m.hidden_size}, {m.num_attention_heads} heads / "
                      f"{m.num_query_groups} kv, MLP {m.ffn_hidden_size}, theta {m.rotary_base:g}, "
                      f"tied {m.tie_embeddings}"),
            ("vocab", f"tokenizer {tok['vocab_size']}, HF rows {source['hf_vocab_rows']}, megatron rows {padded}"
                      + (f" ({source['rows_dropped']} unused HF rows dropped)" if source["rows_dropped"] else "")),
            ("tokenizer", _describe_tokenizer(tok)),
            ("checkpoint", f"{out / 'iter_0000000'} ({str(dtype).removeprefix('torch.')}), "
                           f"for TP={cfg.tp} PP={cfg.pp}"),
            ("verification", describe(report) if report else "skipped (--no-verify)"),
            ("continue", f"domainlm pretrain --config {out / 'config.yaml'} --data.shards SHARDS --checkpoint.dir DIR"),
            ("time", f"{seconds:.1f}s")]
    summary("domainlm convert from-hf", rows)


# -- from-gguf ------------------------------------------------------------------------------------


def inputs_from_gguf(cfg: FromGGUFConfig) -> list[dict]:
    from domainlm.pretrain.convert.gguf import describe_inputs

    return describe_inputs(cfg)


def from_gguf(cfg: FromGGUFConfig) -> dict:
    """Entry point of `domainlm convert from-gguf` (the work: convert/gguf.py)."""
    from domainlm.pretrain.convert.gguf import convert

    return convert(cfg)

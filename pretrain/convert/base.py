"""`domainlm convert base`: whatever the user brings as a base model, as an HF dir every later
stage takes (`HFDir`).

    a packaged base name (smollm2-135m-instruct)   -> convert/gguf.py (the packaged GGUF)
    a .gguf file                                   -> convert/gguf.py
    an HF Llama-family dir (config.json + safetensors) -> checked, then linked into OUTPUT

The pipelines' `base` stage is this command with `--input ${base}`, so `--var base=PATH` takes a
GGUF file or an HF dir alike. An HF dir is checked through the HF dir contract (a causal LM of the
Llama family, safetensors only, a chat template: the comparison and fine-tuning need one) and its
files are hard-linked (copied across file systems) into OUTPUT with a manifest; the weights stay
byte-identical, so adapters trained on OUTPUT name the same weights' sha256 as the source's. The
pad token is made one that is not eos, as for a GGUF (fine-tuning pads with it).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from domainlm import stages
from domainlm.errors import UserError
from domainlm.manifest import StageOutput, describe_inputs, make_manifest
from domainlm.progress import summary
from domainlm.pretrain.convert.config import BaseConfig, FromGGUFConfig

STAGE = stages.CONVERT_BASE


def kind(cfg: BaseConfig) -> str:
    """'gguf' (a file or a packaged name) or 'hf' (a directory); a one-line refusal otherwise."""
    from domainlm.pretrain.convert.gguf import MAGIC, PACKAGED

    text = cfg.input.strip()
    p = Path(text).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"base {text!r} is a directory without config.json: neither an HF model dir "
                            "(config.json + *.safetensors + tokenizer) nor a GGUF file; give one of those, or a "
                            f"packaged base ({', '.join(PACKAGED)})")
        return "hf"
    if p.is_file():
        with open(p, "rb") as f:
            if f.read(4) != MAGIC:
                raise UserError(f"base {text!r} is neither an HF model dir nor a GGUF file (it does not start with "
                                "the GGUF magic); give a .gguf file, an HF model dir, or a packaged base "
                                f"({', '.join(PACKAGED)})")
        return "gguf"
    if text.lower() in PACKAGED:
        return "gguf"
    raise UserError(f"base {text!r}: no such file or directory; give an HF model dir, a .gguf file, or a packaged "
                    f"base ({', '.join(PACKAGED)})")


def _gguf_config(cfg: BaseConfig) -> FromGGUFConfig:
    return FromGGUFConfig(input=cfg.input, output=cfg.output, dtype=cfg.dtype, chat_template=cfg.chat_template,
                          verify=cfg.verify, overwrite=cfg.overwrite)


def inputs(cfg: BaseConfig) -> list[dict[str, Any]]:
    if kind(cfg) == "gguf":
        from domainlm.pretrain.convert.gguf import describe_inputs as gguf_inputs

        return gguf_inputs(_gguf_config(cfg))
    extra = [Path(cfg.chat_template)] if cfg.chat_template else []
    return describe_inputs([Path(cfg.input), *extra])


def prepare(cfg: BaseConfig) -> dict[str, Any]:
    if kind(cfg) == "gguf":
        from domainlm.pretrain.convert.gguf import convert

        return convert(_gguf_config(cfg), stage=STAGE, recorded=cfg)
    return _from_hf_dir(cfg)


def _from_hf_dir(cfg: BaseConfig) -> dict[str, Any]:
    from domainlm.pretrain.convert.gguf import check_template, save_tokenizer, chat_template_file, choose_pad
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    t0 = time.perf_counter()
    src = open_hf_dir(cfg.input)
    src.require_llama_family(STAGE)
    template = chat_template_file(cfg.chat_template) if cfg.chat_template else None
    if template is None and not src.chat_template:
        raise UserError(f"base {cfg.input!r} has no chat template (chat_template.jinja or tokenizer_config.json's "
                        "chat_template); the comparison, fine-tuning and serving need one: give --chat-template "
                        "FILE.jinja (e.g. the template of the model's instruct version, or ChatML)")
    inputs_ = inputs(cfg)
    with StageOutput(cfg.output, STAGE, overwrite=cfg.overwrite, inputs=inputs_) as out:
        linked = 0
        for f in sorted(src.path.iterdir()):
            if f.is_file() and f.name != "manifest.json" and not f.name.startswith("."):
                _link_or_copy(f, out.tmp / f.name)
                linked += 1
        tok = src.tokenizer()
        pad_note = choose_pad(tok)
        if template is not None:
            tok.chat_template = template
        check_template(tok, cfg.chat_template or f"{cfg.input}")
        for name in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            (out.tmp / name).unlink(missing_ok=True)           # rewritten by the tokenizer, not linked
        save_tokenizer(tok, out.tmp, src.max_positions)
        written = open_hf_dir(out.tmp)
        manifest = make_manifest(STAGE, cfg, inputs_, source={"kind": "hf", "path": str(src.path)},
                                 model={"architecture": (src.config.get("architectures") or ["?"])[0],
                                        "weights_sha256": written.weights_sha256()},
                                 tokenizer={"vocab_size": len(tok), "eos": tok.eos_token, "pad": tok.pad_token,
                                            "pad_note": pad_note, "chat_template": "file" if template else "the dir's"},
                                 files={"linked": linked}, timing={"total_s": round(time.perf_counter() - t0, 2)})
        out.commit(manifest)
    summary(f"domainlm {STAGE}", [("input", f"{cfg.input} (HF dir, {manifest['model']['architecture']})"),
                                  ("weights", f"{linked} file(s) hard-linked or copied, sha256 "
                                              f"{manifest['model']['weights_sha256'][:16]}..."),
                                  ("tokenizer", f"{len(tok):,} tokens; pad {pad_note}"),
                                  ("output", cfg.output), ("time", f"{time.perf_counter() - t0:.1f}s")])
    return manifest


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)

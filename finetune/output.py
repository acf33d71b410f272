"""What `finetune sft` leaves behind: the adapter dir (or HF dir), its manifest, the summary.

    OUTPUT/
      adapter_config.json, adapter_model.safetensors     peft's own files (method lora/dora/qlora)
      config.json, model.safetensors, generation_config.json     instead, for method full
      tokenizer files + chat_template.jinja               the template used in training, verbatim
      dead_letter.jsonl                                   malformed records: file, line, reason
      logs/metrics.jsonl, logs/tensorboard/
      manifest.json                                       base model path + weights sha256, data
                                                          (files, sha256, counts, drops by reason),
                                                          config, parameters, training, checks
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from domainlm.manifest import StageOutput, make_manifest, sha256_json, write_json
from domainlm.progress import summary


def gather_full_state(trainer) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights of an FSDP model on CPU; every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(trainer.loss_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in sd.items()}


def write(trainer, full_state: dict | None) -> dict[str, Any]:
    from domainlm.finetune.adapter import write_adapter, write_tokenizer
    from domainlm.finetune.merge import base_config
    from domainlm.finetune.model import causal_lm
    from domainlm.pretrain.convert.hfdir import generation_config

    cfg, hf = trainer.cfg, trainer.hf
    with StageOutput(cfg.output, trainer.stage, overwrite=cfg.overwrite) as out:
        if cfg.method == "full":
            lm = causal_lm(trainer.peft_model)
            dtype = _base_dtype(hf.config)
            state = full_state if full_state is not None else lm.state_dict()
            state = {k: v.detach().to("cpu", dtype) if v.is_floating_point() else v.cpu() for k, v in state.items()}
            lm.save_pretrained(str(out.tmp), state_dict=state, safe_serialization=True)
            write_json(out.tmp / "config.json", base_config(hf, dtype))      # the base's spelling, new weights
            write_json(out.tmp / "generation_config.json", generation_config(trainer.encoder.tok))
            files = sorted(p.name for p in out.tmp.glob("*.safetensors")) + ["config.json"]
        else:
            files = write_adapter(trainer.peft_model, out.tmp, base_path=str(hf.path))
        files += write_tokenizer(hf.path, out.tmp, trainer.template)
        shutil.copy2(trainer.root / "dead_letter.jsonl", out.tmp / "dead_letter.jsonl")
        if (trainer.root / "logs").is_dir():
            shutil.copytree(trainer.root / "logs", out.tmp / "logs")
        manifest = make_manifest(trainer.stage, cfg, trainer.inputs, **facts(trainer), files=sorted(set(files)))
        out.commit(manifest)
    print_summary(trainer, manifest)
    return manifest


def _base_dtype(config: dict) -> torch.dtype:
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def facts(trainer) -> dict[str, Any]:
    """The manifest's fields beyond the common ones."""
    from domainlm.finetune.points import compare

    cfg, hf, p = trainer.cfg, trainer.hf, trainer.params
    before, after = trainer.evals.get("before", {}), trainer.evals.get("after", {})
    checks: dict[str, Any] = {"before": before, "after": after}
    if "points" in after and "points" in before:
        checks["points"] = compare(before["points"], after["points"])
    losses = [h["loss"] for h in trainer.history]
    return {
        "base_model": {"path": str(hf.path), "weights_sha256": hf.weights_sha256(), "architecture": hf.architecture,
                       "model_type": hf.model_type, "made_by": (hf.manifest or {}).get("stage")},
        "method": cfg.method,
        "chat_template": {"source": cfg.chat_template or "model", "sha256": sha256_json(trainer.template)},
        "kernels": {"requested": cfg.kernels, "used": trainer.kernel_counts,
                    "recompute_elementwise": trainer.loss_model.recompute},
        "data": trainer.data.stats,
        "dead_letters": trainer.dead_letters,
        "parameters": {**p, "trainable_share": p["trainable"] / max(1, p["total"])},
        "training": {"steps": trainer.step, "total_steps": trainer.total_steps, "resumed_at": trainer.start_step or None,
                     "processes": trainer.world, "device": str(trainer.device.type),
                     "precision": "bf16" if trainer.bf16 else "fp32", "packing": cfg.packing,
                     "items_per_epoch": trainer.batches.items_per_epoch,
                     "epochs": trainer.step * cfg.train.global_batch_size / trainer.batches.items_per_epoch,
                     "warmup_steps": trainer.warmup,
                     "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                     "seconds": round(trainer.seconds, 2),
                     "tokens": trainer.tokens_trained},   # tokens the model read in this run (all processes)
        "checks": checks,
        **trainer.extra_facts(),
    }


def _rate(v: dict) -> str:
    return f"{v['passed']}/{v['tests']}"


def print_summary(trainer, manifest: dict[str, Any]) -> None:
    cfg, m = trainer.cfg, manifest
    d, t, p = m["data"], m["training"], m["parameters"]
    before, after = m["checks"]["before"], m["checks"]["after"]
    method = cfg.method if cfg.method == "full" else (
        f"{cfg.method} r={cfg.lora.r} alpha={cfg.lora.alpha:g}{' rslora' if cfg.lora.rslora else ''}")
    dropped = {**d["train"].get("dropped", {})}
    rows = [("base model", f"{m['base_model']['path']} ({m['base_model']['architecture']})"),
            ("method", f"{method}: {p['trainable']:,} of {p['total']:,} parameters trained "
                       f"({100 * p['trainable_share']:.2f}%)"),
            ("train data", f"{_items(d['train'])}, {d['train']['tokens']:,} tokens "
                           f"({d['train']['supervised_tokens']:,} supervised) from {d['train']['records']:,} records"),
            ("dropped", (", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none")
             + (f" ({m['dead_letters']} malformed records in {Path(cfg.output) / 'dead_letter.jsonl'})"
                if m["dead_letters"] else "")),
            ("valid data", _items(d["valid"]) + (
                f" (dropped: {', '.join(f'{k} {v}' for k, v in sorted(d['valid']['dropped'].items()))})"
                if d["valid"].get("dropped") else ""))]
    tok_s = sum(h.get("tokens_per_s", 0) for h in trainer.history if "tokens_per_s" in h)
    n_tok = sum(1 for h in trainer.history if "tokens_per_s" in h)
    rows.append(("steps", f"{t['resumed_at'] or 0} -> {t['steps']} ({t['epochs']:.2f} epochs, {t['processes']} "
                          f"process(es), {t['device']} {t['precision']}{', packed' if t['packing'] else ''}) in "
                          f"{t['seconds']:.1f}s" + (f", {tok_s / n_tok:,.0f} tok/s" if n_tok else "")))
    if t["first_loss"] is not None:
        rows.append(("train loss", f"{t['first_loss']:.4f} -> {t['last_loss']:.4f}"))
    if "dpo" in m:
        p = m["dpo"]
        start = p["start_adapter"]
        rows.append(("preference", f"{p['loss']} loss, beta {p['beta']:g}; reference: "
                                   + (f"the start adapter {start['path']}" if start else "the base model")))
    if "pairs" in after:
        b, a = before.get("pairs", {}), after["pairs"]
        nan = float("nan")
        rows.append(("held-out pairs", f"reward margin {b.get('margin', nan):.3f} -> {a['margin']:.3f}, accuracy "
                                       f"{b.get('accuracy', nan):.3f} -> {a['accuracy']:.3f}, log-prob margin "
                                       f"{b.get('logp_margin', nan):.2f} -> {a['logp_margin']:.2f} ({a['pairs']} pairs)"))
    if "valid_loss" in after:
        rows.append(("valid loss", f"{before.get('valid_loss', float('nan')):.4f} -> {after['valid_loss']:.4f}"))
    for name, v in (m["checks"].get("points") or {}).items():
        fell = "   FELL" if v["fell"] else ""
        rows.append((f"point {name}", f"{_rate(before['points'][name])} -> {_rate(after['points'][name])} passed{fell}"))
    if "qa" in after:
        b, a = before.get("qa", {}), after["qa"]
        rows.append(("held-out QA", f"exact match {b.get('exact_match', 0):.3f} -> {a['exact_match']:.3f}, "
                                    f"F1 {b.get('f1', 0):.3f} -> {a['f1']:.3f} ({a['questions']} questions)"))
    if "forgetting_ppl" in after:
        rows.append(("forgetting ppl", f"{before.get('forgetting_ppl', float('nan')):.2f} -> "
                                       f"{after['forgetting_ppl']:.2f} (general text; lower is better)"))
    rows.append(("output", f"{cfg.output} ({'HF model dir' if cfg.method == 'full' else 'PEFT adapter dir'})"))
    if cfg.method != "full":
        rows.append(("next", f"domainlm finetune merge --adapter {cfg.output} --output {cfg.output.rstrip('/')}-merged"))
    summary(f"domainlm {trainer.stage}", rows)


def _items(split: dict[str, Any]) -> str:
    return f"{split['pairs']:,} pairs" if "pairs" in split else f"{split['samples']:,} samples"

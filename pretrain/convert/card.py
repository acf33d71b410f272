"""The model card (README.md) of an export, from the manifests that made the checkpoint.

checkpoint manifest (config, steps) -> shards manifests (documents, tokens, what was dropped)
-> tokenizer manifest (vocab, bytes per token); plus the training log and the verification.
What a manifest does not say (a shards dir since moved) is left out, not guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from domainlm import stages
from domainlm.manifest import MANIFEST
from domainlm.tokenizer.tokdir import measured_bytes_per_token


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _last_metrics(root: Path, step: int) -> dict[str, float]:
    out: dict[str, float] = {}
    log = root / "logs" / "metrics.jsonl"
    if not log.is_file():
        return out
    for line in log.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("step", 0) > step:
            continue
        if rec.get("kind") == "train" and "loss" in rec:
            out["train_loss"] = rec["loss"]
        if rec.get("kind") == "eval" and "val_loss" in rec:
            out["val_loss"], out["val_step"] = rec["val_loss"], rec["step"]
    return out


def training_summary(info) -> dict[str, Any]:
    """Data and steps behind the checkpoint, as its manifests record them."""
    m = info.manifest
    cfg = m.get("config", {})
    out: dict[str, Any] = {"stage": m.get("stage"), "step": info.step}
    if m.get("stage") == stages.CONVERT_FROM_HF:
        out["source"] = m.get("source", {})
        return out
    train = cfg.get("train", {})
    out["tokens_seen"] = info.step * train.get("global_batch_size", 0) * train.get("seq_len", 0)
    out["train"] = {k: train.get(k) for k in ("seq_len", "global_batch_size", "max_steps", "precision")}
    out["optim"] = {k: cfg.get("optim", {}).get(k) for k in ("lr", "min_lr", "weight_decay")}
    out["schedule"] = cfg.get("schedule", {}).get("style")
    out["init_from"] = cfg.get("init_from") or None
    out["metrics"] = _last_metrics(info.root, info.step)
    shards = []
    data = cfg.get("data", {})
    for path, weight in zip(data.get("shards", []), data.get("weights") or [1.0] * len(data.get("shards", []))):
        sm = _read(Path(path) / MANIFEST)
        entry: dict[str, Any] = {"path": path, "weight": weight}
        if sm:
            entry["splits"] = {s: {"documents": v.get("documents"), "tokens": v.get("tokens")}
                               for s, v in sm.get("splits", {}).items()}
            entry["dropped"] = {k: v for k, v in sm.get("dropped", {}).items() if v}
            entry["corpus"] = [i.get("path") for i in sm.get("inputs", []) if "tokenizer" not in str(i.get("path", ""))]
        shards.append(entry)
    out["shards"] = shards
    tm = _read(info.root / "tokenizer" / MANIFEST)
    tok = tm.get("tokenizer", {})
    out["tokenizer"] = {"model_type": tok.get("model_type"), "vocab_size": tok.get("vocab_size"),
                        "bytes_per_token": measured_bytes_per_token(tm),
                        "corpus": [i.get("path") for i in tm.get("inputs", [])]}
    return out


def model_card(name: str, path: str, info, hf_cfg: dict[str, Any], params: int, dtype: str, training: dict[str, Any],
               verification: dict[str, Any] | None) -> str:
    """README.md text: front matter, what the model is, how it was trained, how to load it."""
    c = hf_cfg
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [domainlm, llama, megatron-core]", "---", "", f"# {name}", "",
             f"A Llama-architecture causal language model ({params:,} parameters, {dtype}) exported by "
             f"`domainlm convert to-hf` from the megatron-core checkpoint `{info.iter_dir}`.", "",
             "## Architecture", "", "| | |", "| --- | --- |",
             f"| layers | {c['num_hidden_layers']} |", f"| hidden size | {c['hidden_size']} |",
             f"| attention heads / key-value heads | {c['num_attention_heads']} / {c['num_key_value_heads']} |",
             f"| MLP (SwiGLU) width | {c['intermediate_size']} |", f"| vocabulary | {c['vocab_size']} |",
             f"| RoPE theta | {c['rope_theta']:g} |", f"| context trained | {c['max_position_embeddings']} |",
             f"| tied embeddings | {c['tie_word_embeddings']} |", "", "## Training", ""]
    t = training
    if t["stage"] == stages.CONVERT_FROM_HF:
        src = t.get("source", {})
        lines += [f"Weights converted from the Hugging Face model `{src.get('path')}` "
                  f"({src.get('architecture')}) by `domainlm convert from-hf`; no training since.", ""]
    else:
        tr = t["train"]
        lines += [f"- steps: {t['step']:,} (of {tr.get('max_steps')} planned), {t['tokens_seen']:,} tokens "
                  f"({tr.get('global_batch_size')} windows of {tr.get('seq_len')} tokens per step)",
                  f"- optimizer: AdamW, lr {t['optim'].get('lr')} -> {t['optim'].get('min_lr')} ({t['schedule']}), "
                  f"weight decay {t['optim'].get('weight_decay')}"]
        if t.get("init_from"):
            lines.append(f"- initialized from `{t['init_from']}` (continued pretraining)")
        mt = t.get("metrics", {})
        if "train_loss" in mt:
            lines.append(f"- last training loss: {mt['train_loss']:.4f}")
        if "val_loss" in mt:
            import math

            lines.append(f"- validation loss at step {mt['val_step']}: {mt['val_loss']:.4f} "
                         f"(perplexity {math.exp(min(mt['val_loss'], 50)):.2f})")
        lines += ["", "### Data", ""]
        for s in t.get("shards", []):
            lines.append(f"- `{s['path']}` (blend weight {s['weight']})")
            for split, v in s.get("splits", {}).items():
                lines.append(f"  - {split}: {v['documents']:,} documents, {v['tokens']:,} tokens")
            if s.get("corpus"):
                lines.append(f"  - corpus: {', '.join(f'`{p}`' for p in s['corpus'][:5])}")
            if s.get("dropped"):
                lines.append("  - dropped before training: " + ", ".join(f"{k} {v:,}" for k, v in s["dropped"].items()))
        tok = t.get("tokenizer", {})
        if tok.get("vocab_size"):
            bpt = (f", {tok['bytes_per_token']:.2f} bytes per token on held-out text"
                   if tok.get("bytes_per_token") else "")
            corpus = ", ".join(f"`{p}`" for p in tok.get("corpus", [])[:3]) or "the corpus"
            lines += ["", "### Tokenizer", "",
                      f"SentencePiece {tok.get('model_type')} with {tok['vocab_size']:,} tokens{bpt}, trained on "
                      + corpus + "; ChatML chat template."]
    lines += ["", "## Verification", ""]
    lines += verification_lines(verification, "Megatron and this export", "prompts", "continuation")
    first = ((verification or {}).get("prompts") or [{}])[0].get("prompt") or "The main idea of this document is"
    lines += use_lines(path, [f'ids = tok({first!r}, return_tensors="pt")',
                              "print(tok.decode(model.generate(**ids, max_new_tokens=32)[0]))"],
                       "configs, input checksums, library versions")
    return "\n".join(lines)


def verification_lines(v: dict | None, who: str, prompts: str, sample: str) -> list[str]:
    """The card's verification paragraph and table (`verify.compare`'s report), or why there is none."""
    if not v:
        return ["Not verified (converted with --no-verify)."]
    lines = [f"{who} ran the same {len(v['prompts'])} {prompts}: largest absolute logit difference "
             f"{v['max_abs_diff']:.3g} (tolerance {v['tolerance']:.3g}, {v['dtype']}); greedy "
             f"{v['new_tokens']}-token {sample}s identical: {v['greedy_identical']}.", "",
             f"| prompt | greedy {sample} (transformers) |", "| --- | --- |"]
    return lines + [f"| `{_cell(r['prompt'])}` | `{_cell(r['sample'])}` |" for r in v["prompts"]]


def use_lines(path: str, body: list[str], provenance: str) -> list[str]:
    """The card's usage snippet (transformers) and where the provenance is."""
    return ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'tok = AutoTokenizer.from_pretrained("{path}")',
            f'model = AutoModelForCausalLM.from_pretrained("{path}")', *body, "```", "",
            f"Provenance ({provenance}) is in `manifest.json`.", ""]


def _cell(text: str) -> str:
    return text.replace("\n", "\\n").replace("|", "\\|").replace("`", "'")

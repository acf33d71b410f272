"""The adapter dir contract (ARCHITECTURE.md, "Contracts"): what `domainlm finetune sft` writes and
`finetune merge`, `serve` and `eval` read.

A stock PEFT layout (`adapter_config.json`, `adapter_model.safetensors`) that `peft`,
`transformers` and vLLM load unchanged, the tokenizer files with the chat template used in
training, and `manifest.json` naming the base model and its weights' sha256. A full fine-tune
(method `full`) writes an HF dir instead (the HF dir contract), with the same manifest fields.

`open_adapter_dir(path)` checks the directory and returns an `AdapterDir`; `check_base(hf)`
refuses a base model other than the one the adapter was trained on, naming the mismatch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domainlm.errors import UserError
from domainlm import stages
from domainlm.manifest import MANIFEST, read_jsonl
from domainlm.pretrain.convert.hfdir import HFDir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
STAGE = stages.FINETUNE_SFT


@dataclass(slots=True)
class AdapterDir:
    path: Path
    config: dict[str, Any]
    """adapter_config.json as parsed."""
    manifest: dict[str, Any]
    """manifest.json: base model, its sha256, data, counts, metrics."""

    @property
    def base_model(self) -> str:
        """The base model's path as given at training."""
        return str(self.manifest.get("base_model", {}).get("path") or self.config.get("base_model_name_or_path") or "")

    @property
    def base_sha256(self) -> str | None:
        return self.manifest.get("base_model", {}).get("weights_sha256")

    @property
    def method(self) -> str:
        return str(self.manifest.get("config", {}).get("method", self.config.get("peft_type", "lora"))).lower()

    @property
    def chat_template(self) -> str | None:
        jinja = self.path / "chat_template.jinja"
        return jinja.read_text(encoding="utf-8") if jinja.is_file() else None

    def metrics(self) -> list[dict[str, Any]]:
        """The training's logged metrics (logs/metrics.jsonl: {"kind": "train"|"eval", "step", ...})."""
        return read_jsonl(self.path / "logs" / "metrics.jsonl")

    def check_base(self, hf: HFDir) -> None:
        """UserError unless `hf` holds the weights this adapter was trained on."""
        want = self.base_sha256
        if want and hf.weights_sha256() != want:
            raise UserError(
                f"adapter {str(self.path)!r} was trained on {self.base_model!r} (weights sha256 {want[:12]}...), "
                f"but model {str(hf.path)!r} has other weights (sha256 {hf.weights_sha256()[:12]}...); "
                "give the base model it was trained on")


def open_adapter_dir(path: str | Path) -> AdapterDir:
    """Check `path` is an adapter dir written by `domainlm finetune sft`; UserError naming what is wrong."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"adapter {str(p)!r} is not a directory; give the output of `domainlm finetune sft`")
    cfg_file = p / ADAPTER_CONFIG
    if not cfg_file.is_file():
        raise UserError(f"adapter {str(p)!r} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter directory")
    if not (p / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"adapter {str(p)!r} has no {ADAPTER_WEIGHTS} (domainlm reads safetensors only)")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{cfg_file}: not valid JSON ({e})") from None
    manifest: dict[str, Any] = {}
    if (p / MANIFEST).is_file():
        try:
            manifest = json.loads((p / MANIFEST).read_text(encoding="utf-8"))
        except ValueError as e:
            raise UserError(f"{p / MANIFEST}: not valid JSON ({e})") from None
    return AdapterDir(path=p, config=config, manifest=manifest)


# -- the writer side (`finetune sft`, `finetune merge`) -----------------------------------------

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def write_tokenizer(model_dir: Path, out: Path, chat_template: str) -> list[str]:
    """The base model's tokenizer files in `out`, with `chat_template` as the template every
    loader reads: chat_template.jinja, and tokenizer_config.json's own field when it has one
    (so the two can never disagree)."""
    from domainlm.manifest import write_json
    from domainlm.pretrain.convert.hfdir import copy_tokenizer

    names = copy_tokenizer(model_dir, out)
    (out / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
    tc = out / "tokenizer_config.json"
    if tc.is_file():
        cfg = json.loads(tc.read_text(encoding="utf-8"))
        if "chat_template" in cfg:
            cfg["chat_template"] = chat_template
            write_json(tc, cfg)
    for stale in ("chat_template.json",):          # a second template source would shadow ours
        (out / stale).unlink(missing_ok=True)
    return sorted(set(names) | {CHAT_TEMPLATE_FILE})


def write_adapter(peft_model, out: Path, *, base_path: str) -> list[str]:
    """peft's own save_pretrained: adapter_config.json + adapter_model.safetensors."""
    # The vocab is never resized here, so an adapter on lm_head / embed_tokens needs only its
    # A and B matrices, not a copy of the base's embedding (peft's default then).
    peft_model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    cfg_file = out / ADAPTER_CONFIG
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base_path     # what PeftModel / vLLM resolve the base by
    cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return [ADAPTER_CONFIG, ADAPTER_WEIGHTS]

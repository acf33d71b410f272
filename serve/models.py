"""What the built-in engine serves: the base model and its adapters, by name.

Checked before anything heavy loads (a bad start is one line, in seconds): the model dir (HF dir
contract, safetensors only) and its chat template, every adapter dir (adapter dir contract)
against the base's weights sha256, and that every adapter is a LoRA (the adapter type PEFT can
mix in one batch). The set of names is fixed here: a request's `model` only ever selects among
them, never reaches the filesystem.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainlm.errors import UserError
from domainlm.finetune.adapter import AdapterDir, open_adapter_dir
from domainlm.pretrain.convert.hfdir import HFDir, open_hf_dir, stop_ids
from domainlm.progress import log

MIXABLE = {"LORA"}
"""PEFT adapter types whose forward takes `adapter_names` (one per row of a mixed batch)."""


@dataclass(slots=True)
class ModelPlan:
    """The checked model dir and adapters, before loading."""

    hf: HFDir
    name: str
    template: str
    adapters: dict[str, AdapterDir] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def plan(model: str, model_name: str, adapter_specs: list[str], skip_missing: bool = False) -> ModelPlan:
    hf = open_hf_dir(model)
    template = hf.require_chat_template("domainlm serve (chat requests use the template fine-tuning used)")
    name = model_name or Path(model).resolve().name
    p = ModelPlan(hf=hf, name=name, template=template)
    for spec in adapter_specs:
        aname, _, path = spec.partition("=")
        if aname == name:
            raise UserError(f"adapter name {aname!r} is the base model's name; pick another (--adapter NEW={path})")
        if skip_missing and not Path(path).exists():
            log.warning("adapter %s: %s does not exist, left out (--skip-missing-adapters)", aname, path)
            p.skipped.append(aname)
            continue
        a = open_adapter_dir(path)
        a.check_base(hf)
        kind = str(a.config.get("peft_type", "")).upper()
        if kind not in MIXABLE:
            raise UserError(f"adapter {path!r} is {kind or 'of no known type'} (adapter_config.json peft_type); "
                            "domainlm serve serves LoRA adapters, which PEFT mixes in one batch: merge this one "
                            "(domainlm finetune merge) and serve the merged model")
        p.adapters[aname] = a
    return p


@dataclass(slots=True)
class Loaded:
    model: Any
    """The torch model: a PeftModel with every adapter when there are adapters, else the base."""
    tokenizer: Any
    stop_ids: list[int]
    device: str
    dtype: str
    context: int
    templates: dict[str, str]
    """Chat template per served name: an adapter's own (the one it was trained with) when its dir
    has one, else the model's."""


def load(p: ModelPlan, device: str, dtype: str) -> Loaded:
    # torch, transformers and peft take seconds to import: only when a local model is served.
    import warnings

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from domainlm.serve.embedder import pick_device

    hf_logging.disable_progress_bar()              # a bar per weight file is noise in a server's log
    # PEFT calls a transformers API that transformers 5 deprecates; not ours to fix, not the user's.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    device = pick_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    tok = p.hf.tokenizer()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p.hf.path), dtype=getattr(torch, dtype), use_safetensors=True)
    except Exception as e:  # noqa: BLE001 - a model dir transformers cannot load is the user's to fix
        raise UserError(f"model {str(p.hf.path)!r} does not load in transformers "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    model.to(device).eval()
    if p.adapters:
        from peft import PeftModel

        names = list(p.adapters)
        model = PeftModel.from_pretrained(model, str(p.adapters[names[0]].path), adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(str(p.adapters[n].path), adapter_name=n)
        model.to(device).eval()
    context = p.hf.max_positions or int(getattr(model.config, "max_position_embeddings", 2048))
    templates = {p.name: p.template}
    for n, a in p.adapters.items():
        templates[n] = a.chat_template or p.template
    return Loaded(model=model, tokenizer=tok, stop_ids=stop_ids(tok), device=device, dtype=dtype, context=context,
                  templates=templates)

"""`finetune merge`: fold an adapter into its base and write a verified HF model dir.

peft does the merge (`PeftModel.from_pretrained(base, adapter).merge_and_unload()`, for LoRA,
rsLoRA and DoRA alike). A QLoRA adapter was trained on the 4-bit NF4 base, so it is merged into
that base dequantized (transformers' `dequantize()` of the 4-bit model), never into 4-bit
weights (whose re-quantization would lose the update) nor into the original weights (which are
not what the adapter was trained against).

Verification, as `convert to-hf` does it: the unmerged model (base + adapter, what was trained)
runs each check prompt, rendered with the adapter's chat template; the merged model is written,
loaded back from the files by stock transformers and runs the same prompts. The largest logit
difference must be within the dtype's tolerance relative to the largest |logit| (fp32 1e-4,
bf16 5e-2), or nothing is written. Greedy continuations of both are compared and reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from domainlm.errors import UserError
from domainlm.finetune.config import MergeConfig
from domainlm.pretrain.convert.hfdir import HFDir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_base(cfg: MergeConfig, adapter) -> HFDir:
    from domainlm.pretrain.convert.hfdir import open_hf_dir

    path = cfg.base or adapter.base_model
    if not path:
        raise UserError(f"adapter {cfg.adapter!r} does not name its base model; give --base HF_DIR")
    if not Path(path).is_dir():
        raise UserError(f"the base model of adapter {cfg.adapter!r}, {path!r}, is not there; give --base HF_DIR "
                        "(the model it was trained on, checked by sha256)")
    hf = open_hf_dir(path)
    adapter.check_base(hf)
    return hf


def load_base(hf: HFDir, dtype: torch.dtype, quantized: bool):
    """The base model in `dtype`; for QLoRA, loaded in 4-bit and dequantized (what was trained on)."""
    from transformers import AutoModelForCausalLM

    from domainlm.finetune.model import quiet_transformers

    quiet_transformers()
    if quantized:
        from domainlm.finetune.model import bnb_config

        model = AutoModelForCausalLM.from_pretrained(str(hf.path), quantization_config=bnb_config(),
                                                     dtype=torch.bfloat16, device_map={"": 0})
        return model
    return AutoModelForCausalLM.from_pretrained(str(hf.path), dtype=dtype).eval()


def shard_bytes(size: str) -> int:
    """'5GB' -> 5 * 10**9, '2GiB' -> 2 * 2**30: transformers' own reading of max_shard_size."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        n = convert_file_size_to_int(size.strip())
    except (ValueError, AttributeError):
        n = 0
    if not isinstance(n, int) or n <= 0:
        raise UserError(f"max_shard_size: {size!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    return n


def base_config(hf: HFDir, dtype) -> dict[str, Any]:
    """The base's config.json with the new dtype: the architecture is the base's, and its spelling
    (convert to-hf writes the one transformers 4.x, 5.x and vLLM all read) is kept as it was."""
    config = dict(hf.config)
    for key in ("quantization_config", "dtype"):
        config.pop(key, None)
    config.update(torch_dtype=str(dtype).removeprefix("torch."), use_cache=True)
    return config


def check_qlora_merge() -> None:
    import importlib.util

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("merging a QLoRA adapter needs bitsandbytes on a CUDA GPU: it merges into the 4-bit base "
                        "it was trained on, dequantized (merging into the original weights would give another "
                        "model than the one trained); run the merge on a GPU machine with bitsandbytes")


@torch.no_grad()
def run_prompts(model, tok, template: str, prompts: list[str], new_tokens: int) -> list[dict[str, Any]]:
    """Logits over each rendered prompt and its greedy continuation (transformers' generate)."""
    from domainlm.finetune.chat import end_token_ids, pad_id

    stops = end_token_ids(tok)
    device = next(model.parameters()).device
    out = []
    for p in prompts:
        text = tok.apply_chat_template([{"role": "user", "content": p}], chat_template=template, tokenize=False,
                                       add_generation_prompt=True)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]], device=device)
        logits = model(input_ids=ids).logits[0].float().cpu()
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=stops, pad_token_id=pad_id(tok))
        new = gen[0, ids.shape[1]:].tolist()
        out.append({"prompt": p, "prompt_tokens": ids.shape[1], "logits": logits, "ids": new,
                    "sample": tok.decode(new, skip_special_tokens=False)})
    return out


def compare(reference: list[dict], merged: list[dict], dtype: torch.dtype, new_tokens: int) -> dict[str, Any]:
    """The report `domainlm.pretrain.convert.verify.describe` reads, merged vs base + adapter."""
    from domainlm.pretrain.convert.verify import TOLERANCE

    rows, worst, scale = [], 0.0, 1.0
    for r, m in zip(reference, merged):
        diff = float((r["logits"] - m["logits"]).abs().max())
        worst, scale = max(worst, diff), max(scale, float(r["logits"].abs().max()))
        rows.append({"prompt": r["prompt"], "prompt_tokens": r["prompt_tokens"], "max_abs_diff": diff,
                     "unmerged_ids": r["ids"], "merged_ids": m["ids"], "greedy_identical": r["ids"] == m["ids"],
                     "sample": m["sample"]})
    tolerance = TOLERANCE[dtype] * scale
    return {"dtype": str(dtype).removeprefix("torch."), "max_abs_diff": worst, "max_abs_logit": scale,
            "relative_tolerance": TOLERANCE[dtype], "tolerance": tolerance, "passed": worst <= tolerance,
            "greedy_identical": all(r["greedy_identical"] for r in rows), "new_tokens": new_tokens, "prompts": rows}


def merged_dtype(cfg: MergeConfig, hf: HFDir, quantized: bool) -> torch.dtype:
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    if quantized:
        return torch.bfloat16
    name = str(hf.config.get("torch_dtype") or hf.config.get("dtype") or "float32").removeprefix("torch.")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


def reference_outputs(cfg: MergeConfig, adapter, hf: HFDir, dtype, quantized: bool, template: str):
    """Base + adapter, unmerged, as trained (for QLoRA: on the 4-bit base), on the check prompts."""
    from peft import PeftModel

    from domainlm.pretrain.convert.hfdir import load_tokenizer

    tok = load_tokenizer(adapter.path, f"adapter {str(adapter.path)!r}")
    model = PeftModel.from_pretrained(load_base(hf, dtype, quantized), str(adapter.path)).eval()
    return run_prompts(model, tok, template, cfg.checks.prompts, cfg.checks.new_tokens)


def write_merged(adapter, hf: HFDir, dtype, quantized: bool, template: str, out: Path,
                 max_shard: int) -> tuple[list[dict], int]:
    """Merge with peft and write config, safetensors, tokenizer, generation config into `out`."""
    from peft import PeftModel

    from domainlm.finetune.adapter import write_tokenizer
    from domainlm.manifest import write_json
    from domainlm.pretrain.convert.hfdir import generation_config, load_tokenizer, write_safetensors
    from domainlm.progress import log

    base = load_base(hf, dtype, quantized)
    if quantized:
        base = base.dequantize().to(dtype)        # transformers' own NF4 -> dense
    merged = PeftModel.from_pretrained(base, str(adapter.path)).merge_and_unload().eval()
    log.info("merge: %s adapter folded into %s (%s)", adapter.method, hf.path, str(dtype).removeprefix("torch."))
    tied = bool(merged.config.tie_word_embeddings)
    weights = {k: v for k, v in merged.state_dict().items() if not (tied and k == "lm_head.weight")}
    files = write_safetensors(weights, out, dtype, max_shard)
    params = sum(t.numel() for t in weights.values())
    config = base_config(hf, dtype)
    write_json(out / "config.json", config)
    write_tokenizer(adapter.path, out, template)
    write_json(out / "generation_config.json", generation_config(load_tokenizer(out, "merged model")))
    return files, params


def verify(path: Path, dtype, template: str, cfg: MergeConfig, reference, device: str = "cpu") -> dict[str, Any]:
    """The written dir, loaded by stock transformers (every weight must load), against `reference`
    (run on `device`, where the reference ran: the GPU for QLoRA)."""
    from transformers import AutoModelForCausalLM

    from domainlm.pretrain.convert.hfdir import load_tokenizer

    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    model.to(device)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise RuntimeError(f"transformers did not load every weight of the merged model: {bad}")
    tok = load_tokenizer(path, "merged model")
    merged = run_prompts(model.eval(), tok, template, cfg.checks.prompts, cfg.checks.new_tokens)
    return compare(reference, merged, dtype, cfg.checks.new_tokens)

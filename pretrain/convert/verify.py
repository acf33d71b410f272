"""Logits parity between the Megatron model and the Hugging Face model, run on every conversion.

Both models run the same prompts (encoded with the exported tokenizer). The largest absolute
logit difference must stay within the export dtype's tolerance, relative to the largest |logit|
of the Megatron model (at least 1): fp32 1e-4, fp16 1e-2, bf16 5e-2. A wrong mapping (a swapped
gate/up, a misordered query group, a wrong RoPE theta) moves logits by about their own size, far
above these; rounding the weights to bf16 moves them by well under 5%. Then each model continues
each prompt greedily (Megatron: full forward passes; HF: its own `generate` with the KV cache)
and the token ids are compared. That comparison is reported, not enforced: in bf16 a near-tie
between two tokens can legitimately flip.
"""

from __future__ import annotations

from typing import Any

import torch

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@torch.no_grad()
def compare(megatron, hf_model, tok, prompts: list[str], new_tokens: int, vocab: int,
            dtype: torch.dtype) -> dict[str, Any]:
    """Run both models; returns the report (max_abs_diff, tolerance, passed, greedy, samples)."""
    from transformers import GenerationConfig

    from domainlm.pretrain.convert.hfdir import stop_ids
    from domainlm.pretrain.convert.megatron import greedy, logits

    stops = stop_ids(tok)
    gen = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=stops or None,
                           pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (stops or [0])[0])
    hf_model.eval()
    rows, worst, scale = [], 0.0, 1.0
    for prompt in prompts:
        ids = tok(prompt)["input_ids"]
        ours = logits(megatron, ids, vocab)
        theirs = hf_model(torch.tensor([ids])).logits[0, :, :vocab].float()
        diff = float((ours - theirs).abs().max())
        worst, scale = max(worst, diff), max(scale, float(ours.abs().max()))
        ours_ids = greedy(megatron, ids, new_tokens, vocab, set(stops))
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                generation_config=gen)
        hf_ids = out[0, len(ids):].tolist()
        rows.append({"prompt": prompt, "prompt_tokens": len(ids), "max_abs_diff": diff,
                     "megatron_ids": ours_ids, "hf_ids": hf_ids, "greedy_identical": ours_ids == hf_ids,
                     "sample": tok.decode(hf_ids, skip_special_tokens=False)})
    tolerance = TOLERANCE[dtype] * scale
    return {"dtype": str(dtype).removeprefix("torch."), "max_abs_diff": worst, "max_abs_logit": scale,
            "relative_tolerance": TOLERANCE[dtype], "tolerance": tolerance, "passed": worst <= tolerance,
            "greedy_identical": all(r["greedy_identical"] for r in rows), "new_tokens": new_tokens, "prompts": rows}


def describe(report: dict[str, Any]) -> str:
    """One line: the numbers that decide pass / fail."""
    same = sum(r["greedy_identical"] for r in report["prompts"])
    return (f"max |logit diff| {report['max_abs_diff']:.3g} (tolerance {report['tolerance']:.3g} = "
            f"{report['relative_tolerance']:g} x {report['max_abs_logit']:.3g}, {report['dtype']}); greedy "
            f"{report['new_tokens']} tokens identical on {same}/{len(report['prompts'])} prompts")


PARITY_TEXTS_EXTRA = ["Hello world! Numbers 12345, symbols <>{}[] and ünïcödé.\nA second line.",
                      "  leading spaces,\ttabs and\n\n\nblank lines; 3.14159 == pi?  <|im_end|> inside text"]


def _parity_texts() -> list[str]:
    from domainlm.pretrain.convert.config import DEFAULT_PROMPTS

    return DEFAULT_PROMPTS + PARITY_TEXTS_EXTRA


def tokenizer_parity(sp, hf_tok) -> dict[str, Any]:
    """SentencePiece vs the HF tokenizer on fixed texts (an imported tokenizer should agree)."""
    from domainlm.tokenizer.hf_export import parity

    return parity(sp, hf_tok, _parity_texts()[:-1])


def encoder_parity(encode, hf_tok) -> dict[str, Any]:
    """The shards' encoding (`tokdir.DocumentEncoder`: the `tokenizers` library on tokenizer.json)
    vs transformers' tokenizer (what fine-tuning, serving and evaluation run) on fixed texts,
    without special tokens added."""
    texts = _parity_texts()
    ours = encode(texts)
    theirs = [hf_tok.encode(t, add_special_tokens=False) for t in texts]
    bad = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    return {"documents": len(texts), "id_mismatches": len(bad), "first_mismatch": bad[0][:60] if bad else None}

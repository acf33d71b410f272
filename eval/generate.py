"""Batched generation for evaluation: many questions through one HF model (+ adapter) at once.

transformers' `generate` does the decoding (KV cache, sampling, stop tokens); what this module
adds is the evaluation harness around it: chat-template prompts, left padding so a batch of
different lengths decodes as one, questions sorted by length so a batch wastes little padding,
per-question token counts, and the process CPU time the batch cost. Greedy answers equal those of
one `generate` call per question (checked by tests/test_eval.py and bench/compare.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from domainlm.errors import UserError
from domainlm.finetune.adapter import open_adapter_dir
from domainlm.pretrain.convert.hfdir import HFDir, open_hf_dir, stop_ids


@dataclass(slots=True)
class Generation:
    text: str
    tokens_in: int
    tokens_out: int
    seconds: float
    """Wall time of the batch this answer was decoded in."""
    truncated: bool = False
    """The prompt did not fit the context next to max_new_tokens: only its last tokens were kept
    (the question's end and the generation prompt; the system prompt and what came first lost)."""


def warn_cut(outs: list[Generation], max_positions: int, max_new_tokens: int, what: str = "") -> int:
    """How many of `outs` had their prompt cut to the context (`Generation.truncated`), said in
    one warning; `what` names the prompts (e.g. the approach) in it."""
    cut = sum(o.truncated for o in outs)
    if cut:
        from domainlm.progress import log

        log.warning("%d of %d prompts%s are longer than the model's context of %d tokens less max_new_tokens %d: "
                    "cut to their last %d tokens (the system prompt and the start of the question lost)", cut,
                    len(outs), f" ({what})" if what else "", max_positions, max_new_tokens,
                    max_positions - max_new_tokens)
    return cut


AUTO_TOKENS = (16, 1024)
"""Bounds of an answer budget set from the training answers (`answer_budget`)."""


def answer_budget(tok, answers: list[str], max_positions: int, fixed: int = 0) -> dict[str, int]:
    """The answer budget for `gen.max_new_tokens` `fixed`, or with 0 from `answers` (the QA train
    answers): ceil(1.2 x their 99th percentile in `tok`'s tokens) + 8 (a citation ' [n]' and the
    end token), within AUTO_TOKENS and half the context. Also how many answers are longer than
    the budget leaves them (budget less the 8), which the caller reports."""
    lengths = sorted(len(ids) for ids in tok(list(answers), add_special_tokens=False)["input_ids"]) or [0]
    p99 = lengths[max(0, math.ceil(0.99 * len(lengths)) - 1)]
    auto = min(AUTO_TOKENS[1], max(AUTO_TOKENS[0], math.ceil(1.2 * p99) + 8), max(AUTO_TOKENS[0], max_positions // 2))
    budget = fixed or auto
    return {"max_new_tokens": budget, "auto": not fixed, "train_answers": len(answers), "p99_tokens": p99,
            "longest_tokens": lengths[-1], "longer_than_budget": sum(n > budget - 8 for n in lengths)}


def torch_dtype(name: str, device: str) -> torch.dtype:
    """gen.dtype as a torch dtype: bf16 only where it is fast (a GPU, or a CPU with native bf16)."""
    from domainlm.devices import cpu_has_bf16

    if name == "bf16" and (device != "cpu" or cpu_has_bf16()):
        return torch.bfloat16
    return torch.float32


class cpu_threads:
    """`with cpu_threads(n):` torch's intra-op threads set to n (0: unchanged) and restored after,
    so a pipeline's later stages keep theirs."""

    def __init__(self, n: int):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        if self.n:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.old)


class Generator:
    """An HF causal LM (optionally with a PEFT adapter) ready to answer chat prompts."""

    def __init__(self, model_dir: str | Path, adapter: str | Path | None = None, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, fuse_lora: bool = True):
        """`fuse_lora`: each LoRA projection computes base(x) + s * A(x) B^T with the adapter's
        product inside one `torch.addmm` (finetune/kernels.py: FusedLoraLinear), where peft writes
        B's output, a scaled copy and the sum; peft's own forward wherever the dtypes differ
        (a bf16 base with fp32 adapters) or the adapter is not plain LoRA."""
        from transformers import AutoModelForCausalLM

        self.hf: HFDir = open_hf_dir(model_dir)
        self.hf.require_chat_template("evaluation")
        self.tok = self.hf.tokenizer()
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            raise UserError(f"model {str(model_dir)!r}: the tokenizer has no pad token; batched generation needs one")
        model = AutoModelForCausalLM.from_pretrained(str(self.hf.path), dtype=dtype)
        self.adapter = None
        if adapter:
            from peft import PeftModel

            ad = open_adapter_dir(adapter)
            ad.check_base(self.hf)
            model = PeftModel.from_pretrained(model, str(ad.path))
            self.adapter = ad
            if fuse_lora:
                from domainlm.finetune.kernels import fuse_lora as fuse

                fuse(model)
        self.model = model.to(device).eval()
        self.device = device
        self.stops = stop_ids(self.tok)
        self.max_positions = self.hf.max_positions or 2048

    def room(self, max_new_tokens: int) -> int:
        """Prompt tokens that fit the model's context next to max_new_tokens of answer."""
        return self.max_positions - max_new_tokens - 8

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)

    @torch.inference_mode()
    def generate(self, prompts: list[list[dict[str, str]]], *, max_new_tokens: int = 64, batch_size: int = 16,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> list[Generation]:
        """Answers to `prompts` (chat message lists), in their order."""
        encoded = [self.prompt_ids(m) for m in prompts]
        limit = self.max_positions - max_new_tokens
        cut = [len(ids) > limit for ids in encoded]
        for i, ids in enumerate(encoded):
            if cut[i]:   # keep the end: the question and the generation prompt
                encoded[i] = ids[-limit:]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out: list[Generation | None] = [None] * len(encoded)
        for start in range(0, len(order), max(1, batch_size)):
            idx = order[start:start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            pad = self.tok.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in idx])
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in idx])
            kw = dict(max_new_tokens=max_new_tokens, eos_token_id=self.stops, pad_token_id=pad)
            if temperature > 0:
                torch.manual_seed(seed)
                kw.update(do_sample=True, temperature=temperature, top_p=top_p)
            else:
                kw.update(do_sample=False)
            t0 = time.perf_counter()
            gen = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                      **kw)
            seconds = time.perf_counter() - t0
            new = gen[:, width:].tolist()
            for row, i in enumerate(idx):
                toks = new[row]
                n = len(toks)
                for j, t in enumerate(toks):
                    if t in self.stops:
                        n = j + 1
                        break
                else:
                    while n and toks[n - 1] == pad:
                        n -= 1
                text = self.tok.decode([t for t in toks[:n] if t not in self.stops], skip_special_tokens=True)
                out[i] = Generation(text=text.strip(), tokens_in=len(encoded[i]), tokens_out=n, seconds=seconds,
                                    truncated=cut[i])
        return out  # type: ignore[return-value]

"""Checks run before and after training: greedy answers, QA exact match / F1, forgetting perplexity.

Generation is transformers' own `generate` (greedy, left-padded batches, stopping at the chat
template's end token), on the prompt the chat template renders with its generation prompt: the
text a served model sees. Answers are decoded without special tokens, up to the end token.

QA scoring is SQuAD's (Rajpurkar et al. 2016): both strings lower-cased, punctuation, articles
and extra whitespace removed; exact match is equality, F1 the harmonic mean of token precision
and recall. Perplexity is exp of the mean next-token loss over windows of train.seq_len tokens.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from domainlm.errors import UserError
from domainlm.qa import exact_match, token_f1
from domainlm.finetune.chat import ChatEncoder, end_token_ids, pad_id
from domainlm.progress import progress


@torch.no_grad()
def generate(model, encoder: ChatEncoder, conversations: list[list[dict]], *, new_tokens: int, batch_size: int,
             desc: str = "generating") -> list[str]:
    """Greedy answer to each conversation (ending with a user turn), as text."""
    tok = encoder.tok
    stops = end_token_ids(tok)
    pad = pad_id(tok)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    bar = progress(total=len(conversations), desc=desc, unit="prompt")
    for i in range(0, len(conversations), batch_size):
        prompts = [encoder.prompt_ids(c) for c in conversations[i:i + batch_size]]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):            # left padding: every prompt ends where generation starts
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=stops, pad_token_id=pad, use_cache=True)
        for row in gen[:, width:].tolist():
            cut = next((j for j, t in enumerate(row) if t in stops), len(row))
            out.append(tok.decode(row[:cut], skip_special_tokens=True))
        bar.update(len(prompts))
    bar.close()
    model.train(was_training)
    return out


# -- QA ----------------------------------------------------------------------------------------


def qa_scores(model, encoder: ChatEncoder, qa: list, *, new_tokens: int, batch_size: int) -> dict[str, Any]:
    """Exact match and F1 of greedy answers to held-out questions (records of domainlm.qa.read_qa)."""
    answers = generate(model, encoder, [[{"role": "user", "content": q.question}] for q in qa],
                       new_tokens=new_tokens, batch_size=batch_size, desc="QA")
    em = [exact_match(a, q.answer) for a, q in zip(answers, qa)]
    f1 = [token_f1(a, q.answer) for a, q in zip(answers, qa)]
    return {"questions": len(qa), "exact_match": sum(em) / len(qa), "f1": sum(f1) / len(qa),
            "samples": [{"question": q.question, "answer": q.answer, "generated": a}
                        for q, a in list(zip(qa, answers))[:5]]}


# -- forgetting --------------------------------------------------------------------------------


def forgetting_windows(specs: list[str], hf_tok, model_dir: Path, seq_len: int, max_tokens: int) -> dict[str, Any]:
    """Windows of seq_len + 1 token ids of general text: a shards dir's valid split (made with the
    model's tokenizer, checked) or text files read by domainlm.corpus and tokenized here."""
    from domainlm.manifest import MANIFEST

    ids: list[int] = []
    eos = hf_tok.eos_token_id
    sources = []
    for spec in specs:
        p = Path(spec)
        if p.is_dir() and (p / MANIFEST).is_file():
            from domainlm.data.shards import open_shards_dir
            from domainlm.tokenizer.tokdir import check_same, load_tokenizer_dir

            shards = open_shards_dir(p)
            mine = load_tokenizer_dir(model_dir).identity
            check_same(shards.tokenizer_id, mine, what=f"forgetting_data {spec!r}",
                       mine_label=f"model {str(model_dir)!r}",
                       fix="give text files (JSONL, .txt/.md/.rst/.html/.pdf) instead, which are tokenized with the model's "
                           "tokenizer")
            for _, arr, _ in shards.documents("valid"):
                ids.extend(arr.tolist())
                if eos is not None:
                    ids.append(eos)
                if len(ids) > max_tokens:
                    break
            sources.append({"path": spec, "kind": "shards valid split", "fingerprint": shards.manifest.get("fingerprint")})
        else:
            from domainlm.corpus import read_documents

            for doc in read_documents([spec]):
                ids.extend(hf_tok(doc.text, add_special_tokens=False)["input_ids"])
                if eos is not None:
                    ids.append(eos)
                if len(ids) > max_tokens:
                    break
            sources.append({"path": spec, "kind": "text"})
    ids = ids[:max_tokens + 1]
    windows = [ids[i:i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise UserError(f"forgetting_data {', '.join(specs)} holds no text")
    return {"windows": windows, "sources": sources, "tokens": sum(len(w) - 1 for w in windows)}


@torch.no_grad()
def perplexity(loss_model, windows: list[list[int]], batch_size: int, device) -> float:
    """exp(mean next-token loss) of `windows` under the LossModel's model."""
    total, count = 0.0, 0
    was = loss_model.training
    loss_model.eval()
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        width = max(map(len, chunk))
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, w in enumerate(chunk):
            ids[r, :len(w)] = torch.tensor(w)
            labels[r, :len(w)] = torch.tensor(w)
            mask[r, :len(w)] = 1
        total += float(loss_model(ids.to(device), labels.to(device), attention_mask=mask.to(device)))
        count += int((labels[:, 1:] != -100).sum())
    loss_model.train(was)
    return math.exp(min(total / max(count, 1), 50.0))

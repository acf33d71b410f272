"""Perplexity of an HF model (+ adapter) on a shards dir's split or on corpus files.

Documents are concatenated with an eos after each and cut into windows of seq_len tokens, as
pretraining reads them; the perplexity is exp of the mean next-token loss over every scored token.
Shards carry SentencePiece ids, so their tokenizer must be the model's (checked by identity, the
same check every stage makes); corpus files are tokenized with the model's own tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from domainlm.corpus import read_documents
from domainlm.data.shards import open_shards_dir
from domainlm.errors import UserError
from domainlm.tokenizer.tokdir import check_same, load_tokenizer_dir


def token_stream(model_dir: Path, tok, *, shards: str | None, split: str, inputs: list[str],
                 max_tokens: int, text_field: str = "text") -> tuple[np.ndarray, dict]:
    """Up to max_tokens+1 ids (eos after each document) and where they came from."""
    eos = tok.eos_token_id
    parts, n, docs = [], 0, 0
    if shards:
        sd = open_shards_dir(shards)
        mine = load_tokenizer_dir(model_dir).identity
        check_same(sd.tokenizer_id, mine, what=f"shards dir {shards!r}", mine_label=f"model {str(model_dir)!r}",
                   fix="score shards made with the model's tokenizer, or give --input text files")
        source = {"shards": shards, "split": split}
        docs_iter = (ids for _, ids, _ in sd.documents(split))
    else:
        source = {"input": inputs}
        docs_iter = (np.asarray(tok.encode(d.text, add_special_tokens=False), np.int64)
                     for d in read_documents(inputs, text_field))
    for ids in docs_iter:
        parts.append(np.asarray(ids, np.int64))
        parts.append(np.asarray([eos], np.int64))
        n += len(ids) + 1
        docs += 1
        if n > max_tokens:
            break
    if not parts:
        raise UserError(f"no document to score in {source}")
    stream = np.concatenate(parts)[: max_tokens + 1]
    return stream, {**source, "documents": docs}


@torch.inference_mode()
def perplexity(model, stream: np.ndarray, seq_len: int, device: str = "cpu", batch_size: int = 8) -> dict:
    """exp(mean loss) over windows stream[i*L : i*L + L + 1] (every token after the first scored once)."""
    L = seq_len
    n_win = (len(stream) - 1) // L
    if n_win < 1:
        raise UserError(f"only {len(stream)} tokens to score; need more than seq_len={L}")
    windows = torch.as_tensor(np.stack([stream[i * L: i * L + L + 1] for i in range(n_win)]))
    total, count = 0.0, 0
    for b in range(0, n_win, batch_size):
        w = windows[b:b + batch_size].to(device)
        logits = model(input_ids=w[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                                 reduction="sum")
        total += float(loss)
        count += w[:, 1:].numel()
    mean = total / count
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": count, "windows": n_win}

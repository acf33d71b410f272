"""Export a SentencePiece model as a Hugging Face fast tokenizer that encodes identically.

The tokenizer.json is built from the SentencePiece processor's own view of the vocabulary
(pieces, scores, piece types), not from transformers' slow-tokenizer conversion: that path parses
the model proto through sentencepiece's generated protobuf module, whose runtime requirement
clashes with apache-beam's protobuf pin in some sentencepiece releases, and it adds a
pre-tokenizer that splits on spaces, which SentencePiece does not do.

What makes the two agree:
- SentencePiece here is trained with identity normalization, no dummy prefix and no whitespace
  squeezing, so the only normalization is ' ' -> '▁' (a Replace normalizer) and there is no
  pre-tokenizer: both see the whole text as one sequence.
- BPE: SentencePiece merges, at each step, the adjacent pair whose merged piece has the highest
  score. The HF merges list holds every split (a, b) of every piece with a, b in the vocab,
  ranked by the merged piece's id (ids follow descending score), which is the same choice.
- Byte fallback: characters outside the vocab become <0xNN> byte pieces in both.
- User-defined symbols are matched in text by both: the chat and reserved tokens (HF special
  tokens) and the newline (a plain added token; SentencePiece trains on lines, so a newline
  would otherwise always fall back to a byte). SentencePiece's control symbols (bos, eos, pad)
  and unk are HF special tokens.
Decoding reverses it: '▁' -> ' ', byte pieces fused back into UTF-8.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from domainlm.manifest import write_json

CHAT_START = "<|im_start|>"
CHAT_END = "<|im_end|>"

# ChatML, with {% generation %} around what the assistant says so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks the tokens fine-tuning
# computes its loss on.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- message['content'] + '<|im_end|>' -}}{% endgeneration %}"
    "{{- '\\n' -}}"
    "{%- else -%}"
    "{{- message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def build_hf_tokenizer(sp, model_type: str, user_defined: list[str]) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to SentencePiece processor `sp`.

    `user_defined` lists the user-defined symbols the model was trained with; those written
    <|...|> become special tokens, the rest (the newline) plain added tokens.
    """
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    unk = pieces[sp.unk_id()]
    special = [sp.is_control(i) or sp.is_unknown(i) for i in range(n)]
    if model_type == "bpe":
        vocab = {p: i for i, p in enumerate(pieces)}
        whole = set(user_defined)  # emitted whole by SentencePiece, never built by merges
        merges = []  # in id order = descending score; within a piece, by the left part's id
        for i, p in enumerate(pieces):
            if len(p) < 2 or special[i] or p in whole or sp.is_byte(i) or sp.is_unused(i):
                continue
            splits = [(vocab[p[:k]], p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
            merges += [(a, b) for _, a, b in sorted(splits)]
        model = models.BPE(vocab=vocab, merges=merges, unk_token=unk,
                           byte_fallback=True, fuse_unk=True, ignore_merges=False)
    elif model_type == "unigram":
        model = models.Unigram([(p, sp.get_score(i)) for i, p in enumerate(pieces)],
                               unk_id=sp.unk_id(), byte_fallback=True)
    else:
        raise ValueError(f"unknown model type {model_type!r}")
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p in user_defined if not _special(p)])
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                            for i in range(n) if special[i] or _special(pieces[i]) and pieces[i] in user_defined])
    return tok


def _special(piece: str) -> bool:
    return piece.startswith("<|") and piece.endswith("|>")


def write_hf_files(sp, model_type: str, out_dir: Path, special: dict[str, str], user_defined: list[str]) -> Tokenizer:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja;
    returns the `tokenizers.Tokenizer` written."""
    tok = build_hf_tokenizer(sp, model_type, user_defined)
    tok.save(str(out_dir / "tokenizer.json"))
    added = {}
    extra_special = [p for p in user_defined if _special(p)]
    for i in range(sp.get_piece_size()):
        p = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i) or p in user_defined:
            added[str(i)] = {"content": p, "lstrip": False, "normalized": False,
                             "rstrip": False, "single_word": False, "special": p not in user_defined or _special(p)}
    # Written by hand rather than by save_pretrained so that transformers 4.x (vLLM, older
    # stacks) and 5.x both load it: the class name both know, and the chat template inline.
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special["bos"],
        "eos_token": special["eos"],
        "pad_token": special["pad"],
        "unk_token": special["unk"],
        "additional_special_tokens": extra_special,
        "added_tokens_decoder": added,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        # No dummy prefix: llama.cpp's HF-to-GGUF converter reads this key (its SentencePiece
        # default would prepend a space to every text); transformers encodes the same either way.
        "add_prefix_space": False,
        "model_max_length": 1_000_000,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }
    write_json(out_dir / "tokenizer_config.json", config)
    write_json(out_dir / "special_tokens_map.json", {
        "bos_token": special["bos"], "eos_token": special["eos"], "pad_token": special["pad"],
        "unk_token": special["unk"], "additional_special_tokens": extra_special,
    })
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return tok


def parity(sp, hf_tokenizer, texts: list[str], expected: list[list[int]] | None = None) -> dict:
    """Compare SentencePiece and HF encodings and decodings on `texts`.

    `hf_tokenizer` is a `tokenizers.Tokenizer` or a transformers fast tokenizer (its backend is
    compared: what transformers runs). Batched: both sides encode on every core. `expected`:
    SentencePiece's ids of `texts`, when the caller has them.
    """
    tok = getattr(hf_tokenizer, "backend_tokenizer", hf_tokenizer)
    if expected is None:
        expected = sp.encode(texts, num_threads=-1)
    got = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    decoded = tok.decode_batch(got, skip_special_tokens=False)
    mismatched_ids = order_only = mismatched_text = 0
    first = None
    for t, a, b, d in zip(texts, expected, got, decoded):
        if a != b:
            mismatched_ids += 1
            if sorted(a) == sorted(b):
                order_only += 1
            if first is None:
                j = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
                first = {"sentencepiece": [sp.id_to_piece(x) for x in a[max(0, j - 2):j + 4]],
                         "hf": [tok.id_to_token(x) for x in b[max(0, j - 2):j + 4]]}
        if d != t:
            mismatched_text += 1
    return {"documents": len(texts), "bytes": sum(len(t.encode("utf-8")) for t in texts),
            "id_mismatches": mismatched_ids, "tie_order_only": order_only,
            "decode_mismatches": mismatched_text, "first_mismatch": first}

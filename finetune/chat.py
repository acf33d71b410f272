"""Conversations -> token ids and labels: the model's chat template, loss on the assistant only.

The text a sample becomes is exactly what the chat template renders (the same template is copied
into the adapter dir, so serving renders the same text). Labels are the ids where the assistant
speaks, each assistant turn's end token (`<|im_end|>` in ChatML) included so the model learns to
stop, and -100 everywhere else: system and user text and the template's markup
(`<|im_start|>user\\n`, the newline after an end token). Padding never counts: labels mark what
is learned, so a tokenizer whose pad token is its eos still learns to emit eos.

Two ways to find the assistant's tokens, the same result where both apply (tested):
- the template marks them with `{% generation %}` (our tokenizers' ChatML does): transformers'
  `apply_chat_template(..., return_assistant_tokens_mask=True)` returns the mask;
- any other template: each assistant turn's text is what rendering the conversation up to and
  including that turn adds to rendering it up to the turn before with the generation prompt;
  the supervised part ends at the turn's end token (the first eos / `<|im_end|>` in it).
"""

from __future__ import annotations

from dataclasses import dataclass

from domainlm.errors import UserError
from domainlm.progress import progress

IGNORE = -100
END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>")


@dataclass(slots=True)
class Encoded:
    ids: list[int]
    labels: list[int]

    @property
    def supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


class ChatEncoder:
    """Renders and tokenizes conversations with one tokenizer and one chat template."""

    def __init__(self, tokenizer, template: str):
        self.tok = tokenizer
        self.template = template
        self.marked = "{% generation %}" in template or "{%- generation %}" in template
        self.end_strings = [s for s in END_TOKENS if s in tokenizer.get_vocab()]
        if tokenizer.eos_token and tokenizer.eos_token not in self.end_strings:
            self.end_strings.append(tokenizer.eos_token)

    def render(self, messages, add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)

    def prompt_ids(self, messages) -> list[int]:
        """Ids of a prompt ending with the assistant's generation prompt (for generation)."""
        text = self.render(messages, add_generation_prompt=True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_many(self, conversations: list[list[dict]], desc: str = "tokenizing") -> list[Encoded]:
        out: list[Encoded] = []
        bar = progress(total=len(conversations), desc=desc, unit="sample", unit_scale=True)
        step = 512
        for i in range(0, len(conversations), step):
            chunk = conversations[i:i + step]
            out.extend(self._encode_marked(chunk) if self.marked else [self._encode_by_prefix(c) for c in chunk])
            bar.update(len(chunk))
        bar.close()
        return out

    def encode(self, messages) -> Encoded:
        return self.encode_many([messages])[0]

    def _encode_marked(self, conversations) -> list[Encoded]:
        out = self.tok.apply_chat_template(conversations, chat_template=self.template, tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True)
        result = []
        for ids, mask in zip(out["input_ids"], out["assistant_masks"]):
            result.append(Encoded(list(ids), [t if m else IGNORE for t, m in zip(ids, mask)]))
        return result

    def _encode_by_prefix(self, messages) -> Encoded:
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                raise UserError("the chat template does not render a conversation as the concatenation of its "
                                "turns, so the assistant's tokens cannot be found; add {% generation %} markers "
                                "around the assistant's content and end token, or give another --chat-template")
            turn = upto[len(before):]
            ends = [turn.find(s) + len(s) for s in self.end_strings if s in turn]
            spans.append((len(before), len(before) + (min(ends) if ends else len(turn))))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = enc["input_ids"], []
        for tid, (a, b) in zip(ids, enc["offset_mapping"]):
            inside = b > a and any(s <= a and b <= e for s, e in spans)
            labels.append(tid if inside else IGNORE)
        return Encoded(list(ids), labels)


def check_template(template: str, where: str, fix: str = "fix the template") -> None:
    """UserError naming `where` and the line of a Jinja syntax error, before any model loads
    (compiled as transformers' apply_chat_template compiles it, so `{% generation %}` is known)."""
    from jinja2 import TemplateSyntaxError

    try:        # transformers' own compiler (private: a transformers without it skips this early check)
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return
    try:
        _compile_jinja_template(template)
    except TemplateSyntaxError as e:
        raise UserError(f"{where}, line {e.lineno}: Jinja syntax error ({e.message}); {fix}") from None


def end_token_ids(tok) -> list[int]:
    """Ids that end an assistant turn (for generation): the chat end tokens the vocab has, and eos."""
    vocab = tok.get_vocab()
    ids = [vocab[s] for s in END_TOKENS if s in vocab]
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def pad_id(tok) -> int:
    """The id padding positions hold: the pad token, else unk, else the first id that ends nothing.

    Never eos or an end-of-turn token, even where the tokenizer's pad token is its eos (common in
    Llama fine-tunes): labels decide what is learned, but a pad that is eos invites collators
    that mask "pad" tokens to mask every eos, and the model never learns to stop."""
    ends = set(end_token_ids(tok))
    for v in (tok.pad_token_id, tok.unk_token_id):
        if v is not None and int(v) not in ends:
            return int(v)
    return next(i for i in range(len(tok)) if i not in ends)

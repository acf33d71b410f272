"""The RAG prompt: retrieved chunks as numbered sources in the user's turn.

One function builds it for the server, the evaluation stage (RAG and SFT+RAG rows) and
fine-tuning on retrieved context, so a model is trained and asked with the same layout:

    Sources:
    [1] json > json.dumps
    json.dumps(obj, *, skipkeys=False, ...)
    Serialize ``obj`` to a JSON formatted ``str``. ...

    [2] ...

    Answer the question using the sources above and cite them by number, like [1]. If they do
    not hold the answer, say so.

    Question: What does `json.dumps` do?

The sources go into the last user message rather than a system message: some chat templates
refuse a system role, and small models follow what is in the turn they answer.
"""

from __future__ import annotations

from typing import Callable, Sequence

from domainlm.errors import UserError
from domainlm.serve.chunking import header

INSTRUCTION = ("Answer the question using the sources above and cite them by number, like [1]. "
               "If they do not hold the answer, say so.")
MIN_SOURCE_TOKENS = 16
"""A source cut shorter than this is dropped rather than kept as a fragment."""


def source_header(n: int, hit) -> str:
    """`[n] DOC_ID > HEADING > PATH`: the document and where in it the text is. The file and line
    (`hit.source`) stay out of the prompt: they tell the model nothing (~15 tokens a source) and
    reach the user with the response's sources."""
    return f"[{n}] {header(hit.doc_id, getattr(hit, 'context', ''))}"


def format_source(n: int, hit) -> str:
    """The source's header line and its text."""
    return f"{source_header(n, hit)}\n{hit.text.strip()}"


def rag_user_content(question: str, hits: Sequence) -> str:
    """The user turn carrying numbered sources, the instruction and the question."""
    if not hits:
        return question
    sources = "\n\n".join(format_source(i, h) for i, h in enumerate(hits, 1))
    return f"Sources:\n{sources}\n\n{INSTRUCTION}\n\nQuestion: {question}"


def rag_messages(messages: list[dict], hits: Sequence) -> list[dict]:
    """`messages` with the last user message replaced by `rag_user_content` of it."""
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m.get("role") == "user":
            m["content"] = rag_user_content(m["content"], hits)
            break
    return out


def last_user_text(messages: list[dict]) -> str | None:
    for m in reversed(messages):
        if m.get("role") == "user":
            return m.get("content") or None
    return None


def check_budget(budget: int, context: int, what: str) -> None:
    """A sources budget must leave room in the model's context for the question and the answer."""
    if budget >= context:
        raise UserError(f"{what} is {budget} tokens, but the model's context is {context}: the sources would leave "
                        f"no room for the question and the answer; give at most about {context // 2}")


def token_counter(tok) -> tuple[Callable[[str], int], Callable[[str, int], str]]:
    """(count, cut) for `fit_hits` with a Hugging Face tokenizer: tokens of a text, and a text cut
    to its first n tokens."""
    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def cut(text: str, n: int) -> str:
        return tok.decode(tok(text, add_special_tokens=False)["input_ids"][:n])

    return count, cut


def fit_hits(hits: Sequence, budget: int, count_tokens: Callable[[str], int],
             cut_tokens: Callable[[str, int], str]) -> list:
    """The hits, best first, that fit `budget` tokens of source text; the last one that does not
    fit whole is cut to what is left (dropped when under MIN_SOURCE_TOKENS). Each hit's text is
    replaced by the text that goes into the prompt."""
    from dataclasses import replace

    out, left = [], budget
    for i, h in enumerate(hits, 1):
        overhead = count_tokens(source_header(i, h) + "\n") + 2
        need = overhead + count_tokens(h.text.strip())
        if need <= left:
            out.append(h)
            left -= need
            continue
        room = left - overhead
        if room >= MIN_SOURCE_TOKENS:
            out.append(replace(h, text=cut_tokens(h.text.strip(), room)))
        break
    return out

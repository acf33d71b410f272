"""Per-sequence token choice and text output: sampling, incremental detokenization, stop strings.

Each sequence of a batch has its own temperature, top_p and seed (a torch.Generator of its own,
so a seeded request gives the same tokens whatever else shares its batch), its own stop strings
and its own detokenizer.
"""

from __future__ import annotations

from typing import Sequence

import torch  # at the top: only `serve` with a local model imports this module (setup.load)

GREEDY_BELOW = 1e-5
"""A temperature at or below this is greedy decoding (argmax), as in OpenAI's API."""


def choose(logits: torch.Tensor, temperatures: Sequence[float], top_ps: Sequence[float],
           generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row of `logits` [B, V]."""
    greedy = logits.argmax(-1).tolist()
    out = []
    for i, (t, p, g) in enumerate(zip(temperatures, top_ps, generators)):
        if t <= GREEDY_BELOW:
            out.append(greedy[i])
            continue
        probs = torch.softmax(logits[i].float() / t, dim=-1)
        if p < 1.0:
            # Nucleus: keep the smallest set of tokens whose probability reaches p.
            sp, order = probs.sort(descending=True)
            keep = sp.cumsum(0) - sp < p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sp[keep])
        out.append(int(torch.multinomial(probs, 1, generator=g).item()))
    return out


class Detokenizer:
    """Text of a growing list of token ids, one delta at a time.

    Decodes a short window (the previous token's text and the new one) rather than the whole
    sequence, and holds a delta back while it ends in U+FFFD: a byte-fallback character spread
    over several tokens is emitted once complete (the approach of TGI and vLLM).
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What `add` held back (an incomplete character at the end of the output), as the full
        decode shows it."""
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class StopStrings:
    """Text out, cut at the first stop string; text that may be the start of a stop string is held
    back until the next tokens tell."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """(text safe to emit, stopped)."""
        if not self.stops:
            return delta, False
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

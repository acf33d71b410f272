"""The built-in generation engine: continuous batching over a causal LM's KV cache.

Why a continuous-batching loop rather than a batching window over `model.generate`: requests of
a server differ in max_tokens, stop strings, temperature, seed and adapter, and arrive at any
time. With a window, a batch is as long as its longest member, a request arriving one token
after the window closed waits for the whole batch, a stop string needs a custom criterion per
row, and a client that disconnects keeps its row busy to the end. Here one thread runs a loop:
each step admits waiting requests (one prefill forward for the group, whose KV cache is
left-padded and concatenated onto the running batch's), runs one decode forward for every
running sequence, and drops the sequences that finished or were cancelled (their rows are cut
out of the cache at once, and the cache's all-padding columns with them). vLLM and TGI schedule
the same way, with paged attention where this uses transformers' DynamicCache.

transformers runs every forward (left padding through the 2-D attention mask and explicit
position ids, exactly as `generate` does for a padded batch); PEFT's mixed-batch LoRA forward
(`adapter_names=[...]`, one name per row, '__base__' for none) lets requests for different
adapters share a batch. Ours: the scheduling, the cache surgery (merge, select, trim) and the
per-row sampling, stop strings and detokenization (serve/sampling.py).

Events go back to the caller through its `emit` callback, from the engine thread:
("text", str), ("done", finish_reason, prompt_tokens, completion_tokens), ("error", message).
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch  # at the top: only `serve` with a local model imports this module (setup.load)

from domainlm.serve.sampling import Detokenizer, StopStrings, choose

log = logging.getLogger("domainlm.serve")
BASE = "__base__"
"""PEFT's name for 'no adapter' in a mixed batch."""


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    adapter: str = BASE
    ignore_eos: bool = False
    """Keep going past the stop ids (vLLM's `ignore_eos`), to max_tokens."""
    incremental: bool = True
    """Text as it is generated (streams, stop strings); else decoded once at the end, which saves
    two decodes per token and row."""
    cancelled: bool = False
    """Set from any thread; the engine drops the sequence before its next step."""
    # -- engine state --
    generated: int = 0
    pos: int = 0
    last: int = 0
    finish: str | None = None
    generator: torch.Generator | None = None
    detok: Detokenizer | None = None
    stops: StopStrings | None = None


class Engine:
    def __init__(self, model, tokenizer, stop_ids: list[int], *, max_batch: int, device: str, adapters: bool):
        self.model, self.tok, self.device = model, tokenizer, torch.device(device)
        self.stop_ids = set(stop_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop_ids or [0])[0]
        self.max_batch = max_batch
        self.adapters = adapters
        self._queue: collections.deque[Sequence] = collections.deque()
        self._cv = threading.Condition()
        self._rows: list[Sequence] = []
        self._cache = None
        self._mask: torch.Tensor | None = None
        self._stop = False
        self.steps = 0
        self.tokens = 0
        self._thread = threading.Thread(target=self._run, name="domainlm-engine", daemon=True)

    # -- public, any thread ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def warmup(self) -> None:
        """One short generation before serving: the first forward's one-time costs are paid here,
        and a model whose KV cache is not plain full-attention layers (sliding windows, linear
        attention), which the cache surgery below does not handle, is refused."""
        from domainlm.errors import UserError

        seq = Sequence(prompt=[self.pad_id, self.pad_id], max_tokens=2, emit=lambda ev: None, temperature=0.0)
        with torch.inference_mode():
            self._prefill([seq])
            kinds = {type(layer).__name__ for layer in self._cache.layers}
            if kinds != {"DynamicLayer"}:
                raise UserError(f"the model's KV cache has {', '.join(sorted(kinds))} layers; the built-in engine "
                                "serves full-attention models: use --backend with vLLM for this one")
            self._decode()
        self._rows, self._cache, self._mask = [], None, None
        self.steps = self.tokens = 0

    def submit(self, seq: Sequence) -> None:
        with self._cv:
            self._queue.append(seq)
            self._cv.notify()

    def wake(self) -> None:
        """Make the loop look at cancellations now (a disconnect while it waits)."""
        with self._cv:
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def queued(self) -> int:
        return len(self._queue)

    # -- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self._queue and not self._rows:
                        self._cv.wait()
                    if self._stop:
                        return
                    new = []
                    while self._queue and len(self._rows) + len(new) < self.max_batch:
                        s = self._queue.popleft()
                        if not s.cancelled:
                            new.append(s)
                try:
                    if new:
                        self._prefill(new)
                    self._drop()
                    if self._rows:
                        self._decode()
                        self._drop()
                except Exception:  # noqa: BLE001 - a bug or out-of-memory must not stop the server
                    log.exception("engine step failed; the sequences in flight get an error")
                    for s in self._rows + new:
                        if s.finish is None:
                            s.finish = "error"
                            s.emit(("error", "the generation engine failed on this request (see the server log)"))
                    self._rows, self._cache, self._mask = [], None, None

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache, rows: list[Sequence]):
        kw = {"adapter_names": [s.adapter for s in rows]} if self.adapters else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1, **kw)
        return out.logits[:, -1, :], out.past_key_values

    def _prefill(self, new: list[Sequence]) -> None:
        width = max(len(s.prompt) for s in new)
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, s in enumerate(new):
            ids[i, width - len(s.prompt):] = torch.tensor(s.prompt, dtype=torch.long)
            mask[i, width - len(s.prompt):] = 1
            s.pos = len(s.prompt)
            s.detok, s.stops = Detokenizer(self.tok), StopStrings(s.stop)
            if s.seed is not None:
                s.generator = torch.Generator(device=self.device).manual_seed(s.seed % 2**64)
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, pos, None, new)
        self._merge(cache, mask, new)
        self._accept(new, logits)

    def _decode(self) -> None:
        rows = self._rows
        ids = torch.tensor([[s.last] for s in rows], dtype=torch.long, device=self.device)
        pos = torch.tensor([[s.pos] for s in rows], dtype=torch.long, device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        logits, self._cache = self._forward(ids, self._mask, pos, self._cache, rows)
        for s in rows:
            s.pos += 1
        self.steps += 1
        self._accept(rows, logits)

    def _accept(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        tokens = choose(logits, [s.temperature for s in rows], [s.top_p for s in rows], [s.generator for s in rows])
        for s, t in zip(rows, tokens):
            if s.cancelled or s.finish:
                continue
            self.tokens += 1
            if t in self.stop_ids and not s.ignore_eos:
                self._finish(s, "stop", self._tail(s, ""))
                continue
            s.generated += 1
            s.last = t
            if s.incremental:
                text, stopped = s.stops.feed(s.detok.add(t))
            else:
                s.detok.ids.append(t)
                text, stopped = "", False
            if stopped:
                self._finish(s, "stop", text)
            elif s.generated >= s.max_tokens:
                self._finish(s, "length", self._tail(s, text))
            elif text:
                s.emit(("text", text))

    @staticmethod
    def _tail(s: Sequence, text: str) -> str:
        """`text` and whatever the detokenizer and the stop strings still hold, at the end of a
        sequence that no stop string ended."""
        held, stopped = s.stops.feed(s.detok.flush())
        return text + held + ("" if stopped else s.stops.flush())

    def _finish(self, s: Sequence, reason: str, text: str) -> None:
        if text:
            s.emit(("text", text))
        s.finish = reason
        s.emit(("done", reason, len(s.prompt), s.generated))

    # -- the KV cache: rows in, rows out -----------------------------------------------------

    def _merge(self, cache, mask: torch.Tensor, new: list[Sequence]) -> None:
        """Append the prefilled rows to the running batch, left-padding the shorter cache."""
        if not self._rows:
            self._cache, self._mask, self._rows = cache, mask, list(new)
            return
        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)], dim=0)
        self._rows = self._rows + list(new)

    def _drop(self) -> None:
        """Cut finished and cancelled rows out of the batch, then the columns no row uses."""
        keep = [i for i, s in enumerate(self._rows) if s.finish is None and not s.cancelled]
        if len(keep) == len(self._rows):
            return
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        idx = torch.tensor(keep, device=self.device)
        self._rows = [self._rows[i] for i in keep]
        self._mask = self._mask.index_select(0, idx)
        lead = int((self._mask.cumsum(1) == 0).sum(1).min())
        self._mask = self._mask[:, lead:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, lead:]
            layer.values = layer.values.index_select(0, idx)[:, :, lead:]


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """`t` with zeros prepended along `dim` up to `width` (cache [B, H, T, D] or mask [B, T])."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)

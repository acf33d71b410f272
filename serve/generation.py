"""Chat and text completions on the built-in engine: prompt, limits, sequences, OpenAI responses.

A request becomes `n` engine sequences (`n` x prompts for text completions) whose events come
back on one asyncio queue; the response is assembled from them (non-streaming) or sent as
server-sent events in OpenAI's chunk format as they come (streaming): a first chunk with the
role (and `sources` when retrieval ran), content deltas, a chunk of its own per choice with
`finish_reason`, an optional usage chunk, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import orjson

from domainlm.serve.engine import BASE, Engine, Sequence
from domainlm.serve.protocol import APIError, new_id, now


@dataclass(slots=True)
class Job:
    """What a request asks the engine for, after the prompt and limits are settled."""

    model: str
    adapter: str
    prompts: list[list[int]]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    ignore_eos: bool = False
    stream: bool = False
    sources: list[dict] | None = None
    seqs: list[Sequence] = field(default_factory=list)


def sampling(req) -> tuple[float, float]:
    t = 1.0 if req.temperature is None else float(req.temperature)
    p = 1.0 if req.top_p is None else float(req.top_p)
    return t, p


def budget(prompt_len: int, asked: int | None, context: int, limits) -> int:
    """max_tokens for a prompt of `prompt_len` tokens; APIError when it cannot fit."""
    prompt_limit = min(limits.max_prompt_tokens or context, context - 1)
    if prompt_len > prompt_limit:
        raise APIError(400, f"the prompt is {prompt_len} tokens, over this server's limit of {prompt_limit} "
                            f"(the model's context is {context}); shorten the messages", param="messages",
                       code="context_length_exceeded")
    if asked is not None:
        if asked > limits.max_tokens:
            raise APIError(400, f"max_tokens is {asked}, over this server's limit of {limits.max_tokens}",
                           param="max_tokens", code="invalid_value")
        if prompt_len + asked > context:
            raise APIError(400, f"the prompt ({prompt_len} tokens) plus max_tokens ({asked}) is over the model's "
                                f"context of {context} tokens; lower max_tokens or shorten the messages",
                           param="max_tokens", code="context_length_exceeded")
        return asked
    return max(1, min(limits.default_max_tokens, context - prompt_len))


class Runner:
    """Runs jobs on the engine and shapes OpenAI responses."""

    def __init__(self, engine: Engine, metrics, timeout_s: float):
        self.engine, self.metrics, self.timeout_s = engine, metrics, timeout_s

    def _submit(self, job: Job, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        job.seqs = []
        for p, prompt in enumerate(job.prompts):
            for j in range(job.n):
                index = p * job.n + j

                def emit(ev, index=index):
                    loop.call_soon_threadsafe(queue.put_nowait, (index, ev))

                seed = None if job.seed is None else job.seed + j
                job.seqs.append(Sequence(prompt=prompt, max_tokens=job.max_tokens, emit=emit,
                                         temperature=job.temperature, top_p=job.top_p, stop=job.stop, seed=seed,
                                         adapter=job.adapter, ignore_eos=job.ignore_eos,
                                         incremental=job.stream or bool(job.stop)))
        for s in job.seqs:
            self.engine.submit(s)

    def _cancel(self, job: Job) -> None:
        for s in job.seqs:
            s.cancelled = True
        self.engine.wake()

    async def _events(self, job: Job, request) -> AsyncIterator[tuple[int, tuple]]:
        """(choice index, event) until every sequence is done; cancels them all on the way out
        (a disconnect, a timeout, an error)."""
        queue: asyncio.Queue = asyncio.Queue()
        self._submit(job, queue)
        deadline = time.monotonic() + self.timeout_s
        left = len(job.seqs)
        try:
            while left:
                try:
                    index, ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if time.monotonic() > deadline:
                        raise APIError(408, f"the request ran past this server's limit of {self.timeout_s:g} s",
                                       type="timeout_error", code="request_timeout") from None
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                if ev[0] == "error":
                    raise APIError(500, ev[1], type="server_error", code="engine_error")
                if ev[0] == "done":
                    left -= 1
                    self.metrics.tokens(ev[2], ev[3])
                yield index, ev
        finally:
            self._cancel(job)

    # -- non-streaming --------------------------------------------------------------------------

    async def complete(self, job: Job, request, chat: bool) -> dict[str, Any]:
        total = len(job.seqs) if job.seqs else len(job.prompts) * job.n
        texts = [""] * total
        reasons: list[str | None] = [None] * total
        prompt_tokens = completion = 0
        async for index, ev in self._events(job, request):
            if ev[0] == "text":
                texts[index] += ev[1]
            elif ev[0] == "done":
                reasons[index] = ev[1]
                completion += ev[3]
        prompt_tokens = sum(len(p) for p in job.prompts)
        if any(r is None for r in reasons):
            raise APIError(499, "the client closed the request", code="client_closed_request")
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                 "total_tokens": prompt_tokens + completion}
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
            body = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": job.model,
                    "choices": choices, "usage": usage, "system_fingerprint": None}
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
            body = {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": job.model,
                    "choices": choices, "usage": usage}
        if job.sources is not None:
            body["sources"] = job.sources
        return body

    # -- streaming ------------------------------------------------------------------------------

    async def stream(self, job: Job, request, chat: bool, include_usage: bool) -> AsyncIterator[bytes]:
        cid = new_id("chatcmpl" if chat else "cmpl")
        created = now()
        obj = "chat.completion.chunk" if chat else "text_completion"
        total = len(job.prompts) * job.n

        def chunk(choices: list[dict], **extra) -> bytes:
            body = {"id": cid, "object": obj, "created": created, "model": job.model, "choices": choices}
            if chat:
                body["system_fingerprint"] = None
            body.update(extra)
            return b"data: " + orjson.dumps(body) + b"\n\n"

        def choice(i: int, content: str | None = None, reason: str | None = None, role: bool = False) -> dict:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta = {"role": "assistant", "content": ""}
                elif content is not None:
                    delta = {"content": content}
                return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            return {"index": i, "text": content or "", "logprobs": None, "finish_reason": reason}

        first = [choice(i, role=True) for i in range(total)] if chat else []
        extra = {"sources": job.sources} if job.sources is not None else {}
        if first or extra:
            yield chunk(first, **extra)
        completion = 0
        try:
            # No polling for a disconnect here: Starlette cancels this generator when the client
            # goes, and the `finally` of _events cancels the sequences.
            async for index, ev in self._events(job, None):
                if ev[0] == "text":
                    yield chunk([choice(index, ev[1])])
                elif ev[0] == "done":
                    completion += ev[3]
                    yield chunk([choice(index, reason=ev[1])])
        except APIError as e:
            yield b"data: " + orjson.dumps(e.body()) + b"\n\n"
            return
        if include_usage:
            prompt_tokens = sum(len(p) for p in job.prompts)
            yield chunk([], usage={"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                   "total_tokens": prompt_tokens + completion})
        yield b"data: [DONE]\n\n"


def adapter_for(name: str, base: str, adapters: set[str]) -> str:
    if name == base:
        return BASE
    if name in adapters:
        return name
    served = ", ".join([base, *sorted(adapters)])
    raise APIError(404, f"the model {name!r} does not exist on this server; served: {served}", param="model",
                   code="model_not_found")

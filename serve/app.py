"""The FastAPI application: OpenAI-compatible routes over the engine (or a backend) and the index.

Routes parse their own bodies (orjson, then the strict pydantic schemas of protocol.py) so that
every refusal is an OpenAI-shaped error with the right status: 400 bad JSON or a value the
server will not serve, 401 key (guard.py), 404 unknown model or route, 413 body size (guard.py),
422 a field of the wrong type or range, 429 concurrency (guard.py). Anything unexpected is a 500
with a fixed message; the traceback goes to the server log, never to the client.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from domainlm.serve import prompt as rag
from domainlm.serve.config import ServeConfig
from domainlm.serve.guard import BodyTooLarge, Guard, too_large
from domainlm.serve.metrics import Metrics
from domainlm.serve.protocol import (APIError, ChatRequest, CompletionRequest, EmbeddingRequest, RagOptions, now,
                                     parse_json, validate)

log = logging.getLogger("domainlm.serve")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Served:
    """Everything the routes use, built once at start (command.py)."""

    cfg: ServeConfig
    metrics: Metrics
    model_name: str | None = None
    adapters: set[str] = field(default_factory=set)
    loaded: Any = None
    """models.Loaded for the built-in engine."""
    runner: Any = None
    """generation.Runner over the built-in engine."""
    retriever: Any = None
    backend: Any = None
    """backend.Backend when generation is forwarded."""
    created: int = field(default_factory=now)


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_app(s: Served, api_key: str | None) -> Any:
    app = FastAPI(title="domainlm", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e)

    @app.exception_handler(BodyTooLarge)
    async def _too_big(_, e):
        return error_response(too_large(s.cfg.limits.max_body_bytes))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        if e.status_code == 404:
            return error_response(APIError(404, "no such endpoint; see /v1/models, /v1/chat/completions, "
                                                "/v1/completions, /v1/embeddings, /health, /metrics",
                                           code="not_found"))
        if e.status_code == 405:
            return error_response(APIError(405, "method not allowed on this endpoint", code="method_not_allowed"))
        return error_response(APIError(e.status_code, str(e.detail), code="http_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e):
        return error_response(APIError(422, "invalid request", code="invalid_request"))

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        log.exception("internal error")
        return error_response(APIError(500, "internal server error (see the server log)", type="server_error",
                                       code="internal_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(s.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        if s.backend is not None:
            return await s.backend.models(s)
        return {"object": "list", "data": _model_cards(s)}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if s.backend is not None:
            return await s.backend.model(model_id)
        for card in _model_cards(s):
            if card["id"] == model_id:
                return card
        raise APIError(404, f"the model {model_id!r} does not exist on this server", param="model",
                       code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = parse_json(await request.body())
        if s.backend is not None:
            return await _proxy_chat(s, body)
        req = validate(ChatRequest, body)
        return await _generate(s, req, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = parse_json(await request.body())
        if s.backend is not None:
            return await s.backend.forward("/completions", body, request)
        req = validate(CompletionRequest, body)
        return await _generate(s, req, request, chat=False)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = parse_json(await request.body())
        if s.backend is not None and s.retriever is None:
            return await s.backend.forward("/embeddings", body, request)
        return await _embeddings(s, validate(EmbeddingRequest, body))

    return Guard(app, api_key=api_key, max_body_bytes=s.cfg.limits.max_body_bytes,
                 max_concurrent=s.cfg.limits.max_concurrent, metrics=s.metrics, log_requests=s.cfg.log_requests)


def _model_cards(s: Served) -> list[dict]:
    cards = []
    if s.model_name:
        cards.append({"id": s.model_name, "object": "model", "created": s.created, "owned_by": "domainlm",
                      "root": s.model_name, "parent": None, "max_model_len": s.loaded.context if s.loaded else None})
    for a in sorted(s.adapters):
        cards.append({"id": a, "object": "model", "created": s.created, "owned_by": "domainlm", "root": a,
                      "parent": s.model_name, "max_model_len": s.loaded.context if s.loaded else None})
    if s.retriever is not None:
        name = s.retriever.embedder.ref.name
        cards.append({"id": name, "object": "model", "created": s.created, "owned_by": "domainlm", "root": name,
                      "parent": None, "type": "embedding"})
    return cards


# -- retrieval, shared with the backend proxy ------------------------------------------------------


def rag_settings(s: Served, opts, explicit_default: bool) -> tuple[bool, int, str, float]:
    """(enabled, top_k, mode, min_score) from the server's settings and the request's `rag` field."""
    r = s.cfg.rag.retrieval
    enabled = explicit_default if opts is None or opts.enabled is None else opts.enabled
    top_k = r.top_k if opts is None or opts.top_k is None else opts.top_k
    mode = r.mode if opts is None or opts.mode is None else opts.mode
    min_score = r.min_score if opts is None or opts.min_score is None else opts.min_score
    if enabled and s.retriever is None:
        if opts is not None and opts.enabled:
            raise APIError(400, "rag.enabled: this server has no index (start it with --index DIR)", param="rag",
                           code="no_index")
        enabled = False
    if top_k > s.cfg.limits.max_top_k:
        raise APIError(400, f"rag.top_k is {top_k}, over this server's limit of {s.cfg.limits.max_top_k}",
                       param="rag.top_k", code="invalid_value")
    return enabled, top_k, mode, min_score


async def retrieve(s: Served, question: str, top_k: int, mode: str, min_score: float) -> list:
    # Embedding the question and searching are CPU work: off the event loop.
    hits = await run_in_threadpool(s.retriever.retrieve, question, top_k, mode, min_score)
    s.metrics.retrievals += 1
    return hits


async def _proxy_chat(s: Served, body: Any):
    from domainlm.serve.backend import user_text, with_sources

    if not isinstance(body, dict):
        raise APIError(422, f"the request body must be a JSON object, not {type(body).__name__}", code="invalid_type")
    opts = validate(RagOptions, body.pop("rag")) if body.get("rag") is not None else None
    body.pop("rag", None)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise APIError(422, "messages: give a non-empty list of message objects", param="messages",
                       code="invalid_type")
    if len(messages) > s.cfg.limits.max_messages:
        raise APIError(400, f"{len(messages)} messages, over this server's limit of {s.cfg.limits.max_messages}",
                       param="messages", code="invalid_value")
    enabled, top_k, mode, min_score = rag_settings(s, opts, s.cfg.rag.enabled)
    sources = None
    question = user_text(messages)
    if enabled and question:
        hits = await retrieve(s, question, top_k, mode, min_score)
        if s.cfg.rag.max_source_tokens:
            # No tokenizer of the backend's model here: ~4 characters a token.
            hits = rag.fit_hits(hits, s.cfg.rag.max_source_tokens, lambda t: len(t) // 4 + 1, lambda t, n: t[: n * 4])
        body["messages"] = with_sources(messages, hits)
        sources = [h.as_dict() for h in hits]
    return await s.backend.chat(body, sources)


# -- the built-in engine -------------------------------------------------------------------------


async def _generate(s: Served, req, request: Request, chat: bool):
    # generation imports torch (seconds): only servers with a built-in engine need it.
    from domainlm.serve.generation import Job, adapter_for, budget, sampling

    lim, loaded = s.cfg.limits, s.loaded
    adapter = adapter_for(req.model, s.model_name, s.adapters)
    if getattr(req, "logprobs", None):
        raise APIError(400, "logprobs are not supported by this server", param="logprobs",
                       code="unsupported_parameter")
    prompts = [req.prompt] if not chat and isinstance(req.prompt, str) else ([] if chat else list(req.prompt))
    if not chat and (not prompts or any(not isinstance(p, str) for p in prompts)):
        raise APIError(422, "prompt: give a string or a list of strings", param="prompt", code="invalid_type")
    choices = req.n * (1 if chat else len(prompts))
    if choices > lim.max_n:
        raise APIError(400, f"this request asks for {choices} choices (n x prompts); this server's limit is "
                            f"{lim.max_n}", param="n", code="invalid_value")
    asked = (req.max_completion_tokens or req.max_tokens) if chat else req.max_tokens
    if asked is not None and asked > lim.max_tokens:
        raise APIError(400, f"max_tokens is {asked}, over this server's limit of {lim.max_tokens}",
                       param="max_tokens", code="invalid_value")
    stop = req.stops()
    temperature, top_p = sampling(req)
    tok = loaded.tokenizer
    enabled, top_k, mode, min_score = rag_settings(s, req.rag, s.cfg.rag.enabled if chat else False)
    sources = None
    if chat:
        if len(req.messages) > lim.max_messages:
            raise APIError(400, f"{len(req.messages)} messages, over this server's limit of {lim.max_messages}",
                           param="messages", code="invalid_value")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        question = rag.last_user_text(messages)
        template = loaded.templates[req.model]
        hits = []
        if enabled and question:
            hits = await retrieve(s, question, top_k, mode, min_score)
            hits = _fit(s, lambda h: _template(tok, rag.rag_messages(messages, h), template), hits, asked)
            sources = [h.as_dict() for h in hits]
        texts = [_template(tok, rag.rag_messages(messages, hits) if hits else messages, template)]
    else:
        texts = prompts
        if enabled:
            if len(prompts) > 1:
                raise APIError(400, "rag: give one prompt per request when retrieval is on", param="prompt",
                               code="invalid_value")
            hits = await retrieve(s, prompts[0], top_k, mode, min_score)
            hits = _fit(s, lambda h: rag.rag_user_content(prompts[0], h), hits, asked)
            texts = [rag.rag_user_content(prompts[0], hits)]
            sources = [h.as_dict() for h in hits]
    ids = [_encode(tok, t) for t in texts]
    max_tokens = min(budget(len(p), asked, loaded.context, lim) for p in ids)
    job = Job(model=req.model, adapter=adapter, prompts=ids, n=req.n, max_tokens=max_tokens, temperature=temperature,
              top_p=top_p, stop=stop, seed=req.seed, ignore_eos=req.ignore_eos, stream=req.stream, sources=sources)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(s.runner.stream(job, request, chat, include_usage), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    return await s.runner.complete(job, request, chat)


def _template(tok, messages: list[dict], template: str) -> str:
    try:
        return tok.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja's exceptions (raise_exception in templates) are the request's
        raise APIError(400, f"the chat template refused these messages: {str(e).splitlines()[0][:200]}",
                       param="messages", code="invalid_messages") from None


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _fit(s: Served, render, hits: list, asked: int | None) -> list:
    """The hits that fit the context next to the prompt and the answer's tokens; `render(hits)`
    is the prompt text with those hits."""
    if not hits:
        return hits
    tok, lim, ctx = s.loaded.tokenizer, s.cfg.limits, s.loaded.context
    empty = [hits[0].__class__(id="", doc_id="", source="", score=0.0, text="")]
    used = len(_encode(tok, render(empty)))
    answer = asked if asked is not None else min(lim.default_max_tokens, ctx // 2)
    room = min(lim.max_prompt_tokens or ctx, ctx - 1) - used - answer - 8
    if s.cfg.rag.max_source_tokens:
        room = min(room, s.cfg.rag.max_source_tokens)
    count, cut = rag.token_counter(tok)
    return rag.fit_hits(hits, room, count, cut)


# -- embeddings ------------------------------------------------------------------------------------


async def _embeddings(s: Served, req) -> Any:
    if s.retriever is None:
        raise APIError(400, "this server has no embedder: start it with --index DIR (the index's embedder "
                            "serves /v1/embeddings)", param="model", code="no_embedder")
    emb = s.retriever.embedder
    if req.model != emb.ref.name:
        raise APIError(404, f"the embedding model {req.model!r} does not exist on this server; served: "
                            f"{emb.ref.name!r}", param="model", code="model_not_found")
    inputs = [req.input] if isinstance(req.input, str) else list(req.input)
    if len(inputs) > s.cfg.limits.max_embedding_inputs:
        raise APIError(400, f"{len(inputs)} inputs, over this server's limit of {s.cfg.limits.max_embedding_inputs}",
                       param="input", code="invalid_value")
    if any(not t.strip() for t in inputs):
        raise APIError(400, "input: every input must be a non-empty string", param="input", code="invalid_value")
    if req.dimensions is not None and req.dimensions != emb.dim:
        raise APIError(400, f"dimensions: {emb.ref.name} makes {emb.dim}-d vectors only", param="dimensions",
                       code="invalid_value")
    vecs = await run_in_threadpool(emb.encode, inputs)
    tokens = sum(min(len(ids), emb.window) for ids in
                 emb.tokenizer(inputs, add_special_tokens=False, verbose=False)["input_ids"])
    data = []
    for i, v in enumerate(vecs):
        value = base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return {"object": "list", "data": data, "model": emb.ref.name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

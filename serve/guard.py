"""The ASGI layer in front of every route: API key, body size, concurrency, metrics.

It runs before FastAPI parses anything, so a request that fails one of these checks costs a
header read: a 10 MB body is refused on its Content-Length (or, when chunked, once its bytes pass
the limit), and a 429 is returned before the body is read at all. The concurrency slot is held
until the response has been sent or the client has gone, streams included: it is released in
the `finally` of the whole ASGI call, whatever ends it.
"""

from __future__ import annotations

import hmac
import logging
import time

import orjson

from domainlm.serve.metrics import Metrics
from domainlm.serve.protocol import APIError

log = logging.getLogger("domainlm.serve")
LIMITED = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}
OPEN = {"/health"}


class BodyTooLarge(Exception):
    pass


async def send_error(send, err: APIError) -> None:
    body = orjson.dumps(err.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, max_concurrent: int, metrics: Metrics,
                 log_requests: bool = False):
        self.app = app
        # Compared as bytes with hmac.compare_digest: time does not depend on where a guess differs.
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes
        self.max_concurrent = max_concurrent
        self.metrics = metrics
        self.log_requests = log_requests
        self.inflight = 0
        metrics.gauge("domainlm_requests_in_flight", "Generation and embedding requests being served.",
                      lambda: self.inflight)

    def authorized(self, scope) -> bool:
        if self.key is None:
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path, method = scope.get("path", ""), scope.get("method", "")
        status = {"code": 500}

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        held = False
        try:
            if path not in OPEN and not self.authorized(scope):
                return await send_error(send_wrapped, APIError(
                    401, "missing or wrong API key: send the header 'Authorization: Bearer YOUR_KEY'",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
            length = _content_length(scope)
            if length is not None and length > self.max_body:
                return await send_error(send_wrapped, too_large(self.max_body))
            if method == "POST" and path in LIMITED:
                if self.inflight >= self.max_concurrent:
                    return await send_error(send_wrapped, APIError(
                        429, f"the server is at its limit of {self.max_concurrent} concurrent requests; retry shortly",
                        type="rate_limit_error", code="too_many_requests", headers={"Retry-After": "1"}))
                self.inflight += 1
                held = True
            seen = 0

            async def receive_limited():
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > self.max_body:
                        raise BodyTooLarge()
                return message

            await self.app(scope, receive_limited, send_wrapped)
        finally:
            if held:
                self.inflight -= 1
            dt = time.perf_counter() - t0
            self.metrics.observe(method, path, status["code"], dt)
            if self.log_requests:
                log.info("%s %s %d %.3fs", method, path if path in LIMITED | OPEN else path[:64], status["code"], dt)


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over the server's limit of {limit:,} bytes",
                    code="request_too_large")


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None

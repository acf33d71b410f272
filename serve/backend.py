"""--backend URL: retrieval in front of another OpenAI-compatible server (vLLM, llama.cpp, ours).

The proxy retrieves for the last user message, puts the numbered sources into it (the same
prompt layout as the built-in engine, serve/prompt.py), forwards the request with httpx, and
adds `sources` to the response body or to the first chunk of the stream. Everything else in
the request (model, sampling, tools, ...) goes to the backend unchanged, and the backend's own
errors come back with their status and body; a backend that cannot be reached is a 502.
The proxy keeps its own limits, API key and metrics.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx
import orjson
from fastapi.responses import JSONResponse, StreamingResponse

from domainlm.errors import UserError
from domainlm.serve import prompt as rag
from domainlm.serve.protocol import APIError

log = logging.getLogger("domainlm.serve")


def v1_base(url: str) -> str:
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class Backend:
    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300.0):
        self.base = v1_base(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=self.base, headers=headers,
                                        timeout=httpx.Timeout(timeout_s, connect=10.0))

    cards: list[dict] = []
    """The backend's /v1/models cards as checked at start."""
    domainlm = False
    """True when the backend is itself `domainlm serve`: its own retrieval is then turned off
    in what is forwarded ({"rag": {"enabled": false}}), so sources are not added twice."""

    @staticmethod
    def check(url: str, api_key: str | None) -> list[dict]:
        """The backend's model cards; UserError at start when it does not answer."""
        base = v1_base(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        try:
            r = httpx.get(base + "/models", headers=headers, timeout=10.0)
        except httpx.HTTPError as e:
            raise UserError(f"backend {url!r} does not answer ({type(e).__name__}); start it first, e.g. "
                            "vllm serve MODEL_DIR --port 8001") from None
        if r.status_code == 401:
            raise UserError(f"backend {url!r} refused the API key (401); set --backend-api-key-env VAR")
        if r.status_code != 200:
            raise UserError(f"backend {url!r}: GET /v1/models answered {r.status_code}; is it an OpenAI-compatible "
                            "server?")
        try:
            cards = r.json()["data"]
            [m["id"] for m in cards]
            return cards
        except (ValueError, KeyError, TypeError):
            raise UserError(f"backend {url!r}: /v1/models is not an OpenAI model list") from None

    async def close(self) -> None:
        await self.client.aclose()

    async def _send(self, method: str, path: str, body: Any = None) -> httpx.Response:
        try:
            return await self.client.request(method, path, content=None if body is None else orjson.dumps(body),
                                              headers={"Content-Type": "application/json"})
        except httpx.HTTPError as e:
            raise APIError(502, f"the backend did not answer ({type(e).__name__})", type="server_error",
                           code="backend_unavailable") from None

    @staticmethod
    def _relay(r: httpx.Response) -> JSONResponse:
        try:
            body = r.json()
        except ValueError:
            raise APIError(502, f"the backend answered {r.status_code} with a body that is not JSON",
                           type="server_error", code="bad_backend_response") from None
        return JSONResponse(body, status_code=r.status_code)

    async def models(self, served) -> JSONResponse:
        r = await self._send("GET", "/models")
        if r.status_code != 200 or served.retriever is None:
            return self._relay(r)
        body = r.json()
        name = served.retriever.embedder.ref.name
        data = body.setdefault("data", [])
        if all(m.get("id") != name for m in data):      # /v1/embeddings is served here, by the index's embedder
            data.append({"id": name, "object": "model", "created": served.created, "owned_by": "domainlm",
                         "type": "embedding"})
        return JSONResponse(body)

    async def model(self, model_id: str) -> JSONResponse:
        return self._relay(await self._send("GET", f"/models/{model_id}"))

    async def forward(self, path: str, body: Any, request) -> Any:
        if isinstance(body, dict) and body.get("stream"):
            return await self._stream(path, body, None)
        return self._relay(await self._send("POST", path, body))

    async def chat(self, body: dict, sources: list | None) -> Any:
        """Forward a chat request whose messages already carry the sources; add `sources` to the
        response (or to the stream's first chunk)."""
        if self.domainlm:
            body["rag"] = {"enabled": False}
        if body.get("stream"):
            return await self._stream("/chat/completions", body, sources)
        r = await self._send("POST", "/chat/completions", body)
        resp = self._relay(r)
        if r.status_code == 200 and sources is not None:
            data = r.json()
            data["sources"] = sources
            return JSONResponse(data)
        return resp

    async def _stream(self, path: str, body: dict, sources: list | None) -> Any:
        req = self.client.build_request("POST", path, content=orjson.dumps(body),
                                        headers={"Content-Type": "application/json"})
        try:
            r = await self.client.send(req, stream=True)
        except httpx.HTTPError as e:
            raise APIError(502, f"the backend did not answer ({type(e).__name__})", type="server_error",
                           code="backend_unavailable") from None
        if r.status_code != 200:
            await r.aread()
            await r.aclose()
            return self._relay(r)

        async def relay():
            first = sources is not None
            try:
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    if first and line.startswith("data: {"):
                        chunk = orjson.loads(line[6:])
                        chunk["sources"] = sources
                        line = "data: " + orjson.dumps(chunk).decode()
                        first = False
                    yield (line + "\n\n").encode()
            finally:
                await r.aclose()      # a client gone mid-stream closes the backend's stream too

        return StreamingResponse(relay(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def user_text(messages: list[dict]) -> str | None:
    for m in reversed(messages):
        if m.get("role") == "user":
            c = m.get("content")
            if isinstance(c, str):
                return c or None
            if isinstance(c, list):
                return "".join(p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text") or None
            return None
    return None


def with_sources(messages: list[dict], hits: list) -> list[dict]:
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m.get("role") == "user":
            m["content"] = rag.rag_user_content(user_text([m]) or "", hits)
            break
    return out

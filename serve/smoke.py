"""`domainlm serve --smoke.run`: the server on its real socket in a thread, questions over HTTP.

Every question goes through real HTTP (httpx) to the same app `domainlm serve` runs, through the
adapter when one is served (else the base model); the answers are printed with their sources,
then the server stops. A request that fails, or an answer without sources where an index is
served, makes the command fail.
"""

from __future__ import annotations

import textwrap
import threading
import time

from domainlm.errors import UserError


def smoke(app, sock, url: str, key: str | None, served, cfg) -> int:
    import httpx
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    failures = []
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise UserError(f"the server did not start on {url}")
            time.sleep(0.05)
        with httpx.Client(base_url=url, headers=headers, timeout=cfg.limits.request_timeout_s) as client:
            models = [m["id"] for m in client.get("/v1/models").raise_for_status().json()["data"]]
            model = sorted(served.adapters)[0] if served.adapters else served.model_name
            print(f"smoke: {url}/v1  models: {', '.join(models)}  asking: {model}", flush=True)
            for q in cfg.smoke.questions:
                t0 = time.perf_counter()
                r = client.post("/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": q}],
                    "max_tokens": cfg.smoke.max_tokens, "temperature": 0})
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    failures.append(f"{q!r}: HTTP {r.status_code} {r.text[:200]}")
                    continue
                body = r.json()
                answer = body["choices"][0]["message"]["content"]
                sources = body.get("sources")
                print(f"\nQ: {q}\nA ({model}, {body['usage']['completion_tokens']} tokens, {dt:.2f}s): "
                      + textwrap.shorten(" ".join(answer.split()) or "(empty)", 400, placeholder=" ..."))
                for i, src in enumerate(sources or [], 1):
                    print(f"   [{i}] {src['doc_id']}  ({src['source']})  score {src['score']:.4f}")
                if served.retriever is not None and not sources:
                    failures.append(f"{q!r}: no sources in the answer")
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    if failures:
        raise UserError("smoke test failed: " + "; ".join(failures))
    print(f"\nsmoke: {len(cfg.smoke.questions)} questions answered over HTTP; server stopped", flush=True)
    return 0

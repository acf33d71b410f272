"""`domainlm serve`: a real server in a subprocess on 127.0.0.1, called with the official openai client.

One server (tiny Llama + a LoRA adapter + the pydoc index + an API key) serves every test here;
outputs are checked against references computed in this process: greedy text against stock
transformers/PEFT `generate`, embeddings against sentence-transformers, sources against the
QA pairs' gold documents. Then: a bounded fuzz of malformed requests (only 4xx, OpenAI error
bodies, the server healthy, its memory flat), 429 with Retry-After, a disconnect mid-stream
freeing its slot, the --backend proxy in front of this server, and the bad-input one-liners.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, run_cli, tiny_llama

# PEFT calls a transformers API that transformers 5 deprecates (adapters built here for the tests).
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
KEY_ENV = "DOMAINLM_TEST_SERVE_KEY"
CONTEXT = 2048
FUZZ_REQUESTS = 1200
RSS_GROWTH_BOUND_MB = 40


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    lines: list[str] = field(default_factory=list)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(args: list, env: dict | None = None, timeout: float = 300) -> Server:
    """`domainlm serve ARGS --port 0` in a subprocess; returns once /health answers."""
    proc = subprocess.Popen([sys.executable, "-m", "domainlm.cli", "serve", *map(str, args), "--port", "0"],
                            cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    server = Server(proc, "")
    found = threading.Event()

    def drain():     # keep the pipe empty so the server never blocks on a log line
        for line in proc.stdout:
            server.lines.append(line)
            m = re.search(r"url\s+(http://[\d.]+:\d+)/v1", line)
            if m:
                server.url = m.group(1)
                found.set()

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            time.sleep(0.2)
            raise AssertionError("server exited:\n" + "".join(server.lines))
        if found.is_set():
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    server.stop()
    raise AssertionError("server did not start:\n" + "".join(server.lines))


def make_adapter(path: Path, model_dir: Path, seed: int) -> Path:
    """A LoRA on `model_dir` with non-zero B (so its output differs from the base's), saved by PEFT
    (safetensors) with the adapter dir's manifest."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from domainlm.pretrain.convert.hfdir import open_hf_dir

    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(str(path))
    (path / "manifest.json").write_text(json.dumps({"stage": "finetune sft", "base_model": {
        "path": str(model_dir), "weights_sha256": open_hf_dir(model_dir).weights_sha256()}}))
    return path


@dataclass
class Stack:
    server: Server
    key: str
    model: Path
    adapter: Path
    index: Path
    qas: list
    root: Path

    def client(self, **kw):
        import openai

        return openai.OpenAI(**{"base_url": self.server.url + "/v1", "api_key": self.key, "max_retries": 0,
                                "timeout": 120, **kw})


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tokenizer_dir, pydoc_index):
    root = tmp_path_factory.mktemp("serve")
    model = tiny_llama(root / "tiny", tokenizer_dir, max_position_embeddings=CONTEXT)
    adapter = make_adapter(root / "adapter", model, seed=1)
    index, qas = pydoc_index
    key = "sk-test-" + secrets.token_hex(16)
    server = start_server(["--model", model, "--adapter", f"pydoc={adapter}", "--index", index,
                           "--api-key-env", KEY_ENV, "--limits.max-concurrent", 4, "--engine.max-batch", 8,
                           "--limits.request-timeout-s", 120], env={KEY_ENV: key})
    yield Stack(server, key, model, adapter, index, qas, root)
    server.stop()
    assert key not in "".join(server.lines)                  # the key is never logged


@pytest.fixture(scope="module")
def reference(stack):
    """Greedy continuations by stock transformers + PEFT `generate`, the engine's reference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from domainlm.pretrain.convert.hfdir import open_hf_dir, stop_ids

    hf = open_hf_dir(stack.model)
    tok = hf.tokenizer()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(stack.model)), str(stack.adapter),
                                      adapter_name="pydoc").eval()
    stops = stop_ids(tok)

    def generate(text: str, max_new_tokens: int, adapter: str | None) -> str:
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            if adapter:
                model.set_adapter(adapter)
                out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=stops, pad_token_id=tok.pad_token_id)
            else:
                with model.disable_adapter():
                    out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                                         eos_token_id=stops, pad_token_id=tok.pad_token_id)
        new = [t for t in out[0, ids.shape[1]:].tolist()]
        if new and new[-1] in stops:
            new = new[:-1]
        return tok.decode(new, skip_special_tokens=True)

    def chat(content: str, max_new_tokens: int, adapter: str | None = None) -> str:
        text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       tokenize=False)
        return generate(text, max_new_tokens, adapter)

    return {"chat": chat, "raw": generate, "tok": tok}


NO_RAG = {"rag": {"enabled": False}}


def test_models_health_and_auth(stack):
    import openai

    ids = {m.id for m in stack.client().models.list().data}
    assert ids == {"tiny", "pydoc", "all-MiniLM-L6-v2"}
    assert httpx.get(stack.server.url + "/health").json() == {"status": "ok"}      # no key needed
    for key in ("wrong-key", stack.key + "x", stack.key[:-1]):
        with pytest.raises(openai.AuthenticationError) as e:
            stack.client(api_key=key).models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    r = httpx.post(stack.server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(stack.server.url + "/metrics", headers={"Authorization": f"Basic {stack.key}"})
    assert r.status_code == 401


def test_chat_greedy_matches_transformers_generate(stack, reference):
    client = stack.client()
    outs = {}
    for model, adapter in (("tiny", None), ("pydoc", "pydoc")):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What does abc do?"}],
                                           max_tokens=24, temperature=0, extra_body=NO_RAG)
        assert r.choices[0].message.content == reference["chat"]("What does abc do?", 24, adapter)
        assert r.object == "chat.completion" and r.model == model and "sources" not in (r.model_extra or {})
        assert r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 5
        outs[model] = r.choices[0].message.content
    assert outs["tiny"] != outs["pydoc"]                      # the adapter is applied, by name


def test_concurrent_requests_batch_and_mix_adapters(stack, reference):
    """Requests in flight together share the engine's batch (base and adapter rows mixed); each
    still gets exactly its own greedy continuation."""
    client = stack.client()
    prompts = [(f"Question {i}: what is {w}?", "pydoc" if i % 2 else "tiny")
               for i, w in enumerate(["json", "os.path", "numpy.sum", "peft", "ast", "re"])]

    def ask(p):
        text, model = p
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                           max_tokens=32, temperature=0, extra_body=NO_RAG)
        return r.choices[0].message.content

    before = _metric(stack, "domainlm_engine_steps_total")
    with ThreadPoolExecutor(4) as pool:          # the server's limit is 4 in flight
        got = list(pool.map(ask, prompts))
    steps = _metric(stack, "domainlm_engine_steps_total") - before
    for (text, model), out in zip(prompts, got):
        assert out == reference["chat"](text, 32, None if model == "tiny" else "pydoc")
    assert steps < 6 * 31                                       # fewer decode steps than one at a time


def test_chat_with_retrieval_cites_the_gold_document(stack):
    client = stack.client()
    qas = stack.qas[:10]
    found = 0
    for q in qas:
        r = client.chat.completions.create(model="pydoc", messages=[{"role": "user", "content": q.question}],
                                           max_tokens=8, temperature=0)
        sources = r.model_extra["sources"]
        assert 1 <= len(sources) <= 8                         # top_k 8 within the sources budget
        for s in sources:
            assert s["id"].startswith(s["doc_id"] + "#") and re.match(r".+\.jsonl:\d+$", s["source"])
            assert isinstance(s["score"], float) and s["text"]
        found += q.doc_id in [s["doc_id"] for s in sources]
        plain = client.chat.completions.create(model="pydoc", messages=[{"role": "user", "content": q.question}],
                                               max_tokens=8, temperature=0, extra_body=NO_RAG)
        assert r.usage.prompt_tokens > plain.usage.prompt_tokens + 50     # the sources are in the prompt
    assert found >= 8
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": qas[0].question}],
                                       max_tokens=4, extra_body={"rag": {"top_k": 1, "mode": "bm25"}})
    assert len(r.model_extra["sources"]) == 1


def test_streaming_chunks(stack):
    client = stack.client()
    q = stack.qas[0].question
    kw = dict(model="pydoc", messages=[{"role": "user", "content": q}], max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant"
    assert [s["doc_id"] for s in first.model_extra["sources"]] == [s["doc_id"] for s in whole.model_extra["sources"]]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].delta.content is None
    assert finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    raw = httpx.post(stack.server.url + "/v1/chat/completions", json={**kw, "stream": True},
                     headers={"Authorization": f"Bearer {stack.key}"}).text
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_completions_stop_seed_and_length(stack, reference):
    client = stack.client()
    prompt = "def parse(text):\n"
    full = reference["raw"](prompt, 30, None)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0)
    assert r.choices[0].text == full and r.object == "text_completion"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0, extra_body={
        "ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 30
    cut = full[len(full) // 3: len(full) // 3 + 3]
    if cut.strip():
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0, stop=[cut, "zzzz"])
        assert r.choices[0].text == full[:full.index(cut)] and r.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=1.0, top_p=0.9,
                                         seed=seed, n=2).choices for seed in (7, 7, 8)]
    assert [c.text for c in sampled[0]] == [c.text for c in sampled[1]]
    assert [c.text for c in sampled[0]] != [c.text for c in sampled[2]]
    assert len(sampled[0]) == 2 and sampled[0][0].text != sampled[0][1].text
    stream = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=30, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in stream if c.choices) == full


def test_embeddings_match_sentence_transformers(stack):
    import numpy as np

    from domainlm.serve.embedder import Embedder, resolve_embedder

    texts = ["json.dumps serializes an object", "os.path.join joins path components", "numpy.sum"]
    client = stack.client()
    r64 = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)         # the client asks for base64
    rf = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format="float")
    ref = Embedder(resolve_embedder("all-MiniLM-L6-v2"), "cpu").encode(texts)
    for r in (r64, rf):
        got = np.array([d.embedding for d in r.data])
        assert got.shape == (3, 384) and np.allclose(got, ref, atol=1e-5)
    assert r64.usage.prompt_tokens == rf.usage.prompt_tokens > 10


def _metric(stack, name: str, labels: str = "") -> float:
    text = httpx.get(stack.server.url + "/metrics", headers={"Authorization": f"Bearer {stack.key}"}).text
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.split()[-1])
    return 0.0


def test_429_and_a_disconnect_mid_stream_frees_the_slot(stack):
    """Four streams hold the four slots: the fifth request gets 429 with Retry-After; closing the
    streams mid-way frees their slots and engine rows at once."""
    auth = {"Authorization": f"Bearer {stack.key}"}
    body = {"model": "tiny", "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 1000,
            "stream": True, "ignore_eos": True, "temperature": 0, "rag": {"enabled": False}}
    clients = [httpx.Client(base_url=stack.server.url, timeout=60) for _ in range(4)]
    streams = []
    try:
        for c in clients:
            s = c.stream("POST", "/v1/chat/completions", json=body, headers=auth)
            resp = s.__enter__()
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")                  # the stream has started
            streams.append((s, resp, lines))
        r = httpx.post(stack.server.url + "/v1/chat/completions", json={**body, "stream": False}, headers=auth)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert _metric(stack, "domainlm_requests_in_flight") == 4
        assert _metric(stack, "domainlm_engine_sequences") == 4
    finally:
        t0 = time.monotonic()
        for s, resp, _ in streams:
            resp.close()
            s.__exit__(None, None, None)
        for c in clients:
            c.close()
    while time.monotonic() - t0 < 5:
        if _metric(stack, "domainlm_requests_in_flight") == 0 and _metric(stack, "domainlm_engine_sequences") == 0:
            break
        time.sleep(0.05)
    freed = time.monotonic() - t0
    assert _metric(stack, "domainlm_requests_in_flight") == 0 and _metric(stack, "domainlm_engine_sequences") == 0
    assert freed < 2.0
    r = stack.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=2, extra_body=NO_RAG)
    assert r.choices[0].message.role == "assistant"


def _fuzz_cases(stack, rng: random.Random) -> list[tuple[str, str, dict, bytes]]:
    """(method, path, headers, body) of malformed requests, every kind many times over."""
    good = {"Authorization": f"Bearer {stack.key}", "Content-Type": "application/json"}
    msg = [{"role": "user", "content": "hi"}]
    base = {"model": "tiny", "messages": msg, "max_tokens": 4}
    long_text = "word " * (CONTEXT + 200)
    bad_fields = [
        ("model", 5), ("model", ""), ("model", "../../etc/passwd"), ("model", "tiny/../pydoc"), ("model", None),
        ("model", "gpt-4"), ("messages", "hi"), ("messages", []), ("messages", [{"role": "robot", "content": "x"}]),
        ("messages", [{"role": "user", "content": 5}]), ("messages", [{"content": "x"}]), ("messages", [1, 2]),
        ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]),
        ("messages", msg * 300), ("messages", [{"role": "user", "content": long_text}]),
        ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 10**9), ("max_tokens", 2**70), ("max_tokens", "5"),
        ("max_tokens", 1.5), ("max_tokens", True), ("max_tokens", 1025), ("max_tokens", CONTEXT - 5),
        ("temperature", "hot"), ("temperature", -1), ("temperature", 3), ("top_p", 0), ("top_p", 1.5),
        ("n", 0), ("n", 100), ("n", "2"), ("stream", "yes"), ("stop", [1, 2]), ("stop", ["a"] * 5), ("stop", [""]),
        ("seed", 1.5), ("seed", 2**80), ("rag", "on"), ("rag", {"top_k": -1}), ("rag", {"mode": "x"}),
        ("rag", {"top_k": 1000}), ("rag", {"enabled": "yes"}), ("rag", {"unknown": 1}), ("tools", [{"type": "x"}]),
        ("logprobs", True), ("stream_options", {"include_usage": "y"}), ("response_format", {"type": "json"}),
    ]
    cases = []
    for field_name, value in bad_fields:
        cases.append(("POST", "/v1/chat/completions", good, json.dumps({**base, field_name: value}).encode()))
    for body in (b"", b"{", b"not json", b"[1, 2]", b'"text"', b"null", b'{"model": NaN}', b"\xff\xfe\x00",
                 b'{"model": "tiny", "messages": [' * 50, json.dumps({**base, "extra": 1})[:-1].encode(),
                 b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"\x00" * 10 + b'"]}'):
        cases.append(("POST", "/v1/chat/completions", good, body))
    for field_name, value in (("prompt", 5), ("prompt", []), ("prompt", [1, 2]), ("model", "nope"),
                              ("max_tokens", -3), ("prompt", ["a"] * 5), ("logprobs", 3), ("echo", True)):
        cases.append(("POST", "/v1/completions", good, json.dumps({"model": "tiny", "prompt": "x",
                                                                   field_name: value}).encode()))
    for field_name, value in (("model", "tiny"), ("input", []), ("input", [""]), ("input", ["a"] * 300),
                              ("input", [1, 2]), ("input", 5), ("encoding_format", "hex"), ("dimensions", 3)):
        cases.append(("POST", "/v1/embeddings", good, json.dumps({"model": "all-MiniLM-L6-v2", "input": "x",
                                                                  field_name: value}).encode()))
    body = json.dumps(base).encode()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {stack.key}"},
                    {"Authorization": f"Bearer {stack.key[:-1]}"}, {"Authorization": "Bearer"},
                    {"Authorization": f"Bearer {stack.key}{stack.key}"}):
        cases.append(("POST", "/v1/chat/completions", {**headers, "Content-Type": "application/json"}, body))
    cases += [("GET", "/v1/chat/completions", good, b""), ("POST", "/v1/nothing", good, body),
              ("DELETE", "/v1/models", good, b""), ("GET", "/v1/models/unknown-model", good, b""),
              ("GET", "/../../etc/passwd", good, b"")]
    out = []
    while len(out) < FUZZ_REQUESTS:
        out.extend(rng.sample(cases, len(cases)))
    big = ("POST", "/v1/chat/completions", good, b'{"model": "tiny", "messages": [{"role": "user", "content": "'
           + b"a" * 10_000_000 + b'"}]}')
    for i in range(5):                                              # 10 MB bodies: a few, they cost the client
        out.insert(rng.randrange(len(out)), big)
    return out


def test_fuzz_malformed_requests_get_only_4xx(stack):
    rng = random.Random(0)
    cases = _fuzz_cases(stack, rng)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=stack.server.url, timeout=60) as client:
        def send(case):
            method, path, headers, body = case
            r = client.request(method, path, headers=headers, content=body)
            assert 400 <= r.status_code < 500, (case[:2], body[:200], r.status_code, r.text[:300])
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str)
            assert "Traceback" not in r.text and 'File "' not in r.text
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        for case in cases[:200]:                                     # warm-up: allocator pools, caches
            send(case)
        rss0 = stack.server.rss_mb()
        for case in cases[200:]:
            send(case)
        rss1 = stack.server.rss_mb()
    print(f"\nfuzz: {len(cases)} requests, statuses {dict(sorted(statuses.items()))}, server RSS "
          f"{rss0:.0f} -> {rss1:.0f} MB")
    assert len(cases) >= 1000 and set(statuses) >= {400, 401, 404, 405, 413, 422}
    assert rss1 - rss0 < RSS_GROWTH_BOUND_MB
    assert httpx.get(stack.server.url + "/health").status_code == 200
    r = stack.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, extra_body=NO_RAG)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_metrics_prometheus_text(stack):
    text = httpx.get(stack.server.url + "/metrics", headers={"Authorization": f"Bearer {stack.key}"}).text
    assert '# TYPE domainlm_requests_total counter' in text
    assert re.search(r'domainlm_requests_total\{endpoint="/v1/chat/completions",method="POST",status="200"\} \d+',
                     text)
    assert re.search(r'domainlm_requests_total\{endpoint="/v1/chat/completions",method="POST",status="401"\} \d+',
                     text)
    assert 'domainlm_request_seconds_bucket{endpoint="/v1/chat/completions",le="+Inf"}' in text
    assert _metric(stack, "domainlm_completion_tokens_total") > 0 and _metric(stack, "domainlm_retrievals_total") > 0
    assert 'endpoint="/../../etc/passwd"' not in text                     # unknown paths are 'other'


def test_backend_proxy_in_front_of_our_server(stack):
    """--backend: retrieval here, generation there; the forwarded prompt carries the sources."""
    from domainlm.serve.prompt import rag_user_content
    from domainlm.serve.retrieve import Hit

    key_file = stack.root / "proxy.key"
    key_file.write_text("proxy-key-" + secrets.token_hex(8) + "\n")
    proxy = start_server(["--backend", stack.server.url, "--backend-api-key-env", KEY_ENV, "--index", stack.index,
                          "--api-key-file", key_file], env={KEY_ENV: stack.key})
    try:
        import openai

        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key=key_file.read_text().strip(), max_retries=0)
        ids = {m.id for m in client.models.list().data}
        assert {"tiny", "pydoc", "all-MiniLM-L6-v2"} <= ids
        q = stack.qas[1]
        r = client.chat.completions.create(model="pydoc", messages=[{"role": "user", "content": q.question}],
                                           max_tokens=12, temperature=0)
        sources = r.model_extra["sources"]
        # top_k 8 within the 600-token sources budget (estimated at 4 characters a token here)
        assert 1 <= len(sources) <= 8 and sum(len(s["text"]) // 4 + 1 for s in sources) <= 600
        assert q.doc_id in [s["doc_id"] for s in sources]
        hits = [Hit(s["id"], s["doc_id"], s["source"], s["score"], s["text"], s["context"]) for s in sources]
        direct = stack.client().chat.completions.create(
            model="pydoc", messages=[{"role": "user", "content": rag_user_content(q.question, hits)}], max_tokens=12,
            temperature=0, extra_body=NO_RAG)
        assert r.choices[0].message.content == direct.choices[0].message.content
        chunks = list(client.chat.completions.create(model="pydoc", stream=True, max_tokens=12, temperature=0,
                                                     messages=[{"role": "user", "content": q.question}]))
        assert [s["doc_id"] for s in chunks[0].model_extra["sources"]] == [s["doc_id"] for s in sources]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.choices[0].message.content
        with pytest.raises(openai.NotFoundError):                       # the backend's 404, relayed
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], max_tokens=2)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=proxy.url + "/v1", api_key=stack.key, max_retries=0).models.list()
        c = client.completions.create(model="tiny", prompt="def f():", max_tokens=5, temperature=0)
        assert c.choices[0].text == stack.client().completions.create(model="tiny", prompt="def f():", max_tokens=5,
                                                                      temperature=0).choices[0].text
    finally:
        proxy.stop()


# -- bad input at start: one line each, before anything heavy loads --------------------------------


def _one_line(capsys, args) -> str:
    code, _, err = run_cli(["serve", *args], capsys)
    lines = [line for line in err.splitlines() if line.strip() and "domainlm serve: error" in line]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def test_bad_input_one_line_each(stack, tmp_path, tokenizer_dir, capsys, monkeypatch):
    import shutil

    no_template = tmp_path / "no_template"
    shutil.copytree(stack.model, no_template)
    (no_template / "chat_template.jinja").unlink()
    cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert "has no chat template" in _one_line(capsys, ["--model", no_template, "--port", "0"])

    other = tiny_llama(tmp_path / "other", tokenizer_dir, seed=5)
    line = _one_line(capsys, ["--model", other, "--adapter", f"pydoc={stack.adapter}", "--port", "0"])
    assert "was trained on" in line and "give the base model it was trained on" in line

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        line = _one_line(capsys, ["--model", stack.model, "--port", port])
        assert f"port {port} on 127.0.0.1 is in use" in line

    pickled = tmp_path / "pickled"
    shutil.copytree(stack.model, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    assert "reads safetensors only" in _one_line(capsys, ["--model", pickled, "--port", "0"])

    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    assert "NO_SUCH_KEY_VAR is unset" in _one_line(capsys, ["--model", stack.model, "--api-key-env",
                                                            "NO_SUCH_KEY_VAR"])
    assert "write NAME=DIR" in _one_line(capsys, ["--model", stack.model, "--adapter", str(stack.adapter)])
    assert "exclude each other" in _one_line(capsys, ["--model", stack.model, "--backend", "http://127.0.0.1:9"])
    assert "does not answer" in _one_line(capsys, ["--backend", "http://127.0.0.1:9", "--port", "0"])
    line = _one_line(capsys, ["--model", stack.model, "--index", stack.index, "--embedder",
                              str(stack.model), "--port", "0"])
    assert "sentence-transformers" in line or "was built with embedder" in line
    line = _one_line(capsys, ["--model", stack.model, "--index", stack.index, "--rag.max-source-tokens",
                              str(CONTEXT), "--port", "0"])
    assert f"rag.max_source_tokens is {CONTEXT} tokens, but the model's context is {CONTEXT}" in line


def test_engine_threads_and_device_are_one_line_before_loading(tiny_hf_model, capsys, monkeypatch):
    """A negative thread count, a device torch does not know, CUDA where there is none: refused in
    one line before the model loads, not a torch traceback from inside it."""
    import torch

    line = _one_line(capsys, ["--model", tiny_hf_model, "--engine.threads", "-1", "--smoke.run"])
    assert "engine.threads must be >= 0" in line and "got -1" in line
    line = _one_line(capsys, ["--model", tiny_hf_model, "--engine.device", "gpu", "--smoke.run"])
    assert "--engine.device 'gpu': use auto, cpu, cuda or cuda:N" in line
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        line = _one_line(capsys, ["--model", tiny_hf_model, "--engine.device", device, "--port", "0", "--smoke.run"])
        assert f"--engine.device {device}: no CUDA device here; use --engine.device cpu (or auto)" in line

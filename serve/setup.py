"""Building what `domainlm serve` serves: check (fast, one-line refusals), then load (slow)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from domainlm.progress import log
from domainlm.serve.config import ServeConfig


@dataclass(slots=True)
class Checked:
    plan: Any = None
    """models.ModelPlan (built-in engine)."""
    index: Any = None
    """index_dir.IndexDir."""
    embedder: Any = None
    """embedder.EmbedderRef the index was built with."""
    backend_models: list[dict] | None = None
    """The backend's /v1/models cards."""
    device: str = "cpu"
    """--engine.device resolved (auto: cuda or cpu), checked to be here."""


def check(cfg: ServeConfig) -> Checked:
    out = Checked()
    if cfg.index:
        from domainlm.serve.index_dir import open_index_dir

        out.index = open_index_dir(cfg.index)
        out.embedder = out.index.embedder(cfg.embedder)
    if cfg.model:
        from domainlm.serve.models import plan

        out.plan = plan(cfg.model, cfg.model_name, cfg.adapter, cfg.skip_missing_adapters)
        if cfg.index and out.plan.hf.max_positions:
            from domainlm.serve.prompt import check_budget

            check_budget(cfg.rag.max_source_tokens, out.plan.hf.max_positions, "rag.max_source_tokens")
    if cfg.backend:
        from domainlm.serve.backend import Backend

        out.backend_models = Backend.check(cfg.backend, _backend_key(cfg))
    if cfg.model or cfg.index:
        from domainlm.serve.config import resolve_device

        out.device = resolve_device(cfg.engine.device, "--engine.device")
    return out


def _backend_key(cfg: ServeConfig) -> str | None:
    if not cfg.backend_api_key_env:
        return None
    from domainlm.errors import UserError

    key = os.environ.get(cfg.backend_api_key_env, "").strip()
    if not key:
        raise UserError(f"backend_api_key_env: the environment variable {cfg.backend_api_key_env} is unset or empty")
    return key


def load(cfg: ServeConfig, c: Checked):
    from domainlm.serve.app import Served
    from domainlm.serve.metrics import Metrics

    s = Served(cfg=cfg, metrics=Metrics())
    if cfg.engine.threads:
        import torch  # the thread count must be set before the first forward

        torch.set_num_threads(cfg.engine.threads)
    if c.index is not None:
        from domainlm.serve.embedder import Embedder
        from domainlm.serve.retrieve import Retriever

        log.info("serve: loading index %s (%s chunks) and embedder %s", cfg.index, c.index.counts.get("chunks"),
                 c.embedder.name)
        s.retriever = Retriever(c.index, Embedder(c.embedder, c.device), cfg.rag.retrieval)
    if c.plan is not None:
        from domainlm.serve.engine import Engine
        from domainlm.serve.generation import Runner
        from domainlm.serve.models import load as load_models

        log.info("serve: loading model %s%s", c.plan.hf.path,
                 f" with adapters {', '.join(c.plan.adapters)}" if c.plan.adapters else "")
        s.loaded = load_models(c.plan, c.device, cfg.engine.dtype)
        s.model_name, s.adapters = c.plan.name, set(c.plan.adapters)
        engine = Engine(s.loaded.model, s.loaded.tokenizer, s.loaded.stop_ids, max_batch=cfg.engine.max_batch,
                        device=s.loaded.device, adapters=bool(c.plan.adapters))
        engine.warmup()
        engine.start()
        s.runner = Runner(engine, s.metrics, cfg.limits.request_timeout_s)
        s.metrics.gauge("domainlm_engine_sequences", "Sequences in the engine's running batch.", lambda: engine.running)
        s.metrics.gauge("domainlm_engine_queued", "Sequences waiting for a place in the batch.", lambda: engine.queued)
        s.metrics.gauge("domainlm_engine_steps_total", "Decode steps run (a counter).", lambda: engine.steps)
    if cfg.backend:
        from domainlm.serve.backend import Backend

        s.backend = Backend(cfg.backend, _backend_key(cfg), cfg.limits.request_timeout_s)
        s.backend.cards = c.backend_models or []
        s.backend.domainlm = any(m.get("owned_by") == "domainlm" for m in s.backend.cards)
    return s


def describe(cfg: ServeConfig, s, url: str, auth: bool) -> list[tuple[str, str]]:
    rows = [("url", f"{url}/v1  ({'API key required' if auth else 'no API key'})")]
    if s.loaded is not None:
        rows.append(("model", f"{s.model_name}  ({cfg.model}; {s.loaded.device}, {s.loaded.dtype}, "
                              f"context {s.loaded.context})"))
        rows.append(("adapters", ", ".join(sorted(s.adapters)) or "none"))
    if s.backend is not None:
        rows.append(("backend", f"{s.backend.base}  (models: {', '.join(m['id'] for m in s.backend.cards)})"))
    if s.retriever is not None:
        r = cfg.rag.retrieval
        rows.append(("index", f"{cfg.index}  ({len(s.retriever.chunks):,} chunks, {s.retriever.index.dense_type}, "
                              f"embedder {s.retriever.embedder.ref.name})"))
        rows.append(("rag", f"{'on' if cfg.rag.enabled else 'off'} by default; {r.mode}, top {r.top_k}, "
                            f"cosine >= {r.min_score}, rerank {r.rerank}, sources budget "
                            f"{cfg.rag.max_source_tokens or 'the context'} tokens"))
    lim = cfg.limits
    rows.append(("limits", f"body {lim.max_body_bytes:,} B, {lim.max_concurrent} concurrent, max_tokens "
                           f"{lim.max_tokens}, n {lim.max_n}, {lim.request_timeout_s:g} s"))
    return rows


def close(s) -> None:
    if s.runner is not None:
        s.runner.engine.close()

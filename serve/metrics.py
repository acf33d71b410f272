"""/metrics in the Prometheus text exposition format (version 0.0.4), written here.

Counters of requests by endpoint and status, a latency histogram by endpoint, token counters,
and gauges read at scrape time (requests in flight, engine rows and queue). The format is a few
lines of text; prometheus-client would add a dependency and a global registry for that.
Endpoints are a fixed set (unknown paths count as 'other'), so a scan of random URLs cannot
grow the label set.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from typing import Callable

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics")


def endpoint_label(path: str) -> str:
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models"
    return "other"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, list[int]] = defaultdict(lambda: [0] * (len(BUCKETS) + 1))
        self.latency_sum: dict[str, float] = defaultdict(float)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.retrievals = 0
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        ep = endpoint_label(path)
        with self._lock:
            self.requests[(ep, method, status)] += 1
            buckets = self.latency[ep]
            for i, b in enumerate(BUCKETS):
                if seconds <= b:
                    buckets[i] += 1
            buckets[-1] += 1
            self.latency_sum[ep] += seconds

    def tokens(self, prompt: int, completion: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP domainlm_requests_total HTTP requests by endpoint, method and status.",
                     "# TYPE domainlm_requests_total counter"]
            for (ep, method, status), n in sorted(self.requests.items()):
                lines.append(f'domainlm_requests_total{{endpoint="{ep}",method="{method}",status="{status}"}} {n}')
            lines += ["# HELP domainlm_request_seconds Time from request to the end of the response.",
                      "# TYPE domainlm_request_seconds histogram"]
            for ep, buckets in sorted(self.latency.items()):
                for b, n in zip(BUCKETS, buckets):
                    lines.append(f'domainlm_request_seconds_bucket{{endpoint="{ep}",le="{b}"}} {n}')
                lines.append(f'domainlm_request_seconds_bucket{{endpoint="{ep}",le="+Inf"}} {buckets[-1]}')
                lines.append(f'domainlm_request_seconds_sum{{endpoint="{ep}"}} {self.latency_sum[ep]:.6f}')
                lines.append(f'domainlm_request_seconds_count{{endpoint="{ep}"}} {buckets[-1]}')
            lines += ["# HELP domainlm_prompt_tokens_total Prompt tokens of completed generations.",
                      "# TYPE domainlm_prompt_tokens_total counter",
                      f"domainlm_prompt_tokens_total {self.prompt_tokens}",
                      "# HELP domainlm_completion_tokens_total Tokens generated.",
                      "# TYPE domainlm_completion_tokens_total counter",
                      f"domainlm_completion_tokens_total {self.completion_tokens}",
                      "# HELP domainlm_retrievals_total Retrievals run for requests.",
                      "# TYPE domainlm_retrievals_total counter",
                      f"domainlm_retrievals_total {self.retrievals}"]
        for name, (help_text, read) in sorted(self.gauges.items()):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {read():g}"]
        return "\n".join(lines) + "\n"

"""Metrics (/metrics, Prometheus text format) and one structured log line per request.

Every request gets an id (returned as `x-request-id`, and used as the completion id of chat calls); its log
line is JSON on the `glmstack.api.access` logger: method, path, matched route, status, duration, key id and
whatever the handler added to `request.state.log` (model, tokens, finish reason).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("glmstack.api.access")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def new_id() -> str:
    """A platform-style id: UTC timestamp then random hex, e.g. 20240815182248e12590715ca34df4."""
    return time.strftime("%Y%m%d%H%M%S", time.gmtime()) + secrets.token_hex(8)


class _EngineCollector:
    """Reads engine.stats() at scrape time: every numeric entry (waiting, running, KV blocks in use, ...)
    becomes a gauge, so a new engine statistic shows up without touching this file."""

    def __init__(self, stats: Callable[[], dict[str, Any]], in_flight: Callable[[], int]) -> None:
        self._stats, self._in_flight = stats, in_flight

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "glmstack_requests_in_flight", "Generations admitted by the HTTP limiter", value=self._in_flight()
        )
        for name, value in sorted(self._stats().items()):
            if isinstance(value, int | float) and not isinstance(value, bool):
                yield GaugeMetricFamily(f"glmstack_engine_{name}", f"engine.stats()['{name}']", value=value)


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict[str, Any]], in_flight: Callable[[], int]) -> None:
        # A registry per app, not the process-global one, so several apps (tests) never collide.
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "glmstack_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "glmstack_http_request_duration_seconds",
            "HTTP request duration",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "glmstack_tokens", "Tokens processed", ["model", "kind"], registry=self.registry
        )
        self.completions = Counter(
            "glmstack_completions", "Finished generations", ["finish_reason"], registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "glmstack_time_to_first_token_seconds",
            "Time to first token",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine_stats, in_flight))

    def record_generation(
        self,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        finish_reason: str,
        time_to_first_token: float | None,
    ) -> None:
        self.tokens.labels(model, "prompt").inc(prompt_tokens)
        self.tokens.labels(model, "completion").inc(completion_tokens)
        self.completions.labels(finish_reason).inc()
        if time_to_first_token is not None:
            self.time_to_first_token.observe(time_to_first_token)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestLog:
    """ASGI middleware: request id, access log line, request counters and latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_id()
        state = scope.setdefault("state", {})
        state["request_id"], state["log"] = request_id, {}
        started, status = time.perf_counter(), 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            matched = scope.get("route")
            route = getattr(matched, "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            caller = state.get("caller")
            access_log.info(
                json.dumps(
                    {
                        "request_id": request_id,
                        "method": scope["method"],
                        "path": scope["path"],
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 1),
                        "key_id": getattr(caller, "key_id", None),
                        **state["log"],
                    },
                    ensure_ascii=False,
                )
            )

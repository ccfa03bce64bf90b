"""Prometheus metrics through Ray's metrics export (Serve adds deployment/replica/application tags).

Request-level figures are taken in the ingress (what a client sees); engine gauges in each LLMServer replica.
Scrape them from each node's metrics export port (`ray start --metrics-export-port=...`).
"""
from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram
from starlette.requests import Request

from deployments.errors import route_label

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
TOKEN_BUCKETS = [1, 8, 32, 128, 512, 2048, 8192, 32768]


class RequestMetrics:
    """Per-request counters and latencies, recorded by the ingress."""

    def __init__(self) -> None:
        self.requests = Counter("adallm_requests", "HTTP requests by route and status code", ("route", "status"))
        self.errors = Counter("adallm_request_errors", "Requests answered with an error, by status code", ("route", "status"))
        self.ttft = Histogram("adallm_time_to_first_token_s", "Seconds to the first generated token", LATENCY_BUCKETS_S, ("route",))
        self.tpot = Histogram(
            "adallm_time_per_output_token_s", "Seconds per generated token after the first", LATENCY_BUCKETS_S, ("route",)
        )
        self.prompt_tokens = Counter("adallm_prompt_tokens", "Prompt tokens processed", ("route",))
        self.generation_tokens = Counter("adallm_generation_tokens", "Tokens generated", ("route",))
        self.prompt_len = Histogram("adallm_request_prompt_tokens", "Prompt tokens per request", TOKEN_BUCKETS, ("route",))

    def record_status(self, route: str, status: int) -> None:
        tags = {"route": route, "status": str(status)}
        self.requests.inc(1, tags)
        if status >= 400:
            self.errors.inc(1, dict(tags))

    def record_generation(
        self, route: str, ttft_s: float | None, total_s: float, prompt_tokens: int, completion_tokens: int,
        longest_choice_tokens: int,
    ) -> None:
        tags = {"route": route}
        if ttft_s is not None:
            self.ttft.observe(ttft_s, dict(tags))
            # a request's choices (n, several prompts) are generated side by side: the time per token is the
            # longest choice's, not the request's time over all its tokens (n times too small)
            if longest_choice_tokens > 1:
                self.tpot.observe((total_s - ttft_s) / (longest_choice_tokens - 1), dict(tags))
        if prompt_tokens:  # Ray counters refuse 0
            self.prompt_tokens.inc(prompt_tokens, dict(tags))
        if completion_tokens:
            self.generation_tokens.inc(completion_tokens, dict(tags))
        self.prompt_len.observe(prompt_tokens, dict(tags))


def install_status_counter(app, record, self_recorded: tuple[str, ...]) -> None:
    """record(route, status) for each success of a route not in self_recorded (which record their own, at the end
    of their streams); errors are recorded by the error handlers (deployments/errors.py)."""
    app.add_middleware(_StatusCounter, record=record, self_recorded=self_recorded)


class _StatusCounter:
    # plain ASGI, not @app.middleware: that one re-streams each body, and a stream must still see its client leave
    def __init__(self, app, record, self_recorded: tuple[str, ...]):
        self.app, self.record, self.self_recorded = app, record, self_recorded

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        statuses = []

        async def sending(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            await send(message)

        await self.app(scope, receive, sending)
        route = route_label(Request(scope))  # the router put the matched route in the scope
        if statuses and statuses[0] < 400 and route not in self.self_recorded:
            self.record(route, statuses[0])


class EngineMetrics:
    """Engine gauges, sampled once a second in each LLMServer replica from AsyncLLM.stats()."""

    def __init__(self) -> None:
        self.waiting = Gauge("adallm_num_requests_waiting", "Requests queued in the engine, not yet running")
        self.running = Gauge("adallm_num_requests_running", "Sequences the engine is running")
        self.kv_usage = Gauge("adallm_kv_cache_usage", "Fraction of KV-cache blocks in use (0..1)")

    def record_engine_stats(self, stats: dict) -> None:
        self.waiting.set(stats["num_waiting"], {})
        self.running.set(stats["num_running"], {})
        self.kv_usage.set(stats["kv_usage"], {})

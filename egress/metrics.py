"""Prometheus metrics, kept as plain counters on the hot path and turned into samples at scrape time.

Contract: `Metrics.observe(exchange)` runs once per request in the log phase: a few dict and list
increments, no locks, no label look-ups (prometheus-client's `labels().inc()` costs microseconds a
call). `MetricsCollector` hands everything to prometheus-client when `/metrics` is scraped, on the
admin listener, never the main one.

Cardinality is bounded: labels are provider names (from config), status classes, error codes and
token kinds, and models. Models are capped per provider (`MODEL_CAP`), and later ones fold into
`other`. Key ids and paths are never labels.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from egress.proxy import Exchange
    from egress.server import ServerState
    from egress.usage import Usage

MODEL_CAP = 50
# Seconds; from sub-millisecond errors to multi-minute generations.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_AUTH_CODES = frozenset(
    {"missing_key", "invalid_key", "key_expired", "key_revoked", "provider_not_permitted", "no_pool_key"}
)


class Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.total += value


class Metrics:
    __slots__ = (
        "auth_failures",
        "bytes_in",
        "bytes_out",
        "duration",
        "models",
        "rate_limited",
        "requests",
        "tokens",
        "ttfb",
    )

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.bytes_in: Counter[str] = Counter()
        self.bytes_out: Counter[str] = Counter()
        self.rate_limited: Counter[str] = Counter()
        self.auth_failures: Counter[str] = Counter()
        self.tokens: Counter[tuple[str, str, str]] = Counter()
        self.models: dict[str, set[str]] = {}
        self.duration: dict[str, Histogram] = {}
        self.ttfb: dict[str, Histogram] = {}

    def observe(self, exchange: Exchange, seconds: float) -> None:
        route = exchange.route
        provider = route.provider.name if route is not None else "none"
        self.requests[(provider, f"{exchange.status // 100}xx")] += 1
        self.bytes_in[provider] += exchange.body_size
        self.bytes_out[provider] += exchange.bytes_out
        histogram = self.duration.get(provider)
        if histogram is None:
            histogram = self.duration[provider] = Histogram()
        histogram.observe(seconds)
        if exchange.ttfb is not None:
            histogram = self.ttfb.get(provider)
            if histogram is None:
                histogram = self.ttfb[provider] = Histogram()
            histogram.observe(exchange.ttfb)
        error = exchange.error
        if error is not None:
            if error.code == "rate_limited":
                self.rate_limited[provider] += 1
            elif error.code in _AUTH_CODES:
                self.auth_failures[error.code] += 1

    def observe_usage(self, provider: str, usage: Usage) -> None:
        model = self._model_label(provider, usage.model)
        tokens = self.tokens
        for kind, count in (
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_read", usage.cache_read_tokens),
            ("cache_creation", usage.cache_creation_tokens),
            ("reasoning", usage.reasoning_tokens),
            ("estimated_output", usage.estimated_output_tokens),
        ):
            if count:
                tokens[(provider, model, kind)] += count

    def _model_label(self, provider: str, model: str | None) -> str:
        if model is None:
            return "unknown"
        seen = self.models.setdefault(provider, set())
        if model in seen:
            return model
        if len(seen) < MODEL_CAP:
            seen.add(model)
            return model
        return "other"


class MetricsCollector:
    """prometheus-client collector over one process's `ServerState`."""

    def __init__(self, state: ServerState) -> None:
        self._state = state

    def collect(self):
        state = self._state
        metrics: Metrics = state.metrics
        requests = CounterMetricFamily("egress_requests", "Requests answered", labels=["provider", "status_class"])
        for (provider, status_class), count in sorted(metrics.requests.items()):
            requests.add_metric([provider, status_class], count)
        yield requests
        for name, help_text, source in (
            ("egress_request_duration_seconds", "Time from first request byte to last response byte", metrics.duration),
            ("egress_upstream_ttfb_seconds", "Time to the provider's first response byte", metrics.ttfb),
        ):
            family = HistogramMetricFamily(name, help_text, labels=["provider"])
            for provider, histogram in sorted(source.items()):
                cumulative, buckets = 0, []
                for bound, count in zip((*BUCKETS, float("inf")), histogram.counts, strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                family.add_metric([provider], buckets, histogram.total)
            yield family
        for name, help_text, source in (
            ("egress_request_bytes", "Request body bytes received", metrics.bytes_in),
            ("egress_response_bytes", "Response body bytes relayed", metrics.bytes_out),
            ("egress_rate_limited", "Requests refused by the rate limiter", metrics.rate_limited),
        ):
            family = CounterMetricFamily(name, help_text, labels=["provider"])
            for provider, count in sorted(source.items()):
                family.add_metric([provider], count)
            yield family
        failures = CounterMetricFamily("egress_key_failures", "Refused credentials by reason", labels=["reason"])
        for reason, count in sorted(metrics.auth_failures.items()):
            failures.add_metric([reason], count)
        yield failures
        tokens = CounterMetricFamily("egress_tokens", "Tokens metered", labels=["provider", "model", "kind"])
        for (provider, model, kind), count in sorted(metrics.tokens.items()):
            tokens.add_metric([provider, model, kind], count)
        yield tokens
        facts = CounterMetricFamily("egress_usage_facts", "Usage facts by usage state", labels=["provider", "usage"])
        for (provider, usage), count in sorted(state.facts.counts.items()):
            facts.add_metric([provider, usage], count)
        yield facts
        dropped = CounterMetricFamily("egress_usage_facts_dropped", "Usage facts dropped", labels=["sink"])
        dropped.add_metric(["jsonl"], state.facts.dropped)
        if state.facts.publisher is not None:
            dropped.add_metric(["nats"], state.facts.publisher.dropped)
        yield dropped
        yield GaugeMetricFamily("egress_open_connections", "Open client connections", value=len(state.connections))
        idle = GaugeMetricFamily(
            "egress_upstream_idle_connections", "Pooled idle upstream connections", labels=["host"]
        )
        for host, count in sorted(state.pool.idle_counts().items()):
            idle.add_metric([host], count)
        yield idle
        denyset = state.auth.denyset
        yield GaugeMetricFamily("egress_deny_set_size", "Revoked key ids enforced", value=len(denyset))
        age = denyset.age_seconds()
        if age is not None:
            yield GaugeMetricFamily("egress_deny_set_age_seconds", "Staleness of the revocation stream", value=age)
        yield GaugeMetricFamily("egress_draining", "1 while shutting down", value=1 if state.draining else 0)

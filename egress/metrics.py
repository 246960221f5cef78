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
import operator
import time
from collections import Counter
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from egress.accounts import COOLING, STATE_NAMES

if TYPE_CHECKING:
    from egress.proxy import Exchange
    from egress.server import ServerState
    from egress.usage import Usage

MODEL_CAP = 50
# Seconds; from sub-millisecond errors to multi-minute generations.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# The `kind` label of egress_tokens, and the Usage field it counts.
_TOKEN_KINDS = (
    ("input", "input_tokens"),
    ("output", "output_tokens"),
    ("cache_read", "cache_read_tokens"),
    ("cache_creation", "cache_creation_tokens"),
    ("reasoning", "reasoning_tokens"),
    ("estimated_output", "estimated_output_tokens"),
)
_KIND_NAMES = tuple(kind for kind, _ in _TOKEN_KINDS)
_token_counts = operator.attrgetter(*(attribute for _, attribute in _TOKEN_KINDS))
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


class ProviderStats:
    """One provider's request counters: one dict look-up per request finds them all."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "duration",
        "overhead",
        "rate_limited",
        "status_classes",
        "stream_duration",
        "ttfb",
        "upstream_ttfb",
    )

    def __init__(self) -> None:
        self.status_classes = [0] * 10  # index: status // 100
        self.bytes_in = 0
        self.bytes_out = 0
        self.rate_limited = 0
        self.duration = Histogram()
        self.ttfb = Histogram()
        self.upstream_ttfb = Histogram()
        self.overhead = Histogram()
        self.stream_duration = Histogram()


class Metrics:
    __slots__ = (
        "attempts",
        "auth_failures",
        "busy",
        "fallbacks",
        "model_lists",
        "models",
        "providers",
        "retry_budget_exhausted",
        "tokens",
    )

    def __init__(self) -> None:
        self.providers: dict[str, ProviderStats] = {}
        self.auth_failures: Counter[str] = Counter()
        self.tokens: Counter[tuple[str, str, str]] = Counter()
        self.models: dict[str, set[str]] = {}
        self.model_lists: Counter[tuple[str, str]] = Counter()  # (provider, "ok" | "error") fetches
        # (provider, account id or "byo", outcome): success, retry_scheduled, retry_exhausted, not_retryable
        self.attempts: Counter[tuple[str, str, str]] = Counter()
        self.retry_budget_exhausted = 0
        self.fallbacks: Counter[tuple[str, str]] = Counter()  # (from provider, to provider)
        self.busy: Counter[str] = Counter()  # provider_busy answers, by provider

    def observe(self, exchange: Exchange, seconds: float) -> None:
        route = exchange.route
        provider = route.provider.name if route is not None else "none"
        stats = self.providers.get(provider)
        if stats is None:
            stats = self.providers[provider] = ProviderStats()
        stats.status_classes[exchange.status // 100] += 1
        stats.bytes_in += exchange.body_size
        stats.bytes_out += exchange.bytes_out
        stats.duration.observe(seconds)
        ttfb = exchange.ttfb
        if ttfb is not None:
            stats.ttfb.observe(ttfb)
            stats.upstream_ttfb.observe(exchange.upstream_ttfb)
            upstream = exchange.upstream_time
            if upstream is not None:  # the provider's answer came whole: what egress added to it
                overhead = seconds - upstream
                stats.overhead.observe(overhead if overhead > 0.0 else 0.0)
                if exchange.streamed:
                    stats.stream_duration.observe(seconds - ttfb)
        error = exchange.error
        if error is not None:
            if error.code == "rate_limited":
                stats.rate_limited += 1
            elif error.code in _AUTH_CODES:
                self.auth_failures[error.code] += 1

    def observe_usage(self, provider: str, usage: Usage) -> None:
        model = self._model_label(provider, usage.model)
        tokens = self.tokens
        # attrgetter reads the six fields in one C call: a getattr per kind cost ~40 opcodes more.
        for kind, count in zip(_KIND_NAMES, _token_counts(usage), strict=True):
            if count:
                tokens[(provider, model, kind)] += count

    def _model_label(self, provider: str, model: str | None) -> str:
        if model is None:
            return "unknown"
        seen = self.models.get(provider)
        if seen is None:
            seen = self.models[provider] = set()
        elif model in seen:
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
        providers = sorted(metrics.providers.items())
        requests = CounterMetricFamily("egress_requests", "Requests answered", labels=["provider", "status_class"])
        for provider, stats in providers:
            for status_class, count in enumerate(stats.status_classes):
                if count:
                    requests.add_metric([provider, f"{status_class}xx"], count)
        yield requests
        for name, help_text, which in (
            ("egress_request_duration_seconds", "Time from first request byte to last response byte", "duration"),
            ("egress_ttfb_seconds", "Time from first request byte to the response head sent to the caller", "ttfb"),
            (
                "egress_upstream_ttfb_seconds",
                "Time from the request sent upstream to the provider's head",
                "upstream_ttfb",
            ),
            (
                "egress_overhead_seconds",
                "Request time less the provider's part (request sent to response end): egress's own cost",
                "overhead",
            ),
            ("egress_stream_duration_seconds", "Time from the head of an SSE response to its end", "stream_duration"),
        ):
            family = HistogramMetricFamily(name, help_text, labels=["provider"])
            for provider, stats in providers:
                histogram = getattr(stats, which)
                if not any(histogram.counts):
                    continue
                cumulative, buckets = 0, []
                for bound, count in zip((*BUCKETS, float("inf")), histogram.counts, strict=True):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
                family.add_metric([provider], buckets, histogram.total)
            yield family
        for name, help_text, which in (
            ("egress_request_bytes", "Request body bytes received", "bytes_in"),
            ("egress_response_bytes", "Response body bytes relayed", "bytes_out"),
            ("egress_rate_limited", "Requests refused by the rate limiter", "rate_limited"),
        ):
            family = CounterMetricFamily(name, help_text, labels=["provider"])
            for provider, stats in providers:
                count = getattr(stats, which)
                if count or which != "rate_limited":
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
        lists = CounterMetricFamily(
            "egress_model_list_fetches", "Fetches of providers' model lists by outcome", labels=["provider", "outcome"]
        )
        for (provider, outcome), count in sorted(metrics.model_lists.items()):
            lists.add_metric([provider, outcome], count)
        yield lists
        yield from _account_families(state)
        yield GaugeMetricFamily("egress_open_connections", "Open client connections", value=len(state.connections))
        idle = GaugeMetricFamily(
            "egress_upstream_idle_connections", "Pooled idle upstream connections", labels=["host"]
        )
        for host, count in sorted(state.pool.idle_counts().items()):
            idle.add_metric([host], count)
        yield idle
        denyset = state.auth.denyset
        yield GaugeMetricFamily("egress_deny_set_size", "Revoked key ids enforced", value=len(denyset))
        yield CounterMetricFamily(
            "egress_deny_file_bad_lines",
            "Deny-file lines skipped (not UTF-8, not a kid), each read",
            value=denyset.file_bad_lines,
        )
        age = denyset.age_seconds()
        if age is not None:
            yield GaugeMetricFamily("egress_deny_set_age_seconds", "Staleness of the revocation stream", value=age)
        yield GaugeMetricFamily("egress_draining", "1 while shutting down", value=1 if state.draining else 0)


def _account_families(state: ServerState):
    """Per account (bounded: the configured pool keys), from the host's shared table."""
    metrics: Metrics = state.metrics
    attempts = CounterMetricFamily(
        "egress_upstream_attempts", "Upstream attempts by outcome", labels=["provider", "account", "outcome"]
    )
    for (provider, account, outcome), count in sorted(metrics.attempts.items()):
        attempts.add_metric([provider, account, outcome], count)
    yield attempts
    yield CounterMetricFamily(
        "egress_retry_budget_exhausted",
        "Retries refused by the host-wide retry budget",
        value=metrics.retry_budget_exhausted,
    )
    fallbacks = CounterMetricFamily(
        "egress_fallbacks", "Requests moved to a fallback of their model route", labels=["provider", "fallback"]
    )
    for (provider, fallback), count in sorted(metrics.fallbacks.items()):
        fallbacks.add_metric([provider, fallback], count)
    yield fallbacks
    busy = CounterMetricFamily(
        "egress_provider_busy", "Requests answered provider_busy after the queue timeout", labels=["provider"]
    )
    for provider, count in sorted(metrics.busy.items()):
        busy.add_metric([provider], count)
    yield busy
    waiting = GaugeMetricFamily("egress_requests_waiting", "Requests waiting for a concurrency slot (this worker)")
    waiting.add_metric([], len(state.waiting))
    yield waiting
    table = state.accounts
    in_flight = GaugeMetricFamily(
        "egress_provider_in_flight", "Requests in flight to a capped provider (this host)", labels=["provider"]
    )
    for provider, (gate, _) in sorted(state.auth.gates.items()):
        in_flight.add_metric([provider], table.in_flight(gate))
    yield in_flight
    now = time.monotonic()
    states = GaugeMetricFamily(
        "egress_account_state", "1 for the state each account is in", labels=["provider", "account", "state"]
    )
    cooling = GaugeMetricFamily(
        "egress_account_cooldown_seconds",
        "Seconds until a cooling account is used again",
        labels=["provider", "account"],
    )
    remaining = GaugeMetricFamily(
        "egress_account_remaining", "The provider's last remaining quota", labels=["provider", "account", "dimension"]
    )
    for provider, pool in sorted(state.auth.pools.items()):
        for account in pool.accounts:
            current = table.state_of(account, now)
            for index, name in enumerate(STATE_NAMES):
                states.add_metric([provider, account.id, name], 1 if index == current else 0)
            left = table.soonest([account], now) if current == COOLING else 0.0
            cooling.add_metric([provider, account.id], left or 0.0)
            for dimension, count in table.remaining(account, now).items():
                remaining.add_metric([provider, account.id, dimension], count)
    yield states
    yield cooling
    yield remaining

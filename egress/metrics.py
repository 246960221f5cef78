"""Prometheus metrics: stores into shared memory on the hot path, samples made at scrape time.

Contract: `Metrics.observe(exchange)` runs once per request in the log phase: one dict look-up and a
few memoryview increments into this worker's slab of the host's tally (tally.py), no locks, no
label look-ups (prometheus-client's `labels().inc()` costs microseconds a call). `MetricsCollector`
answers `/metrics` on the admin listener for the whole host: any worker sums every worker's slab, so
one target serves them all, and a restarted worker goes on from its predecessor's counts (a sum
never goes backwards). Gauges and process figures are per live worker, with a `worker` label.

Cardinality is bounded: labels are provider names (from config), surfaces, status classes, error
codes and token kinds, and models. Models are capped per provider on the host (`MODEL_CAP`, the
workers' labels counted together), and later ones fold into `other`, as do names longer than
`MODEL_LABEL_MAX`. Key ids and paths are never labels.
"""

from __future__ import annotations

import bisect
import itertools
import math
import operator
import os
import platform
import time
from typing import TYPE_CHECKING

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from egress import __version__
from egress.accounts import COOLING, STATE_NAMES
from egress.config import config_digest
from egress.tally import Tally, keys_of, read_slabs, slab_of, sum_counters

if TYPE_CHECKING:
    from egress.config import Config
    from egress.proxy import Exchange
    from egress.server import ServerState
    from egress.tally import Slab
    from egress.usage import Usage

MODEL_CAP = 50
# A model label's longest: the provider names the model in its response, and an OpenAI-compatible
# server may echo whatever the caller asked for (llama.cpp's does); a longer name is `other`. As
# long as the longest model usage.MODEL_FIELD finds in a request.
MODEL_LABEL_MAX = 200
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
    {
        "missing_key",
        "invalid_key",
        "key_expired",
        "key_not_yet_valid",
        "key_revoked",
        "byo_not_allowed",
        "byo_key_wrong_provider",
        "too_many_invalid_keys",
        "provider_not_permitted",
        "no_pool_key",
    }
)


# One provider's and surface's figures, at fixed offsets from its first value in the tally: one
# dict look-up per request finds them all.
_STATUS = 0  # 10 values, by status // 100
_BYTES_IN, _BYTES_OUT, _RATE_LIMITED, _SSE_EVENTS = 10, 11, 12, 13
_HISTOGRAM_WIDTH = len(BUCKETS) + 2  # a count per bucket, +Inf's, then the sum
_DURATION, _TTFB, _UPSTREAM_TTFB, _OVERHEAD, _STREAM = (14 + _HISTOGRAM_WIDTH * n for n in range(5))
_SUM = len(BUCKETS) + 1
_DURATION_SUM, _TTFB_SUM, _UPSTREAM_TTFB_SUM, _OVERHEAD_SUM, _STREAM_SUM = (
    at + _SUM for at in (_DURATION, _TTFB, _UPSTREAM_TTFB, _OVERHEAD, _STREAM)
)
_bucket = bisect.bisect_left
_WIDTH = 14 + 5 * _HISTOGRAM_WIDTH
_HISTOGRAMS = (
    ("egress_request_duration_seconds", "Time from first request byte to last response byte", _DURATION),
    ("egress_ttfb_seconds", "Time from first request byte to the response head sent to the caller", _TTFB),
    ("egress_upstream_ttfb_seconds", "Time from the request sent upstream to the provider's head", _UPSTREAM_TTFB),
    (
        "egress_overhead_seconds",
        "Request time less the provider's part (request sent to response end): egress's own cost",
        _OVERHEAD,
    ),
    ("egress_stream_duration_seconds", "Time from the head of an SSE response to its end", _STREAM),
)
_PROVIDER_COUNTERS = (
    ("egress_request_bytes", "Request body bytes received", _BYTES_IN),
    ("egress_response_bytes", "Response body bytes relayed", _BYTES_OUT),
    ("egress_sse_events", "SSE events relayed to the caller", _SSE_EVENTS),
    ("egress_rate_limited", "Requests refused by the rate limiter", _RATE_LIMITED),
)


class Metrics:
    """This process's counters, kept in its slab of the host's tally (tally.py)."""

    __slots__ = ("_host", "_models", "_providers", "_tokens", "tally", "values")

    def __init__(self, tally: Tally | None = None) -> None:
        self.tally = tally = tally if tally is not None else Tally()
        self.values = tally.values
        self._providers: dict[tuple[str, str], int] = {}  # (provider, surface) -> first value
        self._tokens: dict[tuple[str, str | None], int] = {}  # (provider, model) -> its six kinds' first
        self._models: dict[str, set[str]] = {}
        # The host's tally and its number of slabs (see_host): the model cap is the host's.
        self._host: tuple[memoryview, int] | None = None
        for key in tally:  # a restarted worker's model labels count towards the cap again
            if key[0] == "tokens" and key[2] != "other":
                self._models.setdefault(key[1], set()).add(key[2])

    def see_host(self, slabs: memoryview, workers: int) -> None:
        """Every worker's slab (the collector's, which sums them): the model labels the other workers
        made count towards this one's cap, so the host exposes MODEL_CAP per provider, not
        MODEL_CAP per worker (a scrape sums the slabs: each worker's own 50 added up to 50 x workers)."""
        if workers > 1:
            self._host = (slabs, workers)

    def observe(self, exchange: Exchange, seconds: float) -> None:
        route = exchange.route
        key = (route.provider.name, route.surface or "passthrough") if route is not None else _NO_ROUTE
        at = self._providers.get(key)
        if at is None:
            at = self._providers[key] = self.tally.index(("provider", *key), _WIDTH)
        values = self.values
        values[at + exchange.status // 100] += 1
        values[at + _BYTES_IN] += exchange.body_size
        values[at + _BYTES_OUT] += exchange.bytes_out
        # Each histogram written out: a bucket's count, then the sum (a call each cost ~10 opcodes).
        values[at + _DURATION + _bucket(BUCKETS, seconds)] += 1
        values[at + _DURATION_SUM] += seconds
        ttfb = exchange.ttfb
        if ttfb is not None:
            values[at + _TTFB + _bucket(BUCKETS, ttfb)] += 1
            values[at + _TTFB_SUM] += ttfb
        upstream_ttfb = exchange.upstream_ttfb
        if upstream_ttfb is not None and ttfb is not None:  # the provider's head, relayed
            values[at + _UPSTREAM_TTFB + _bucket(BUCKETS, upstream_ttfb)] += 1
            values[at + _UPSTREAM_TTFB_SUM] += upstream_ttfb
            streamed = exchange.streamed
            if streamed:
                values[at + _SSE_EVENTS] += exchange.events
            upstream = exchange.upstream_time
            if upstream is None and exchange.outcome == "complete" and exchange.error is None:
                # The caller had its whole answer and closed before the provider's end came (the
                # OpenAI SDK at [DONE], proxy.Exchange.client_left): the provider's part ran to now.
                upstream = exchange.started + seconds - exchange.sent_at + exchange.provider_elapsed
            if upstream is not None:  # the provider's answer came whole: what egress added to it
                overhead = seconds - upstream
                waited = exchange.turn_at - exchange.started
                if waited > 0.0:  # the caller's own upload, and its pipeline's wait: before its turn
                    overhead -= waited
                if overhead < 0.0:
                    overhead = 0.0
                values[at + _OVERHEAD + _bucket(BUCKETS, overhead)] += 1
                values[at + _OVERHEAD_SUM] += overhead
                if streamed:
                    streaming = seconds - ttfb
                    values[at + _STREAM + _bucket(BUCKETS, streaming)] += 1
                    values[at + _STREAM_SUM] += streaming
        error = exchange.error
        outcome = exchange.outcome
        if error is not None and outcome != "upstream_cut":  # a cut is no answer egress made
            code = error.code
            if code == "rate_limited":
                values[at + _RATE_LIMITED] += 1
            elif code in _AUTH_CODES:
                self.tally.add(("key_failures", code))
            # Every answer egress made itself, by its stable code: a 502 of egress's own
            # (upstream_connect_error) is told apart from a provider's.
            self.tally.add(("errors", key[0], code))
        elif outcome != "complete":  # client_gone, upstream_cut: a response not whole
            self.tally.add(("outcomes", key[0], outcome))

    def observe_usage(self, provider: str, usage: Usage) -> None:
        at = self._tokens.get((provider, usage.model))
        if at is None:
            at = self._token_values(provider, usage.model)
        values = self.values
        # attrgetter reads the six fields in one C call, and the kinds are written out: a loop over
        # them cost ~50 opcodes more, most kinds being 0.
        input_, output, cache_read, cache_creation, reasoning, estimated = _token_counts(usage)
        if input_:
            values[at] += input_
        if output:
            values[at + 1] += output
        if cache_read:
            values[at + 2] += cache_read
        if cache_creation:
            values[at + 3] += cache_creation
        if reasoning:
            values[at + 4] += reasoning
        if estimated:
            values[at + 5] += estimated

    def _token_values(self, provider: str, model: str | None) -> int:
        """The first of a provider and model's six token kinds, the model capped per provider."""
        label = "unknown" if model is None else model
        seen = self._models.setdefault(provider, set())
        if label not in seen:
            if len(seen) < MODEL_CAP and len(label) <= MODEL_LABEL_MAX and self._host is not None:
                # A label new to this worker, under the cap: the other workers' labels first (read
                # at most MODEL_CAP times a provider; two workers adding at once may pass it by one).
                seen |= self._host_models(provider)
            if label not in seen:
                if len(seen) >= MODEL_CAP or len(label) > MODEL_LABEL_MAX:
                    # Not cached: a provider answering with ever new model names must not grow it.
                    return self.tally.index(("tokens", provider, "other"), len(_KIND_NAMES))
                seen.add(label)
        at = self._tokens[(provider, model)] = self.tally.index(("tokens", provider, label), len(_KIND_NAMES))
        return at

    def _host_models(self, provider: str) -> set[str]:
        slabs, workers = self._host
        return {
            key[2]
            for index in range(workers)
            for key in keys_of(slab_of(slabs, workers, index))
            if key[0] == "tokens" and key[1] == provider and key[2] != "other"
        }


_NO_ROUTE = ("none", "none")


_LINE_BREAKS = (b"\n", b"\r")


def sse_events(end: bytes, data: bytes) -> tuple[int, bytes]:
    """SSE events ended in `data` (blank lines, LF or CRLF), given `end`, the stream's last bytes
    before it, as this returned them last: (events, the new `end`). The same count however the
    stream is cut into reads (a run of three or more line ends may count as fewer events, and a
    stream mixing LF and CRLF line ends as fewer too).
    """
    # A stream ends its lines with LF or with CRLF: one of the two counts is 0, the other scan is
    # made only when the first finds nothing.
    events = data.count(b"\n\n") or data.count(b"\n\r\n")
    if end and data[:1] in _LINE_BREAKS:  # only then can a blank line straddle the cut
        head = data[:2]
        joined = end + head
        # Only the blank lines that straddle the cut: those inside `end` or `head` are counted.
        events += joined.count(b"\n\n") + joined.count(b"\n\r\n") - end.count(b"\n\n") - head.count(b"\n\n")
    tail = data[-2:] if len(data) >= 2 else (end + data)[-2:]
    return events, tail if b"\n" in tail else b""


def publish_gauges(state: ServerState) -> None:
    """This worker's gauges into its slab, for whichever worker is scraped: every second, and at a scrape."""
    tally = state.metrics.tally
    tally.set_gauge(("open_connections",), len(state.connections))
    tally.set_gauge(("requests_waiting",), len(state.waiting))
    tally.set_gauge(("draining",), 1 if state.draining else 0)
    denyset = state.auth.denyset
    tally.set_gauge(("deny_set_size",), len(denyset))
    age = denyset.age_seconds()
    if age is None:
        # Never in step with a revocation stream: with none configured there is no staleness to
        # report (NaN, not exposed); with one configured but never reached (no snapshot, broker
        # down since start) the set is as stale as can be, and an alert on the age must fire, not
        # find no series.
        age = math.inf if state.config.nats.url is not None else math.nan
    tally.set_gauge(("deny_set_age",), age)
    idle = state.pool.idle_counts()
    for key in [key for key in tally if key[0] == "upstream_idle" and key[1] not in idle]:
        tally.set_gauge(key, 0)  # a host with no idle connection left
    for host, count in idle.items():
        tally.set_gauge(("upstream_idle", host), count)


def alive(pid: int) -> bool:
    """Whether the worker that wrote a slab as `pid` still runs; 0 (a slab whose worker left or
    never started) never does. A worker is this process, or a sibling: a child of this process's
    supervisor. A pid the kernel has since given to another process is not one (its parent differs)."""
    if not pid:
        return False
    if pid == os.getpid():
        return True
    if not _PROC:  # no /proc to read: whether the pid is taken is all that can be known
        return _exists(pid)
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:  # gone (ENOENT, or ESRCH while it exits)
        return False
    # Fields after the command name, which is in parentheses and may hold anything: state, ppid.
    # A worker that died and is not reaped yet (a zombie, Z) is not running either.
    state, ppid = stat.rpartition(b")")[2].split()[:2]
    return state != b"Z" and int(ppid) == os.getppid()


_PROC = os.path.exists("/proc/self/stat")


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MetricsCollector:
    """prometheus-client collector for the whole host: every worker's slab summed (tally.py), each
    live worker's gauges labelled with it, and the accounts' shared table."""

    def __init__(self, state: ServerState, slabs: memoryview, workers: int) -> None:
        self._state = state
        self._slabs = slabs
        self._workers = workers
        # The supervisor: this worker's parent when its admin listener starts (workers.supervise
        # checks it before serving). PID 1 in a container, where egress is the entrypoint.
        self._supervisor = os.getppid() if workers > 1 else 0
        state.metrics.see_host(slabs, workers)

    def collect(self):
        state = self._state
        publish_gauges(state)
        slabs = read_slabs(self._slabs, self._workers)
        by_family: dict[str, list[tuple[tuple, list[float]]]] = {}
        for key, values in sorted(sum_counters(slabs).items()):
            by_family.setdefault(key[0], []).append((key[1:], values))
        yield from _provider_families(by_family.get("provider", ()))
        tokens = CounterMetricFamily("egress_tokens", "Tokens metered", labels=["provider", "model", "kind"])
        for (provider, model), values in by_family.get("tokens", ()):
            for kind, count in zip(_KIND_NAMES, values, strict=True):
                if count:
                    tokens.add_metric([provider, model, kind], count)
        yield tokens
        for family_name, name, help_text, labels in _COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=list(labels))
            for label_values, values in by_family.get(family_name, ()):
                family.add_metric(list(label_values), values[0])
            yield family
        yield CounterMetricFamily(
            "egress_metrics_overflow",
            "Metric series not kept because a worker's slab was full",
            value=sum(slab.overflow for slab in slabs),
        )
        yield from _account_families(state)
        yield from _worker_families(slabs, self._supervisor)
        build = GaugeMetricFamily("egress_build_info", "egress's version, always 1", labels=["version", "python"])
        build.add_metric([__version__, platform.python_version()], 1)
        yield build


# (tally key, metric name, help, label names): the counters kept as one value per key.
_COUNTERS = (
    ("key_failures", "egress_key_failures", "Refused credentials by reason", ("reason",)),
    ("usage_facts", "egress_usage_facts", "Usage facts by usage state", ("provider", "usage")),
    ("usage_facts_dropped", "egress_usage_facts_dropped", "Usage facts dropped", ("sink",)),
    (
        "model_lists",
        "egress_model_list_fetches",
        "Fetches of providers' model lists by outcome",
        ("provider", "outcome"),
    ),
    ("attempts", "egress_upstream_attempts", "Upstream attempts by outcome", ("provider", "account", "outcome")),
    ("retry_budget_exhausted", "egress_retry_budget_exhausted", "Retries refused by the host-wide retry budget", ()),
    ("errors", "egress_errors", "Errors egress answered itself, by code", ("provider", "code")),
    (
        "outcomes",
        "egress_responses_incomplete",
        "Responses not relayed whole: the client left (client_gone) or the upstream cut it (upstream_cut)",
        ("provider", "outcome"),
    ),
    (
        "upstream_connections",
        "egress_upstream_connections",
        "New upstream connections by outcome (ok, timeout, dns_error, tls_error, error): pool churn and dial failures",
        ("host", "outcome"),
    ),
    (
        "fallbacks",
        "egress_fallbacks",
        "Requests moved to a fallback of their model route",
        ("provider", "fallback"),
    ),
    ("busy", "egress_provider_busy", "Requests answered provider_busy after the queue timeout", ("provider",)),
    (
        "deny_file_bad_lines",
        "egress_deny_file_bad_lines",
        "Deny-file lines skipped (not UTF-8, not a kid), each read",
        (),
    ),
    (
        "revocation_messages_ignored",
        "egress_revocation_messages_ignored",
        "Revocation stream messages that were no key id, skipped (counted by each worker)",
        (),
    ),
    (
        "revocations_lost",
        "egress_revocations_lost",
        "Revocations purged from the stream (limits, a purge) before a worker read them: a revoked key may pass",
        (),
    ),
    (
        "snapshot_write_failures",
        "egress_snapshot_write_failures",
        "Deny-set snapshot writes that failed (a restart then replays the stream from further back)",
        (),
    ),
)


def _provider_families(rows):
    """Requests, latency histograms and byte and event counts, by provider and surface."""
    labels = ["provider", "surface"]
    requests = CounterMetricFamily(
        "egress_requests", "Requests answered", labels=["provider", "surface", "status_class"]
    )
    for label_values, values in rows:
        for status_class in range(10):
            if values[_STATUS + status_class]:
                requests.add_metric([*label_values, f"{status_class}xx"], values[_STATUS + status_class])
    yield requests
    bounds = [repr(bound) for bound in BUCKETS] + ["+Inf"]
    for name, help_text, at in _HISTOGRAMS:
        family = HistogramMetricFamily(name, help_text, labels=labels)
        for label_values, values in rows:
            counts = values[at : at + _SUM]
            if not any(counts):
                continue
            cumulative = list(itertools.accumulate(counts))
            family.add_metric(list(label_values), list(zip(bounds, cumulative, strict=True)), values[at + _SUM])
        yield family
    for name, help_text, at in _PROVIDER_COUNTERS:
        family = CounterMetricFamily(name, help_text, labels=labels)
        for label_values, values in rows:
            if values[at] or at != _RATE_LIMITED:
                family.add_metric(list(label_values), values[at])
        yield family


# (tally key, metric name, help): each live worker's own figures, labelled with the worker.
_GAUGES = (
    ("open_connections", "egress_open_connections", "Open client connections"),
    ("requests_waiting", "egress_requests_waiting", "Requests waiting for a concurrency slot"),
    ("deny_set_size", "egress_deny_set_size", "Revoked key ids enforced"),
    ("deny_set_age", "egress_deny_set_age_seconds", "Staleness of the revocation stream"),
    ("draining", "egress_draining", "1 while shutting down"),
    # Prometheus's own names for the same question: did the last reload (SIGHUP) take?
    (
        "config_reload_ok",
        "egress_config_last_reload_successful",
        "1 if the last configuration load (start or SIGHUP) succeeded, 0 if it was refused",
    ),
    (
        "config_reload_time",
        "egress_config_last_reload_success_timestamp_seconds",
        "When the running configuration was loaded (Unix time)",
    ),
)


def config_loaded(tally: Tally, ok: bool, config: Config | None = None) -> None:
    """A configuration load (start, or a SIGHUP reload) ended: whether it took, when it did, and the
    fingerprint of the config that runs (`config`, given when it took)."""
    tally.set_gauge(("config_reload_ok",), 1.0 if ok else 0.0)
    if ok:
        tally.set_gauge(("config_reload_time",), time.time())
    if config is not None:
        tally.set_gauge(("config_digest",), float(int(config_digest(config), 16)))


def worker_digest(slab: Slab) -> str | None:
    """The fingerprint of the config a worker runs (config_loaded), as config_digest spells it."""
    value = slab.gauges.get(("config_digest",))
    return None if value is None or math.isnan(value) else f"{int(value):012x}"


def _worker_families(slabs, supervisor: int):
    """Per worker: up, its gauges (from its slab, while it lives), and its process's figures."""
    up = GaugeMetricFamily("egress_worker_up", "1 for each worker process running", labels=["worker"])
    live = []
    for index, slab in enumerate(slabs):
        running = alive(slab.pid)
        up.add_metric([str(index)], 1 if running else 0)
        if running:
            live.append((str(index), slab))
    yield up
    for key, name, help_text in _GAUGES:
        family = GaugeMetricFamily(name, help_text, labels=["worker"])
        for worker, slab in live:
            value = slab.gauges.get((key,))
            if value is not None and not math.isnan(value):
                family.add_metric([worker], value)
        yield family
    # Prometheus's idiom for a value that is a label: alert when a host's workers disagree,
    # count(count by (digest) (egress_config_info)) > 1.
    info = GaugeMetricFamily(
        "egress_config_info", "The running config's fingerprint, as /status shows it", labels=["worker", "digest"]
    )
    for worker, slab in live:
        digest = worker_digest(slab)
        if digest is not None:
            info.add_metric([worker, digest], 1)
    yield info
    idle = GaugeMetricFamily(
        "egress_upstream_idle_connections", "Pooled idle upstream connections", labels=["worker", "host"]
    )
    for worker, slab in live:
        for key, count in sorted(slab.gauges.items()):
            if key[0] == "upstream_idle":
                idle.add_metric([worker, key[1]], count)
    yield idle
    processes = [(worker, slab.pid) for worker, slab in live]
    # Only while it is still this worker's parent: a worker outliving it (draining after its
    # death) must not report init, or a subreaper, as the supervisor.
    if supervisor and os.getppid() == supervisor:
        processes.append(("supervisor", supervisor))
    yield from _process_families(processes)


def _process_families(processes):
    """prometheus-client's process figures (memory, CPU, descriptors, start time) of each process,
    read from /proc, with a `worker` label."""
    merged: dict[str, Metric] = {}
    for worker, pid in processes:
        collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)
        for family in collector.collect():
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                target.add_sample(sample.name, {**sample.labels, "worker": worker}, sample.value)
    yield from merged.values()


def _account_families(state: ServerState):
    """Per account (bounded: the configured pool keys), from the host's shared table."""
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

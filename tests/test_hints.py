"""Rate-limit hints: recorded provider heads, every value form, precedence, malformed values, cooldown rules."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress.hints import (
    DIMENSIONS,
    MAX_WAIT,
    NO_HINTS,
    RateHints,
    cooldown,
    exhausted_until,
    parse_duration,
    parse_retry_after,
    parse_rfc3339,
    read_hints,
    should_retry,
)

RECORDINGS = Path(__file__).parent / "recordings"


def epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


NOW = epoch("2024-01-01T00:00:00+00:00")  # a Monday


def head(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in pairs]


def recorded(name: str) -> list[tuple[bytes, bytes]]:
    """The response head kept in tests/recordings/<name>/meta.json (sources in tests/recordings/SOURCES.md)."""
    meta = orjson.loads((RECORDINGS / name / "meta.json").read_bytes())
    return [(key.encode(), value.encode()) for key, value in meta["response"]["headers"]]


# -- whole response heads, as providers sent them ---------------------------------------------------

# (case, headers, now, limit, remaining, reset, retry_after)
HEADS = [
    (
        # crewAIInc/crewAI@88ed915 tests/cassettes/test_guardrail_reached_attempt_limit.yaml, interactions[3]:
        # POST https://api.openai.com/v1/chat/completions
        "openai chat (recorded)",
        recorded("openai__chat_json_gzip_cached"),
        NOW,
        {"requests": 30000, "tokens": 150000000},
        {"requests": 29999, "tokens": 149997855},
        {"requests": 0.002, "tokens": 0.0},
        None,
    ),
    (
        # crewAIInc/crewAI@88ed915 tests/cassettes/test_get_knowledge_search_query.yaml, interactions[0]:
        # POST https://api.openai.com/v1/embeddings
        "openai embeddings (recorded)",
        recorded("openai__embeddings_gzip"),
        NOW,
        {"requests": 10000, "tokens": 10000000},
        {"requests": 9999, "tokens": 9999996},
        {"requests": 0.006, "tokens": 0.0},
        None,
    ),
    (
        # traceloop/openllmetry@93429cf packages/opentelemetry-instrumentation-groq/tests/traces/cassettes/
        # test_chat_tracing/test_chat_legacy.yaml, interactions[0]: POST https://api.groq.com/openai/v1/chat/completions
        "groq chat (recorded)",
        recorded("groq__json_gzip"),
        NOW,
        {"requests": 14400, "tokens": 30000},
        {"requests": 14398, "tokens": 29987},
        {"requests": 10.332999999, "tokens": 0.026},
        None,
    ),
    (
        # traceloop/openllmetry@93429cf packages/opentelemetry-instrumentation-anthropic/tests/cassettes/
        # test_prompt_caching/test_anthropic_prompt_caching_legacy.yaml, interactions[1]:
        # POST https://api.anthropic.com/v1/messages. `now` is set 2 s before the earliest reset.
        "anthropic messages (recorded)",
        recorded("anthropic__json_gzip_cache_read"),
        epoch("2025-03-15T09:39:58+00:00"),
        {"requests": 4000, "tokens": 480000, "input_tokens": 400000, "output_tokens": 80000},
        {"requests": 3999, "tokens": 480000, "input_tokens": 400000, "output_tokens": 80000},
        {"requests": 2.0, "tokens": 3.0, "input_tokens": 3.0, "output_tokens": 6.0},
        None,
    ),
    (
        # the same cassette, interactions[0], read after two of its resets have passed (→ 0, never negative)
        "anthropic messages, resets partly past (recorded)",
        recorded("anthropic__json_gzip_cache_creation"),
        epoch("2025-03-15T09:39:58.5+00:00"),
        {"requests": 4000, "tokens": 480000, "input_tokens": 400000, "output_tokens": 80000},
        {"requests": 3999, "tokens": 480000, "input_tokens": 400000, "output_tokens": 80000},
        {"requests": 0.0, "tokens": 0.0, "input_tokens": 0.0, "output_tokens": 1.5},
        None,
    ),
    (
        # The sample values of https://platform.openai.com/docs/guides/rate-limits#rate-limits-in-headers
        "openai docs sample",
        head(
            ("x-ratelimit-limit-requests", "60"),
            ("x-ratelimit-limit-tokens", "150000"),
            ("x-ratelimit-remaining-requests", "59"),
            ("x-ratelimit-remaining-tokens", "149984"),
            ("x-ratelimit-reset-requests", "1s"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ),
        NOW,
        {"requests": 60, "tokens": 150000},
        {"requests": 59, "tokens": 149984},
        {"requests": 1.0, "tokens": 360.0},
        None,
    ),
    (
        # Azure OpenAI's Responses API as reported at
        # https://learn.microsoft.com/en-us/answers/questions/5625878/azure-openai-responses-api-x-ratelimit-headers-val:
        # -1 is no count (ignored); a bare 0 is a plain number of seconds.
        "azure responses api (reported)",
        head(
            ("x-ratelimit-limit-tokens", "-1"),
            ("x-ratelimit-remaining-tokens", "-1"),
            ("x-ratelimit-reset-tokens", "0"),
        ),
        NOW,
        {},
        {},
        {"tokens": 0.0},
        None,
    ),
    (
        # Groq on a 429: the six headers of https://console.groq.com/docs/rate-limits, its example resets
        # (2m59.56s, 7.66s) and retry-after in seconds; remaining values made 0 for the 429.
        "groq 429 (docs-shaped)",
        head(
            ("retry-after", "2"),
            ("x-ratelimit-limit-requests", "14400"),
            ("x-ratelimit-limit-tokens", "18000"),
            ("x-ratelimit-remaining-requests", "14370"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-requests", "2m59.56s"),
            ("x-ratelimit-reset-tokens", "7.66s"),
        ),
        NOW,
        {"requests": 14400, "tokens": 18000},
        {"requests": 14370, "tokens": 0},
        {"requests": 179.56, "tokens": 7.66},
        2.0,
    ),
    (
        # Mistral's own families (traceloop/openllmetry@93429cf packages/opentelemetry-instrumentation-mistralai/
        # tests/cassettes/test_chat/test_mistralai_chat_legacy.yaml): not OpenAI's names, so nothing is read.
        "mistral (recorded, other names)",
        recorded("mistral__json_gzip"),
        NOW,
        {},
        {},
        {},
        None,
    ),
    (
        # Together's bare x-ratelimit-{limit,remaining,reset} (traceloop/openllmetry@93429cf
        # packages/opentelemetry-instrumentation-together/tests/cassettes/test_chat/test_together_chat_legacy.yaml)
        "together (recorded, other names)",
        recorded("together__json_chat"),
        NOW,
        {},
        {},
        {},
        None,
    ),
]


def padded(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name, b" \t" + value + b" ") for name, value in headers]


def title_case(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(name.title(), value) for name, value in headers]


@pytest.mark.parametrize("shape", [None, padded, title_case], ids=["as sent", "padded", "Title-Case names"])
@pytest.mark.parametrize(("case", "headers", "now", "limit", "remaining", "reset", "retry_after"), HEADS)
def test_recorded_heads(case, headers, now, limit, remaining, reset, retry_after, shape):
    hints = read_hints(shape(headers) if shape else headers, now)
    assert hints.limit == limit
    assert hints.remaining == remaining
    assert hints.reset == pytest.approx(reset)
    assert hints.retry_after == retry_after


def test_the_recordings_are_the_ones_described():
    # The table above reads tests/recordings: a recording that lost its rate-limit headers would make the
    # recorded rows vacuous, so check they are there.
    for name in ("openai__chat_json_gzip_cached", "groq__json_gzip", "anthropic__json_gzip_cache_read"):
        names = {key for key, _ in recorded(name)}
        assert len({key for key in names if b"ratelimit" in key}) >= 6, name


def test_a_typical_openai_head_of_twenty_headers():
    headers = head(
        ("date", "Mon, 26 May 2025 05:00:04 GMT"),
        ("content-type", "application/json"),
        ("transfer-encoding", "chunked"),
        ("connection", "keep-alive"),
        ("access-control-expose-headers", "X-Request-ID"),
        ("openai-organization", "user-abc123"),
        ("openai-processing-ms", "35291"),
        ("openai-project", "proj_abc123"),
        ("openai-version", "2020-10-01"),
        ("x-envoy-upstream-service-time", "35296"),
        ("x-ratelimit-limit-requests", "30000"),
        ("x-ratelimit-limit-tokens", "150000000"),
        ("x-ratelimit-remaining-requests", "29999"),
        ("x-ratelimit-remaining-tokens", "149997855"),
        ("x-ratelimit-reset-requests", "2ms"),
        ("x-ratelimit-reset-tokens", "0s"),
        ("x-request-id", "req_4676152d4227ac1825d1240ddef231d6"),
        ("strict-transport-security", "max-age=31536000; includeSubDomains; preload"),
        ("cf-cache-status", "DYNAMIC"),
        ("cf-ray", "94d9b7d24d991d2c-GRU"),
    )
    assert read_hints(headers, NOW) == RateHints(
        None,
        {"requests": 29999, "tokens": 149997855},
        {"requests": 30000, "tokens": 150000000},
        {"requests": 0.002, "tokens": 0.0},
    )


def test_no_headers_no_hints():
    assert read_hints([], NOW) == RateHints()
    assert read_hints(iter(head(("content-type", "application/json"))), NOW) == RateHints()


def test_a_repeated_header_keeps_its_last_valid_value():
    hints = read_hints(
        head(
            ("x-ratelimit-remaining-tokens", "10"),
            ("x-ratelimit-remaining-tokens", "7"),
            ("x-ratelimit-remaining-tokens", "garbage"),
            ("retry-after", "5"),
            ("retry-after", "-1"),
        ),
        NOW,
    )
    assert hints.remaining == {"tokens": 7}
    assert hints.retry_after == 5.0


def test_every_anthropic_dimension_is_read():
    pairs = []
    for n, dim in enumerate(DIMENSIONS, start=1):
        wire = dim.replace("_", "-")
        pairs += [
            (f"anthropic-ratelimit-{wire}-limit", str(100 * n)),
            (f"anthropic-ratelimit-{wire}-remaining", str(n)),
            (f"anthropic-ratelimit-{wire}-reset", f"2024-01-01T00:00:{n:02d}Z"),
        ]
    hints = read_hints(head(*pairs), NOW)
    assert hints.limit == {dim: 100 * n for n, dim in enumerate(DIMENSIONS, start=1)}
    assert hints.remaining == {dim: n for n, dim in enumerate(DIMENSIONS, start=1)}
    assert hints.reset == {dim: float(n) for n, dim in enumerate(DIMENSIONS, start=1)}


# -- Go durations: x-ratelimit-reset-* ---------------------------------------------------------------

DURATIONS = [
    ("1s", 1.0),  # OpenAI docs sample
    ("6m0s", 360.0),  # OpenAI docs sample
    ("2m59.56s", 179.56),  # Groq docs example
    ("7.66s", 7.66),  # Groq docs example
    ("200ms", 0.2),
    ("1h2m3s", 3723.0),
    ("0s", 0.0),  # recorded (crewAI)
    ("1m", 60.0),
    ("30ms", 0.03),
    ("2ms", 0.002),  # recorded (crewAI)
    ("26ms", 0.026),  # recorded (openllmetry, Groq)
    ("10.332999999s", 10.332999999),  # recorded (openllmetry, Groq)
    ("1h0m0s", 3600.0),
    ("1.5h", 5400.0),
    ("500us", 0.0005),
    ("1500ns", 0.0000015),
    (".5s", 0.5),  # Go's ParseDuration takes these two as well
    ("5.s", 5.0),
    ("12", 12.0),  # a plain number is seconds
    ("12.5", 12.5),
    ("0", 0.0),
    (" 7.66s\t", 7.66),
    ("8760h", MAX_WAIT),  # a year exactly: still a wait
]

BAD_DURATIONS = [
    "",
    " ",
    "-1s",
    "+1s",
    "-0",
    "1x",
    "s",
    "ms",
    "h1",
    "1 s",
    "1h 2m",
    "1.2.3s",
    "1e3",
    "1e3s",
    "0x10s",
    "1_000s",
    "nan",
    "NaN",
    "inf",
    "infs",
    "8760h1s",  # over a year
    "31536001",
    "9" * 63 + "s",
    "1" * 65,
    "\uff11s",  # FULLWIDTH DIGIT ONE
    "1µs",  # Go's micro sign: not ASCII, so not a header value egress reads
    "1h-2m",
    "P1D",
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_durations(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=0.0)
    assert read_hints(head(("x-ratelimit-reset-tokens", text)), NOW).reset == pytest.approx({"tokens": seconds})


@pytest.mark.parametrize("text", BAD_DURATIONS)
def test_malformed_durations(text):
    assert parse_duration(text) is None


# -- retry-after and its millisecond cousins ----------------------------------------------------------

RETRY_AFTER = [
    (b"30", 30.0),
    (b"0", 0.0),
    (b"1.5", 1.5),  # not RFC 9110, but the SDKs take float(value)
    (b" 7 ", 7.0),
    (b"31536000", MAX_WAIT),
    # RFC 9110 §5.6.7: IMF-fixdate, and the obsolete RFC 850 and asctime forms, all relative to `now`
    (b"Mon, 01 Jan 2024 00:00:30 GMT", 30.0),
    (b"Monday, 01-Jan-24 00:01:00 GMT", 60.0),
    (b"Mon Jan  1 00:02:00 2024", 120.0),
    (b"Sun, 31 Dec 2023 23:59:00 GMT", 0.0),  # in the past: the wait is over
    (b"Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # RFC 9110's own example, long past
]

BAD_RETRY_AFTER = [
    b"",
    b"-1",
    b"+5",
    b"abc",
    b"1e3",
    b"nan",
    b"inf",
    b"30s",
    b"30 seconds",
    b"31536001",  # more than a year
    b"Wed, 01 Jan 2025 00:00:30 GMT",  # 2024 is a leap year: 366 days and 30 s away
    b"Mon, 32 Jan 2024 00:00:00 GMT",
    b"Mon, 01 Jan 2024 25:00:00 GMT",
    "\uff13\uff10".encode(),  # FULLWIDTH 30
    b"\xff\xfe",
    b"0" * 65,  # longer than any real value: refused unread
]


@pytest.mark.parametrize(("value", "seconds"), RETRY_AFTER)
def test_retry_after(value, seconds):
    assert parse_retry_after(value, NOW) == seconds
    assert read_hints([(b"retry-after", value)], NOW).retry_after == seconds


@pytest.mark.parametrize("value", BAD_RETRY_AFTER)
def test_malformed_retry_after(value):
    assert parse_retry_after(value, NOW) is None
    assert read_hints([(b"retry-after", value)], NOW).retry_after is None


@pytest.mark.parametrize("name", ["retry-after-ms", "x-ms-retry-after-ms"])
@pytest.mark.parametrize(
    ("value", "seconds"), [("1500", 1.5), ("250.5", 0.2505), ("0", 0.0), (" 100 ", 0.1), ("31536000000", MAX_WAIT)]
)
def test_millisecond_headers(name, value, seconds):
    assert read_hints(head((name, value)), NOW).retry_after == pytest.approx(seconds)


@pytest.mark.parametrize("name", ["retry-after-ms", "x-ms-retry-after-ms"])
@pytest.mark.parametrize("value", ["", "-1", "1e3", "nan", "inf", "soon", "31536000001", "\uff11"])
def test_malformed_millisecond_headers(name, value):
    assert read_hints(head((name, value)), NOW).retry_after is None


PRECEDENCE = [
    # retry-after-ms > x-ms-retry-after-ms > retry-after (egress/hints.py says why)
    ([("retry-after-ms", "1500"), ("x-ms-retry-after-ms", "2000"), ("retry-after", "3")], 1.5),
    ([("retry-after", "3"), ("x-ms-retry-after-ms", "2000"), ("retry-after-ms", "1500")], 1.5),  # order-free
    ([("x-ms-retry-after-ms", "2000"), ("retry-after", "3")], 2.0),
    ([("retry-after", "3")], 3.0),
    ([("retry-after-ms", "0"), ("retry-after", "30")], 0.0),  # a valid 0 is an answer
    ([("retry-after-ms", "soon"), ("x-ms-retry-after-ms", "2000"), ("retry-after", "3")], 2.0),  # invalid = absent
    ([("retry-after-ms", "-5"), ("x-ms-retry-after-ms", "x"), ("retry-after", "3")], 3.0),
    ([("retry-after-ms", "1500"), ("retry-after", "Mon, 01 Jan 2024 00:00:30 GMT")], 1.5),
    ([("retry-after-ms", "bad"), ("retry-after", "Mon, 01 Jan 2024 00:00:30 GMT")], 30.0),
    ([("retry-after-ms", "bad"), ("x-ms-retry-after-ms", "bad"), ("retry-after", "bad")], None),
]


@pytest.mark.parametrize(("pairs", "seconds"), PRECEDENCE)
def test_retry_after_precedence(pairs, seconds):
    assert read_hints(head(*pairs), NOW).retry_after == seconds


# -- RFC 3339: anthropic-ratelimit-*-reset -------------------------------------------------------------

RFC3339 = [
    ("2024-01-01T00:00:30Z", NOW + 30),  # the brief's form; Anthropic's recorded ones are the same shape
    ("2025-03-15T09:40:01Z", epoch("2025-03-15T09:40:01+00:00")),  # recorded (openllmetry)
    ("2024-01-01T00:00:30.25Z", NOW + 30.25),
    ("2024-01-01T00:00:30.123456789Z", NOW + 30.123456789),
    ("2024-01-01T00:00:30+00:00", NOW + 30),
    ("2024-01-01T02:00:30+02:00", NOW + 30),
    ("2023-12-31T19:00:30-05:00", NOW + 30),
    ("2024-01-01T05:30:30.5+05:30", NOW + 30.5),
    ("2024-01-01t00:00:30z", NOW + 30),  # RFC 3339 §5.6: T and Z may be lower case
    ("2024-01-01 00:00:30Z", NOW + 30),  # ...and a space may separate date and time
    ("2016-12-31T23:59:60Z", epoch("2017-01-01T00:00:00+00:00")),  # a leap second
    ("2024-02-29T00:00:00Z", epoch("2024-02-29T00:00:00+00:00")),
]

BAD_RFC3339 = [
    "",
    "2024-01-01",
    "2024-01-01T00:00:30",  # no offset: not RFC 3339
    "2024-01-01T00:00Z",
    "2024-13-01T00:00:00Z",
    "2024-00-01T00:00:00Z",
    "2023-02-29T00:00:00Z",
    "2024-02-30T00:00:00Z",
    "2024-01-01T24:00:00Z",
    "2024-01-01T00:60:00Z",
    "2024-01-01T00:00:61Z",
    "2024-01-01T00:00:00+24:00",
    "2024-01-01T00:00:00+00:60",
    "2024-01-01T00:00:00+0000",
    "0000-01-01T00:00:00Z",
    "2024-01-01T00:00:00.Z",
    "2024-W01-1T00:00:00Z",
    "20240101T000000Z",
    "1704067230",
    "30s",
    "\uff12024-01-01T00:00:00Z",
    "2024-01-01T00:00:30Z junk",
]


@pytest.mark.parametrize(("text", "when"), RFC3339)
def test_rfc3339(text, when):
    assert parse_rfc3339(text) == pytest.approx(when, abs=1e-6)


@pytest.mark.parametrize("text", BAD_RFC3339)
def test_malformed_rfc3339(text):
    assert parse_rfc3339(text) is None


def test_anthropic_resets_relative_to_now():
    name = "anthropic-ratelimit-tokens-reset"
    assert read_hints(head((name, "2024-01-01T00:00:30Z")), NOW).reset == {"tokens": 30.0}
    assert read_hints(head((name, "2023-12-31T23:00:00Z")), NOW).reset == {"tokens": 0.0}  # past: 0
    assert read_hints(head((name, "2024-12-31T00:00:00Z")), NOW).reset == {"tokens": 365 * 86400.0}
    assert read_hints(head((name, "2025-01-01T00:00:01Z")), NOW).reset == {}  # over a year: ignored


# -- malformed values of every header, each ignored as if absent ---------------------------------------

BAD_COUNTS = ["", "-1", "+5", "12.5", "1e3", "abc", "nan", "inf", "1 000", "1_000", "0x10", "\uff11\uff12", "9" * 19]
BAD = (
    [
        (f"x-ratelimit-{kind}-{dim}", value)
        for kind in ("limit", "remaining")
        for dim in ("requests", "tokens")
        for value in BAD_COUNTS
    ]
    + [(f"x-ratelimit-reset-{dim}", value) for dim in ("requests", "tokens") for value in BAD_DURATIONS]
    + [
        (f"anthropic-ratelimit-{dim}-{kind}", value)
        for dim in ("requests", "tokens", "input-tokens", "output-tokens")
        for kind in ("limit", "remaining")
        for value in BAD_COUNTS
    ]
    + [
        (f"anthropic-ratelimit-{dim}-reset", value)
        for dim in ("requests", "tokens", "input-tokens", "output-tokens")
        for value in [*BAD_RFC3339, "2099-01-01T00:00:00Z", "6m0s"]
    ]
    + [("retry-after", value.decode("latin-1")) for value in BAD_RETRY_AFTER]
)


@pytest.mark.parametrize(("name", "value"), BAD, ids=[f"{name}={value!r}" for name, value in BAD])
def test_malformed_values_are_ignored(name, value):
    good = ("x-request-id", "req_1")
    assert read_hints(head(good, (name, value), good), NOW) == RateHints()


def test_a_malformed_header_does_not_hide_its_neighbours():
    hints = read_hints(
        head(
            ("x-ratelimit-remaining-requests", "-1"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-requests", "soon"),
            ("x-ratelimit-reset-tokens", "6m0s"),
        ),
        NOW,
    )
    assert hints == RateHints(None, {"tokens": 0}, {}, {"tokens": 360.0})


def test_non_ascii_and_binary_values():
    for value in ["١٢".encode(), "12\u00a0".encode(), b"\x00", b"12\x00", b"\xc2\xb2"]:
        for name in (b"x-ratelimit-remaining-tokens", b"x-ratelimit-reset-tokens", b"anthropic-ratelimit-tokens-reset"):
            assert read_hints([(name, value)], NOW) == RateHints(), (name, value)


# -- cooldown ----------------------------------------------------------------------------------------


def hints(retry_after=None, remaining=None, reset=None) -> RateHints:
    return RateHints(retry_after, remaining or {}, {}, reset or {})


@pytest.mark.parametrize("status", [429, 503, 529])
@pytest.mark.parametrize("retry_after", [0.0, 0.2, 2.5, 45.0, 3600.0, 86400.0])
@pytest.mark.parametrize("failures", [0, 3, 10])
def test_cooldown_honours_the_providers_retry_after_exactly(status, retry_after, failures):
    # shorter than the default's floor (0.5 s at the first failure) and far longer than its 60 s cap alike
    assert cooldown(status, hints(retry_after), failures, 0.5) == retry_after


def test_a_429_without_retry_after_waits_for_the_spent_dimensions():
    spent_requests = hints(remaining={"requests": 0, "tokens": 10}, reset={"requests": 0.5, "tokens": 2400.0})
    assert cooldown(429, spent_requests, 0, 0.5) == 0.5  # only the spent dimension counts: shorter than default too
    both_spent = hints(remaining={"requests": 0, "tokens": 0}, reset={"requests": 12.0, "tokens": 3600.0})
    assert cooldown(429, both_spent, 0, 0.5) == 3600.0  # an hour-long reset is an hour, not capped at 60 s
    none_spent = hints(remaining={"requests": 5, "tokens": 10}, reset={"requests": 1.0, "tokens": 7.66})
    assert cooldown(429, none_spent, 0, 0.5) == 7.66  # no dimension at 0: the largest reset given
    no_counts = hints(reset={"requests": 0.002, "tokens": 0.0})
    assert cooldown(429, no_counts, 4, 0.5) == 0.002  # never a minimum
    spent_without_reset = hints(remaining={"tokens": 0}, reset={"requests": 3.0})
    assert cooldown(429, spent_without_reset, 0, 0.5) == 3.0


def test_retry_after_beats_the_resets():
    both = hints(retry_after=2.0, remaining={"tokens": 0}, reset={"tokens": 360.0})
    assert cooldown(429, both, 0, 0.5) == 2.0


@pytest.mark.parametrize("status", [503, 529])
def test_overloaded_statuses_ignore_quota_resets(status):
    # A 503/529 is the provider's capacity, not this account's quota: without retry-after, the default.
    with_resets = hints(remaining={"tokens": 0}, reset={"tokens": 360.0})
    assert cooldown(status, with_resets, 0, 0.0) == 0.5


# failures before this one -> the step: 1 s doubling, capped at 60 s
STEPS = [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (4, 16.0), (5, 32.0), (6, 60.0), (7, 60.0), (100, 60.0), (10**9, 60.0)]


@pytest.mark.parametrize("status", [429, 503, 529])
@pytest.mark.parametrize(("failures", "step"), STEPS)
def test_default_backoff_doubles_to_the_cap_with_jitter(status, failures, step):
    low = cooldown(status, RateHints(), failures, 0.0)
    high = cooldown(status, RateHints(), failures, 0.999)
    assert low == step * 0.5  # full jitter over [50 %, 100 %) of the step
    assert high == pytest.approx(step * 0.9995)
    assert low <= cooldown(status, RateHints(), failures, 0.5) <= high < step


def test_default_backoff_out_of_contract_inputs():
    assert cooldown(429, RateHints(), -3, 0.0) == 0.5  # negative failures: the first
    for rand in (1.0, -0.1, 7.0, math.nan, math.inf):
        assert cooldown(429, RateHints(), 2, rand) == 2.0  # the step's 50 %, never an exception


@pytest.mark.parametrize("status", [500, 502, 504, 599])
def test_other_5xx_cool_only_on_a_retry_after(status):
    assert cooldown(status, hints(retry_after=7.0), 3, 0.5) == 7.0
    assert cooldown(status, RateHints(), 3, 0.5) is None
    assert cooldown(status, hints(remaining={"tokens": 0}, reset={"tokens": 30.0}), 0, 0.5) is None


@pytest.mark.parametrize("status", [200, 201, 400, 401, 404, 408, 409, 413])
def test_other_statuses_never_cool(status):
    assert cooldown(status, hints(retry_after=7.0, remaining={"tokens": 0}, reset={"tokens": 30.0}), 3, 0.5) is None


def test_cooldown_from_a_whole_429_head():
    # An Anthropic-shaped 429 (header names from https://docs.anthropic.com/en/api/rate-limits): retry-after wins
    headers = head(
        ("retry-after", "12"),
        ("anthropic-ratelimit-tokens-remaining", "0"),
        ("anthropic-ratelimit-tokens-reset", "2024-01-01T00:01:00Z"),
        ("anthropic-ratelimit-requests-remaining", "49"),
        ("anthropic-ratelimit-requests-reset", "2024-01-01T00:00:01Z"),
    )
    read = read_hints(headers, NOW)
    assert cooldown(429, read, 0, 0.5) == 12.0
    assert exhausted_until(read) == 60.0
    read.retry_after = None  # a proxy that dropped it: the spent dimension's reset
    assert cooldown(429, read, 0, 0.5) == 60.0


# -- exhausted_until -----------------------------------------------------------------------------------


def test_exhausted_until():
    assert exhausted_until(RateHints()) is None
    assert exhausted_until(read_hints(recorded("openai__chat_json_gzip_cached"), NOW)) is None  # nothing at 0
    assert (
        exhausted_until(hints(remaining={"tokens": 0, "requests": 4}, reset={"tokens": 12.0, "requests": 99.0})) == 12.0
    )
    both = hints(remaining={"tokens": 0, "requests": 0}, reset={"tokens": 12.0, "requests": 3.0})
    assert exhausted_until(both) == 12.0
    assert exhausted_until(hints(remaining={"tokens": 0})) is None  # spent, but no reset given: nothing known
    partly = hints(remaining={"tokens": 0, "requests": 0}, reset={"requests": 3.0})
    assert exhausted_until(partly) == 3.0
    assert exhausted_until(hints(remaining={"tokens": 0}, reset={"tokens": 0.0})) == 0.0


# -- properties -------------------------------------------------------------------------------------------

HINT_NAMES = [
    b"retry-after",
    b"retry-after-ms",
    b"x-ms-retry-after-ms",
    *[
        f"x-ratelimit-{kind}-{dim}".encode()
        for kind in ("limit", "remaining", "reset")
        for dim in ("requests", "tokens")
    ],
    *[
        f"anthropic-ratelimit-{dim}-{kind}".encode()
        for dim in ("requests", "tokens", "input-tokens", "output-tokens")
        for kind in ("limit", "remaining", "reset")
    ],
]
VALUE_ALPHABET = "0123456789.:-+ TZtzhmsnu,GMTMonJan\t"
names = st.one_of(st.sampled_from(HINT_NAMES), st.sampled_from(HINT_NAMES).map(bytes.upper), st.binary(max_size=30))
values = st.one_of(st.binary(max_size=80), st.text(VALUE_ALPHABET, max_size=40).map(str.encode))


def assert_sane(read: RateHints) -> None:
    assert set(read.limit) <= set(DIMENSIONS) and set(read.remaining) <= set(DIMENSIONS)
    assert set(read.reset) <= set(DIMENSIONS)
    assert all(isinstance(n, int) and n >= 0 for n in [*read.limit.values(), *read.remaining.values()])
    assert all(math.isfinite(s) and 0.0 <= s <= MAX_WAIT for s in read.reset.values())
    assert read.retry_after is None or (math.isfinite(read.retry_after) and 0.0 <= read.retry_after <= MAX_WAIT)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(names, values), max_size=25), st.floats(allow_nan=True, allow_infinity=True))
def test_read_hints_never_raises_and_stays_in_range(headers, now):
    read = read_hints(headers, now)
    assert_sane(read)
    for status in (200, 429, 500, 503, 529):
        wait = cooldown(status, read, 3, 0.25)
        assert wait is None or (math.isfinite(wait) and 0.0 <= wait <= MAX_WAIT)
    until = exhausted_until(read)
    assert until is None or 0.0 <= until <= MAX_WAIT


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), st.text("0123456789.hmsun-+eE ", max_size=30)))
def test_parse_duration_is_never_negative_or_non_finite(text):
    seconds = parse_duration(text)
    assert seconds is None or (math.isfinite(seconds) and 0.0 <= seconds <= MAX_WAIT)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 8759), st.integers(0, 59), st.integers(0, 59), st.integers(0, 999))
def test_go_duration_strings_round_trip(hours, minutes, seconds, millis):
    # Go's time.Duration.String() shape: 1h2m3.004s, 2m3s, 3.004s, 4ms
    if hours:
        text = f"{hours}h{minutes}m{seconds}.{millis:03d}s"
    elif minutes:
        text = f"{minutes}m{seconds}.{millis:03d}s"
    elif seconds:
        text = f"{seconds}.{millis:03d}s"
    else:
        text = f"{millis}ms"
    assert parse_duration(text) == pytest.approx(hours * 3600 + minutes * 60 + seconds + millis / 1000)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80), st.floats(allow_nan=True, allow_infinity=True))
def test_parse_retry_after_never_raises(value, now):
    seconds = parse_retry_after(value, now)
    assert seconds is None or (math.isfinite(seconds) and 0.0 <= seconds <= MAX_WAIT)


offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda minutes: timezone(timedelta(minutes=minutes)))


@settings(max_examples=300, deadline=None)
@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)), offsets, st.booleans())
def test_rfc3339_agrees_with_datetime(when, offset, zulu):
    when = when.replace(tzinfo=UTC if zulu else offset)
    text = when.isoformat()
    if zulu:
        text = text.replace("+00:00", "Z")
    assert parse_rfc3339(text) == pytest.approx(when.timestamp(), abs=1e-6)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_parse_rfc3339_never_raises(text):
    parse_rfc3339(text)


def test_hint_names_are_matched_in_any_case_and_a_head_without_one_shares_no_hints():
    assert read_hints([(b"X-RateLimit-Remaining-Requests", b"7"), (b"Server", b"nginx")], 0.0).remaining == {
        "requests": 7
    }
    assert read_hints([(b"Server", b"nginx"), (b"Date", b"x")], 0.0) is NO_HINTS


# x-should-retry, as openai-python (_base_client.py:932-941) and anthropic-sdk-python (:940-949)
# read it: `response.headers.get("x-should-retry")` compared with "true" and "false" exactly; httpx
# joins a repeated field with ", ", which is neither.
SHOULD_RETRY = [
    ([], None),
    ([("x-should-retry", "true")], True),
    ([("x-should-retry", "false")], False),
    ([("X-Should-Retry", "false")], False),
    ([("x-should-retry", " true ")], True),  # optional whitespace is no part of a field value (RFC 9110 §5.5)
    ([("x-should-retry", "True")], None),
    ([("x-should-retry", "1")], None),
    ([("x-should-retry", "")], None),
    ([("x-should-retry", "true"), ("x-should-retry", "true")], None),
    ([("retry-after", "2"), ("x-should-retry", "false")], False),
]


@pytest.mark.parametrize(("pairs", "answer"), SHOULD_RETRY)
def test_should_retry(pairs, answer):
    assert should_retry(head(*pairs)) is answer
    assert read_hints(head(*pairs), NOW) == read_hints(
        head(*(pair for pair in pairs if pair[0].lower() != "x-should-retry")), NOW
    )


def test_should_retry_is_kept_from_the_head():
    from egress.hints import HINT_NAMES

    assert b"x-should-retry" in HINT_NAMES  # http1.inspect_response keeps it for retries.answered

"""Limiter review: a limit of N lets N a minute through a busy caller (1 included), Retry-After is
never early, and collisions between callers only ever refuse early. In process: minutes of clock."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from egress.config import parse_config
from egress.errors import EgressError
from egress.limiter import RateLimiter, shared_bytes_needed
from egress.vkeys import Claims


def limits(requests_per_minute: int, **extra):
    config = parse_config({"limits": {"requests_per_minute": requests_per_minute}}).limits
    return dataclasses.replace(config, **extra) if extra else config


def caller(kid: str) -> SimpleNamespace:
    claims = Claims(kid, "0" * 16, "app", 0)
    return SimpleNamespace(claims=claims, facts=None, route=None, identity=None, limit_slots=None)


def admitted(limiter: RateLimiter, exchange, now: float) -> EgressError | None:
    try:
        limiter.admit(exchange, "openai", now)
    except EgressError as error:
        return error
    return None


@pytest.mark.parametrize("limit", [1, 2, 3, 10, 60])
def test_a_busy_caller_gets_its_limit_per_minute_and_never_more_in_any_minute(limit):
    """`requests_per_minute = 1` let one request through every two minutes, and N a busy caller N - 1
    a minute: a part of a previous-window request held the last slot until the window ended. nginx
    limit_req (rate=1r/m), Envoy's token bucket and LiteLLM's rpm all pass N a minute."""
    limiter = RateLimiter(limits(limit))
    exchange = caller("00112233445566aa")
    start, passed, now = 6000.0, [], 6000.0
    while now < start + 600:  # ten minutes of a caller retrying every quarter second
        if admitted(limiter, exchange, now) is None:
            passed.append(now)
        now += 0.25
    assert len(passed) == 10 * limit
    assert max(sum(first <= later < first + 60 for later in passed) for first in passed) == limit


@pytest.mark.parametrize("limit", [1, 2, 7])
def test_retry_after_is_never_earlier_than_the_request_passes(limit):
    """At `now + Retry-After` the refused request passes (nobody else asked meanwhile), and a second
    earlier than the exact wait it would still be refused."""
    config = limits(limit)
    buffer = bytearray(shared_bytes_needed(config))
    limiter = RateLimiter(config, memoryview(buffer), default_hash_key=b"k" * 32)
    exchange = caller("00112233445566bb")
    refusals = 0
    now = 9000.0 + 13.7
    while now < 9000 + 400:
        refused = admitted(limiter, exchange, now)
        if refused is not None:
            refusals += 1
            headers = dict(refused.headers)
            retry_after = int(headers[b"retry-after"])
            assert headers[b"x-ratelimit-reset-requests"] == b"%ds" % retry_after
            assert headers[b"x-ratelimit-remaining-requests"] == b"0"
            probe = RateLimiter(config, memoryview(bytearray(buffer)), default_hash_key=b"k" * 32)
            assert admitted(probe, caller("00112233445566bb"), now + retry_after) is None, (now, retry_after)
            if retry_after > 1:
                probe = RateLimiter(config, memoryview(bytearray(buffer)), default_hash_key=b"k" * 32)
                assert admitted(probe, caller("00112233445566bb"), now + retry_after - 1) is not None
        now += 3.1
    assert refusals > 10


def test_callers_that_collide_are_refused_early_never_late():
    """One counter for every caller (a 1 x 1 sketch): a neighbour's requests count against a caller,
    so it is refused early; the limit itself is never passed by anyone."""
    limiter = RateLimiter(limits(3, sketch_width=1, sketch_depth=1))
    first, second = caller("00112233445566cc"), caller("00112233445566dd")
    now = 500.0
    assert [admitted(limiter, first, now + step) for step in (0, 0.1)] == [None, None]
    assert admitted(limiter, second, now + 0.2) is None
    refused = admitted(limiter, second, now + 0.3)
    assert refused is not None and refused.code == "rate_limited"
    assert admitted(limiter, first, now + 0.4) is not None

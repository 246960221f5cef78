"""The resolver cache: fresh answers cached, one lookup for concurrent callers, stale served on failure."""

from __future__ import annotations

import asyncio
import socket

import pytest

from egress.dns import Resolver


class ScriptedLookups:
    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    async def __call__(self, host, port, **_):
        self.calls += 1
        await asyncio.sleep(0.01)
        if self.fail:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.1", port)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("fd00::1", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.2", port)),
        ]


def run(coroutine):
    return asyncio.run(coroutine)


def test_cached_within_ttl_and_shared_by_concurrent_callers():
    async def scenario():
        lookups = ScriptedLookups()
        resolver = Resolver(ttl=60, getaddrinfo=lookups)
        answers = await asyncio.gather(*(resolver.resolve("api.test", 443) for _ in range(5)))
        await resolver.resolve("api.test", 443)
        return lookups.calls, answers[0]

    calls, answer = run(scenario())
    assert calls == 1
    # Families interleaved, IPv6 first (RFC 8305).
    assert [addr[0] for _, addr in answer] == ["fd00::1", "10.0.0.1", "10.0.0.2"]


def test_stale_answer_served_when_refresh_fails():
    async def scenario():
        lookups = ScriptedLookups()
        resolver = Resolver(ttl=0.05, retry_after=0.05, getaddrinfo=lookups)
        first = await resolver.resolve("api.test", 443)
        await asyncio.sleep(0.06)
        lookups.fail = True
        stale = await resolver.resolve("api.test", 443)
        again = await resolver.resolve("api.test", 443)  # within retry_after: no new lookup
        return first, stale, again, lookups.calls

    first, stale, again, calls = run(scenario())
    assert stale == first == again
    assert calls == 2


def test_failure_without_any_answer_raises():
    async def scenario():
        lookups = ScriptedLookups()
        lookups.fail = True
        await Resolver(ttl=60, getaddrinfo=lookups).resolve("api.test", 443)

    with pytest.raises(OSError):
        run(scenario())


def test_ip_literals_skip_the_resolver():
    async def scenario():
        lookups = ScriptedLookups()
        resolver = Resolver(ttl=60, getaddrinfo=lookups)
        return await resolver.resolve("::1", 80), await resolver.resolve("127.0.0.1", 80), lookups.calls

    v6, v4, calls = run(scenario())
    assert v6 == [(socket.AF_INET6, ("::1", 80))] and v4 == [(socket.AF_INET, ("127.0.0.1", 80))] and calls == 0

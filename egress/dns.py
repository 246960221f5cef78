"""Asynchronous name resolution with a TTL cache.

Contract: `await resolver.resolve(host, port)` returns a non-empty list of (family, sockaddr).
A fresh answer is served from the cache; an expired one triggers one lookup shared by every
concurrent caller; if that lookup fails, or is still unanswered after `stale_after` seconds, and
an old answer exists, the old answer is served (a resolver hiccup must not take every provider
down) and retried after `retry_after` seconds. The system resolver gives no TTLs, so the configured
TTL stands in for them. `resolver.demote(host, port, sockaddr)` moves an address that failed to
connect to the end of the cached answer, until the next lookup.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

# RFC 8767 §5 ("Serving Stale Data to Improve DNS Resiliency"): a refresh that has not answered
# within the client response timer, 1.8 s suggested, is answered with the stale data. Without it a
# resolver that times out instead of failing (glibc: 5 s per try and server) held every new upstream
# connection until connect_timeout, a 504 each, with a usable old answer in hand.
STALE_AFTER = 1.8


class Resolver:
    __slots__ = ("_cache", "_getaddrinfo", "_inflight", "_loop", "retry_after", "stale_after", "ttl")

    def __init__(
        self, ttl: float, retry_after: float = 5.0, getaddrinfo=None, stale_after: float = STALE_AFTER
    ) -> None:
        self.ttl = ttl
        self.retry_after = retry_after
        self.stale_after = stale_after
        self._cache: dict[tuple[str, int], tuple[float, list]] = {}
        self._inflight: dict[tuple[str, int], asyncio.Future] = {}
        self._loop = asyncio.get_running_loop()
        # The system resolver (uvloop runs it off-thread); tests hand in a scripted one.
        self._getaddrinfo = getaddrinfo or self._loop.getaddrinfo

    async def resolve(self, host: str, port: int) -> list[tuple[int, tuple]]:
        literal = _literal(host, port)
        if literal is not None:
            return literal
        key = (host, port)
        cached = self._cache.get(key)
        now = self._loop.time()
        if cached is not None and cached[0] > now:
            return cached[1]
        pending = self._inflight.get(key)
        if pending is None:
            pending = self._loop.create_task(self._lookup(host, port))
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        try:
            if cached is None:
                return await asyncio.shield(pending)
            # The lookup goes on (shielded) and caches its answer whenever it comes.
            return await asyncio.wait_for(asyncio.shield(pending), self.stale_after)
        except OSError:  # TimeoutError included: wait_for's, once stale_after passed
            if cached is None:
                raise
            # Serve stale, and don't hammer a failing resolver on every request.
            self._cache[key] = (now + self.retry_after, cached[1])
            return cached[1]

    def demote(self, host: str, port: int, sockaddr: tuple) -> None:
        """An address that failed to connect goes last in the cached answer, so the next new
        connection tries the others first instead of paying for it again until the TTL ends."""
        cached = self._cache.get((host, port))
        if cached is None:
            return
        until, addresses = cached
        if len(addresses) > 1 and addresses[-1][1] != sockaddr:
            kept = [pair for pair in addresses if pair[1] != sockaddr]
            if len(kept) < len(addresses):
                # A new list: a dial already walking the old one goes on undisturbed.
                self._cache[(host, port)] = (until, kept + [pair for pair in addresses if pair[1] == sockaddr])

    async def _lookup(self, host: str, port: int) -> list[tuple[int, tuple]]:
        infos = await self._getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        if not infos:
            raise OSError(f"no addresses for {host}")
        # Interleave families (RFC 8305 §4) so a dead IPv6 path costs one attempt, not all of them.
        v6 = [(family, addr) for family, *_, addr in infos if family == socket.AF_INET6]
        v4 = [(family, addr) for family, *_, addr in infos if family != socket.AF_INET6]
        ordered = [pair for pairs in zip(v6, v4, strict=False) for pair in pairs] + v6[len(v4) :] + v4[len(v6) :]
        self._cache[(host, port)] = (self._loop.time() + self.ttl, ordered)
        return ordered


def _literal(host: str, port: int) -> list[tuple[int, tuple]] | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    return [(family, (host, port))]

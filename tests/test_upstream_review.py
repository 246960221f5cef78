"""Upstream edge cases found in review: several addresses for one name, a resolver that hangs."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time

import pytest

from egress.config import parse_config
from egress.dns import Resolver
from egress.errors import EgressError
from egress.providers import Router
from egress.tally import Tally
from egress.upstream import UpstreamPool
from tests.support import RawClient, ScriptedUpstream, _split_request, request_bytes, wait_until


@contextlib.contextmanager
def dropping_syns():
    """An address:port on loopback whose accept queue is full, so the kernel drops new SYNs: a
    connect there hangs, as to a firewalled node or a dead IPv6 route."""
    listener = socket.socket()
    listener.bind(("127.0.0.2", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.2", port))
        fillers.append(filler)
    time.sleep(0.1)
    try:
        yield ("127.0.0.2", port)
    finally:
        for sock in [*fillers, listener]:
            sock.close()


@contextlib.contextmanager
def listening():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    try:
        yield listener.getsockname()
    finally:
        listener.close()


def pool_for(upstream: dict, getaddrinfo) -> tuple[UpstreamPool, object]:
    config = parse_config({"providers": {"raw": {"base_url": "http://api.several.test"}}, "upstream": upstream})
    origin = Router(config.providers).resolve(b"/raw/v1/models").provider.origin
    pool = UpstreamPool(config.upstream, Tally())
    pool._resolver._getaddrinfo = getaddrinfo  # the pool's own resolver, fed scripted answers
    return pool, origin


async def timed_connect(pool, origin) -> tuple[object, float]:
    """A new upstream connection's peer and how long it took to make; the connection closed."""
    started = time.monotonic()
    conn = await pool.connect(origin)
    took = time.monotonic() - started
    peer = conn.transport.get_extra_info("peername")
    conn.close()
    return peer, took


def answer(*sockaddrs):
    return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", sockaddr) for sockaddr in sockaddrs]


def test_an_address_that_drops_syns_leaves_time_for_the_next_one():
    # Before: the first address took the whole connect_timeout, a 504 with a working address next.
    async def scenario(dead, alive):
        async def getaddrinfo(host, port, **_):
            return answer(dead, alive)

        pool, origin = pool_for({"connect_timeout": 5.0}, getaddrinfo)
        peer, first_took = await timed_connect(pool, origin)
        # The dead address went last: the next new connection does not wait for it again.
        _, second_took = await timed_connect(pool, origin)
        return peer, first_took, second_took

    with dropping_syns() as dead, listening() as alive:
        peer, first_took, second_took = asyncio.run(scenario(dead, alive))
    assert peer == alive
    assert 2.0 <= first_took < 4.0  # its share: half of the 5 s, at least 2 s
    assert second_took < 1.0


def test_every_address_dropping_syns_is_still_a_504_within_connect_timeout():
    async def scenario(dead):
        async def getaddrinfo(host, port, **_):
            return answer(dead, dead)

        pool, origin = pool_for({"connect_timeout": 2.5}, getaddrinfo)
        started = time.monotonic()
        with pytest.raises(EgressError) as failed:
            await pool.connect(origin)
        return failed.value, time.monotonic() - started

    with dropping_syns() as dead:
        error, took = asyncio.run(scenario(dead))
    assert error.code == "upstream_timeout" and error.status == 504
    assert 2.4 <= took < 3.0


@pytest.mark.parametrize(("connect_timeout", "stale_after"), [(4.0, 1.8), (1.0, 0.5)])
def test_a_resolver_that_hangs_on_refresh_gets_the_stale_answer(connect_timeout, stale_after):
    # Before: every new connection waited for the hung refresh until connect_timeout: a 504 each,
    # with a usable answer in the cache (RFC 8767 §5 answers stale after 1.8 s; a short
    # connect_timeout, after half of it).
    async def scenario(alive):
        calls = []

        async def getaddrinfo(host, port, **_):
            calls.append(host)
            if len(calls) > 1:
                await asyncio.sleep(30)  # glibc's resolver: 5 s per try and per server
            return answer(alive)

        pool, origin = pool_for({"connect_timeout": connect_timeout, "dns_ttl": 0.1}, getaddrinfo)
        (await pool.connect(origin)).close()
        await asyncio.sleep(0.2)  # the answer expired
        peer, took = await timed_connect(pool, origin)
        # Within retry_after, the stale answer is served at once, with no second wait.
        _, again = await timed_connect(pool, origin)
        return peer, took, again, len(calls)

    with listening() as alive:
        peer, took, again, calls = asyncio.run(scenario(alive))
    assert peer == alive
    assert stale_after - 0.1 <= took < stale_after + 0.4
    assert again < 0.5
    assert calls == 2


def test_a_slow_refresh_that_answers_in_time_is_used():
    async def scenario():
        calls = []

        async def getaddrinfo(host, port, **_):
            calls.append(host)
            await asyncio.sleep(0.05 if len(calls) == 1 else 0.2)
            return answer((f"10.0.0.{len(calls)}", port))

        resolver = Resolver(ttl=0.05, stale_after=1.0, getaddrinfo=getaddrinfo)
        first = await resolver.resolve("api.test", 443)
        await asyncio.sleep(0.1)
        return first, await resolver.resolve("api.test", 443)

    first, second = asyncio.run(scenario())
    assert first[0][1][0] == "10.0.0.1" and second[0][1][0] == "10.0.0.2"


def test_demote_moves_a_failed_address_last_and_a_new_lookup_resets_the_order():
    async def scenario():
        async def getaddrinfo(host, port, **_):
            return answer(("10.0.0.1", port), ("10.0.0.2", port), ("10.0.0.3", port))

        resolver = Resolver(ttl=0.05, getaddrinfo=getaddrinfo)
        before = await resolver.resolve("api.test", 443)
        resolver.demote("api.test", 443, ("10.0.0.1", 443))
        demoted = await resolver.resolve("api.test", 443)
        await asyncio.sleep(0.1)
        return before, demoted, await resolver.resolve("api.test", 443)

    before, demoted, fresh = asyncio.run(scenario())
    order = [[sockaddr[0] for _, sockaddr in addresses] for addresses in (before, demoted, fresh)]
    listed = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert order == [listed, ["10.0.0.2", "10.0.0.3", "10.0.0.1"], listed]


# -- TLS: a close-delimited body ends only on the provider's close_notify ------------------------


class TlsScriptedUpstream(ScriptedUpstream):
    """A ScriptedUpstream over TLS; after a reply, `"notify"` closes with a close_notify alert
    (an orderly TLS close), `"ragged"` closes the TCP connection without one (a truncation)."""

    def __init__(self, replies: list, context: ssl.SSLContext) -> None:
        self.context = context
        super().__init__(replies)

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            tls = self.context.wrap_socket(conn, server_side=True)
        except OSError:
            return
        self._open.append(tls)
        for request in self._requests(tls, _split_request):
            self.requests.append(request)
            data, after = self.replies.pop(0)
            try:
                tls.sendall(data)
                if after == "notify":
                    tls.settimeout(2)
                    tls.unwrap().close()  # close_notify, then the TCP close
                    return
                if after == "ragged":
                    time.sleep(0.2)  # the bytes are read before the close
                    tls.close()  # SSLSocket.close sends no close_notify
                    return
            except OSError:
                return


@pytest.fixture
def tls_scripted(start_egress, certificate_authority, ca_file):
    started = []

    def start(replies: list) -> tuple:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        certificate_authority.issue_cert("127.0.0.1").configure_cert(context)
        raw = TlsScriptedUpstream(replies, context)
        started.append(raw)
        config = f'[upstream]\nca_file = "{ca_file}"\n[providers.raw]\nbase_url = "{raw.base_url}"\n'
        return start_egress(config), raw

    yield start
    for raw in started:
        raw.stop()


UNFRAMED = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: {}\n\n"


@pytest.mark.parametrize(("after", "complete"), [("notify", True), ("ragged", False)])
def test_a_close_delimited_body_over_tls_is_whole_only_with_close_notify(tls_scripted, after, complete):
    # RFC 9112 §9.8: a response with neither chunked coding nor Content-Length "is complete only if
    # a valid closure alert has been received". A TCP close without one may be an attacker's or a
    # middlebox's cut, and must reach the client and the bill as a cut.
    egress, _ = tls_scripted([(UNFRAMED, after)])
    with RawClient(egress.port) as client:
        client.send(request_bytes("POST", "/raw/v1/chat/completions", body=b'{"model":"m","stream":true}'))
        response = client.read_response("POST")
    assert response.status == 200 and response.body == b"data: {}\n\n"
    assert response.complete is complete
    assert wait_until(lambda: egress.access_records(), timeout=3)
    assert egress.access_records()[-1]["outcome"] == ("complete" if complete else "upstream_cut")

"""Upstream client: per-origin keep-alive pool of HTTP/1.1 connections over TCP or TLS.

Contract:
  `pool.take_idle(origin)` -> a pooled `UpstreamConnection` ready for one request, or None;
  `await pool.connect(origin)` -> a new one, or raises EgressError (upstream_connect_error /
      upstream_timeout).
  `conn.send(exchange, data)` writes one request; the connection then calls, in order,
      exchange.upstream_head(status, headers) once, exchange.upstream_body(bytes) per read,
      and exactly one of exchange.upstream_end() or exchange.upstream_failed(error); the end only
      once the exchange took a final head (exchange.head_sent). The end is reported after the read
      that completed the response is parsed, so the exchange may hand the connection to the next
      request at once.
  `pool.release(conn)` returns it; it is kept only after a complete, well-framed response with
      nothing but CRLF after it, that the provider did not ask to close; closed when idle past
      `pool_idle_timeout`, or when a byte arrives while idle.
Deadlines: connect (DNS + TCP + TLS, shared by a name's addresses in turn, each its share of what is
left), first byte after the request is written, then idle between reads.
"""

from __future__ import annotations

import asyncio
import ssl

import httptools

from egress.config import UpstreamConfig
from egress.deadline import Deadline
from egress.dns import STALE_AFTER, Resolver
from egress.errors import EgressError
from egress.http1 import DISCARD_FIELDS
from egress.providers import Origin
from egress.tally import Tally

# A response head still incomplete past this is refused: httptools keeps a header in memory until
# it ends. Providers send 1-2 KiB; nginx refuses past its proxy_buffer_size (4-8 KiB).
_MAX_RESPONSE_HEAD = 64 * 1024
# Only request bodies (at most max_body_bytes, already in memory) are written upstream.
_WRITE_BUFFER_HIGH = 256 * 1024
_WRITE_BUFFER_LOW = 64 * 1024
# The least one address of several gets to connect, of connect_timeout's remainder (Go: 2 s).
_MIN_ATTEMPT = 2.0


def make_tls_context(ca_file: str | None) -> ssl.SSLContext:
    # Verification on, hostname checked, system CAs; an extra bundle only adds trust.
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    context.set_alpn_protocols(["http/1.1"])
    return context


class UpstreamPool:
    __slots__ = ("_config", "_hosts", "_idle", "_loop", "_resolver", "_tally", "_tls")

    def __init__(self, config: UpstreamConfig, tally: Tally | None = None) -> None:
        self._config = config
        self._tally = tally if tally is not None else Tally()  # new connections by outcome (metrics.py)
        self._loop = asyncio.get_running_loop()
        # A stale answer must come in time to leave the connect its part of connect_timeout.
        self._resolver = Resolver(config.dns_ttl, stale_after=min(STALE_AFTER, config.connect_timeout / 2))
        self._tls = make_tls_context(config.ca_file)
        self._idle: dict[str, list[UpstreamConnection]] = {}  # by Origin.pool_key
        self._hosts: dict[str, str] = {}  # Origin.pool_key -> host, for the idle-connection gauge

    @property
    def config(self) -> UpstreamConfig:
        return self._config

    def take_idle(self, origin: Origin) -> UpstreamConnection | None:
        idle = self._idle.get(origin.pool_key)
        while idle:
            conn = idle.pop()  # most recently used first: the likeliest to still be open
            if conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        transport = conn.transport
        if not conn.reusable or transport is None or transport.is_closing():
            conn.close()
            return
        idle = self._idle.get(conn.origin.pool_key)
        if idle is None:
            idle = self._idle[conn.origin.pool_key] = []
            self._hosts[conn.origin.pool_key] = conn.origin.host
        if len(idle) >= self._config.max_idle_per_origin:
            conn.close()
            return
        conn.park(self._loop.time() + self._config.pool_idle_timeout)
        idle.append(conn)

    def idle_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for key, idle in self._idle.items():
            host = self._hosts[key]
            counts[host] = counts.get(host, 0) + len(idle)
        return counts

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.origin.pool_key)
        if idle and conn in idle:
            idle.remove(conn)

    def close_idle(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
            idle.clear()

    async def connect(self, origin: Origin) -> UpstreamConnection:
        _, conn = await self._dial(origin, lambda: UpstreamConnection(self, origin))
        return conn

    async def open_stream(self, origin: Origin) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A fresh connection as asyncio streams, for egress's own few requests (the model lists):
        the same resolver, TLS context and connect deadline as traffic, never a pooled connection."""
        reader = asyncio.StreamReader(limit=_MAX_RESPONSE_HEAD)
        transport, protocol = await self._dial(origin, lambda: asyncio.StreamReaderProtocol(reader))
        return reader, asyncio.StreamWriter(transport, protocol, reader, self._loop)

    async def _dial(self, origin: Origin, factory) -> tuple[asyncio.Transport, asyncio.Protocol]:
        loop = self._loop
        give_up_at = loop.time() + self._config.connect_timeout
        host = origin.host
        try:
            async with asyncio.timeout_at(give_up_at):
                addresses = await self._resolver.resolve(host, origin.port)
        except TimeoutError:
            raise self._failed(host, "timeout", "upstream_timeout", f"resolving {host} timed out") from None
        except OSError:
            raise self._failed(host, "dns_error", "upstream_connect_error", f"cannot resolve {host}") from None
        failure, outcome = "no address", "error"
        left = len(addresses)
        for family, sockaddr in addresses:
            # Each address gets an equal share of the time left, at least _MIN_ATTEMPT (Go's
            # net.Dialer, partialDeadline): one that drops SYNs (a dead IPv6 route, a firewalled
            # node) used to spend the whole connect_timeout, a 504 while the next address answered.
            now = loop.time()
            if now >= give_up_at:
                failure, outcome = "timed out", "timeout"
                break
            attempt_until = min(give_up_at, now + max((give_up_at - now) / left, _MIN_ATTEMPT))
            left -= 1
            try:
                async with asyncio.timeout_at(attempt_until):
                    opened = await loop.create_connection(
                        factory,
                        host=sockaddr[0],
                        port=sockaddr[1],
                        family=family,
                        ssl=self._tls if origin.tls else None,
                        server_hostname=host if origin.tls else None,
                    )
            except TimeoutError:
                failure, outcome = "timed out", "timeout"
                self._resolver.demote(host, origin.port, sockaddr)
            except ssl.SSLCertVerificationError as exc:
                message = f"TLS certificate of {host} failed verification: {exc.verify_message}"
                raise self._failed(host, "tls_error", "upstream_connect_error", message) from None
            except ssl.SSLError as exc:
                failure, outcome = exc.strerror or type(exc).__name__, "tls_error"
            except OSError as exc:
                failure, outcome = exc.strerror or type(exc).__name__, "error"
                self._resolver.demote(host, origin.port, sockaddr)
            else:
                self._tally.add(("upstream_connections", host, "ok"))
                return opened
        if outcome == "timeout":
            raise self._failed(host, "timeout", "upstream_timeout", f"connecting to {host} timed out")
        message = f"cannot connect to {host}:{origin.port}: {failure}"
        raise self._failed(host, outcome, "upstream_connect_error", message)

    def _failed(self, host: str, outcome: str, code: str, message: str) -> EgressError:
        """A new connection that failed, counted by how (egress_upstream_connections_total)."""
        self._tally.add(("upstream_connections", host, outcome))
        return EgressError(code, message)


# Framing fields that would give an interim response a body (_interim), as llhttp reads names.
_FRAMING_FIELDS = frozenset((b"content-length", b"transfer-encoding"))


class _ResponseAfterEnd(Exception):
    """Stops the parser: nothing after the end of the response belongs to it."""


# One read buffer for every upstream connection of the process (BufferedProtocol): the loop (one
# per process) reads into it and hands it over (buffer_updated) in the same callback, which parses
# it at once, so no two reads ever share it, and httptools hands the body on as bytes of its own. No bytes object is
# made per read, and over TLS uvloop decrypts straight into it: its other path allocates 256 KiB
# per read (an mmap, page faults and an munmap each time) and raises SSLWantReadError to end every
# read (uvloop/sslproto.pyx, `_do_read__copied` against `_do_read__buffered`).
_READ = memoryview(bytearray(256 * 1024))


class UpstreamConnection(asyncio.BufferedProtocol):
    __slots__ = (
        "_body_seen",
        "_deadline",
        "_eof",
        "_framing_bytes",
        "_head_size",
        "_headers",
        "_loop",
        "_message_done",
        "_parser",
        "_skipping_interim",
        "exchange",
        "origin",
        "pool",
        "received_any",
        "reusable",
        "reused",
        "timed_out",
        "transport",
    )

    def __init__(self, pool: UpstreamPool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.exchange = None  # the Exchange this connection serves, None while idle
        self.reused = False
        self.reusable = False
        self.received_any = False
        self.timed_out = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = -1  # bytes read while the response head is incomplete; -1 once it is
        self._framing_bytes = 0  # bytes read after the head since the last body byte
        self._body_seen = False
        self._skipping_interim = False
        self._message_done = False  # the response ended inside the read being parsed
        self._eof = False  # the provider closed in order (eof_received)
        self._parser = httptools.HttpResponseParser(self)
        self._deadline = Deadline(self._loop, self._on_deadline)

    # -- driven by the exchange --------------------------------------------------------------
    def send(self, exchange, data: list[bytes]) -> None:
        self.exchange = exchange
        self.reusable = False
        self.received_any = False
        self._headers = []
        self._head_size = 0
        self._framing_bytes = 0
        self._deadline.set(self._loop.time() + self.pool.config.first_byte_timeout)
        self.transport.writelines(data)

    def park(self, idle_until: float) -> None:
        self.exchange = None
        self._deadline.set(idle_until)

    def close(self) -> None:
        self._deadline.cancel()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close at once, unflushed: the provider must stop generating for a client that left."""
        self.reusable = False
        self._deadline.cancel()
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        # Explicit, as on the client side: uvloop's defaults are not asyncio's documented ones.
        transport.set_write_buffer_limits(high=_WRITE_BUFFER_HIGH, low=_WRITE_BUFFER_LOW)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_READ[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.exchange is None:
            # Bytes on an idle connection: the provider broke framing; never reuse it.
            self.close()
            return
        exchange = self.exchange
        self.received_any = True
        self._deadline.set(self._loop.time() + self.pool.config.read_idle_timeout)
        head_pending = self._head_size >= 0
        if head_pending:
            self._head_size += len(data)
        self._body_seen = False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # A 2xx to CONNECT, which egress never sends (a 101 is refused at its head, _interim):
            # the connection would now speak another protocol. Not an HttpParserError.
            self._fail(EgressError("upstream_protocol_error", "the upstream switched protocols unasked"))
            self.abort()
            return
        except httptools.HttpParserError:
            if self._message_done:
                self.reusable = False  # bytes after a complete response: answered, but never reused
            else:
                self._fail(EgressError("upstream_protocol_error", "the upstream response is not valid HTTP/1.1"))
                self.abort()
                return
        if self._head_size > _MAX_RESPONSE_HEAD:
            self._fail(EgressError("upstream_protocol_error", "the upstream response head is too large"))
            self.abort()
            return
        if not (head_pending or self._body_seen or self._message_done):
            # Chunk headers, extensions or trailer fields with no body byte: httptools accumulates a
            # trailer field until it ends, so the head's bound applies to them too.
            self._framing_bytes += len(data)
            if self._framing_bytes > _MAX_RESPONSE_HEAD:
                self._fail(EgressError("upstream_protocol_error", "the upstream's chunk framing is too large"))
                self.abort()
                return
        else:
            self._framing_bytes = 0
        if self._message_done:
            # Reported only now that the parser is done with this read: the exchange may hand this
            # connection to its next request, which must not start inside our own callbacks.
            self._message_done = False
            self._finish()
        else:
            exchange.upstream_read_done()

    def eof_received(self) -> bool:
        # The provider's orderly close: a TCP FIN, or over TLS its close_notify alert. A TLS
        # connection closed without the alert (a truncation) reaches connection_lost without this.
        self._eof = True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        self.reusable = False
        self.pool.forget(self)
        if self.exchange is None:
            return
        if exc is None and self._eof and not self.timed_out and self._parser_awaits_eof():
            # A response framed by the connection's close (no length, not chunked) ends here, on an
            # orderly close only: a reset or egress's own abort at the idle deadline cuts it short,
            # and the client must see a cut, never a clean end. Over TLS, only a close_notify is
            # orderly (RFC 9112 §9.8: such a response "is complete only if a valid closure alert
            # has been received"); a bare TCP close may be a middlebox's or an attacker's cut.
            self._finish()
            return
        if self.timed_out:
            self._fail(EgressError("upstream_timeout", f"{self.origin.host} stopped answering"))
        else:
            self._fail(EgressError("upstream_protocol_error", f"{self.origin.host} closed the connection early"))

    # -- httptools callbacks: record state only --------------------------------------------
    def on_message_begin(self) -> None:
        if self._message_done:
            # A byte other than CRLF after the end of the response, with no request outstanding:
            # the connection must not be reused (RFC 9112 §9.3; llhttp skips stray CRLF, which is
            # harmless, without calling us). Stopped here, before llhttp buffers half of a head
            # that the next request on this connection would be read through.
            self.reusable = False
            raise _ResponseAfterEnd

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))  # after the head: the trailer sink, which keeps nothing

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200 or status > 599:
            self._interim(status)  # raises unless a 1xx to skip
            return
        self._head_size = -1
        exchange = self.exchange
        headers = self._headers
        self._headers = DISCARD_FIELDS
        try:
            exchange.upstream_head(status, headers)
        except EgressError as error:
            self._fail(error)
            raise
        if exchange.head_request:
            # llhttp can't be told a HEAD response has no body: end here, and never reuse.
            self.reusable = False
            self._message_done = True
            raise _ResponseAfterEnd

    def on_body(self, body: bytes) -> None:
        self._body_seen = True
        exchange = self.exchange
        if exchange is not None:
            exchange.upstream_body(body)

    def on_message_complete(self) -> None:
        if self._skipping_interim:
            self._skipping_interim = False
            return
        self.reusable = self._parser.should_keep_alive()
        self._message_done = True

    # -- internals -------------------------------------------------------------------------
    def _interim(self, status: int) -> None:
        """A status outside 200-599: an interim response to skip, or a refusal (_ResponseAfterEnd)."""
        if status < 100 or status > 599:
            # RFC 9110 §15: a three-digit code of classes 1xx-5xx. Below 100 it would pass for an
            # interim response, and the client would wait for the idle deadline.
            reason = "the upstream sent an invalid status code"
        elif status == 101:
            # RFC 9110 §15.2.2: only an answer to a request that asked to upgrade, and egress asks
            # for none and tunnels nothing. llhttp ends a 101 without Upgrade fields as a complete
            # message, which would settle the exchange with no response at all.
            reason = "the upstream switched protocols unasked"
        elif status not in (100, 102, 103) and any(name.lower() in _FRAMING_FIELDS for name, _ in self._headers):
            # RFC 9110 §15.2, RFC 9112 §6.3 ¶2: a 1xx ends at its blank line and has no content. llhttp
            # ignores framing fields on 100, 102 and 103 only; on any other 1xx it would read the
            # final response as this one's body.
            reason = "the upstream sent an informational response with a body"
        else:
            # Interim responses (103 Early Hints) are not relayed, as nginx does not relay them.
            self._skipping_interim = True
            self._headers = []
            return
        self._fail(EgressError("upstream_protocol_error", reason))
        raise _ResponseAfterEnd

    def _finish(self) -> None:
        exchange = self.exchange
        self._deadline.clear()
        if exchange is None:
            return
        if not exchange.head_sent:
            # A message ended with no final response head relayed (an interim code llhttp took for
            # a whole response): settling that as a success would answer the client nothing and
            # hand its next pipelined request this request's answer.
            self._fail(EgressError("upstream_protocol_error", "the upstream response ended without a final head"))
            self.abort()
            return
        self.exchange = None
        exchange.upstream_end()

    def _fail(self, error: EgressError) -> None:
        exchange = self.exchange
        self.exchange = None
        self.reusable = False
        if exchange is not None:
            exchange.upstream_failed(error)

    def _parser_awaits_eof(self) -> bool:
        exchange = self.exchange
        return exchange is not None and exchange.upstream_until_close

    def _on_deadline(self) -> None:
        exchange = self.exchange
        if exchange is None:
            self.close()  # idle past pool_idle_timeout
            return
        if exchange.client.backpressure.client_paused:
            # egress itself stopped reading: the client is slow, not the provider. The client's
            # send_timeout judges that; the provider gets a fresh idle deadline.
            self._deadline.set(self._loop.time() + self.pool.config.read_idle_timeout)
            return
        self.timed_out = True
        self.abort()

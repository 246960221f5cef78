"""The client side: one asyncio.Protocol per connection, requests parsed by httptools (llhttp, strict).

Contract: every request parsed becomes an `Exchange` queued in arrival order; exchanges run one at a
time, so pipelined requests are answered in order. A framing error queues a final error exchange,
stops parsing and closes after answering. httptools callbacks only record state.

Deadlines, one timer per connection (deadline.py):
  fresh connection / head in progress   header_timeout   -> 408, close (slowloris)
  body in progress                      body_timeout     -> 408, close (idle between body reads)
  idle between requests                 keepalive_timeout -> close quietly
  a request running                     none here: the upstream's own deadlines apply
  writes stalled above the high mark    send_timeout     -> abort (a second, lazily made timer)
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from typing import TYPE_CHECKING

import httptools

from egress import http1, proxy
from egress.accesslog import log_event
from egress.admission import Waiting
from egress.catalog import ModelCatalog
from egress.deadline import Deadline
from egress.errors import EgressError, render_error
from egress.flow import Backpressure
from egress.metrics import Metrics
from egress.providers import HEALTH_PATH, guess_dialect
from egress.routes import ModelRoutes

if TYPE_CHECKING:
    from egress.accesslog import AccessLog
    from egress.auth import Authenticator
    from egress.config import Config
    from egress.facts import FactSink
    from egress.limiter import RateLimiter
    from egress.providers import Router
    from egress.upstream import UpstreamPool

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Bytes read past a pipelined request and held unparsed until its turn (then reading pauses): a
# few requests' worth, so a pipelining client is read on (and its leaving seen) at a bounded cost.
_HOLD_LIMIT = 64 * 1024
# Reads larger than this are parsed in slices of it (data_received), and once this many requests
# of one read are parsed, the rest waits for the loop's next turn.
_SLICE = 16 * 1024
_TURN_REQUESTS = 64
# ClientConnection._upgrade_body: where an Upgrade request with a body is (0: none).
_UPGRADE_HEAD, _UPGRADE_ENDED, _UPGRADE_RESUMED = 1, 2, 3


class ServerState:
    """What every connection of one listener shares."""

    __slots__ = (
        "access_log",
        "accounts",
        "auth",
        "catalog",
        "config",
        "connections",
        "draining",
        "facts",
        "limiter",
        "loop_time",
        "metering",
        "metrics",
        "model_routes",
        "new_request_id",
        "pool",
        "router",
        "waiting",
    )

    def __init__(
        self,
        config: Config,
        router: Router,
        pool: UpstreamPool,
        access_log: AccessLog,
        auth: Authenticator,
        limiter: RateLimiter,
        facts: FactSink,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.router = router
        self.pool = pool
        self.access_log = access_log
        self.auth = auth
        self.accounts = auth.accounts  # one table for the process's life: reloads rebind into it
        self.limiter = limiter
        self.facts = facts
        self.metrics = metrics if metrics is not None else Metrics()
        self.metering = config.usage.enabled
        self.model_routes = ModelRoutes(config.routes, dict(config.providers))
        self.catalog = ModelCatalog(config.upstream)  # started by serve, once listening
        self.loop_time = asyncio.get_running_loop().time
        self.waiting = Waiting(asyncio.get_running_loop())  # requests over a concurrency cap (admission.py)
        self.connections: set[ClientConnection] = set()
        self.draining = False
        # Unique across processes and restarts without a syscall per request: random prefix + counter.
        prefix = os.urandom(6).hex().encode("ascii")
        counter = itertools.count(1)
        self.new_request_id = lambda: b"%s%08x" % (prefix, next(counter))


class _StopParsing(Exception):
    """Raised from a parser callback after it queued an error: the rest of the bytes are not parsed."""


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_body_wire",
        "_completed",
        "_deadline",
        "_dispatching",
        "_framing_bytes",
        "_head_bytes",
        "_held",
        "_holding",
        "_parse_failed",
        "_parse_scheduled",
        "_parser",
        "_pending",
        "_reading_paused",
        "_send_deadline",
        "_stalled",
        "_upgrade_body",
        "active",
        "backpressure",
        "closed",
        "incoming",
        "loop",
        "peer",
        "state",
        "transport",
    )

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._deadline = Deadline(self.loop, self._on_deadline)
        self.backpressure = Backpressure()
        self.incoming: proxy.Exchange | None = None  # being parsed
        self._pending: deque[proxy.Exchange] = deque()  # parsed, waiting their turn
        self.active: proxy.Exchange | None = None  # being answered
        self._parse_failed = False
        self._reading_paused = False
        # Pipelining: while a request waits its turn, later reads are held here unparsed (at most
        # _HOLD_LIMIT, then reading pauses). Reading goes on meanwhile, so a client that leaves is
        # seen at once and its upstream aborted, pipelined request or not.
        self._holding = False
        self._held: bytearray | None = None
        self._parse_scheduled = False
        self._head_bytes = 0
        self._framing_bytes = 0  # bytes read in a body phase since the last body byte
        self._body_wire = 0  # bytes read in this body phase, framing included
        self._dispatching = False  # _run_pending is on the stack
        self._send_deadline: Deadline | None = None  # made on the first stall only
        self._stalled = False
        self._completed = 0  # messages parsed so far
        # An Upgrade request with a body, whose body llhttp skips (see on_headers_complete):
        # _UPGRADE_HEAD its head is parsed, _UPGRADE_ENDED llhttp ended it there, _UPGRADE_RESUMED a
        # fresh parser is reading a stand-in head of the same framing, then the body itself.
        self._upgrade_body = 0
        self.closed = False

    @property
    def draining(self) -> bool:
        return self.state.draining

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else None
        state = self.state
        server = state.config.server
        state.connections.add(self)
        transport.set_write_buffer_limits(high=server.write_buffer_high, low=server.write_buffer_low)
        if state.draining or len(state.connections) > server.max_connections:
            # Refuse the newcomer gracefully; connections already open are left untouched.
            code = "draining" if state.draining else "too_many_connections"
            error = EgressError(code, "egress is shutting down" if state.draining else "too many open connections")
            # Answered before any request is read, so never through the log phase: counted here,
            # the signal an operator alerts on under overload (egress_errors_total).
            state.metrics.tally.add(("errors", "none", code))
            transport.write(
                http1.simple_response(error.status, render_error(error, "openai"), state.new_request_id(), False)
            )
            self._close()
            return
        self._deadline.set(self.loop.time() + server.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._parse_failed or self.closed:
            return
        if self._holding:
            held = self._held
            if held is None:
                held = self._held = bytearray()
            held += data
            if len(held) > _HOLD_LIMIT and not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()
            return
        if len(data) > _SLICE:
            self._feed_slices(data)
            return
        # A read of at most one slice (most are a request or less): parsed here, with no call more.
        while True:
            completed_before = self._completed
            incoming = self.incoming
            body_before = incoming.body_size if incoming is not None else -1
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                # The upgrade request itself was accepted as a plain request (Upgrade is hop-by-hop and
                # never tunnelled); llhttp stops at it, so a fresh parser takes the bytes after it. A
                # loop, not a call per upgrade: one read can pipeline thousands (RecursionError, and
                # a connection left unanswered); a view, so the rest is never copied once per request.
                self._parser = httptools.HttpRequestParser(self)
                data = memoryview(data)[upgrade.args[0] :]
                if self._parse_failed or self.closed:
                    return
                if self._upgrade_body == _UPGRADE_ENDED:
                    # Its body comes next: the fresh parser reads it as the body of a stand-in head
                    # of the same framing, so chunked decoding and every limit apply as to any body.
                    self._upgrade_body = _UPGRADE_RESUMED
                    self._parser.feed_data(self._stand_in_head())
                continue
            except _StopParsing:
                return
            except httptools.HttpParserError as exc:
                if not self._parse_failed:
                    if isinstance(exc, httptools.HttpParserCallbackError) and exc.__context__ is not None:
                        self.log_internal_error(exc.__context__)  # a bug in a callback, not the client's fault
                        self._fail(EgressError("internal_error", "internal error while reading the request"))
                    else:
                        self._fail(_parser_error(exc))
                return
            break
        incoming = self.incoming
        if incoming is not None:
            if not incoming.head_done:
                if completed_before == self._completed:
                    # All of this read belongs to a head still incomplete (no message ended inside
                    # it): bound what llhttp buffers for us before it reaches our callbacks.
                    self._head_bytes += len(data)
                    server = self.state.config.server
                    if self._head_bytes > server.max_header_bytes + server.max_request_line_bytes:
                        self._fail(EgressError("headers_too_large", "request head too large"))
            else:
                server = self.state.config.server
                if incoming.body_size == body_before and completed_before == self._completed:
                    # A read of framing alone (chunk headers, extensions, trailers): llhttp and
                    # httptools accumulate a trailer field until it ends, so bound it as a head is.
                    self._framing_bytes += len(data)
                    if self._framing_bytes > server.max_header_bytes:
                        self._fail(EgressError("headers_too_large", "chunked framing or trailer section too large"))
                        return
                else:
                    self._framing_bytes = 0
                self._body_wire += len(data)
                if self._body_wire > 8 * incoming.body_size + 2 * server.max_header_bytes:
                    # Framing that outweighs the body: 1-byte chunks cost 6 bytes each, so past 8 x
                    # it is chunk extensions, which llhttp skips unseen and a client could send at
                    # line rate forever (node's CVE-2024-22019 caps them at 16 KiB per chunk).
                    self._fail(EgressError("body_too_large", "request body framing too large"))
                    return
                self._deadline.set(self.loop.time() + server.body_timeout)

    def _feed_slices(self, data: bytes) -> None:
        """A large read goes to the parser a slice at a time, so that once requests are left
        waiting (a pipelining client that does not read its answers) the rest is held unparsed: a
        256 KiB read of tiny requests would otherwise queue thousands of them at once."""
        view = memoryview(data)
        first = self._completed
        for start in range(0, len(view), _SLICE):
            self.data_received(view[start : start + _SLICE])  # parsed, or held once holding began
            if self._parse_failed or self.closed:
                return
            rest = view[start + _SLICE :]
            if not rest:
                return
            if not self._holding and self._completed - first >= _TURN_REQUESTS:
                # Enough requests from one read for one turn of the loop: the rest waits for the
                # next, so one pipelining client neither starves the others nor makes egress
                # answer (and log) tens of thousands of requests in one unbroken run.
                self._holding = True
                self._release_held()
            if self._holding:
                self.data_received(rest)  # held
                return

    def eof_received(self) -> bool:
        return False  # a client that half-closes is treated as gone, as nginx does by default

    def pause_writing(self) -> None:
        self.backpressure.pause()
        self._arm_send_deadline()

    def resume_writing(self) -> None:
        self.backpressure.resume()
        self._stalled = False
        self._send_deadline.clear()
        if self.closed:
            if self.transport.get_write_buffer_size():
                # Closing, with a tail still unsent: a client that read a little and stopped again
                # must not hold the connection open, as _close's deadline already made sure once.
                self._arm_send_deadline()
            return
        if self.active is None and self._pending:
            self._run_pending()  # the answers that waited for the client to read

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._deadline.cancel()
        if self._send_deadline is not None:
            self._send_deadline.cancel()
        self.state.connections.discard(self)
        if self.active is not None:
            self.active.client_left()
        if self._pending or (self.incoming is not None and self.incoming.head_done):
            self._log_abandoned()

    # -- httptools callbacks: record state only --------------------------------------------
    def on_message_begin(self) -> None:
        if self._upgrade_body:
            return  # the stand-in head before an Upgrade request's body: that request goes on
        self._body_wire = 0
        exchange = proxy.Exchange(self, self.state.new_request_id(), time.monotonic())
        self.incoming = exchange
        if self.active is None and not self._pending:
            self._deadline.set(self.loop.time() + self.state.config.server.header_timeout)

    def on_url(self, url: bytes) -> None:
        if self._upgrade_body:
            return
        incoming = self.incoming
        incoming.target += url
        if len(incoming.target) > self.state.config.server.max_request_line_bytes:
            self._fail(EgressError("uri_too_long", "request target too long"))
            raise _StopParsing

    def on_header(self, name: bytes, value: bytes) -> None:
        # Limits are checked once the head is complete: until then `data_received` bounds what a
        # head in progress can hold to the limits plus one read.
        self.incoming.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._upgrade_body:
            self._upgrade_body = 0  # the stand-in head is over: its body is the Upgrade request's
            return
        exchange = self.incoming
        exchange.head_done = True
        self._head_bytes = 0
        parser = self._parser
        state = self.state
        server = state.config.server
        raw_headers = exchange.raw_headers
        exchange.raw_headers = http1.DISCARD_FIELDS  # trailers, if any, are dropped
        method = parser.get_method()
        exchange.method = method
        exchange.head_request = method == b"HEAD"  # before any refusal: an answer to HEAD has no body
        if len(raw_headers) > server.max_header_count:
            self._fail(EgressError("headers_too_large", f"more than {server.max_header_count} header fields"))
            raise _StopParsing
        if sum(map(len, itertools.chain.from_iterable(raw_headers))) + 4 * len(raw_headers) > server.max_header_bytes:
            self._fail(EgressError("headers_too_large", "request header fields too large"))
            raise _StopParsing
        version = parser.get_http_version()
        exchange.http11 = version == "1.1"
        try:
            facts = http1.inspect_request(raw_headers, version)
        except EgressError as error:
            self._fail(error)
            raise _StopParsing from None
        exchange.facts = facts
        exchange.keep_alive = parser.should_keep_alive() and not facts.close_requested
        target = exchange.target
        if method == b"CONNECT":
            self._fail(EgressError("method_not_allowed", "CONNECT is not supported"))
            raise _StopParsing
        if facts.content_length is not None and facts.content_length > server.max_body_bytes:
            self._fail(EgressError("body_too_large", f"request body exceeds {server.max_body_bytes} bytes"))
            raise _StopParsing
        if target == HEALTH_PATH:
            exchange.health_check = True
        else:
            try:
                # The unified surface authenticates once its body names the model (surface.py).
                proxy.take_route(exchange, state.router.resolve(target))
            except EgressError as error:
                if exchange.route is None:
                    exchange.dialect = guess_dialect(target, facts.has_anthropic_headers)
                exchange.error = error  # answered in turn, after the body is read and discarded
            if state.draining:
                exchange.error = EgressError("draining", "egress is shutting down")
        if facts.expect_continue:
            if exchange.error is not None:
                # Answer now instead of inviting a body we would discard (RFC 9110 §10.1.1).
                self._fail(exchange.error)
                raise _StopParsing
            if self.active is None and not self._pending:
                self.transport.write(_CONTINUE)
            else:
                exchange.continue_owed = True
        if (facts.chunked or facts.content_length) and parser.should_upgrade():
            # An Upgrade egress ignores (RFC 9110 §7.8: a server MAY), as nginx does and Envoy does
            # for h2c: Java's HttpClient and `curl --http2` put `Upgrade: h2c` on a plain-http POST.
            # httptools makes llhttp skip such a request's body and end the message at its head
            # (on_message_complete, then HttpParserUpgrade): the body is read on (data_received).
            self._upgrade_body = _UPGRADE_HEAD
        # The body deadline is set by data_received if this read ends before the body does.

    def on_body(self, body: bytes) -> None:
        exchange = self.incoming
        exchange.body_size += len(body)
        if exchange.body_size > self.state.config.server.max_body_bytes:
            self._fail(EgressError("body_too_large", "request body too large"))
            raise _StopParsing
        if exchange.error is None:
            exchange.body = http1.grow(exchange.body, body)

    def on_message_complete(self) -> None:
        if self._upgrade_body:
            self._upgrade_body = _UPGRADE_ENDED  # llhttp's end of an Upgrade request, before its body
            return
        exchange = self.incoming
        self.incoming = None
        self._completed += 1
        self._framing_bytes = 0
        self._pending.append(exchange)
        if self.active is None:
            self._run_pending()
        else:
            self._holding = True  # pipelined: later reads wait, unparsed, until its turn comes

    # -- running exchanges -----------------------------------------------------------------
    def _run_pending(self) -> None:
        if self._dispatching:
            # An answer egress gives itself finishes inside this loop and lands here again: the
            # loop below takes the next one. Recursing instead cost ~5 frames per pipelined
            # request, and ~200 queued /healthz behind one upstream request hit RecursionError.
            return
        self._dispatching = True
        try:
            # Not while the client's write buffer is over its high mark: a client that pipelines and
            # never reads would have egress answer (and buffer) without end. resume_writing goes on.
            while self.active is None and self._pending and not self.closed and not self.backpressure.client_paused:
                exchange = self._pending.popleft()
                self.active = exchange
                self._deadline.clear()
                if exchange.error is not None:
                    proxy.respond_error(exchange, exchange.error)
                elif exchange.health_check:
                    proxy.respond_health(exchange)
                else:
                    self.loop.call_soon(proxy.forward, exchange)
        except Exception as exc:
            # A bug while answering: the exchange it left active may never finish, and everything
            # queued behind it would wait forever (a RecursionError here once left a pipelining
            # client unanswered and unclosed). The connection is closed instead, never left hanging.
            self._dispatching = False
            self.log_internal_error(exc)
            self._parse_failed = True
            self._close()
            return
        self._dispatching = False
        if self._pending:
            self._holding = True
        elif self._holding and not self._parse_failed and not self.closed:
            self._release_held()

    def _release_held(self) -> None:
        """The pipeline is empty: the reads held meanwhile are parsed on the loop's next turn (not
        from inside this call, which may be inside the parser's own callback), and reading goes on."""
        if not self._parse_scheduled:
            self._parse_scheduled = True
            self.loop.call_soon(self._parse_held)

    def _parse_held(self) -> None:
        self._parse_scheduled = False
        if self.closed or self._parse_failed or self.active is not None or self._pending:
            return  # still busy: the pipeline's end (_run_pending) schedules this again
        self._holding = False
        held, self._held = self._held, None
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        if held:
            self.data_received(bytes(held))

    def exchange_finished(self, exchange: proxy.Exchange) -> None:
        """Called by the log phase once the exchange's response is fully written or abandoned."""
        self.active = None
        if self.closed:
            return
        if not exchange.keep_alive or (self.state.draining and not self._pending):
            self._close()
            return
        self._run_pending()
        if self.active is None and not self.closed and not self._pending:
            # Only once the pipeline is empty (answers held back while the client reads slowly
            # still wait in it): the next request's deadline, and its owed 100 Continue, are its
            # own turn's, never ahead of an earlier request's answer.
            server = self.state.config.server
            incoming = self.incoming
            if incoming is None:
                self._deadline.set(self.loop.time() + server.keepalive_timeout)
            elif not incoming.head_done:
                self._deadline.set(self.loop.time() + server.header_timeout)
            else:
                self._deadline.set(self.loop.time() + server.body_timeout)
                if incoming.continue_owed:
                    incoming.continue_owed = False
                    self.transport.write(_CONTINUE)

    def _log_abandoned(self) -> None:
        """Requests read but never answered when the client left (queued behind the one running, or
        their body still arriving): each gets its log phase as client_gone, as the running one does.
        A request whose head was read is a request (authenticated, counted by the limiter): without
        this it had no access-log line and no count, as nginx logs one cut mid-body (400)."""
        abandoned = list(self._pending)
        self._pending.clear()
        incoming = self.incoming
        if incoming is not None and incoming.head_done:
            self.incoming = None
            abandoned.append(incoming)
        for exchange in abandoned:
            exchange.client_gone = True
            exchange.outcome = "client_gone"
            exchange.settled = True
            try:
                proxy.finish(exchange)
            except Exception as exc:  # one bad line must not cost the others theirs
                self.log_internal_error(exc)

    def cut(self) -> None:
        """End the connection after what is buffered, without completing the response."""
        self._close()

    def close_if_idle(self) -> bool:
        if self.active is None and not self._pending and self.incoming is None:
            self._close()
            return True
        return False

    def log_internal_error(self, exc: BaseException) -> None:
        log_event("internal_error", error=type(exc).__name__, detail=str(exc)[:200])

    # -- internals -------------------------------------------------------------------------
    def _stand_in_head(self) -> bytes:
        """A head framed as the Upgrade request being read, for the parser that reads its body."""
        facts = self.incoming.facts
        if facts.chunked:
            return b"POST / HTTP/1.1\r\nhost: egress\r\ntransfer-encoding: chunked\r\n\r\n"
        return b"POST / HTTP/1.1\r\nhost: egress\r\ncontent-length: %d\r\n\r\n" % facts.content_length

    def _fail(self, error: EgressError) -> None:
        """Queue a final error response for the request being parsed; parse nothing after it."""
        self._parse_failed = True
        self._upgrade_body = 0
        exchange = self.incoming
        if exchange is None:
            exchange = proxy.Exchange(self, self.state.new_request_id(), time.monotonic())
            exchange.dialect = "openai"
        elif exchange.route is None:
            # Refused before it was routed (a head too large, a Content-Length over the cap, a
            # timeout): still in the caller's dialect, as the same error later in the body is.
            exchange.dialect = self._dialect_of(exchange)
        self.incoming = None
        exchange.error = error
        exchange.keep_alive = False
        exchange.body = b""
        self._pending.append(exchange)
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        if self.active is None:
            self._run_pending()

    def _dialect_of(self, exchange: proxy.Exchange) -> str:
        """The dialect of the provider the target names, else a guess (providers.guess_dialect)."""
        try:
            return self.state.router.resolve(exchange.target).provider.dialect
        except EgressError:
            facts = exchange.facts
            return guess_dialect(exchange.target, facts is not None and facts.has_anthropic_headers)

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self._deadline.cancel()
            transport = self.transport
            transport.close()  # waits for the write buffer to drain: the send deadline bounds that
            if transport.get_write_buffer_size() and not self._stalled:
                self._arm_send_deadline()  # below the high mark, but a client that never reads still holds it

    def _arm_send_deadline(self) -> None:
        self._stalled = True
        deadline = self._send_deadline
        if deadline is None:
            deadline = self._send_deadline = Deadline(self.loop, self._on_send_deadline)
        deadline.set(self.loop.time() + self.state.config.server.send_timeout)

    def _on_send_deadline(self) -> None:
        if self._stalled:
            # The client stopped reading: nothing written for send_timeout. abort(), not close():
            # close() would wait for a buffer this client will never drain.
            self.transport.abort()

    def _on_deadline(self) -> None:
        if self.closed or self.active is not None or self._pending:
            return  # a request still to answer: send_timeout bounds a client that does not read
        incoming = self.incoming
        if incoming is None:
            self._close()  # idle keep-alive, or a fresh connection that never spoke
            return
        what = "request body" if incoming is not None and incoming.head_done else "request head"
        self._fail(EgressError("request_timeout", f"timed out reading the {what}"))


def _parser_error(exc: Exception) -> EgressError:
    reason = str(exc) or type(exc).__name__
    if "HTTP version" in reason:
        return EgressError("http_version_not_supported", "unsupported HTTP version")
    # llhttp's reasons name the rule that broke ("Invalid header value char"), never the bytes.
    return EgressError("bad_request", f"malformed HTTP request: {reason}")

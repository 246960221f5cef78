"""The request phases, in their fixed order, over one per-request context (`Exchange`).

    authenticate      BYO: the caller's credential passes through untouched (virtual keys plug in here)
    select upstream   done while parsing: `Router.resolve` fills `exchange.route` (providers.py)
    upstream request  `forward`: take a pooled connection (or connect), write head + body (upstream.py)
    upstream response `Exchange.upstream_head`: filter hop-by-hop, choose framing, write one header block
    response chunk    `Exchange.upstream_body`: the same bytes object goes to the client; chunked
                      framing is regenerated around it, never parsed or copied
    end of stream     `Exchange.upstream_end` / `upstream_failed`: a cut upstream cuts the client too
    settle            `Exchange.settle`: return the connection, retry once, or answer the error
    log               `finish` always runs, once, after the response is written, with the error if any

Everything runs in the callbacks of the two connections, with no task or future per request: a
coroutine exists only while a new upstream connection is being opened.

A phase that returns a response ends the request early (errors, /healthz).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson

from egress import accesslog, admission, http1, retries, surface
from egress.batch_urls import BatchUrlFilter
from egress.errors import EgressError, render_error
from egress.hints import HINT_NAMES
from egress.http1 import CHUNKED, NO_BODY, UNTIL_CLOSE
from egress.metrics import sse_events
from egress.routes import body_models, check_model, has_model_policy, path_model
from egress.stream_usage import InjectedUsageFilter, inject_include_usage
from egress.usage import (
    ANTHROPIC_BATCH,
    ANTHROPIC_BATCH_RESULTS,
    MISSING,
    MODEL_FIELD,
    OPENAI,
    PARTIAL,
    READ_BACK,
    BatchResultsMeter,
    Usage,
    UsageMeter,
    batch_id_of,
)

if TYPE_CHECKING:
    import asyncio

    from egress.accounts import Account
    from egress.providers import Origin, Route
    from egress.server import ClientConnection, ServerState
    from egress.surface import Fallbacks
    from egress.upstream import UpstreamConnection, UpstreamPool
    from egress.vkeys import Claims


_ID_NAMES = frozenset(http1.UPSTREAM_ID_NAMES)
_HINT_AND_ID_NAMES = HINT_NAMES | _ID_NAMES

# Relayed bytes beyond this are written without waiting for the end of the loop turn.
_WRITE_AT_ONCE = 64 * 1024
# A filtered body's first read past this is transformed and written in two steps (upstream_body).
_FIRST_SLICE = 2048
# What one relayed part holds beside its bytes (the bytes object, its chunk header and CRLF).
_PART_COST = 128


class Exchange:
    """One request and its response: every phase's per-request state lives here."""

    __slots__ = (
        "account",
        "asked_model",
        "attempt",
        "body",
        "body_filter",
        "body_size",
        "bytes_out",
        "claims",
        "client",
        "client_gone",
        "continue_owed",
        "dialect",
        "error",
        "events",
        "facts",
        "fallbacks",
        "flush_scheduled",
        "framing",
        "gate",
        "head_done",
        "head_request",
        "head_sent",
        "health_check",
        "held",
        "hold_timer",
        "http11",
        "identity",
        "keep_alive",
        "lease",
        "limit_slots",
        "meter",
        "method",
        "out",
        "out_size",
        "outcome",
        "provider_elapsed",
        "raw_headers",
        "request",
        "request_id",
        "route",
        "sent_at",
        "settled",
        "sse_end",
        "started",
        "status",
        "streamed",
        "target",
        "tries",
        "ttfb",
        "turn_at",
        "upstream",
        "upstream_done",
        "upstream_kept",
        "upstream_time",
        "upstream_ttfb",
        "upstream_until_close",
    )

    def __init__(self, client: ClientConnection, request_id: bytes, started: float) -> None:
        self.client = client
        self.request_id = request_id
        self.started = started
        self.target = b""
        self.method = b""
        self.http11 = True
        self.keep_alive = False
        self.head_done = False
        self.head_request = False
        self.health_check = False
        self.raw_headers: http1.Headers = []  # until the head is complete; then a sink for trailers
        self.facts: http1.RequestFacts | None = None
        self.body_size = 0
        self.body: bytes | bytearray = b""  # a bytearray once it arrived in more than one read
        self.continue_owed = False
        self.route: Route | None = None
        self.claims: Claims | None = None  # set when a virtual key verified
        self.lease: object | None = None  # the PoolRotation whose key this request sends (auth.py)
        self.identity: bytes | None = None  # who is limited and billed: kid, or BYO key hash
        self.limit_slots: tuple[int, ...] | None = None
        self.dialect = "openai"
        # The model the caller asked for, when the surface sends the provider another name
        # (`provider:model`, a fallback, a translation): the fact's `requested_model`.
        self.asked_model: str | None = None
        self.error: EgressError | None = None
        # response side
        self.out: list[bytes] = []  # bytes for the client, written at the end of the loop turn
        self.out_size = 0
        self.meter: UsageMeter | None = None  # watches a 2xx JSON or SSE body go by
        # The response-body filter seam: None on passthrough. `head(status, content_type) -> bool`
        # (stay on?), `feed(bytes) -> bytes`, `finish() -> bytes`, `extra_headers`. Set when egress
        # asked for stream usage (InjectedUsageFilter) or translates (surface.TranslatedChat).
        self.body_filter = None
        self.status = 0
        self.framing = NO_BODY
        self.head_sent = False
        # A pooled 2xx stream's first bytes, held back until its first event shows it is no error
        # (retries.first_event); None otherwise, and once released.
        self.held: bytearray | None = None
        self.hold_timer: asyncio.TimerHandle | None = None  # the deadline of `held` (retries.py)
        self.bytes_out = 0
        self.ttfb: float | None = None  # request start -> the response head, which goes out at once
        # When the request, whole, had its turn on the connection (forward): before it, the caller's
        # upload and its pipeline's wait, which are no part of egress's overhead.
        self.turn_at = 0.0
        # The provider's own part: the request written (the last attempt) -> its head, -> its end.
        self.sent_at = 0.0
        self.upstream_ttfb: float | None = None
        self.upstream_time: float | None = None
        # The provider's time on attempts dropped for a retry: part of upstream_time, never overhead.
        self.provider_elapsed = 0.0
        # The head's hint and id headers (http1.inspect_response's `kept`): the provider's id for
        # its response is read off them in the log phase, only when something logs it.
        self.upstream_kept: http1.Headers | tuple = ()
        self.streamed = False  # an SSE response
        self.events = 0  # SSE events sent to the caller, and the last bytes they were counted to
        self.sse_end = b""
        self.upstream: UpstreamConnection | None = None
        self.upstream_until_close = False
        self.request: list[bytes] | None = None  # head and body as written upstream, kept for a retry
        self.attempt = 0
        # Upstream attempts across accounts (x-egress-attempts), and the account this one uses:
        # None for a BYO key, which is never moved to another account.
        self.tries = 0
        self.account: Account | None = None
        self.gate = 0  # the provider's concurrency gate this request holds a place in (admission.py)
        self.fallbacks: Fallbacks | None = None  # a pooled request on a route with fallbacks
        self.flush_scheduled = False
        self.upstream_done = False  # the response is complete; settled once it is written
        self.settled = False
        self.client_gone = False
        self.outcome = "complete"

    # -- phases driven by the upstream connection ------------------------------------------
    @property
    def path(self) -> bytes:
        """The request target without its query string (which may carry a credential), for the log
        and the fact. A target refused as malformed is logged too: without its `#fragment`, and an
        absolute-form one (`http://user:key@host/...`) without its userinfo."""
        path = self.target.split(b"?", 1)[0]
        if path[:1] != b"/" or b"#" in path:
            path = _without_credentials(path)
        return path

    def upstream_head(self, status: int, headers: http1.Headers) -> None:
        if self.account is None:
            # Raises upstream_protocol_error: nothing relayed yet.
            facts = http1.inspect_response(headers, _ID_NAMES)
        else:
            # The rate-limit hints are picked out in the same pass over the head.
            facts = http1.inspect_response(headers, _HINT_AND_ID_NAMES)
            sent = self.sent_at  # answered() may send the request again, from a new sent_at
            if retries.answered(self, status, facts.kept):
                self.provider_elapsed += time.monotonic() - sent  # the provider's time, not overhead
                return  # not relayed: the request goes to another account (retries.py)
            if status in retries.DISABLE_STATUSES:
                # The provider refused the pool key (its account's billing), not the caller: the
                # caller gets egress's own answer; the operator, account_disabled. A 401's body is
                # held and judged first (retries.refused): OpenAI's quotes the key ("Incorrect API
                # key provided: sk-proj-****wxyz", a short key whole).
                raise EgressError(
                    "pool_key_refused",
                    f"{self.route.provider.name} refused egress's key for it ({status}); the operator is told",
                )
        self.upstream_kept = facts.kept  # the provider's response id is among them, read if logged
        content_length = facts.content_length
        if status == 204:
            content_length = None  # RFC 9110 §8.6: never in a 204, whatever the upstream sent
        headers = facts.headers
        upstream_length = content_length
        body_filter = self.body_filter
        if body_filter is not None:
            if body_filter.head(status, facts.content_type, facts.kept):
                content_length = None  # the filter changes the body's length: reframe
                if body_filter.extra_headers:
                    headers = headers + list(body_filter.extra_headers)
            else:
                self.body_filter = None
        framing = http1.response_framing(status, self.head_request, content_length, self.http11)
        # The upstream's own framing: a filter reframes a Content-Length body as chunked, and a cut
        # in it must still be a cut, not the close that ends an unframed body.
        self.upstream_until_close = framing in (CHUNKED, UNTIL_CLOSE) and not facts.chunked and upstream_length is None
        client = self.client
        if framing == UNTIL_CLOSE or client.draining:
            self.keep_alive = False
        # Only a POST generates tokens: a GET of a stored response (`/v1/responses/{id}`, a chat
        # completion read back) carries the usage of the request that made it, billed already. But
        # a background response's tokens come only in the GETs that poll it, and a batch's in the
        # GET that finds it done or reads its results: those are read too, and billed once per id
        # (emit_usage, the report).
        if (
            200 <= status < 300
            and client.state.metering
            and (self.method == b"POST" or (self.method == b"GET" and self.route.api in READ_BACK))
        ):
            api = self.route.api
            if api == ANTHROPIC_BATCH_RESULTS:
                meter = BatchResultsMeter(batch_id_of(self.route.upstream_target.split(b"?", 1)[0]))
            else:
                meter = UsageMeter()
            meter.start(api, facts.content_type, facts.content_encoding)
            if meter.active:
                self.meter = meter
        self.status = status
        self.framing = framing
        self.head_sent = True
        now = time.monotonic()
        self.upstream_ttfb = now - self.sent_at
        self.streamed = facts.content_type.startswith(b"text/event-stream")
        self.out.append(
            http1.response_head(
                status, headers, framing, content_length, self.request_id, self.keep_alive, self.http11, self.tries
            )
        )
        if self.account is not None and framing != NO_BODY:
            retries.hold_stream(self, status)
        if self.held is None:
            self.ttfb = now - self.started
        # else: the caller gets the head once the first event is judged (retries.unhold sets it)

    def upstream_body(self, data: bytes) -> None:
        if self.held is not None:
            retries.held_body(self, data)
            return
        meter = self.meter
        if meter is not None:
            meter.feed(data)  # the provider's bytes, usage chunk included
        body_filter = self.body_filter
        if body_filter is not None:
            if not self.bytes_out and len(data) > _FIRST_SLICE:
                # A first read holding much of a stream: its first events go out before the rest
                # is transformed, so the first token does not wait for the last (a transcoder
                # takes microseconds per event).
                first = body_filter.feed(data[:_FIRST_SLICE])
                data = data[_FIRST_SLICE:]
                if first:
                    self._emit(first)
                    self.flush()
            data = body_filter.feed(data)
            if not data:
                return  # never an empty chunk: in chunked framing it would end the body
        self._emit(data)

    def _emit(self, data: bytes) -> None:
        self.bytes_out += len(data)
        if self.streamed:
            events, self.sse_end = sse_events(self.sse_end, data)
            self.events += events
        # Counted with what each part costs in memory, not only its bytes: an upstream sending
        # 1-byte chunks would otherwise queue three objects per byte until the end of the turn.
        self.out_size += len(data) + _PART_COST
        framing = self.framing
        if framing == CHUNKED:
            self.out += (b"%x\r\n" % len(data), data, b"\r\n")
        elif framing != NO_BODY:
            self.out.append(data)

    def upstream_read_done(self) -> None:
        """An upstream read was relayed into `out`: write it once this loop turn's reads are done.

        Writing at the end of the turn puts the turn's writes to one peer back to back: one wake-up
        of the reader instead of one per response (ARCHITECTURE.md, "Writes wait for the end of the
        loop turn"). A large body is written at once:
        it gains nothing from waiting, and the client's write-buffer mark must see it to pause the
        upstream before the next read (libuv reads a socket up to 32 times per turn).
        """
        if self.held is not None:
            return  # nothing goes out while a stream's first event is awaited
        if self.out_size >= _WRITE_AT_ONCE or (self.streamed and not self.upstream_done):
            # A stream's events go out as they come: the turn has no other write to the same peer
            # to wait for, and a paced stream saves a callback per event.
            self.flush()
            if not self.upstream_done:
                return
            # The last read was a large one: the exchange still settles at the end of the turn.
            # It used to stay unsettled until the client left, so a kept-alive connection never
            # took its next request and the log said client_gone.
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.client.loop.call_soon(self._end_of_turn)

    def _end_of_turn(self) -> None:
        self.flush_scheduled = False
        if self.settled:
            return
        self.flush()
        if self.upstream_done:
            self.settle(None)

    def flush(self) -> None:
        """One vectored write for everything relayed since the last one: head, chunks, terminator.

        Halves the send syscalls of a small response (head and body in one writev) with no copy.
        """
        out = self.out
        if out:
            self.client.transport.writelines(out)
            out.clear()
            self.out_size = 0

    def upstream_end(self) -> None:
        if self.held is not None:
            if retries.refused(self):
                return  # a 401 refusing the pool key: another account, or egress's own answer
            retries.release(self)  # the whole stream came before its first event was judged
        if self.body_filter is not None:
            try:
                rest = self.body_filter.finish()
            except EgressError as error:  # the filter found the body cut short: so is the client's
                self.upstream_failed(error)
                return
            except Exception as exc:  # a bug must cost this response, never leave its caller waiting
                self.client.log_internal_error(exc)
                self.upstream_failed(EgressError("internal_error", f"internal error ({type(exc).__name__})"))
                return
            if rest:
                self._emit(rest)
        if self.framing == CHUNKED:
            self.out.append(b"0\r\n\r\n")
        self.upstream_done = True
        self.upstream_time = time.monotonic() - self.sent_at + self.provider_elapsed
        self.upstream_read_done()

    def upstream_failed(self, error: EgressError) -> None:
        held = self.held
        if held is not None:
            if held.__class__ is not retries.Refusal:
                retries.release(self)
            elif held.status == 401:
                self.forget_response()  # a 401 cut before it could be judged: never relayed
            elif retries.answered_late(self):
                return  # a 429's or a 400's body cut: its head said what it was (sent again, as then)
            else:
                retries.release(self)  # relayed as far as it came, then cut, as an error never held
        if self.head_sent:
            # Mid-response: the client must see a truncated body, never a clean end.
            self.flush()
            self.outcome = "upstream_cut"
            self.error = error  # the log line's code: why it was cut (a timeout, a reset, bad framing)
            self.keep_alive = False
            self.client.cut()
        self.settle(error)

    def client_left(self) -> None:
        if self.settled:
            return
        body_filter = self.body_filter
        meter = self.meter
        if not self.out and (
            body_filter.answered
            if body_filter is not None
            else meter is not None and self.upstream_ttfb is not None and meter.done_sent
        ):
            # The caller had its whole answer and closed, as the OpenAI SDK does at [DONE], before
            # the provider's terminating chunk: a complete response (outcome and usage), though
            # the provider's tail goes unread and its connection is not pooled.
            upstream = self.upstream
            if upstream is not None and not self.upstream_done:
                upstream.exchange = None
                upstream.abort()
            self.settle(None)
            return
        self.client_gone = True
        self.outcome = "client_gone"
        if self.held is not None:  # its head was held (retries.hold_stream): the caller got nothing
            retries.abandoned(self)  # a 429 still cools its account, by its head's hints
            self.head_sent = False
            retries.unhold(self)
            self.status = 0
        upstream = self.upstream
        if upstream is not None and not self.upstream_done:
            upstream.exchange = None  # its close must not report back to an exchange already settled
            upstream.abort()  # the provider stops generating for nobody
        self.settle(None)

    def forget_response(self) -> None:
        """The answer so far is dropped before any byte of it left (a retry): as if none came."""
        self.provider_elapsed += time.monotonic() - self.sent_at  # the provider's, not egress's
        self.head_sent = False
        retries.unhold(self)
        self.status = 0
        self.framing = NO_BODY
        self.out.clear()
        self.out_size = 0
        self.meter = None
        self.ttfb = self.upstream_ttfb = None
        self.upstream_kept = ()
        self.bytes_out = 0
        self.events = 0
        self.sse_end = b""
        self.upstream_until_close = False

    def settle(self, failure: EgressError | None, unsent: bool = False) -> None:
        """The upstream's part is over: return its connection, retry once, or answer; then log.
        `unsent`: the failure came before this attempt's request was written (its connect)."""
        if self.settled:
            return
        upstream = self.upstream
        self.upstream = None
        client = self.client
        client.backpressure.detach()
        if failure is not None and self.attempt == 1 and _safe_to_retry(self, upstream):
            # On a new connection, never another pooled one: when an upstream's keep-alive timer
            # closes its idle connections, their FINs are in flight together, and the next pooled
            # one is as likely to be closing (RFC 9112 §9.3.1).
            self.attempt = 2
            self.provider_elapsed += time.monotonic() - self.sent_at
            dispatch(self, fresh=True)
            return
        if (
            failure is not None
            and not self.head_sent
            and not self.client_gone
            # Once the provider sent a byte of its answer, it had the request: sent again, a POST
            # would be generated and billed twice (retries happen before the first byte only).
            and (upstream is None or not upstream.received_any)
            and retries.failed(self, failure, unsent)
        ):
            if self.sent_at:
                self.provider_elapsed += time.monotonic() - self.sent_at  # the failed attempt's wait
            return  # sent again, to another account or after a back-off (retries.py)
        self.settled = True
        try:
            if failure is None:
                if upstream is not None:
                    client.state.pool.release(upstream)  # kept only if complete and still open
            elif not self.head_sent and not self.client_gone:
                respond_error(self, failure)
                return
            finish(self)
        except Exception as exc:  # a bug must cost one request, not the connection's callbacks
            client.log_internal_error(exc)
            client.cut()


def _safe_to_retry(exchange: Exchange, upstream: UpstreamConnection | None) -> bool:
    # A pooled connection the provider closed while idle fails with a reset or EOF before any
    # byte: the request never reached it, so one retry on a fresh connection is safe (what browsers
    # do too). A timeout is never retried: the provider may be generating, and a replay would bill
    # twice and make the caller wait twice.
    return (
        upstream is not None
        and upstream.reused
        and not upstream.received_any
        and not upstream.timed_out
        and not exchange.head_sent
        and not exchange.client_gone
    )


def take_route(exchange: Exchange, route: Route) -> None:
    """The head phase's part once a request has its route: its dialect, and for a provider's route
    (not the unified surface's, which waits for the body's model) the credential and the limit.
    Raises the EgressError to answer. The server's head phase and surface.prepare's drop-in alike."""
    exchange.route = route
    exchange.dialect = route.provider.dialect
    if route.surface is None:
        state = exchange.client.state
        state.auth.authenticate(exchange, route.provider)
        if state.limiter.enabled:
            state.limiter.admit(exchange, route.provider.name, state.loop_time())


def forward(exchange: Exchange) -> None:
    """The upstream request phase for one routed request, when its turn on the connection comes."""
    if exchange.settled:
        # Its client left between the turn being given (call_soon) and now, and client_left logged
        # it: sent on, it would take a place under the caps that nothing gives back, and a pooled
        # connection, for an answer no one bills.
        return
    exchange.turn_at = time.monotonic()
    try:
        if exchange.route.surface is not None and not surface.prepare(exchange):
            return  # answered: the model list, or an error
        route = exchange.route
        # A provider's route, or a surface path's request sent as the drop-in sends it (surface.prepare).
        if route.surface is None and has_model_policy(route.provider, exchange.claims):
            error = _passthrough_model_refused(exchange)
            if error is not None:
                respond_error(exchange, error)
                return
        # The select-account phase: a pooled request's account, a capped provider's place.
        if (exchange.lease is not None or exchange.route.provider.max_concurrent) and not admission.admit(exchange):
            return  # answered, or waiting for a place (admission.Waiting sends it on)
        send_first(exchange)
    except Exception as exc:  # a bug must cost one request, not the process
        exchange.client.log_internal_error(exc)
        respond_error(exchange, EgressError("internal_error", f"internal error ({type(exc).__name__})"))


def send_first(exchange: Exchange) -> None:
    exchange.request = upstream_request(exchange)
    exchange.attempt = 1
    exchange.tries = 1
    dispatch(exchange)


def _passthrough_model_refused(exchange: Exchange) -> EgressError | None:
    """The same model policy on a provider-prefixed request: every model its body names, read as
    the provider reads them (routes.body_models). A body whose models can't be read is refused:
    under a policy, a model hidden past a regular expression's sight must not pass as no model."""
    types = [value for name, value in exchange.facts.forward_headers if name == b"content-type"]
    if len(types) > 1:
        # A singleton field (RFC 9110 §8.3): which one the provider reads (gunicorn: the last) is
        # not which one the policy would; a form read with the other boundary would hide a model.
        return EgressError("model_not_permitted", "a model policy applies here, and the request has two Content-Types")
    models = body_models(exchange.body, types[0] if types else b"")
    named = path_model(exchange.path)
    if named is not None and models is not None:
        models.append(named)  # `/v1/models/{id}` read or deleted (a fine-tuned model's DELETE)
    if models is None:
        return EgressError(
            "model_not_permitted",
            "a model policy applies here, and this body's model can't be read (send JSON or a multipart form)",
        )
    try:
        for model in models:
            check_model(exchange.route.provider, model, exchange.claims)
    except EgressError as error:
        return error
    return None


def upstream_request(exchange: Exchange) -> list[bytes]:
    client = exchange.client
    route = exchange.route
    body = exchange.body
    provider = route.provider
    headers = exchange.facts.forward_headers
    if route.api == ANTHROPIC_BATCH and provider.dialect == "anthropic" and exchange.method in (b"GET", b"POST"):
        # A batch object (its POST, a GET, the list, a cancel): its results_url made relative, so
        # the SDKs read the results through egress, metered and with egress's key (batch_urls.py).
        exchange.body_filter = BatchUrlFilter(provider.origin)
        headers = http1.identity_only(headers)  # JSON it can edit
    elif (
        client.state.metering
        and provider.stream_usage == "include_usage"
        and provider.inject_stream_usage
        and exchange.method == b"POST"
        and exchange.path.endswith(b"/chat/completions")
    ):
        injected = inject_include_usage(body)
        if injected is not None:
            body = injected
            exchange.body_filter = InjectedUsageFilter()
            # The filter edits the stream's bytes, which it can't do inside gzip: ask for identity
            # (always acceptable, RFC 9110 §12.5.3), so the caller gets the stream it asked for.
            headers = http1.identity_only(headers)
    send_length = len(body) if (body or exchange.method in (b"POST", b"PUT", b"PATCH")) else None
    head = http1.upstream_request_head(
        exchange.method, route.upstream_target, provider.origin.host_header, headers, send_length
    )
    return [head, body] if body else [head]


def dispatch(exchange: Exchange, fresh: bool = False) -> None:
    """Send the request on an idle pooled connection, or on a new one (always, when `fresh`)."""
    pool = exchange.client.state.pool
    origin = exchange.route.provider.origin
    upstream = None if fresh else pool.take_idle(origin)
    if upstream is None:
        exchange.client.loop.create_task(_connect_then_send(exchange, pool, origin))
    else:
        _send(exchange, upstream)


async def _connect_then_send(exchange: Exchange, pool: UpstreamPool, origin: Origin) -> None:
    try:
        upstream = await pool.connect(origin)
    except EgressError as error:
        exchange.settle(error, unsent=True)
        return
    except Exception as exc:  # a bug must cost one request, not the process
        exchange.client.log_internal_error(exc)
        exchange.settle(EgressError("internal_error", f"internal error ({type(exc).__name__})"))
        return
    if exchange.settled:  # the client left while egress was connecting
        upstream.close()
        return
    _send(exchange, upstream)


def _send(exchange: Exchange, upstream: UpstreamConnection) -> None:
    exchange.sent_at = time.monotonic()
    exchange.upstream = upstream
    exchange.client.backpressure.attach(upstream.transport)
    upstream.send(exchange, exchange.request)


def respond_error(exchange: Exchange, error: EgressError) -> None:
    exchange.error = error
    if error.kind.closes:
        exchange.keep_alive = False
    respond(exchange, error.status, render_error(error, exchange.dialect), error.headers)


def respond_health(exchange: Exchange) -> None:
    if exchange.client.draining:
        respond_error(exchange, EgressError("draining", "egress is shutting down"))
        return
    denyset = exchange.client.state.auth.denyset
    age = denyset.age_seconds()
    document = {
        "status": "ok",
        "deny_set": {
            "size": len(denyset),
            "stream_connected": denyset.connected,
            "age_seconds": round(age, 3) if age is not None else None,
        },
    }
    respond(exchange, 200, orjson.dumps(document))


def respond(exchange: Exchange, status: int, body: bytes, extra_headers: tuple = ()) -> None:
    exchange.status = status
    exchange.head_sent = True
    exchange.bytes_out = 0 if exchange.head_request else len(body)  # a HEAD's answer has no body
    exchange.ttfb = time.monotonic() - exchange.started  # egress's own answer: its head goes now
    exchange.client.transport.write(
        http1.simple_response(
            status,
            body,
            exchange.request_id,
            exchange.keep_alive,
            exchange.http11,
            head_request=exchange.head_request,
            extra_headers=extra_headers,
            attempts=exchange.tries,
        )
    )
    finish(exchange)


def finish(exchange: Exchange) -> None:
    """The log phase: runs exactly once per request, after its response is written or abandoned."""
    client = exchange.client
    state = client.state
    if exchange.account is not None:
        state.accounts.end(exchange.account, exchange.gate)
        state.waiting.released()
    elif exchange.gate:
        state.accounts.leave(exchange.gate)
        state.waiting.released()
    total = time.monotonic() - exchange.started
    # Sent to the provider: it may have generated, whatever came back (a client gone before the
    # answer gets a fact too, its usage missing for `no_answer`).
    billable = exchange.sent_at != 0.0 and state.metering
    if state.access_log.enabled or billable:
        # Shared by the access-log line and the usage fact. Milliseconds via int(): round() formats
        # the float to round it, a measurable cost at this rate.
        ts = int(time.time() * 1000) / 1000
        request_id = exchange.request_id.decode("ascii")
        path = exchange.path.decode("latin-1")
        ttfb_ms = int(exchange.ttfb * 1_000_000) / 1000 if exchange.ttfb is not None else None
        total_ms = int(total * 1_000_000) / 1000
        claims = exchange.claims
        kid, sub = (claims.kid, claims.sub) if claims is not None else (None, None)
        facts = exchange.facts
        ids = (_text(facts.request_id) if facts is not None else None, _text(upstream_id(exchange.upstream_kept)))
        if state.access_log.enabled:
            route = exchange.route
            error = exchange.error
            state.access_log.write(
                {
                    "ts": ts,
                    "request_id": request_id,
                    "worker": accesslog.WORKER,
                    "client": client.peer,
                    "method": exchange.method.decode("latin-1"),
                    "provider": route.provider.name if route is not None else None,
                    # The key id and subject of a virtual key: who to bill, never the key itself.
                    "kid": kid,
                    "sub": sub,
                    # The path only: a query string may carry a credential (?key=...) and never reaches logs.
                    "path": path,
                    "status": exchange.status,
                    "code": error.code if error is not None else None,
                    "outcome": exchange.outcome,
                    "bytes_in": exchange.body_size,
                    "bytes_out": exchange.bytes_out,
                    "ttfb_ms": ttfb_ms,
                    "total_ms": total_ms,
                    "client_request_id": ids[0],
                    "upstream_request_id": ids[1],
                }
            )
        if billable:
            emit_usage(exchange, state, ts, request_id, path, kid, sub, ttfb_ms, total_ms, ids)
    # After the fact and the line: a fault in a metric must never cost the bill.
    state.metrics.observe(exchange, total)
    client.exchange_finished(exchange)


def _without_credentials(path: bytes) -> bytes:
    path = path.split(b"#", 1)[0]
    if path[:1] == b"/":
        return path
    scheme, separator, rest = path.partition(b"://")
    if not separator:  # authority-form (CONNECT's host:port)
        scheme, rest = b"", scheme
    authority, slash, tail = rest.partition(b"/")
    return scheme + separator + authority.rpartition(b"@")[2] + slash + tail


def upstream_id(kept: http1.Headers | tuple) -> bytes | None:
    """The provider's response id among the head's kept headers, by UPSTREAM_ID_NAMES' order."""
    if not kept:
        return None
    found = dict(kept)
    for name in http1.UPSTREAM_ID_NAMES:
        value = found.get(name)
        if value is not None:
            return value
    return None


def _text(value: bytes | None) -> str | None:
    """An id for a log line or a fact: as sent (latin-1, never failing), at most MAX_ID_BYTES."""
    return value[: http1.MAX_ID_BYTES].decode("latin-1") if value is not None else None


def requested_model(body: bytes | bytearray) -> str | None:
    """The `model` a JSON request body names, found without parsing it: the usage fact's, on the
    log phase's budget. The model policy reads every model as the provider would (routes.body_models)."""
    found = MODEL_FIELD.search(body, 0, 65536) if body else None
    return found.group(1).decode("utf-8", "replace") if found is not None else None


def _missing_reason(exchange: Exchange, usage: Usage, meter: UsageMeter | None) -> str | None:
    """Why a response carried no usage, where egress can tell (the billing contract's reasons)."""
    if meter is None:
        if exchange.method != b"POST":
            return "not_metered"
        return "no_answer" if exchange.upstream_ttfb is None else usage.reason
    if meter.api == OPENAI and meter.streaming and exchange.body_filter is None:
        if exchange.route.provider.stream_usage != "always":
            return "not_requested"  # this provider's chat streams carry usage only when asked
    elif usage.background:
        # `background: true`, still queued or running: the POST answers at once; the tokens are
        # generated later and reported by the GET that finds it done (or a stream resumed by GET).
        return "background"
    return usage.reason


def emit_usage(
    exchange: Exchange,
    state: ServerState,
    ts: float,
    request_id: str,
    path: str,
    kid: str | None,
    sub: str | None,
    ttfb_ms: float,
    total_ms: float,
    ids: tuple[str | None, str | None],
) -> None:
    """The meter's reading becomes one usage fact and feeds the token limit; after the response.

    `ids`: the caller's X-Request-Id and the provider's id for its response, as the access log has them.
    """
    meter = exchange.meter
    # Complete when the provider's response was, even if the client left before the last write.
    # (or when the caller had its whole answer and closed before the provider's last bytes)
    usage = meter.result(exchange.upstream_done or exchange.outcome == "complete") if meter is not None else Usage()
    row = exchange.route.provider
    provider = row.name
    if meter is not None and exchange.method != b"POST" and not usage.background and not usage.batch:
        usage = Usage(reason="not_metered")  # a stored response read back: its POST billed it
    elif usage.state == MISSING:
        usage.reason = _missing_reason(exchange, usage, meter)
    identity = exchange.identity or state.limiter.identity(exchange)
    state.facts.emit(
        {
            "ts": ts,
            "request_id": request_id,
            "identity": identity.decode("ascii") if identity is not None else None,
            "kid": kid,
            "subject": sub,
            "provider": provider,
            "surface": exchange.route.surface or "passthrough",
            "path": path,
            "requested_model": exchange.asked_model or requested_model(exchange.body),
            "model": usage.model,
            "usage": usage.state,
            "input_tokens": usage.input_tokens,
            "output_tokens": usage.output_tokens,
            "cache_read_tokens": usage.cache_read_tokens,
            "cache_creation_tokens": usage.cache_creation_tokens,
            "cache_creation_5m_tokens": usage.cache_creation_5m_tokens,
            "cache_creation_1h_tokens": usage.cache_creation_1h_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "estimated_output_tokens": usage.estimated_output_tokens,
            "provider_cost": usage.provider_cost,
            "web_search_requests": usage.web_search_requests,
            # Every fact of one background response (its POST, each GET, a cancel) carries its id:
            # bill its tokens once per id, from a complete fact if there is one (the usage report does).
            "background_response_id": usage.response_id if usage.background else None,
            # Every fact of one batch (its POST, each GET, its results read, a cancel) carries its
            # id: bill its tokens once per id, from a complete fact when there is one (the report).
            "batch_id": usage.response_id if usage.batch else None,
            "usage_reason": usage.reason,
            "status": exchange.status,
            "stream": meter is not None and meter.streaming,
            "outcome": exchange.outcome,
            "ttfb_ms": ttfb_ms,
            "total_ms": total_ms,
            "client_request_id": ids[0],
            "upstream_request_id": ids[1],
        }
    )
    # After the fact: what feeds the limit and the metrics must never cost the bill.
    tokens = usage.total_tokens
    if usage.state == PARTIAL and usage.input_tokens is None:
        # A stream cut before its usage: the limit still takes its prompt, estimated from the body
        # (about four bytes a token), or cutting streams would spend a token limit for free. The
        # fact says what is known, no estimate of input.
        tokens += len(exchange.body) >> 2
    if not usage.batch:
        # A batch's tokens were generated over hours at the provider, at its batch rate, and every
        # read of them repeats them: charged to a per-minute limit at the read, a large batch shut
        # its caller out for an hour after reading its own results.
        state.limiter.record_tokens(exchange, tokens, state.loop_time())
    state.metrics.observe_usage(provider, usage)

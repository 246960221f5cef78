"""Retries before the first byte, across a provider's accounts (accounts.py).

Contract, for the proxy phases:
  `answered(exchange, status, headers) -> bool` runs first in the upstream-response phase of a
      request that carries a pool key (`exchange.account`). It records the response's quota hints on
      the account (successes too), cools it on 429/503/529 (the provider's hint up to `[accounts]
      max_cooldown`, else a jittered default: hints.cooldown), disables it on a 402 (a 401 is
      judged on its body: `refused`; so are a 429 and a 400, which may say the account's billing
      is spent: `billing_spent`, and are cooled or retried only then, or as their status says once
      their body is too long, cut, or not whole within `first_event_timeout`, or its caller left:
      `abandoned`, cooled then but never sent again), and returns True when this
      response is dropped and the request sent again: to the account with the most headroom at
      once, or to the same account after a jittered back-off when no other one is usable and this
      one is not cooling (a 500, 502, 504). Nothing has reached the caller then, so nothing is
      replayed twice. The provider's `x-should-retry` on an error overrules the status,
      as in the SDKs: `false`, the answer goes to the caller (the account still cools or is
      disabled); `true`, it is retried.
  `failed(exchange, error) -> bool` runs when the upstream failed before any response byte: a
      connect failure or a reset is retried the same way; a timeout never is (the provider may be
      generating). A BYO key is never moved to another account: only its connect failure, where
      nothing was sent, is retried, to the same provider.
Limits: `[accounts] max_attempts` counts every attempt of one request, and the host-wide budget
(`AccountTable.may_retry`) stops storms. When either runs out, the last upstream response goes to
the caller unchanged: status, body and the provider's retry headers (a 429 stays a 429); but a
refusal of the pool key itself (a 402, a 401 about the key, a spent billing) is egress's own 502
`pool_key_refused`: the provider's body is about egress's key, and OpenAI's 401 quotes it.
"""

from __future__ import annotations

import random
import time
from typing import TYPE_CHECKING

import orjson

from egress import admission, proxy
from egress.accesslog import log_event
from egress.accounts import BUSY, HEALTHY
from egress.errors import EgressError
from egress.hints import RateHints, cooldown, read_hints, should_retry

if TYPE_CHECKING:
    from egress.accounts import Account
    from egress.proxy import Exchange

RETRY_STATUSES = {
    429: "rate_limited",
    500: "server_error",
    502: "server_error",
    503: "unavailable",
    504: "server_error",
    529: "overloaded",  # Anthropic's overloaded_error: https://docs.anthropic.com/en/api/errors
}
# The provider refuses this key itself: no use sending it more traffic until the operator acts. A
# 401 is not among them: it is judged on its body (refused), as a restricted key's missing scope for
# one endpoint is a 401 too, and disabling every account for it would let any caller take the
# provider down. A 403 is about what was asked (a model the project can't use, a region): relayed.
DISABLE_STATUSES = {402: "payment_required"}
# Answers whose body is judged before anything is done with them (hold_stream, refused): a 401 may
# refuse the key itself or only this request (key_refused); a 429 or a 400 may say the account's
# billing is spent (billing_spent), which no cooldown mends.
_JUDGED = frozenset((400, 401, 429))
_BACKOFF_BASE = 0.1
_BACKOFF_CAP = 2.0


def answered(exchange: Exchange, status: int, headers: list[tuple[bytes, bytes]]) -> bool:
    state = exchange.client.state
    table = state.accounts
    account = exchange.account
    table.heard(account)  # its answer came: in the quota the provider reports from now on
    wall = time.time()
    hints = read_hints(headers, wall)  # the head's hint headers alone (http1.inspect_response keeps them)
    if hints.remaining or hints.limit:
        table.observe(account, hints, time.monotonic(), wall, state.config.accounts.max_cooldown)
    if status < 400:
        table.succeeded(account)
        state.metrics.tally.add(("attempts", account.provider, account.id, "success"))
        return False
    if status != 401 and status in _JUDGED and not exchange.head_request:
        return False  # held (hold_stream) and judged at its end (refused): cooled and retried only then
    return _error(exchange, account, status, headers, hints)


def _error(exchange: Exchange, account: Account, status: int, headers, hints: RateHints) -> bool:
    """An error answer on `account`: cool it, disable it, send the request again (True), or not."""
    state = exchange.client.state
    table = state.accounts
    wall = time.time()
    # egress stands in for the SDKs, which obey the provider's x-should-retry before the status:
    # openai-python src/openai/_base_client.py:932-941 and anthropic-sdk-python
    # src/anthropic/_base_client.py:940-949, `_should_retry` ("If the server explicitly says whether
    # or not to retry, obey"). `false`: the answer goes back, sent nowhere else; the account still
    # cools or is disabled, which is about the key, not this request. `true`: retried like a 5xx.
    told = should_retry(headers)
    now = time.monotonic()
    reason = RETRY_STATUSES.get(status)
    if reason is None:
        reason = DISABLE_STATUSES.get(status)
        if reason is None:
            if told is not True:
                state.metrics.tally.add(("attempts", account.provider, account.id, "not_retryable"))
                return False
        else:
            _disable(exchange, account, reason, status)  # the attempt's outcome: counted there
    else:
        bound = state.config.accounts.max_cooldown
        seconds = cooldown(status, hints, table.failures(account), random.random(), bound)
        table.failed(account, reason, wall)
        if seconds is not None:
            table.cool(account, seconds, reason, now)
    disabled = status in DISABLE_STATUSES
    if told is False:
        if not disabled:
            state.metrics.tally.add(("attempts", account.provider, account.id, "not_retryable"))
        return False
    return _again(exchange, account, now, counted=disabled)


def failed(exchange: Exchange, error: EgressError, unsent: bool = False) -> bool:
    """An attempt failed with no answer: sent again (True) or not. `unsent`: it failed connecting,
    so the provider never saw it. A connect that timed out is a connect failure (Envoy's
    `connect-failure` covers it) but goes only elsewhere, to a fallback: the provider's other
    accounts share its host, and they, or the same one again, would wait as long."""
    account = exchange.account
    if account is not None:
        exchange.client.state.accounts.heard(account)  # this attempt is over, with no answer
    code = error.code
    connecting = unsent or code == "upstream_connect_error"
    if not connecting and code != "upstream_protocol_error":
        return False  # a read timeout: the provider may be generating, and a replay would bill twice
    elsewhere = unsent and code == "upstream_timeout"
    if account is None:
        if not connecting or elsewhere:
            return False  # a BYO request may have reached the provider: never sent twice
    else:
        reason = "connect_error" if connecting else "reset"
        exchange.client.state.accounts.failed(account, reason, time.time())
    return _again(exchange, account, time.monotonic(), elsewhere)


def _again(
    exchange: Exchange, account: Account | None, now: float, elsewhere: bool = False, counted: bool = False
) -> bool:
    """Send the request again: to another account, the next fallback, or (unless `elsewhere`) the
    same account after a back-off. False when it can't be (attempts, budget, nowhere to go).
    `counted`: the attempt's outcome is tallied already (account_disabled), and not again here: each
    attempt counts once in egress_upstream_attempts_total, whose outcomes add up to the attempts."""
    state = exchange.client.state
    table = state.accounts
    config = state.config.accounts
    label = (exchange.route.provider.name, account.id if account is not None else "byo")
    tally = _no_tally if counted else state.metrics.tally.add
    if exchange.tries >= config.max_attempts or exchange.client_gone:
        tally(("attempts", *label, "retry_exhausted"))
        return False
    if not table.may_retry(now, count=False):
        tally(("attempts", *label, "retry_exhausted"))
        state.metrics.tally.add(("retry_budget_exhausted",))
        return False
    delay = 0.0
    moved = False
    if account is not None:
        # Another account of the provider, within its caps; else the route's next fallback.
        pool = exchange.lease
        following = None if elsewhere else table.take(pool.accounts, now, exclude=(account,), retry=True, gate=0)
        if following is not None and following is not BUSY:
            table.end(account)  # the provider's gate place stays with the request
            state.waiting.released()  # the account's place: a waiter here takes it now, not at its next poll
            exchange.account = following
            name = following.header[0]
            facts = exchange.facts
            facts.forward_headers = [header for header in facts.forward_headers if header[0] != name]
            facts.forward_headers.append(following.credential())
            moved = True
        elif admission.fall_back(exchange, retry=True):
            moved = True
        elif elsewhere or table.state_of(account, now) != HEALTHY:
            tally(("attempts", *label, "retry_exhausted"))
            return False  # every account is cooling or spent: the provider's own answer goes back
    table.may_retry(now)  # counted now that it is sure (checked above, before anything moved)
    if not moved and account is not None:
        table.resend(account)  # sent to it again: awaiting an answer once more
    if not moved:
        delay = random.uniform(0.5, 1.0) * min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (exchange.tries - 1))
    tally(("attempts", *label, "retry_scheduled"))
    upstream = exchange.upstream
    exchange.upstream = None
    if upstream is not None:
        upstream.exchange = None  # what it still reads belongs to an answer nobody will see
        upstream.abort()
    exchange.client.backpressure.detach()
    # Made again for every attempt, the same account's too: with it the response filter the request
    # is owed (the injected usage's, a batch's results_url), which the dropped answer's head turned
    # off when it was no 2xx (Exchange.upstream_head), and fresh for an answer that starts anew.
    exchange.request = proxy.upstream_request(exchange)
    exchange.tries += 1
    exchange.attempt = 1
    loop = exchange.client.loop
    # Never from inside the failed connection's own callbacks.
    if delay:
        loop.call_later(delay, _send_again, exchange)
    else:
        loop.call_soon(_send_again, exchange)
    return True


def _no_tally(key: tuple) -> None:
    pass


def _send_again(exchange: Exchange) -> None:
    if exchange.settled or exchange.client_gone:
        return
    proxy.dispatch(exchange)


# -- a 200 stream whose first event is an error (LiteLLM #24004, Bifrost #2917) -----------------
# A pooled 2xx SSE response is held, head included, until its first event: an error event there
# (Anthropic's `event: error`, an OpenAI-style `data: {"error": …}`) is the provider failing before
# the answer began, so it is retried like a 529. Held at most `first_event_timeout` seconds and
# `_HOLD_LIMIT` bytes; then whatever came is relayed as it is.
_HOLD_LIMIT = 64 * 1024


class Refusal(bytearray):
    """A held error's body (`exchange.held`), read whole before the key is judged (refused): a 401's
    (never relayed before it is judged: it may quote the key), a 429's or a 400's."""

    __slots__ = ("status",)


def hold_stream(exchange: Exchange, status: int) -> None:
    if status in _JUDGED:
        held = exchange.held = Refusal()
        held.status = status
        if status == 401:
            return  # never relayed unjudged: its deadline is the read's own
        # A 429's or a 400's body slower than a first event: judged by its status (_hold_expired), as
        # one too long to judge is. Unbounded, a body that never ended held the caller for the read
        # idle timeout (300 s) and a 504, where its head had sent the request to the next account.
    elif not (200 <= status < 300 and exchange.streamed):
        return
    else:
        exchange.held = bytearray()
    timeout = exchange.client.state.config.accounts.first_event_timeout
    exchange.hold_timer = exchange.client.loop.call_later(timeout, _hold_expired, exchange, exchange.tries)


def held_body(exchange: Exchange, data: bytes) -> None:
    held = exchange.held
    if held.__class__ is Refusal:
        if len(held) + len(data) <= _HOLD_LIMIT:
            held += data
            return
        if held.status != 401:
            # No spent billing is told at this length: an answer about the request, or a rate. It
            # does what its status says (answered_late), else goes to the caller as it comes.
            if answered_late(exchange):
                return
            release(exchange)
            exchange.upstream_body(data)
            exchange.upstream_read_done()
            return
        # No provider's 401 is this long: not relayed (a part of it would misframe the body, the
        # whole might quote the key), and the key not judged on it.
        upstream = exchange.upstream
        exchange.upstream = None
        if upstream is not None:
            upstream.exchange = None
            upstream.abort()
        exchange.upstream_failed(EgressError("upstream_protocol_error", "the provider's 401 had a body over 64 KiB"))
        return
    if held:
        held += data
        buffer = held
    else:
        # Most often the first event is whole in the first read: judged where it lies, and relayed
        # as it came, with no copy of a read that may hold the whole stream.
        buffer = data
    verdict = first_event(buffer)
    if verdict is None and len(buffer) < _HOLD_LIMIT:
        if buffer is data:
            held += data
        return
    if verdict == "error" and _stream_failed(exchange):
        return
    if buffer is data:
        unhold(exchange)
        exchange.upstream_body(data)
    else:
        release(exchange)
    exchange.upstream_read_done()


def refused(exchange: Exchange) -> bool:
    """At the end of a held error (proxy.Exchange.upstream_end): True when the body says the key
    itself is refused (a 401: key_refused) or its account's billing is spent (a 429 or a 400:
    billing_spent); the account is disabled, and the request goes to another account or is
    answered `pool_key_refused` (its body, which may quote the key, never relayed). A 429 or a
    400 that says neither does what its status says (answered_late): True when it is retried.
    False for any other hold, for a 401 about this request alone (a restricted key's missing
    scope), and for an error not retried: relayed as it came (the account untouched, or cooled)."""
    held = exchange.held
    if held.__class__ is not Refusal:
        return False
    status = held.status
    if status == 401:
        if not key_refused(held):
            return False
        reason = "unauthorized"
    elif billing_spent(held):
        reason = "billing_spent"
    else:
        return answered_late(exchange)
    state = exchange.client.state
    account = exchange.account
    _disable(exchange, account, reason, status)
    told = should_retry(exchange.upstream_kept)  # the provider's x-should-retry, as in answered
    exchange.forget_response()
    if told is not False and _again(exchange, account, time.monotonic(), counted=True):
        return True
    upstream = exchange.upstream  # whole and well framed: back to the pool
    exchange.upstream = None
    if upstream is not None:
        state.pool.release(upstream)
    exchange.client.backpressure.detach()
    exchange.settled = True
    if exchange.client_gone:
        proxy.finish(exchange)
    else:
        name = exchange.route.provider.name
        why = "401" if status == 401 else f"{status}: its billing is spent"
        error = EgressError("pool_key_refused", f"{name} refused egress's key for it ({why}); the operator is told")
        proxy.respond_error(exchange, error)
    return True


def answered_late(exchange: Exchange) -> bool:
    """A held 429 or 400 that spends no billing, or whose body is not whole (too long, too slow, cut):
    what `answered` does at a head, done now (cooled, retried). True when the request went again:
    this answer is dropped. Safe after any part of its body: the status says nothing was generated."""
    kept = exchange.upstream_kept
    if not _error(exchange, exchange.account, exchange.held.status, kept, read_hints(kept, time.time())):
        return False
    exchange.forget_response()
    return True


def abandoned(exchange: Exchange) -> None:
    """The caller left while a 429's or a 400's body was held (proxy.Exchange.client_left): what its
    head says of the account is done now, as `answered` does at a head (a 429 cools it, for the
    provider's retry-after); left to the body's judgment, it was lost, and the next request met the
    provider's 429 again. Nothing is sent again (`_again` sends nothing for a caller gone), and a
    spent billing, told only by the whole body, is not judged. A held 401 is judged whole or not at all."""
    held = exchange.held
    if held.__class__ is Refusal and held.status != 401:
        kept = exchange.upstream_kept
        _error(exchange, exchange.account, held.status, kept, read_hints(kept, time.time()))


def _disable(exchange: Exchange, account: Account, reason: str, status: int) -> None:
    """The provider refused `account` itself (its key, its billing): out until a reload."""
    state = exchange.client.state
    if state.accounts.disable(account, reason):
        log_event("account_disabled", provider=account.provider, account=account.id, status=status, reason=reason)
    state.accounts.failed(account, reason, time.time())
    state.metrics.tally.add(("attempts", account.provider, account.id, "account_disabled"))


# OpenAI: a 429 whose code (or, in older answers, type) is insufficient_quota, "You exceeded your
# current quota, please check your plan and billing details": "you have hit your maximum monthly
# spend (hard limit)" or used up the credits (https://help.openai.com/en/articles/6891831; the body:
# plexpt/chatgpt-java#249). Anthropic: a 400 invalid_request_error, "Your credit balance is too
# low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."
# (anthropics/claude-code#4208, #66314), or, for a workspace's spend limit, "You have reached your
# specified API usage limits. You will regain access on 2026-04-01 at 00:00 UTC."
# (anthropics/claude-code#2127); https://docs.anthropic.com/en/api/errors lists a 402
# billing_error too, disabled by its status alone. Either way only the operator mends it.
_SPENT_CODE = "insufficient_quota"
_SPENT_MESSAGES = ("your credit balance is too low", "you have reached your specified api usage limits")


def billing_spent(body: bytes | bytearray) -> bool:
    """Whether an error's body says the account's billing is spent (sans-IO): never for a body egress
    can't read, which may be any proxy's rate limit page."""
    try:
        document = orjson.loads(bytes(body))  # orjson takes no subclass of bytearray (Refusal)
    except orjson.JSONDecodeError:
        return False
    error = document.get("error") if isinstance(document, dict) else None
    if not isinstance(error, dict):
        return False
    if error.get("code") == _SPENT_CODE or error.get("type") == _SPENT_CODE:
        return True
    # Anthropic's, by its message's start: some providers' 400 messages quote what the caller sent,
    # but after their own words, so no caller can word a request into disabling the pool's keys.
    message = error.get("message")
    return (
        error.get("type") == "invalid_request_error"
        and isinstance(message, str)
        and message.lower().startswith(_SPENT_MESSAGES)
    )


def key_refused(body: bytes | bytearray) -> bool:
    """Whether a 401's body refuses the key itself (sans-IO). Not when it names a permission this
    one request lacks: OpenAI's restricted keys answer "You have insufficient permissions for this
    operation. Missing scopes: api.responses.write" (code null) for an endpoint outside their scopes
    (continuedev/continue#10059), where a revoked key says `invalid_api_key`. A body egress can't
    read refuses the key, as the status says."""
    try:
        document = orjson.loads(bytes(body))  # orjson takes no subclass of bytearray (Refusal)
    except orjson.JSONDecodeError:
        return True
    error = document.get("error") if isinstance(document, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str):
        return True
    message = message.lower()
    return "missing scopes" not in message and "insufficient permissions" not in message


def release(exchange: Exchange) -> None:
    """Relay what was held, as it came, and carry on relaying."""
    held = exchange.held
    unhold(exchange)
    if held:
        exchange.upstream_body(bytes(held))


def unhold(exchange: Exchange) -> None:
    """Nothing held any more: the deadline goes too. Left to fire, it kept the exchange (its body,
    its request) alive for `first_event_timeout` after every pooled stream began."""
    exchange.held = None
    if exchange.head_sent and exchange.ttfb is None:
        # The head goes to the caller now, with the first event: that is its time to first byte.
        exchange.ttfb = time.monotonic() - exchange.started
    timer = exchange.hold_timer
    if timer is not None:
        exchange.hold_timer = None
        timer.cancel()


def _hold_expired(exchange: Exchange, tries: int) -> None:
    held = exchange.held
    if held is None or exchange.settled or exchange.tries != tries:
        return
    if held.__class__ is Refusal and answered_late(exchange):
        return
    release(exchange)
    exchange.upstream_read_done()


def first_event(buffer: bytes | bytearray) -> str | None:
    """ "error" or "ok" once the first event with data is whole in `buffer`; None before (sans-IO)."""
    start = 0
    while True:
        end = _event_end(buffer, start)
        if end is None:
            return None
        event = bytes(buffer[start:end])
        lines = event.splitlines()
        start = end
        data = [line[5:].strip() for line in lines if line.startswith(b"data:")]
        if not data:
            continue  # comments (": ping", ": OPENROUTER PROCESSING") say nothing yet
        if b"event:" in event:  # a named event (Anthropic's); OpenAI's streams name none
            names = [line[6:].strip() for line in lines if line.startswith(b"event:")]
            if b"error" in names:
                return "error"
            # Anthropic: "Event streams may also include any number of ping events"
            # (https://docs.anthropic.com/en/docs/build-with-claude/streaming): one before message_start
            # says nothing of the answer, and judged "ok" it let the error after it reach the caller.
            if b"ping" in names:
                continue
        try:
            document = orjson.loads(b"\n".join(data))
        except orjson.JSONDecodeError:
            return "ok"
        if isinstance(document, dict):
            if "error" in document or document.get("type") == "error":
                return "error"
            if document.get("type") == "ping":
                continue
        return "ok"


def _event_end(buffer: bytes | bytearray, start: int) -> int | None:
    lf = buffer.find(b"\n\n", start)
    # A CRLF blank line is looked for only before the first LF one: a stream whose lines end in LF
    # is not scanned to its end for one it never has (a read may hold the whole stream).
    crlf = buffer.find(b"\r\n\r\n", start, len(buffer) if lf < 0 else lf + 4)
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf + 4
    return lf + 2 if lf >= 0 else None


def _stream_failed(exchange: Exchange) -> bool:
    state = exchange.client.state
    table = state.accounts
    account = exchange.account
    now = time.monotonic()
    # Its 200 head counted as a success (answered) and cleared the account's consecutive failures:
    # they count again, or an account whose every stream began with an error never backed off.
    table.relapsed(account)
    bound = state.config.accounts.max_cooldown
    seconds = cooldown(529, RateHints(), table.failures(account), random.random(), bound)
    table.failed(account, "stream_error", time.time())
    table.cool(account, seconds, "stream_error", now)
    if not _again(exchange, account, now):
        return False
    exchange.forget_response()
    return True

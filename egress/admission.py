"""The select-account phase: which account a pooled request sends with, within the concurrency caps,
and the fallbacks of its model route when the provider has no account left.

Contract, for the proxy phases:
  `admit(exchange) -> bool` runs in the upstream-request phase (proxy.forward), after the surface
      prepared the request and before it is written, for a request that carries a pool
      (`exchange.lease`: a virtual key) or goes to a provider with `max_concurrent`. A passthrough
      request with neither never comes here. True: go on: the account is taken (in flight, its
      credential in the forward headers) and the provider's gate entered, in one step under the
      accounts' lock, so the caps hold across workers. False: the request was answered here, or
      it waits, with a ticket in its provider's line (accounts.py): the `Waiting` queue of this
      process sends it on (`proxy.send_first`) when a slot frees and no older ticket of any worker
      is out, answers 503 `provider_busy` with Retry-After after the provider's `queue_timeout`, and
      drops it silently if the caller left meanwhile (its log phase already ran). While anyone
      waits, a new request waits too: it never takes the place an older one is owed.
  `fall_back(exchange, retry) -> bool`: the exchange moves to the next fallback of its model route
      that can serve it (surface.aim: capabilities, the model policy with the caller's key,
      translation) and has an account free now; False when none is left. A BYO key never falls
      back: it is the caller's key for one provider.
No account usable (cooling, disabled, spent) and no fallback: 429 `all_accounts_cooling` with
Retry-After, or 503 `all_accounts_disabled`. A busy provider is waited for, not fallen back from,
until the queue timeout; then the fallbacks are tried before `provider_busy`.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING

from egress.accounts import BUSY
from egress.auth import no_account_error
from egress.errors import EgressError

if TYPE_CHECKING:
    import asyncio

    from egress.proxy import Exchange

OK = "ok"
_NO_GATE = (0, 0)
# How often waiting requests look for a slot freed in another worker (a release in this worker
# wakes them at once). Only the oldest request of the host may take it, so a place freed in
# another worker stays empty until its next look: at most this long.
_POLL = 0.01


def take(exchange: Exchange, now: float, retry: bool = False, ticket: float = 0.0) -> object:
    """OK (the account and gate are the exchange's now), BUSY, or None (no account usable).
    `ticket`: the request's place in the provider's line, when it waits (accounts.AccountTable.wait)."""
    state = exchange.client.state
    table = state.accounts
    pool = exchange.lease
    gate, cap = _gate(exchange)
    if pool is None:
        if gate and not table.enter(gate, cap, ticket):
            return BUSY
        exchange.gate = gate
        return OK
    account = table.take(pool.accounts, now, (), retry, gate, cap, ticket)
    if account is None or account is BUSY:
        return account
    exchange.account = account
    exchange.gate = gate if cap else 0  # a place held in the provider's count, given back at the end
    facts = exchange.facts
    facts.forward_headers = [*facts.forward_headers, account.credential()]
    return OK


def _gate(exchange: Exchange) -> tuple[int, int]:
    """The provider's slot (its line) and cap, as the config has them now.

    Not the pool the request was given (`exchange.lease`), which is the one of the config at its
    authentication: a request that waited from before a reload waited on under the cap the reload
    raised or lifted, and every request behind it in the line with it. The slot is the provider's,
    the same across reloads; a provider whose pool a reload removed keeps the lease's."""
    auth = exchange.client.state.auth
    name = exchange.route.provider.name
    pool = exchange.lease
    if pool is None:
        return auth.gates.get(name, _NO_GATE)
    current = auth.pools.get(name)
    return (current if current is not None else pool).gate


def _line(exchange: Exchange) -> int:
    """The provider's slot whose line this request waits in (0: none, it waits unordered)."""
    return _gate(exchange)[0]


def admit(exchange: Exchange) -> bool:
    now = time.monotonic()
    got = take(exchange, now)
    if got is OK:
        return True
    if got is None:
        if fall_back(exchange, retry=False):
            return True
        _answer(exchange, _no_account(exchange, now))
        return False
    provider = exchange.route.provider
    if provider.queue_timeout <= 0:
        _busy(exchange)
        return False
    state = exchange.client.state
    line = _line(exchange)
    state.waiting.add(exchange, now + provider.queue_timeout, line, state.accounts.wait(line) if line else 0.0)
    return False


def _no_account(exchange: Exchange, now: float) -> EgressError:
    table = exchange.client.state.accounts
    return no_account_error(table, exchange.lease.accounts, now)


def _busy(exchange: Exchange) -> None:
    """The queue timeout passed: a fallback, else 503 provider_busy."""
    if fall_back(exchange, retry=False):
        from egress import proxy

        proxy.send_first(exchange)
        return
    name = exchange.route.provider.name
    exchange.client.state.metrics.tally.add(("busy", name))
    _answer(
        exchange,
        EgressError(
            "provider_busy",
            f"{name} is at its concurrency limit; retry shortly",
            ((b"retry-after", b"1"),),
        ),
    )


def _answer(exchange: Exchange, error: EgressError) -> None:
    from egress import proxy

    proxy.respond_error(exchange, error)


def fall_back(exchange: Exchange, retry: bool) -> bool:
    fallbacks = exchange.fallbacks
    if fallbacks is None:
        return False
    from egress import surface

    state = exchange.client.state
    origin = exchange.route.provider.name
    held, gate = exchange.account, exchange.gate
    while fallbacks.remaining():
        saved = surface.aim_next(exchange, fallbacks)
        if saved is None:
            continue  # it can't serve this request
        if take(exchange, time.monotonic(), retry=retry) is OK:
            if held is not None:
                state.accounts.end(held, gate)
            elif gate:
                state.accounts.leave(gate)
            state.metrics.tally.add(("fallbacks", origin, exchange.route.provider.name))
            return True
        surface.restore(exchange, saved)  # no account free there now: the next one
    return False


class Waiting:
    """This process's requests waiting for a concurrency slot, oldest first across the host: each
    holds a ticket in its provider's line (accounts.py), and a place goes to the oldest ticket of
    every worker's, never to a request that came later (README: "waits up to queue_timeout, oldest
    first"). A release here wakes this process's waiters at once; one in another worker is seen
    by the next poll."""

    __slots__ = ("_loop", "_queue", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # (exchange, deadline, its provider's slot, its ticket there), in the order they came.
        self._queue: deque[tuple[Exchange, float, int, float]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, exchange: Exchange, deadline: float, line: int = 0, ticket: float = 0.0) -> None:
        self._queue.append((exchange, deadline, line, ticket))
        if self._timer is None:
            self._timer = self._loop.call_later(_POLL, self.wake)

    def released(self) -> None:
        """A slot was given back in this process: the oldest waiters try at once."""
        if self._queue:
            self._loop.call_soon(self.wake)

    def wake(self) -> None:
        from egress import proxy

        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = time.monotonic()
        still: deque[tuple[Exchange, float, int, float]] = deque()
        busy: set[object] = set()  # lines that refused this pass: later waiters in them wait on
        queue = self._queue
        self._queue = still
        while queue:
            entry = queue.popleft()
            exchange, deadline, line, ticket = entry
            table = exchange.client.state.accounts
            if exchange.settled or exchange.client_gone:
                if ticket:
                    table.unwait(line, ticket)  # the caller left: its log phase ran when it did
                continue
            key = line or exchange.route.provider.name
            try:
                got = BUSY if key in busy else take(exchange, now, ticket=ticket)
                if got is OK:
                    if ticket:
                        # Retired with the place taken, as a rule; but a reload that lifted the
                        # provider's cap lets take() pass with no gate, and the ticket would stay
                        # out in the shared line for good, refusing everyone after it.
                        table.unwait(line, ticket)
                    proxy.send_first(exchange)
                elif got is None or now >= deadline:
                    if ticket:
                        table.unwait(line, ticket)  # out of the line before a fallback is tried
                    if got is not None:
                        _busy(exchange)
                    elif fall_back(exchange, retry=False):
                        proxy.send_first(exchange)
                    else:
                        _answer(exchange, _no_account(exchange, now))
                else:
                    busy.add(key)
                    still.append(entry)
            except Exception as exc:  # a bug must cost one request, not every request waiting
                if ticket:
                    table.unwait(line, ticket)
                exchange.client.log_internal_error(exc)
                if not exchange.settled and not exchange.head_sent:
                    _answer(exchange, EgressError("internal_error", f"internal error ({type(exc).__name__})"))
        if self._queue and self._timer is None:
            self._timer = self._loop.call_later(_POLL, self.wake)

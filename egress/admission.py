"""The select-account phase: which account a pooled request sends with, within the concurrency caps,
and the fallbacks of its model route when the provider has no account left.

Contract, for the proxy phases:
  `admit(exchange) -> bool` runs in the upstream-request phase (proxy.forward), after the surface
      prepared the request and before it is written, for a request that carries a pool
      (`exchange.lease`: a virtual key) or goes to a provider with `max_concurrent`. A passthrough
      request with neither never comes here. True: go on: the account is taken (in flight, its
      credential in the forward headers) and the provider's gate entered, in one step under the
      accounts' lock, so the caps hold across workers. False: the request was answered here, or
      it waits: the `Waiting` queue of this process sends it on (`proxy.send_first`) when a slot
      frees, answers 503 `provider_busy` with Retry-After after the provider's `queue_timeout`, and
      drops it silently if the caller left meanwhile (its log phase already ran).
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
# How often waiting requests look for a slot freed in another worker (a release in this worker
# wakes them at once).
_POLL = 0.01


def take(exchange: Exchange, now: float, retry: bool = False) -> object:
    """OK (the account and gate are the exchange's now), BUSY, or None (no account usable)."""
    state = exchange.client.state
    provider = exchange.route.provider
    table = state.accounts
    gate, cap = state.auth.gates.get(provider.name, (0, 0)) if provider.max_concurrent else (0, 0)
    pool = exchange.lease
    if pool is None:
        if gate and not table.enter(gate, cap):
            return BUSY
        exchange.gate = gate
        return OK
    account = table.take(pool.accounts, now, retry=retry, gate=gate, cap=cap)
    if account is None or account is BUSY:
        return account
    exchange.account = account
    exchange.gate = gate
    exchange.facts.forward_headers = [*exchange.facts.forward_headers, account.credential()]
    return OK


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
    exchange.client.state.waiting.add(exchange, now + provider.queue_timeout)
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
    """This process's requests waiting for a concurrency slot, oldest first."""

    __slots__ = ("_loop", "_queue", "_timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: deque[tuple[Exchange, float]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, exchange: Exchange, deadline: float) -> None:
        self._queue.append((exchange, deadline))
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
        still: deque[tuple[Exchange, float]] = deque()
        busy: set[str] = set()  # providers that refused this pass: later waiters for them wait on
        queue = self._queue
        self._queue = still
        while queue:
            exchange, deadline = queue.popleft()
            if exchange.settled or exchange.client_gone:
                continue  # the caller left: its log phase ran when it did
            name = exchange.route.provider.name
            try:
                got = BUSY if name in busy else take(exchange, now)
                if got is OK:
                    proxy.send_first(exchange)
                elif got is None:
                    if fall_back(exchange, retry=False):
                        proxy.send_first(exchange)
                    else:
                        _answer(exchange, _no_account(exchange, now))
                elif now >= deadline:
                    _busy(exchange)
                else:
                    busy.add(name)
                    still.append((exchange, deadline))
            except Exception as exc:  # a bug must cost one request, not every request waiting
                exchange.client.log_internal_error(exc)
                if not exchange.settled and not exchange.head_sent:
                    _answer(exchange, EgressError("internal_error", f"internal error ({type(exc).__name__})"))
        if self._queue and self._timer is None:
            self._timer = self._loop.call_later(_POLL, self.wake)

"""Accounts: each pool key of a provider, with its health and quota, shared by every worker of a host.

Contract:
  `Account` is one pool key: `provider`, an opaque stable `id` (the operator's name, or a short
      BLAKE2b of the key: never the key), its ready credential header, and a slot in the table.
  `AccountTable(buffer, lock, worker)` keeps every account's state in fixed memory (`buffer`,
      `table_bytes(workers)` long: the mmap the supervisor makes before forking, beside the
      limiter's sketches), so all workers see one state: `healthy`, `cooling(until, reason)` or
      `disabled(reason)`. `bind(accounts)` gives each account its slot (found by its id: the same
      slot in every worker, and across reloads). A process's first bind keeps a disabled account
      disabled (a restarted worker); a later one, a reload, enables it again.
  `choose(accounts, now, exclude)` picks the healthy account with the most headroom: per
      dimension (requests, tokens, input and output tokens), the provider's last `remaining` over
      its `limit`, less the requests sent on it whose answer has not come (those the provider's
      count may not hold yet); one whose remaining is spent is skipped until
      its reset; with no quota headers at all, round-robin. None when every account is cooling,
      disabled or spent; then `soonest(accounts, now)` says when the first comes back.
  `take(accounts, now, exclude, retry, gate)` is choose and begin in one step under the lock, so
      concurrency caps hold across workers: an account at its `max_concurrent`, or a provider
      whose gate (`bind_gate`: a slot counting every request to it from this host) is at its cap,
      is busy; `BUSY` comes back when only busy accounts are left (the caller waits, bounded),
      None when none is usable (cooling, disabled or spent). `end(account, gate)` releases both;
      `enter(gate, cap)` / `leave(gate)` are the gate alone, for a request with the caller's key.
  Waiting, oldest first across workers: the provider's slot is also its line. `wait(gate)` gives
      a request that got BUSY a ticket; while any ticket is out, `take`/`enter` refuse (BUSY) every
      caller but the holder of the oldest one (`ticket=`), and retire that ticket when it gets its
      place; `unwait(gate, ticket)` retires one whose request left otherwise (timed out, fell
      back, the caller gone). With no ticket out, nothing changes: one more read under the lock.
  `worker_gone(buffer, lock, index)` (the supervisor, when a worker exits): gives back what that
      worker held (in flight, tickets), so a worker killed mid-request leaks no place.
  `begin(account)` / `end(account)` count requests in flight; `observe(account, hints, now)`
      records quota from any response, successes included; `cool(account, seconds, reason, now)`
      moves `until` only ever later (a shorter hint never shortens a longer cooldown: LiteLLM
      #40130); `disable(account, reason)` lasts until a reload; `limit_cooldowns(accounts, now,
      bound)` (a reload) ends every cooldown and spent quota's wait by `now + bound`. `failed` /
      `succeeded` keep the consecutive failures that lengthen the default cooldown;
      `relapsed(account)` puts back what this process's last `succeeded` cleared, for a 200
      stream whose first event was an error.
      A remaining count without its reset is not recorded: a spent dimension with no reset adds
      nothing to wait for (hints.py).
  `may_retry(now)`: the host-wide retry budget: retries at most `ratio` of requests over a
      sliding window (plus a floor, so a quiet host can still retry), which stops retry storms.

Times are CLOCK_MONOTONIC seconds (`time.monotonic()`), one clock for every process of a host.
Read-modify-write updates (in flight, cooldowns, the budget) hold the table's lock, a process-
shared semaphore made before the fork; reads take none (each field is one aligned 8-byte word).
Sans-IO: no clock is read here; `now` and random draws come from the caller.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from contextlib import nullcontext
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from egress.hints import RateHints
    from egress.secrets import Secret

HEALTHY, COOLING, DISABLED = 0, 1, 2
STATE_NAMES = ("healthy", "cooling", "disabled")
DIMENSIONS = ("requests", "tokens", "input_tokens", "output_tokens")
_DIMENSION = {name: dim for dim, name in enumerate(DIMENSIONS)}
# Why an account cools or is disabled, and the last error class seen on it: small integers in the
# table, named here. Bounded: these are also metric label values.
REASONS = (
    "",
    "rate_limited",  # 429
    "overloaded",  # 529, or an overloaded_error event
    "unavailable",  # 503
    "server_error",  # 500, 502, 504
    "connect_error",
    "reset",  # the connection closed before a response
    "stream_error",  # a 200 stream whose first event is an error
    "unauthorized",  # 401
    "payment_required",  # 402
    "forbidden",  # 403
    "quota_spent",  # remaining 0 on some dimension
    "billing_spent",  # the account's credit or spend limit is used up (retries.billing_spent)
)
_REASON_CODE = {name: code for code, name in enumerate(REASONS)}
# take(): only accounts at their concurrency cap are left (the request may wait for one).
BUSY = "busy"
_UNUSABLE, _AT_CAP = -1.0, -2.0

# The layout: SLOTS slots of `stride` doubles each (integers are exact in a double up to 2^53):
# SLOT_DOUBLES words for the host, then LEDGER_WORDS per worker, so stride = 24 + 4 * workers
# (table_bytes). Each word is one aligned 8-byte store: a read without the lock sees the old value
# or the new one, never a mix of the two.
#
# An account's slot (found by a hash of provider and id; who writes it):
#   0 owner: 52 bits of that hash, 0 for a free slot               bind, under the lock
#   1 state, 2 until, 3 reason                                       cool, disable, bind; the lock
#   4 in flight: the host's requests on it, every worker's           take, begin, end; the lock
#   5 consecutive failures                                           failed (lock), succeeded
#   6 last error, 7 its wall time                                    failed (the last one wins)
#   8-11 remaining, 12-15 limit, 16-19 reset at, by dimension        observe (the last response wins)
#   20 seen at (wall), 21 requests so far, 22 its cap                observe, take, bind
#   23 awaiting: of word 4, the attempts whose answer has not come   take, begin, heard, resend, end; the lock
#      (the provider's quota headers may not count them yet; one whose answer came is in its count)
# A provider's slot (bind_gate: its gate, and the line of requests waiting for it) uses four:
#   0 owner; 4 in flight through the gate (every request to the provider, when it has a cap);
#   5 the last ticket handed out; 6 tickets out (requests waiting, host-wide)     the lock
# Slot 0 is the host's retry budget (words 0-4, _B_* below).
# Then worker w's ledger, 4 words at 24 + 4 * w, written by w alone under the lock (and by the
# supervisor under the lock once w has exited):
#   +0 how much of word 4 (in flight) is w's;  +1 how many of word 6 (tickets out) are w's;
#   +2 w's oldest ticket still out, 0 for none;  +3 unused.
# Word 4 alone is read to choose, so a pick costs one read per account however many workers run.
# The ledger is read only when a worker has exited (worker_gone: a worker killed mid-request, by
# SIGKILL or the OOM killer, never ran the `end` that gives its places back, and before the ledger
# those places were lost for good) and by a waiting request (the oldest ticket of the host is the
# smallest +2 over the workers).
# Torn: a read without the lock (in flight for /status and metrics, state, quota) is at most one
# update stale. A worker killed between the two stores of one update, the lock held: a take stores
# its ledger first and an end the host's count first, so at worst worker_gone gives back one place
# too many (one request over a cap until the count next reaches 0, which end never goes below),
# never one too few.
_OWNER, _STATE, _UNTIL, _REASON, _IN_FLIGHT, _FAILURES, _LAST_ERROR, _LAST_ERROR_AT = range(8)
_REMAINING, _LIMIT, _RESET_AT = 8, 12, 16  # 4 dimensions each
_SEEN_AT, _REQUESTS, _CAP, _AWAITING = 20, 21, 22, 23
_LAST_TICKET, _WAITERS = 5, 6  # a provider's slot only
SLOT_DOUBLES = 24
LEDGER_WORDS = 4
_HELD, _TICKETS_HELD, _OLDEST = 0, 1, 2  # in a worker's ledger
SLOTS = 1024
# Slot 0 holds the host's retry budget: window start, requests and retries, current and previous.
_B_START, _B_REQ, _B_REQ_PREV, _B_RETRY, _B_RETRY_PREV = range(5)
# A lock held this long is held by a process that is gone: every section under it is a few stores.
LOCK_TIMEOUT = 1.0


def table_bytes(workers: int = 1) -> int:
    return 8 * (SLOT_DOUBLES + LEDGER_WORDS * workers) * SLOTS


def worker_gone(buffer: memoryview, lock, worker: int, timeout: float = LOCK_TIMEOUT) -> bool:
    """The supervisor, once worker `worker` has exited and before it is started again: what that
    worker held (requests in flight, tickets in a line) goes back to the host. True when the lock
    had to be taken over from it.

    A worker killed (SIGKILL, the OOM killer) inside a section under the lock leaves the semaphore
    taken, and every other worker would block on it for good. The sections are a few stores each,
    so a lock not free after `timeout` seconds is the dead worker's: the supervisor carries on as
    its holder, and its release frees the lock (sem_post(3) may be called by any process; the
    multiprocessing Lock checks no owner). If the holder were alive instead, stopped for longer than
    `timeout` (SIGSTOP, a debugger), two processes would run one section at once: a count off by
    one, and the late release raises ValueError in that worker's request.
    """
    taken_over = not lock.acquire(timeout=timeout)
    try:
        AccountTable(buffer, None, worker).forget_worker(worker)
    finally:
        lock.release()
    return taken_over


def account_id(secret: bytes | bytearray) -> str:
    """A short, stable, one-way name for a key: the same on every host, useless to an attacker."""
    return hashlib.blake2b(bytes(secret), digest_size=6, person=b"egress-account").hexdigest()


def _owner(account_id: str) -> float:
    # 52 bits of a hash of the id: exact in a double, and never 0 (a free slot).
    value = int.from_bytes(hashlib.blake2b(account_id.encode(), digest_size=8).digest(), "little") >> 12
    return float(value or 1)


class Account:
    __slots__ = ("header", "held", "id", "max_concurrent", "name", "owner", "provider", "slot")

    def __init__(
        self,
        provider: str,
        account_id: str,
        header: tuple[bytes, Secret],
        name: str | None = None,
        max_concurrent: int = 0,
    ):
        self.provider = provider
        self.max_concurrent = max_concurrent  # 0: no cap
        self.id = account_id
        self.name = name or account_id
        self.header = header  # (name, Secret): the credential header in the provider's scheme
        self.owner = _owner(f"{provider}/{account_id}")
        self.slot = 0  # set by AccountTable.bind
        self.held = SLOT_DOUBLES  # this process's ledger word of it (+0), set by bind; slot 0's is unused

    def credential(self) -> tuple[bytes, bytearray]:
        name, secret = self.header
        return name, secret.reveal()

    def __repr__(self) -> str:
        return f"Account({self.provider}/{self.id})"


class AccountTable:
    __slots__ = (
        "_bound",
        "_cleared",
        "_lines",
        "_lock",
        "_next",
        "_own",
        "_private",
        "_raw",
        "_stride",
        "_words",
        "floor",
        "ratio",
        "window",
    )

    def __init__(self, buffer: memoryview | None = None, lock=None, worker: int = 0) -> None:
        self._raw = memoryview(bytearray(table_bytes(worker + 1))) if buffer is None else buffer
        self._words = self._raw.cast("B").cast("d")
        self._stride = len(self._words) // SLOTS  # table_bytes(workers): 24 + 4 * workers
        self._own = SLOT_DOUBLES + LEDGER_WORDS * worker  # this worker's ledger in each slot
        if self._own + LEDGER_WORDS > self._stride:
            raise ValueError(
                f"an accounts table for {(self._stride - SLOT_DOUBLES) // LEDGER_WORDS} workers has no worker {worker}"
            )
        self._lock = lock if lock is not None else nullcontext()
        self._next = 0  # round-robin start among equals, per process
        self._private = SLOTS  # past the shared slots: accounts that found no free slot
        self._bound = False  # this process's first bind is a start; every later one, a reload
        # This process's tickets, by line: (live ones in the order given, the set of live ones).
        self._lines: dict[int, tuple[deque[float], set[float]]] = {}
        # Consecutive failures this process's last success on a slot cleared (succeeded), in case
        # that success turns out to be none (relapsed): at most one entry per slot.
        self._cleared: dict[int, float] = {}
        self.ratio = 0.2
        self.floor = 3.0
        self.window = 10.0

    # -- slots ---------------------------------------------------------------------------
    def bind(self, accounts: list[Account]) -> None:
        """Give each account its slot, by id. A disabled state ends at a reload (README: "disables the
        account until the next reload"), not at this process's first bind: a worker restarted after
        a crash finds the provider's refusal still standing, and sends that key nothing."""
        reload = self._bound
        self._bound = True
        with self._lock:
            for account in accounts:
                account.slot = base = self._bind_slot(account.owner, reload)
                account.held = base + self._own
                self._words[base + _CAP] = float(account.max_concurrent)

    def bind_gate(self, provider: str) -> int:
        """The slot counting every request to `provider` from this host (its `max_concurrent`), and
        the line of requests waiting for it."""
        with self._lock:
            return self._bind_slot(_owner(f"{provider}/*"), False)

    def _bind_slot(self, owner: float, reload: bool) -> int:
        """The slot of `owner` (the lock held): its own, or a fresh one, zeroed."""
        words = self._words
        stride = self._stride
        slot = self._find(owner)
        if slot is None:
            # Table full (over 1000 keys): this process keeps the state alone.
            words_needed = (self._private + 1) * stride
            if len(words) < words_needed:
                grown = memoryview(bytearray(words_needed * 8)).cast("B").cast("d")
                grown[: len(words)] = words
                self._words = words = grown
            slot = self._private
            self._private += 1
        base = slot * stride
        if words[base + _OWNER] != owner:
            words[base : base + stride] = memoryview(bytes(8 * stride)).cast("d")
            words[base + _OWNER] = owner
            for dim in range(4):
                words[base + _REMAINING + dim] = -1.0
                words[base + _LIMIT + dim] = -1.0
        elif reload and words[base + _STATE] == DISABLED:
            words[base + _STATE] = HEALTHY
            words[base + _REASON] = 0
        return base

    def _find(self, owner: float) -> int | None:
        words = self._words
        stride = self._stride
        start = 1 + int(owner) % (SLOTS - 1)  # slot 0 is the budget's
        for probe in range(SLOTS - 1):
            slot = 1 + (start - 1 + probe) % (SLOTS - 1)
            current = words[slot * stride + _OWNER]
            if current == owner or current == 0.0:
                return slot
        return None

    # -- selection -------------------------------------------------------------------------
    def choose(self, accounts: list[Account], now: float, exclude: tuple = ()) -> Account | None:
        best = self._pick(accounts, now, exclude)
        return best if best is not BUSY else None

    def take(
        self,
        accounts: list[Account],
        now: float,
        exclude: tuple = (),
        retry: bool = False,
        gate: int = 0,
        cap: int = 0,
        ticket: float = 0.0,
    ) -> Account | str | None:
        """choose + begin under the lock, within the caps: an Account, BUSY or None (see above).
        `gate`: the provider's slot, counted when `cap` is set (0: its line only, for accounts with
        caps); `ticket`: the caller's place in that line, if it waits."""
        with self._lock:
            words = self._words
            # The accounts first: with none usable (every one disabled, cooling or spent) the answer
            # is None now (all_accounts_*), not a wait for a place that would end in provider_busy.
            account = self._pick(accounts, now, exclude)
            if account is None or account is BUSY:
                return account
            if gate and cap and words[gate + _IN_FLIGHT] >= cap:
                return BUSY
            if gate:
                if words[gate + _WAITERS] and ticket != self._oldest(gate, ticket):
                    return BUSY  # older requests wait for this provider: they go first (README)
                if ticket:
                    self._retire(gate, ticket)
                if cap:
                    words[gate + self._own] += 1  # the ledger first: see the layout
                    words[gate + _IN_FLIGHT] += 1
            words[account.held] += 1
            base = account.slot
            words[base + _IN_FLIGHT] += 1
            words[base + _AWAITING] += 1
            words[base + _REQUESTS] += 1
            if not retry:
                self._roll(now)  # counted in the window it falls in, not in one long past
                words[_B_REQ] += 1
            return account

    def enter(self, gate: int, cap: int, ticket: float = 0.0) -> bool:
        """One more request through a provider's gate, if it is under its cap and no older request
        waits for it (`ticket`, as for take)."""
        with self._lock:
            words = self._words
            if words[gate + _IN_FLIGHT] >= cap:
                return False
            if words[gate + _WAITERS] and ticket != self._oldest(gate, ticket):
                return False
            if ticket:
                self._retire(gate, ticket)
            words[gate + self._own] += 1
            words[gate + _IN_FLIGHT] += 1
            return True

    def leave(self, gate: int) -> None:
        with self._lock:
            words = self._words
            if words[gate + _IN_FLIGHT] > 0:
                words[gate + _IN_FLIGHT] -= 1
            held = gate + self._own
            if words[held] > 0:
                words[held] -= 1

    # -- the line of requests waiting for a provider --------------------------------------------
    def wait(self, gate: int) -> float:
        """A ticket in `gate`'s line, for a request that got BUSY: from now on only the oldest
        ticket's holder may take a place there, until every ticket is retired (take or unwait)."""
        with self._lock:
            words = self._words
            ticket = words[gate + _LAST_TICKET] + 1.0
            words[gate + _LAST_TICKET] = ticket
            mine = gate + self._own
            words[mine + _TICKETS_HELD] += 1
            words[gate + _WAITERS] += 1
            line = self._lines.get(gate)
            if line is None:
                line = self._lines[gate] = (deque(), set())
            order, live = line
            if not order:
                words[mine + _OLDEST] = ticket
            order.append(ticket)
            live.add(ticket)
            return ticket

    def unwait(self, gate: int, ticket: float) -> None:
        """`ticket`'s request leaves the line without a place (timed out, fell back, answered, the
        caller gone); a ticket already retired is left alone."""
        with self._lock:
            self._retire(gate, ticket)

    def waiting(self, gate: int) -> int:
        """Tickets out in `gate`'s line, host-wide."""
        return int(self._words[gate + _WAITERS])

    def _retire(self, gate: int, ticket: float) -> None:
        """The lock held: `ticket` is out of the line, and this worker's oldest ticket moves on."""
        line = self._lines.get(gate)
        if line is None or ticket not in line[1]:
            return
        order, live = line
        live.discard(ticket)
        words = self._words
        mine = gate + self._own
        if words[mine + _TICKETS_HELD] > 0:
            words[mine + _TICKETS_HELD] -= 1
        if words[gate + _WAITERS] > 0:
            words[gate + _WAITERS] -= 1
        while order and order[0] not in live:
            order.popleft()
        words[mine + _OLDEST] = order[0] if order else 0.0

    def _oldest(self, gate: int, ticket: float) -> float:
        """The lock held: the oldest ticket out in `gate`'s line, over every worker. With none
        published (a count left over by a worker killed mid-update), `ticket`: no line, nothing to
        wait behind; a leftover count must never stop the line for good."""
        tickets = self._words[gate + SLOT_DOUBLES + _OLDEST : gate + self._stride : LEDGER_WORDS].tolist()
        return min([held for held in tickets if held], default=ticket)

    def forget_worker(self, worker: int) -> None:
        """The lock held: worker `worker` has exited; what its ledger says it held goes back."""
        words = self._words
        stride = self._stride
        for base in range(stride, SLOTS * stride, stride):  # slot 0, the budget's, has no places
            own = base + SLOT_DOUBLES + LEDGER_WORDS * worker
            held, tickets, oldest = words[own], words[own + _TICKETS_HELD], words[own + _OLDEST]
            if held or tickets or oldest:
                if held:
                    words[base + _IN_FLIGHT] = max(0.0, words[base + _IN_FLIGHT] - held)
                    words[base + _AWAITING] = min(words[base + _AWAITING], words[base + _IN_FLIGHT])
                if tickets:  # a provider's slot: an account's word 6 is its last error
                    words[base + _WAITERS] = max(0.0, words[base + _WAITERS] - tickets)
                words[own] = words[own + _TICKETS_HELD] = words[own + _OLDEST] = 0.0

    def _pick(self, accounts: list[Account], now: float, exclude: tuple) -> Account | str | None:
        words = self._words
        count = len(accounts)
        if count == 1:  # one pool key: nothing to choose between
            account = accounts[0]
            if account in exclude:
                return None
            score = self._headroom(words, account.slot, now)
            return account if score > _UNUSABLE else (BUSY if score == _AT_CAP else None)
        start = self._next
        self._next = start + 1
        best = None
        best_score = _UNUSABLE
        busy = False
        for offset in range(count):
            account = accounts[(start + offset) % count]
            if account in exclude:
                continue
            score = self._headroom(words, account.slot, now)
            if score > best_score:
                best, best_score = account, score
            elif score == _AT_CAP:
                busy = True
        if best is None and busy:
            return BUSY
        return best

    @staticmethod
    def _headroom(words, base: int, now: float) -> float:
        """1.0 for an untouched account, down to just above 0; -1 when it can't be used now, -2 when
        it is at its concurrency cap."""
        state = words[base + _STATE]
        if state and (state == DISABLED or words[base + _UNTIL] > now):
            return _UNUSABLE  # disabled, or cooling still
        in_flight = words[base + _IN_FLIGHT]
        cap = words[base + _CAP]
        if cap and in_flight >= cap:
            return _AT_CAP
        score = 1.0
        at = base + _REMAINING
        row = words[at : at + 12].tolist()  # remaining, limit and reset_at of each dimension, at once
        if max(row[0], row[1], row[2], row[3]) < 0:
            return score - in_flight * 1e-6  # no quota known: most providers' rows, and every new one
        for dim in (0, 1, 2, 3):
            remaining = row[dim]
            if remaining < 0 or row[dim + 8] <= now:
                continue  # unknown, or refilled since
            if dim == 0:
                # Less the requests the provider may not have counted yet: those sent whose answer
                # has not come. One whose answer came (a stream under way) is in the count that
                # answer carried; subtracted again, a remaining of 1 with one stream running
                # refused the next request (429 all_accounts_cooling) the provider would serve.
                remaining -= words[base + _AWAITING]
            if remaining <= 0:
                return _UNUSABLE
            limit = row[dim + 4]
            fraction = remaining / limit if limit > 0 else 1.0
            if fraction < score:
                score = fraction
        return score - in_flight * 1e-6  # among equals, the less busy one

    def soonest(self, accounts: list[Account], now: float) -> float | None:
        """Seconds until the first account that is cooling or spent can be used; None if all disabled."""
        words = self._words
        soonest = math.inf
        for account in accounts:
            base = account.slot
            state = words[base + _STATE]
            if state == DISABLED:
                continue
            until = words[base + _UNTIL] if state == COOLING else now
            for dim in range(4):
                remaining = words[base + _REMAINING + dim]
                reset_at = words[base + _RESET_AT + dim]
                if remaining >= 0 and reset_at > now and remaining - (words[base + _AWAITING] if dim == 0 else 0) <= 0:
                    until = max(until, reset_at)
            soonest = min(soonest, until)
        return None if soonest == math.inf else max(0.0, soonest - now)

    # -- what happened -----------------------------------------------------------------------
    def begin(self, account: Account, retry: bool = False) -> None:
        """An attempt starts on `account`; a request's first one also counts for the retry budget."""
        with self._lock:
            words = self._words
            words[account.held] += 1
            words[account.slot + _IN_FLIGHT] += 1
            words[account.slot + _AWAITING] += 1
            words[account.slot + _REQUESTS] += 1
            if not retry:
                words[_B_REQ] += 1

    def end(self, account: Account, gate: int = 0) -> None:
        with self._lock:
            words = self._words
            at = account.slot + _IN_FLIGHT
            if words[at] > 0:  # the host's count first, then the ledger: see the layout
                words[at] -= 1
            # An attempt that ended with no answer (timed out, the caller gone) was awaiting: the
            # count can't say which of the rest were, so it comes down to those left in flight.
            if words[account.slot + _AWAITING] > words[at]:
                words[account.slot + _AWAITING] = words[at]
            at = account.held
            if words[at] > 0:
                words[at] -= 1
            if gate:
                if words[gate + _IN_FLIGHT] > 0:
                    words[gate + _IN_FLIGHT] -= 1
                at = gate + self._own
                if words[at] > 0:
                    words[at] -= 1

    def heard(self, account: Account) -> None:
        """An attempt on `account` has its answer (or has failed before one): the provider counted it
        in the quota it reports, or never will; either way it is no longer subtracted from it."""
        with self._lock:
            at = account.slot + _AWAITING
            if self._words[at] > 0:
                self._words[at] -= 1

    def resend(self, account: Account) -> None:
        """The request goes to `account` again (a retry on the same account): awaiting once more."""
        with self._lock:
            self._words[account.slot + _AWAITING] += 1

    def observe(self, account: Account, hints: RateHints, now: float, wall: float, bound: float = math.inf) -> None:
        """Quota from a response: single-word writes, no lock (the last response wins). A reset
        further than `bound` (`[accounts] max_cooldown`) counts as `bound` away: a spent quota
        whose reset a bad header put a year away benched the key as a year's cooldown did.

        A remaining count is kept only with its reset: with none, nothing says when the account
        could be used again, and a count at 0 (or at the requests in flight) would lock it out for a
        time egress made up. hints.exhausted_until's contract: "A dimension at 0 whose reset the
        provider did not give adds nothing to wait for"; the provider's 429 will say how long."""
        words = self._words
        base = account.slot
        reset = hints.reset
        for name, remaining in hints.remaining.items():
            seconds = reset.get(name)
            if seconds is not None:
                if seconds > bound:
                    seconds = bound
                dim = _DIMENSION[name]
                words[base + _REMAINING + dim] = float(remaining)
                words[base + _RESET_AT + dim] = now + seconds
        for name, limit in hints.limit.items():
            words[base + _LIMIT + _DIMENSION[name]] = float(limit)
        words[base + _SEEN_AT] = wall

    def succeeded(self, account: Account) -> None:
        words = self._words
        failures = words[account.slot + _FAILURES]
        if failures:
            words[account.slot + _FAILURES] = 0.0
            self._cleared[account.slot] = failures
        elif self._cleared:
            self._cleared.pop(account.slot, None)

    def relapsed(self, account: Account) -> None:
        """What `succeeded` last counted on `account` in this process was no success after all (a
        200 stream whose first event is an error, judged after its head): the consecutive failures
        it cleared count again, so the next cooldown is the next step, not the first."""
        failures = self._cleared.pop(account.slot, 0.0)
        if failures:
            with self._lock:
                words = self._words
                if words[account.slot + _FAILURES] < failures:
                    words[account.slot + _FAILURES] = failures

    def failures(self, account: Account) -> int:
        return int(self._words[account.slot + _FAILURES])

    def failed(self, account: Account, reason: str, wall: float) -> None:
        words = self._words
        with self._lock:
            words[account.slot + _FAILURES] += 1
        words[account.slot + _LAST_ERROR] = _REASON_CODE[reason]
        words[account.slot + _LAST_ERROR_AT] = wall

    def cool(self, account: Account, seconds: float, reason: str, now: float) -> None:
        until = now + seconds
        words = self._words
        base = account.slot
        with self._lock:
            state = words[base + _STATE]
            if state == DISABLED:
                return
            if state == COOLING and words[base + _UNTIL] >= until:
                return  # never shortened
            words[base + _STATE] = COOLING
            words[base + _UNTIL] = until
            words[base + _REASON] = _REASON_CODE[reason]

    def disable(self, account: Account, reason: str) -> bool:
        """True when this call disabled it (it was not already)."""
        words = self._words
        base = account.slot
        with self._lock:
            if words[base + _STATE] == DISABLED:
                return False
            words[base + _STATE] = DISABLED
            words[base + _REASON] = _REASON_CODE[reason]
            return True

    def limit_cooldowns(self, accounts: list[Account], now: float, bound: float) -> None:
        """No account waits past `now + bound` (a reload's `[accounts] max_cooldown`): a cooldown, or
        a spent quota's reset, set further away under an older bound (or none) ends then. Each
        cooldown is bounded as it is set (hints.cooldown); this is for those set before, which a
        reload lowering the bound would otherwise leave for as long as the old one allowed."""
        latest = now + bound
        words = self._words
        with self._lock:
            for account in accounts:
                base = account.slot
                if words[base + _STATE] == COOLING and words[base + _UNTIL] > latest:
                    words[base + _UNTIL] = latest
                for dim in range(4):
                    if words[base + _RESET_AT + dim] > latest:
                        words[base + _RESET_AT + dim] = latest

    def may_retry(self, now: float, count: bool = True) -> bool:
        """The host's retry budget: a retry is allowed (and counted, unless `count` is False) or refused."""
        words = self._words
        with self._lock:
            start = self._roll(now)
            weight = 1.0 - (now - start) / self.window
            requests = words[_B_REQ] + words[_B_REQ_PREV] * weight
            retries = words[_B_RETRY] + words[_B_RETRY_PREV] * weight
            if retries >= self.floor + self.ratio * requests:
                return False
            if count:
                words[_B_RETRY] += 1
            return True

    def _roll(self, now: float) -> float:
        """The lock held: the budget's current window is the one `now` falls in; its start.

        Run wherever a count is added, requests as well as retries: rolled only by a retry, a
        burst after a quiet spell was counted in a window long over, and the next retry zeroed it
        (50 requests a second before a retry left it the floor alone, not the floor and 20 %)."""
        words = self._words
        start = words[_B_START]
        if now - start >= self.window:
            elapsed_windows = (now - start) // self.window
            if elapsed_windows == 1:
                words[_B_REQ_PREV], words[_B_RETRY_PREV] = words[_B_REQ], words[_B_RETRY]
            else:
                words[_B_REQ_PREV] = words[_B_RETRY_PREV] = 0.0
            words[_B_REQ] = words[_B_RETRY] = 0.0
            words[_B_START] = start = start + elapsed_windows * self.window if start else now
        return start

    # -- reading, for /status and metrics --------------------------------------------------
    def snapshot(self, account: Account, now: float, wall: float) -> dict:
        words = self._words
        base = account.slot
        state = self.state_of(account, now)
        until = words[base + _UNTIL]
        quota = {}
        live = self.remaining(account, now)  # as egress_account_remaining: a quota past its reset is refilled
        for dim, name in enumerate(DIMENSIONS):
            if name in live:
                reset_at = words[base + _RESET_AT + dim]
                limit = words[base + _LIMIT + dim]
                quota[name] = {
                    "remaining": live[name],
                    "limit": int(limit) if limit >= 0 else None,
                    "reset_in_s": round(max(0.0, reset_at - now), 3),
                }
        last_error = int(words[base + _LAST_ERROR])
        last_error_at = words[base + _LAST_ERROR_AT]
        return {
            "id": account.id,
            "name": account.name,
            "state": STATE_NAMES[state],
            "until": round(wall + (until - now), 3) if state == COOLING else None,
            "reason": REASONS[int(words[base + _REASON])] or None if state != HEALTHY else None,
            "in_flight": int(words[base + _IN_FLIGHT]),
            "max_concurrent": account.max_concurrent or None,
            "requests": int(words[base + _REQUESTS]),
            "consecutive_failures": int(words[base + _FAILURES]),
            "quota": quota,
            "last_error": REASONS[last_error] if last_error else None,
            "last_error_age_s": round(wall - last_error_at, 3) if last_error else None,
        }

    def in_flight(self, slot: int) -> int:
        return int(self._words[slot + _IN_FLIGHT])

    def state_of(self, account: Account, now: float) -> int:
        """Its state now: a cooldown that is over reads healthy (the next pick finds it so)."""
        words = self._words
        state = int(words[account.slot + _STATE])
        return HEALTHY if state == COOLING and words[account.slot + _UNTIL] <= now else state

    def remaining(self, account: Account, now: float) -> dict[str, int]:
        words = self._words
        base = account.slot
        return {
            name: int(words[base + _REMAINING + dim])
            for dim, name in enumerate(DIMENSIONS)
            if words[base + _REMAINING + dim] >= 0 and words[base + _RESET_AT + dim] > now
        }

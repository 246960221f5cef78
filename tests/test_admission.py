"""Admission across the workers of a host: what a worker that exits held goes back, the lock a killed
worker held is taken over, and requests waiting for a capped provider are served oldest first in
whichever worker they wait. First the table itself (values in, values out, with `fork` for the
processes that die), then the real process with `--workers 2`."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import orjson
import pytest

from egress.accounts import BUSY, Account, AccountTable, table_bytes, worker_gone
from egress.secrets import Secret
from egress.vkeys import mint
from tests.support import (
    LoopbackServer,
    RawClient,
    _split_request,
    admin_get,
    request_bytes,
    samples,
    value,
    wait_until,
)
from tests.test_accounts import ISSUER, accounts_config, completion

# --- the table -------------------------------------------------------------------------------


def host(workers: int = 2):
    """One host's shared table as `workers` workers see it: the buffer, its lock, a table each."""
    buffer = memoryview(mmap.mmap(-1, table_bytes(workers)))  # MAP_SHARED: a forked child writes here too
    lock = multiprocessing.Lock()
    return buffer, lock, [AccountTable(buffer, lock, index) for index in range(workers)]


def rows(table: AccountTable, *caps: int) -> list[Account]:
    bound = [
        Account("openai", f"k{index}", (b"authorization", Secret(b"Bearer sk-%d" % index, "env:X")), None, cap)
        for index, cap in enumerate(caps)
    ]
    table.bind(bound)
    return bound


def test_what_a_worker_held_goes_back_when_it_exits():
    buffer, lock, (first, second) = host()
    gate = first.bind_gate("openai")
    a1, a2 = rows(first, 0), rows(second, 0)
    assert first.take(a1, 100.0, gate=gate, cap=3) is a1[0]
    assert first.take(a1, 100.0, gate=gate, cap=3) is a1[0]
    assert second.take(a2, 100.0, gate=gate, cap=3) is a2[0]
    assert first.in_flight(gate) == 3 and first.take(a1, 100.0, gate=gate, cap=3) is BUSY
    assert not worker_gone(buffer, lock, 0)  # the lock was free
    assert first.in_flight(gate) == 1 and second.in_flight(a2[0].slot) == 1  # worker 1's request stays
    restarted = AccountTable(buffer, lock, 0)  # worker 0 started again: its ledger is empty
    assert restarted.take(rows(restarted, 0), 100.0, gate=gate, cap=3) is not BUSY
    second.end(a2[0], gate)
    assert second.in_flight(gate) == 1 and second.in_flight(a2[0].slot) == 1  # only the restarted one's
    assert not worker_gone(buffer, lock, 1)
    assert second.in_flight(gate) == 1  # nothing of worker 1's was left to give back


def test_with_no_account_usable_a_full_gate_is_no_reason_to_wait():
    # Every account disabled while the provider's place is taken: None (all_accounts_disabled at
    # once), never BUSY, which waited queue_timeout to end in provider_busy.
    _, _, (table,) = host(1)
    gate = table.bind_gate("openai")
    (account,) = rows(table, 0)
    assert table.take([account], 100.0, gate=gate, cap=1) is account
    assert table.take([account], 100.0, gate=gate, cap=1) is BUSY  # usable, the place taken: wait
    table.disable(account, "unauthorized")
    assert table.take([account], 100.0, gate=gate, cap=1) is None


def test_a_worker_killed_mid_request_leaks_no_place():
    buffer, lock, (first, _) = host()
    gate = first.bind_gate("openai")
    mine = rows(first, 1)
    child = os.fork()
    if child == 0:  # worker 1: takes the provider's only place, and is killed before it ends
        try:
            worker = AccountTable(buffer, lock, 1)
            if worker.take(rows(worker, 1), 100.0, gate=gate, cap=1) is not BUSY:
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert first.take(mine, 100.0, gate=gate, cap=1) is BUSY  # held by nobody alive
    worker_gone(buffer, lock, 1)  # the supervisor, before it starts worker 1 again
    assert first.take(mine, 100.0, gate=gate, cap=1) is mine[0]
    assert first.in_flight(gate) == 1 and first.in_flight(mine[0].slot) == 1


def test_the_lock_of_a_worker_killed_holding_it_is_taken_over():
    buffer, lock, (first, _) = host()
    mine = rows(first, 0)
    child = os.fork()
    if child == 0:
        try:
            lock.acquire()
            os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    os.waitpid(child, 0)
    assert not lock.acquire(timeout=0.05)  # every worker would block here for good
    assert worker_gone(buffer, lock, 1, timeout=0.2)  # taken over, used, released
    assert first.take(mine, 100.0) is mine[0]
    assert lock.acquire(timeout=0.05)
    lock.release()


def test_a_new_request_waits_behind_an_older_one_in_another_worker():
    _, _, (first, second) = host()
    gate = first.bind_gate("openai")
    a1, a2 = rows(first, 0), rows(second, 0)
    assert first.take(a1, 100.0, gate=gate, cap=1) is a1[0]
    assert second.take(a2, 100.0, gate=gate, cap=1) is BUSY
    ticket = second.wait(gate)
    first.end(a1[0], gate)  # the place is free, and worker 0's next request comes first
    assert first.take(a1, 100.0, gate=gate, cap=1) is BUSY  # worker 1's request is older
    assert first.waiting(gate) == 1
    assert second.take(a2, 100.0, gate=gate, cap=1, ticket=ticket) is a2[0]
    assert first.waiting(gate) == 0  # its ticket went with the place
    second.end(a2[0], gate)
    assert first.take(a1, 100.0, gate=gate, cap=1) is a1[0]  # no one waits: straight in


def test_tickets_are_served_in_the_order_given_whichever_worker_holds_them():
    _, _, (first, second) = host()
    gate = first.bind_gate("openai")
    mine = {first: rows(first, 0), second: rows(second, 0)}
    assert first.take(mine[first], 100.0, gate=gate, cap=1) is mine[first][0]
    holder = first
    line = [(table, table.wait(gate)) for table in (first, second, first, second)]
    served = []
    while line:
        holder.end(mine[holder][0], gate)
        # Every ticket tries, the youngest first; only the oldest one left gets the place.
        won = [
            entry
            for entry in reversed(line)
            if entry[0].take(mine[entry[0]], 100.0, gate=gate, cap=1, ticket=entry[1]) is not BUSY
        ]
        assert len(won) == 1
        line.remove(won[0])
        holder = won[0][0]
        served.append(won[0][1])
    assert served == sorted(served)


def test_a_ticket_that_leaves_lets_the_next_one_go():
    _, _, (first, second) = host()
    gate = first.bind_gate("openai")
    a1, a2 = rows(first, 0), rows(second, 0)
    assert first.take(a1, 100.0, gate=gate, cap=1) is a1[0]
    t1, t2, t3 = first.wait(gate), first.wait(gate), second.wait(gate)
    first.end(a1[0], gate)
    first.unwait(gate, t2)  # left out of turn (its caller went away): t1 is still first
    first.unwait(gate, t2)  # a ticket already retired is left alone
    assert first.waiting(gate) == 2
    assert second.take(a2, 100.0, gate=gate, cap=1, ticket=t3) is BUSY
    first.unwait(gate, t1)  # timed out
    assert second.take(a2, 100.0, gate=gate, cap=1, ticket=t3) is a2[0]
    assert first.waiting(gate) == 0


def test_the_tickets_of_a_worker_that_exits_hold_no_one_up():
    buffer, lock, (first, second) = host()
    gate = first.bind_gate("openai")
    a1 = rows(first, 0)
    assert first.take(a1, 100.0, gate=gate, cap=1) is a1[0]
    second.wait(gate)  # the oldest, in worker 1, which is then killed
    mine = first.wait(gate)
    first.end(a1[0], gate)
    assert first.take(a1, 100.0, gate=gate, cap=1, ticket=mine) is BUSY
    worker_gone(buffer, lock, 1)
    assert first.waiting(gate) == 1
    assert first.take(a1, 100.0, gate=gate, cap=1, ticket=mine) is a1[0]


def test_a_byo_request_waits_its_turn_in_the_same_line():
    _, _, (first, second) = host()
    gate = first.bind_gate("openai")
    assert first.enter(gate, 1)
    ticket = second.wait(gate)
    first.leave(gate)
    assert not first.enter(gate, 1)  # older requests wait
    assert second.enter(gate, 1, ticket)
    assert first.waiting(gate) == 0 and first.in_flight(gate) == 1


def test_accounts_caps_alone_line_up_in_the_providers_slot_and_count_nothing_there():
    _, _, (first, second) = host()
    line = first.bind_gate("openai")
    a1, a2 = rows(first, 1), rows(second, 1)
    assert first.take(a1, 100.0, gate=line) is a1[0]
    assert second.take(a2, 100.0, gate=line) is BUSY  # the account is at its cap
    ticket = second.wait(line)
    first.end(a1[0])
    assert first.take(a1, 100.0, gate=line) is BUSY
    assert second.take(a2, 100.0, gate=line, ticket=ticket) is a2[0]
    assert first.in_flight(line) == 0  # the line's slot counts no place


def test_a_table_has_a_ledger_for_each_worker_it_was_made_for():
    with pytest.raises(ValueError, match="no worker 2"):
        AccountTable(memoryview(bytearray(table_bytes(2))), None, 2)


# --- the process -----------------------------------------------------------------------------


class OrderedProvider(LoopbackServer):
    """An OpenAI-style provider that records the order requests reach it (each request's message
    content names it) and holds each `hold` seconds, or until `release` for those in `hung`."""

    def __init__(self, hold: float = 0.0, hung: int = 0) -> None:
        self.hold = hold
        self.hung = hung
        self.release = threading.Event()
        self.seen: list[str] = []
        self.lock = threading.Lock()
        super().__init__(backlog=64)

    def _serve(self, conn) -> None:
        for raw in self._requests(conn, _split_request):
            body = raw.split(b"\r\n\r\n", 1)[1]
            with self.lock:
                count = len(self.seen)
                self.seen.append(orjson.loads(body)["messages"][0]["content"])
            if count < self.hung:
                self.release.wait(30)
            time.sleep(self.hold)
            _, _, answer = completion(count)
            try:
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (len(answer), answer)
                )
            except OSError:
                return

    def stop(self) -> None:
        self.release.set()
        super().stop()


@pytest.fixture
def ordered():
    providers = []

    def start(**kwargs) -> OrderedProvider:
        provider = OrderedProvider(**kwargs)
        providers.append(provider)
        return provider

    yield start
    for provider in providers:
        provider.stop()


def capped(upstream: OrderedProvider, tmp_path: Path, caps: str) -> str:
    return accounts_config(upstream, tmp_path, extra="\n[upstream]\nfirst_byte_timeout = 60.0\n", row=caps)


def chat_bytes(name: str, key: str) -> bytes:
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": name}]})
    return request_bytes("POST", "/openai/v1/chat/completions", {"Authorization": f"Bearer {key}"}, body)


def status(egress) -> dict:
    return orjson.loads(admin_get(egress.admin_port, "/status")[1])


@pytest.mark.timeout(90)
def test_places_held_by_killed_workers_come_back_with_their_successors(start_egress, ordered, tmp_path):
    upstream = ordered(hung=2)
    egress = start_egress(capped(upstream, tmp_path, "max_concurrent = 2\nqueue_timeout = 1.0"), workers=2)
    key = mint(ISSUER, "crash")[0]
    hung = [RawClient(egress.port) for _ in range(2)]
    for index, client in enumerate(hung):
        client.send(chat_bytes(f"hung-{index}", key))
    assert wait_until(lambda: len(upstream.seen) == 2, timeout=10)
    assert status(egress)["providers"]["openai"]["in_flight"] == 2  # the provider's cap, reached
    killed = {worker["pid"] for worker in status(egress)["workers"]}
    for pid in killed:
        os.kill(pid, signal.SIGKILL)  # the OOM killer's way: no code of theirs runs after
    for client in hung:
        client.close()

    def restarted() -> bool:
        try:
            workers = status(egress)["workers"]
        except OSError:
            return False
        return len(workers) == 2 and all(worker["running"] and worker["pid"] not in killed for worker in workers)

    assert wait_until(restarted, timeout=15)
    with RawClient(egress.port, timeout=30) as client:
        client.send(chat_bytes("after", key))
        response = client.read_response("POST")
    assert response.status == 200, response.body  # was 503 provider_busy, for good
    found = samples(egress.admin_port)
    assert value(found, "egress_provider_in_flight", provider="openai") == 0
    assert [row["in_flight"] for row in status(egress)["providers"]["openai"]["accounts"]] == [0, 0]


def _worker_of(egress, client: RawClient) -> int:
    """Which worker `client`'s connection landed on (SO_REUSEPORT chose): its access-log line says."""
    client.send(b"GET /healthz HTTP/1.1\r\nhost: egress\r\n\r\n")
    request_id = client.read_response("GET").headers["x-egress-request-id"]
    found: list[int] = []

    def logged() -> bool:
        found[:] = [record["worker"] for record in egress.access_records() if record.get("request_id") == request_id]
        return bool(found)

    assert wait_until(logged, timeout=5)
    return found[0]


@pytest.mark.timeout(120)
def test_waiting_requests_are_served_oldest_first_across_workers(start_egress, ordered, tmp_path):
    """The first to wait is in the worker that does not hold the place, the next in the one that
    does, and so on: a worker that served its own waiters first (the release there wakes them at
    once, another worker only polls) would break the order at the first release."""
    upstream = ordered(hold=0.2, hung=1)
    egress = start_egress(capped(upstream, tmp_path, "max_concurrent = 1\nqueue_timeout = 30"), workers=2)
    key = mint(ISSUER, "line")[0]
    by_worker: dict[int, list[RawClient]] = {0: [], 1: []}
    clients = []
    while min(len(found) for found in by_worker.values()) < 4 and len(clients) < 64:
        client = RawClient(egress.port, timeout=30)
        clients.append(client)
        by_worker[_worker_of(egress, client)].append(client)
    try:
        assert min(len(found) for found in by_worker.values()) >= 4, "SO_REUSEPORT used one worker only"
        holder = by_worker[0].pop()
        line = [by_worker[1 if index % 2 == 0 else 0].pop() for index in range(6)]
        holder.send(chat_bytes("holder", key))  # held by the provider until every waiter is in line
        assert wait_until(lambda: len(upstream.seen) == 1, timeout=10)
        for index, client in enumerate(line):
            client.send(chat_bytes(f"waiter-{index}", key))
            # In line before the next one comes (each worker publishes its count every second).
            assert wait_until(
                lambda index=index: value(samples(egress.admin_port), "egress_requests_waiting") == index + 1,
                timeout=10,
                interval=0.1,
            )
        upstream.release.set()
        responses = [client.read_response("POST") for client in (holder, *line)]
    finally:
        for client in clients:
            client.close()
    assert [response.status for response in responses] == [200] * 7
    assert upstream.seen == ["holder", *(f"waiter-{index}" for index in range(6))]


def _reloads(egress) -> int:
    return egress.stderr_path.read_bytes().count(b'"event":"reloaded"')


def _reload(egress, text: str) -> None:
    before = _reloads(egress)
    egress.config_path.write_text(text)
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: _reloads(egress) > before, timeout=5), egress.logs()


def test_a_waiter_whose_cap_a_reload_lifted_leaves_the_line(start_egress, tmp_path):
    """c2 waits behind c1 (cap 1); a reload lifts the cap and c2 goes; a later reload caps the
    provider again. c2's ticket must have left the shared line: before, it stayed, and every
    request after it was refused provider_busy while nothing was in flight."""
    upstream = OrderedProvider(hung=1)
    try:
        extra = "\n[upstream]\nfirst_byte_timeout = 60.0\n"

        def config(row: str) -> str:
            return accounts_config(upstream, tmp_path, extra=extra, row=row)

        egress = start_egress(config("max_concurrent = 1\nqueue_timeout = 30"))
        byo = {"Authorization": "Bearer sk-byo-1"}

        def chat(name: str) -> bytes:
            body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": name}]})
            return request_bytes("POST", "/openai/v1/chat/completions", byo, body)

        first, waiter = RawClient(egress.port, timeout=30), RawClient(egress.port, timeout=30)
        first.send(chat("first"))
        assert wait_until(lambda: len(upstream.seen) == 1, timeout=10)
        waiter.send(chat("waiter"))
        time.sleep(0.5)  # it waits, with a ticket in the line
        _reload(egress, config("max_concurrent = 0\nqueue_timeout = 30"))
        upstream.release.set()
        assert first.read_response("POST").status == 200 and waiter.read_response("POST").status == 200
        first.close()
        waiter.close()
        _reload(egress, config("max_concurrent = 1\nqueue_timeout = 3"))
        with RawClient(egress.port, timeout=30) as later:
            later.send(chat("later"))
            response = later.read_response("POST")
        assert response.status == 200, response.body
    finally:
        upstream.stop()

"""Concurrency caps per provider and per account, held across the workers of a host: the table itself
(values in, values out), then the real process with `--workers 2` against a provider that holds each
request long enough to see how many overlap."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson
import pytest

from egress.accounts import BUSY, Account, AccountTable, table_bytes
from egress.secrets import Secret
from egress.vkeys import mint, public_key_text
from tests.support import RawClient, admin_get, request_bytes, samples, value, wait_until
from tests.test_accounts import ISSUER, KEY_A, KEY_B, KeyedProvider, completion

# --- the table -------------------------------------------------------------------------------


def capped(*caps: int) -> tuple[AccountTable, list[Account]]:
    table = AccountTable()
    rows = [
        Account("openai", f"k{index}", (b"authorization", Secret(b"Bearer sk-%d" % index, "env:X")), None, cap)
        for index, cap in enumerate(caps)
    ]
    table.bind(rows)
    return table, rows


def test_an_account_at_its_cap_is_busy_and_free_again_when_a_request_ends():
    table, (a, b) = capped(1, 2)
    taken = [table.take([a, b], 100.0) for _ in range(3)]
    assert sorted(account.id for account in taken) == ["k0", "k1", "k1"]
    assert table.take([a, b], 100.0) is BUSY  # every account at its cap: wait, not "none usable"
    table.end(a)
    assert table.take([a, b], 100.0) is a


def test_busy_is_told_apart_from_cooling():
    table, (a, b) = capped(1, 0)
    assert table.take([a], 100.0) is a
    table.cool(b, 30.0, "rate_limited", 100.0)
    assert table.take([a, b], 100.0) is BUSY  # a frees up; b cools for 30 s
    table.cool(a, 30.0, "rate_limited", 100.0)
    assert table.take([a, b], 100.0) is None


def test_a_providers_gate_counts_every_request_across_workers():
    shared = memoryview(bytearray(table_bytes()))
    worker_1, worker_2 = AccountTable(shared), AccountTable(shared)
    gate = worker_1.bind_gate("openai")
    assert worker_2.bind_gate("openai") == gate  # the same slot in every worker
    rows = [Account("openai", "k", (b"authorization", Secret(b"Bearer sk-k", "env:X")))]
    worker_1.bind(rows)
    assert worker_1.take(rows, 100.0, gate=gate, cap=2) is rows[0]
    assert worker_2.enter(gate, 2)  # a BYO request through the same gate
    assert worker_2.take(rows, 100.0, gate=gate, cap=2) is BUSY
    assert not worker_1.enter(gate, 2)
    worker_1.end(rows[0], gate)
    assert worker_1.in_flight(gate) == 1 and worker_2.enter(gate, 2)
    worker_2.leave(gate)
    worker_2.leave(gate)
    worker_2.leave(gate)  # never below zero
    assert worker_1.in_flight(gate) == 0


# --- the process -----------------------------------------------------------------------------


class Overlap:
    """Each plan wrapped so the provider holds the request `seconds` and counts how many overlap."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.total_now = 0
        self.total_peak = 0

    def held(self, key: str, seconds: float):
        def plan(count: int):
            with self.lock:
                self.now[key] = self.now.get(key, 0) + 1
                self.peak[key] = max(self.peak.get(key, 0), self.now[key])
                self.total_now += 1
                self.total_peak = max(self.total_peak, self.total_now)
            time.sleep(seconds)
            with self.lock:
                self.now[key] -= 1
                self.total_now -= 1
            return completion(count)

        return plan


@pytest.fixture
def held_provider():
    providers = []

    def start(seconds: float, keys=(KEY_A, KEY_B)) -> tuple[KeyedProvider, Overlap]:
        overlap = Overlap()
        provider = KeyedProvider({key: overlap.held(key, seconds) for key in keys})
        providers.append(provider)
        return provider, overlap

    yield start
    for provider in providers:
        provider.stop()


def capped_config(upstream: KeyedProvider, tmp_path: Path, provider_caps: str, key_caps: tuple[int, int]) -> str:
    (tmp_path / "a.key").write_text(KEY_A + "\n")
    (tmp_path / "b.key").write_text(KEY_B + "\n")
    cap_a, cap_b = (f", max_concurrent = {cap}" if cap else "" for cap in key_caps)
    return f"""
[providers.openai]
base_url = "{upstream.base_url}"
pool_keys = [
    {{ name = "team-a", key = "file:{tmp_path / "a.key"}"{cap_a} }},
    {{ name = "team-b", key = "file:{tmp_path / "b.key"}"{cap_b} }},
]
models = ["gpt-4o"]
{provider_caps}

[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]
"""


BODY = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})


def one_request(port: int, key: str | None = None, timeout: float = 30.0):
    key = key or mint(ISSUER, "caps-app")[0]
    with RawClient(port, timeout=timeout) as client:
        client.send(request_bytes("POST", "/openai/v1/chat/completions", {"Authorization": f"Bearer {key}"}, BODY))
        return client.read_response("POST")


def many(port: int, count: int, key: str | None = None) -> list:
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda _: one_request(port, key), range(count)))


@pytest.mark.timeout(90)
def test_a_providers_cap_holds_across_two_workers(start_egress, held_provider, tmp_path):
    upstream, overlap = held_provider(0.25)
    config = capped_config(upstream, tmp_path, "max_concurrent = 2\nqueue_timeout = 30", (0, 0))
    egress = start_egress(config, workers=2)
    responses = many(egress.port, 16)
    assert [response.status for response in responses] == [200] * 16
    assert overlap.total_peak == 2  # reached, never passed, though each worker alone would allow 2
    workers = {record["worker"] for record in egress.access_records() if record.get("path")}
    assert len(workers) == 2, workers  # both workers took requests (16 connections on SO_REUSEPORT)
    found = samples(egress.admin_port)
    assert value(found, "egress_provider_in_flight", provider="openai") == 0  # every place given back


@pytest.mark.timeout(90)
def test_each_accounts_cap_holds_and_the_other_account_takes_the_rest(start_egress, held_provider, tmp_path):
    upstream, overlap = held_provider(0.25)
    egress = start_egress(capped_config(upstream, tmp_path, "queue_timeout = 30", (1, 1)), workers=2)
    responses = many(egress.port, 8)
    assert [response.status for response in responses] == [200] * 8
    assert overlap.peak == {KEY_A: 1, KEY_B: 1}
    assert upstream.served(KEY_A) + upstream.served(KEY_B) == 8


def test_past_the_queue_timeout_the_caller_gets_provider_busy(start_egress, held_provider, tmp_path):
    upstream, overlap = held_provider(1.5)
    egress = start_egress(capped_config(upstream, tmp_path, "max_concurrent = 1\nqueue_timeout = 0.3", (0, 0)))
    started = time.monotonic()
    responses = many(egress.port, 3)
    statuses = sorted(response.status for response in responses)
    assert statuses == [200, 503, 503]
    busy = [response for response in responses if response.status == 503]
    for response in busy:
        assert response.error_code == "provider_busy"
        assert response.headers["retry-after"] == "1"
        assert response.headers["x-egress-attempts"] == "0"  # nothing was sent
    assert time.monotonic() - started >= 1.4  # the one that got in was held by the provider
    assert len(upstream.seen) == 1 and overlap.total_peak == 1
    found = samples(egress.admin_port)
    assert value(found, "egress_provider_busy_total", provider="openai") == 2


def test_a_byo_request_takes_a_place_under_the_providers_cap_too(start_egress, held_provider, tmp_path):
    byo = "sk-byo-capped-caller-0123456"
    upstream, overlap = held_provider(0.3, keys=(KEY_A, KEY_B, byo))
    egress = start_egress(capped_config(upstream, tmp_path, "max_concurrent = 1\nqueue_timeout = 30", (0, 0)))
    responses = many(egress.port, 3, key=byo)
    assert [response.status for response in responses] == [200] * 3
    assert overlap.total_peak == 1
    assert upstream.served(byo) == 3


def test_a_caller_who_leaves_while_waiting_holds_no_place(start_egress, held_provider, tmp_path):
    upstream, _ = held_provider(1.0)
    egress = start_egress(capped_config(upstream, tmp_path, "max_concurrent = 1\nqueue_timeout = 30", (0, 0)))
    key = mint(ISSUER, "leaver")[0]
    with ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(one_request, egress.port, key)
        assert wait_until(lambda: len(upstream.seen) == 1, timeout=5)
        leaver = RawClient(egress.port)
        leaver.send(request_bytes("POST", "/openai/v1/chat/completions", {"Authorization": f"Bearer {key}"}, BODY))
        assert wait_until(lambda: _waiting(egress) == 1, timeout=5)
        leaver.close()
        assert wait_until(lambda: _waiting(egress) == 0, timeout=5)
        assert first.result().status == 200
    assert one_request(egress.port, key).status == 200  # the place the leaver never took is free
    assert len(upstream.seen) == 2  # the leaver's request never went upstream
    assert value(samples(egress.admin_port), "egress_provider_in_flight", provider="openai") == 0


def _waiting(egress) -> float:
    return value(samples(egress.admin_port), "egress_requests_waiting")


def test_caps_are_in_status(start_egress, held_provider, tmp_path):
    upstream, _ = held_provider(0.0)
    egress = start_egress(capped_config(upstream, tmp_path, "max_concurrent = 4", (2, 0)))
    document = orjson.loads(admin_get(egress.admin_port, "/status")[1])
    openai = document["providers"]["openai"]
    assert openai["max_concurrent"] == 4 and openai["in_flight"] == 0
    rows = {row["name"]: row for row in openai["accounts"]}
    assert rows["team-a"]["max_concurrent"] == 2 and rows["team-b"]["max_concurrent"] is None

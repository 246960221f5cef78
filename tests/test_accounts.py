"""Accounts: health, cooldown from the provider's hints, quota-aware selection and retries before the
first byte; first the table itself (values in, values out), then the real process against a provider
whose every key has its own rate limit."""

from __future__ import annotations

import asyncio
import multiprocessing
import re
import socket
import threading
import time
from pathlib import Path

import openai
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from egress import retries
from egress.accounts import Account, AccountTable, account_id, table_bytes
from egress.hints import RateHints
from egress.secrets import Secret
from egress.vkeys import mint, public_key_text
from tests import support
from tests.support import LoopbackServer, RawClient, _split_request, admin_get, request_bytes, samples, value

ISSUER = Ed25519PrivateKey.generate()
KEY_A = "sk-acct-a-0123456789abcdef"
KEY_B = "sk-acct-b-0123456789abcdef"


# --- the table -------------------------------------------------------------------------------


def accounts(*names: str) -> list[Account]:
    return [
        Account("openai", name, (b"authorization", Secret(b"Bearer sk-" + name.encode(), "env:X"))) for name in names
    ]


def bound(*names: str, table: AccountTable | None = None) -> tuple[AccountTable, list[Account]]:
    table = table or AccountTable()
    rows = accounts(*names)
    table.bind(rows)
    return table, rows


def quota(remaining: int, limit: int, reset: float = 30.0, dim: str = "requests") -> RateHints:
    return RateHints(remaining={dim: remaining}, limit={dim: limit}, reset={dim: reset})


def test_without_quota_headers_accounts_take_turns():
    table, rows = bound("a", "b", "c")
    picks = [table.choose(rows, 100.0).id for _ in range(6)]
    assert sorted(picks[:3]) == ["a", "b", "c"] and picks[3:] == picks[:3]


def test_the_account_with_the_most_headroom_is_chosen():
    table, (a, b) = bound("a", "b")
    table.observe(a, quota(10, 100), 100.0, 0.0)
    table.observe(b, quota(60, 100), 100.0, 0.0)
    assert {table.choose([a, b], 100.0).id for _ in range(4)} == {"b"}
    # Requests in flight count against the requests dimension.
    for _ in range(55):
        table.begin(b)
    assert table.choose([a, b], 100.0).id == "a"


def test_status_and_metrics_show_a_quota_until_its_reset_and_not_after():
    table, (a,) = bound("a")
    table.observe(a, quota(0, 100, reset=20.0), 100.0, 0.0)
    assert table.snapshot(a, 110.0, 0.0)["quota"]["requests"]["remaining"] == 0
    assert table.remaining(a, 110.0) == {"requests": 0}
    # Past its reset the provider has refilled it: neither /status nor the gauge shows the stale 0.
    assert table.snapshot(a, 121.0, 0.0)["quota"] == {} and table.remaining(a, 121.0) == {}


def test_a_spent_account_is_skipped_until_its_reset():
    table, (a, b) = bound("a", "b")
    table.observe(a, quota(0, 100, reset=20.0, dim="tokens"), 100.0, 0.0)
    assert {table.choose([a, b], 110.0).id for _ in range(4)} == {"b"}
    table.cool(b, 50.0, "rate_limited", 110.0)
    assert table.choose([a, b], 110.0) is None
    assert table.soonest([a, b], 110.0) == pytest.approx(10.0)  # a's reset at 120
    assert table.choose([a, b], 120.5).id == "a"  # refilled


def test_a_cooldown_only_ever_moves_later():
    table, (a,) = bound("a")
    table.cool(a, 30.0, "rate_limited", 100.0)
    table.cool(a, 5.0, "unavailable", 101.0)  # a shorter hint later never shortens it
    assert table.choose([a], 120.0) is None
    assert table.soonest([a], 120.0) == pytest.approx(10.0)
    table.cool(a, 60.0, "overloaded", 125.0)
    assert table.soonest([a], 125.0) == pytest.approx(60.0)
    assert table.snapshot(a, 125.0, 1000.0)["reason"] == "overloaded"
    assert table.choose([a], 185.1).id == "a"


def test_a_disabled_account_stays_out_until_a_reload():
    table, (a, b) = bound("a", "b")
    assert table.disable(a, "unauthorized")
    assert not table.disable(a, "unauthorized")
    assert {table.choose([a, b], 100.0).id for _ in range(3)} == {"b"}
    assert table.soonest([a], 100.0) is None  # nothing to wait for
    table.cool(a, 1.0, "rate_limited", 100.0)  # a disabled account doesn't start cooling
    assert table.snapshot(a, 100.0, 0.0)["state"] == "disabled"
    table.bind([a, b])  # what a reload does
    assert table.snapshot(a, 100.0, 0.0)["state"] == "healthy"


def test_a_restarted_worker_keeps_a_refused_account_disabled_until_a_reload():
    buffer = memoryview(bytearray(table_bytes()))
    lock = multiprocessing.Lock()
    first, (a, _) = bound("a", "b", table=AccountTable(buffer, lock))
    assert first.disable(a, "unauthorized")  # the provider refused the key: a 401
    restarted, (a2, b2) = bound("a", "b", table=AccountTable(buffer, lock))  # a worker killed, started again
    assert restarted.snapshot(a2, 100.0, 0.0)["state"] == "disabled"  # README: "until the next reload"
    assert restarted.choose([a2, b2], 100.0).id == "b"
    restarted.bind([a2, b2])  # a reload (SIGHUP) in that worker: the operator's word to try it again
    assert first.snapshot(a, 100.0, 0.0)["state"] == "healthy"


@pytest.mark.parametrize("left", [0, 1])
def test_a_remaining_count_without_its_reset_locks_nothing_out(left):
    # hints.exhausted_until: "A dimension at 0 whose reset the provider did not give adds nothing to
    # wait for"; nothing here may make one up (it was 60 s).
    table, (a,) = bound("a")
    table.observe(a, RateHints(remaining={"requests": left}, limit={"requests": 100}), 100.0, 0.0)
    table.begin(a)  # one in flight: a remaining of 1 would be spent too
    assert table.choose([a], 100.5) is a
    assert table.soonest([a], 100.5) == 0.0
    assert table.snapshot(a, 100.5, 0.0)["quota"] == {}
    table.observe(a, quota(0, 100, reset=20.0), 101.0, 0.0)  # with its reset it counts, until then
    assert table.choose([a], 101.0) is None
    assert table.soonest([a], 101.0) == pytest.approx(20.0)


def test_workers_share_one_state_through_the_buffer():
    buffer = memoryview(bytearray(table_bytes()))
    lock = multiprocessing.Lock()
    first, (a1, b1) = bound("a", "b", table=AccountTable(buffer, lock))
    second, (a2, b2) = bound("a", "b", table=AccountTable(buffer, lock))
    assert (a1.slot, b1.slot) == (a2.slot, b2.slot)
    first.cool(a1, 30.0, "rate_limited", 100.0)
    second.begin(b2)
    assert second.choose([a2, b2], 101.0).id == "b"
    assert first.snapshot(b1, 101.0, 0.0)["in_flight"] == 1


def test_the_retry_budget_allows_a_floor_and_a_share_of_requests():
    table, (a,) = bound("a")
    table.ratio, table.floor, table.window = 0.2, 3.0, 10.0
    allowed = sum(table.may_retry(100.0) for _ in range(10))
    assert allowed == 3  # no requests yet: the floor only
    for _ in range(50):
        table.begin(a)
    assert sum(table.may_retry(100.5) for _ in range(50)) == 10  # 3 + 0.2 * 50 = 13 in all
    # A window later the earlier counts weigh less and less.
    assert table.may_retry(125.0)


def test_account_ids_are_short_stable_and_not_the_key():
    key = b"sk-proj-abcdefghijklmnopqrstuvwxyz0123456789"
    assert account_id(key) == account_id(bytearray(key))
    assert re.fullmatch(r"[0-9a-f]{12}", account_id(key))
    assert account_id(key) not in key.decode()
    assert repr(accounts("x")[0]) == "Account(openai/x)"


# --- the real process ------------------------------------------------------------------------


class KeyedProvider(LoopbackServer):
    """An OpenAI-style provider where each key is an account with its own behaviour.

    `plans[key]` is a callable (served count for that key, starting at 0) -> (status, headers,
    body); every request is recorded as (key, path). Plain HTTP on loopback.
    """

    def __init__(self, plans: dict) -> None:
        self.plans = plans
        self.seen: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        super().__init__(backlog=64)

    def _serve(self, conn: socket.socket) -> None:
        for raw in self._requests(conn, _split_request):
            head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            path = head[0].split(" ")[1]
            headers = {n.lower(): v.strip() for n, _, v in (line.partition(":") for line in head[1:])}
            key = headers.get("authorization", "").removeprefix("Bearer ")
            with self.lock:
                count = sum(1 for seen_key, _ in self.seen if seen_key == key)
                self.seen.append((key, path))
            plan = self.plans.get(key)
            status, extra, body = plan(count) if plan else (401, {}, _error("invalid_api_key", "Incorrect API key"))
            extra = {"content-type": "application/json", **extra}
            lines = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}"]
            lines += [f"{name}: {value}" for name, value in extra.items()]
            try:
                conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            except OSError:
                return

    def served(self, key: str) -> int:
        with self.lock:
            return sum(1 for seen_key, _ in self.seen if seen_key == key)


def _error(code: str, message: str, kind: str = "requests") -> bytes:
    # https://platform.openai.com/docs/guides/error-codes: {"error": {message, type, param, code}}
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


def completion(count: int = 0, extra: dict | None = None):
    body = orjson.dumps(
        {
            "id": f"chatcmpl-{count}",
            "object": "chat.completion",
            "created": 1,
            "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    )
    return 200, extra or {}, body


def rate_limited(headers: dict | None = None):
    # OpenAI's 429: https://platform.openai.com/docs/guides/rate-limits#rate-limits-in-headers
    hints = {"retry-after": "20", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20s"}
    return 429, headers if headers is not None else hints, _error("rate_limit_exceeded", "Rate limit reached")


def accounts_config(upstream, tmp_path: Path, extra: str = "", row: str = "") -> str:
    """Two named accounts (team-a, team-b) on the openai row; `row` adds to that row, `extra` after."""
    for name, key in (("a", KEY_A), ("b", KEY_B)):
        (tmp_path / f"{name}.key").write_text(key + "\n")
    return f"""
[providers.openai]
base_url = "{upstream.base_url}"
pool_keys = [
    {{ name = "team-a", key = "file:{tmp_path / "a.key"}" }},
    {{ name = "team-b", key = "file:{tmp_path / "b.key"}" }},
]
models = ["gpt-4o"]
{row}

[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]
{extra}
"""


def chat(egress, key: str | None = None):
    key = key or mint(ISSUER, "accounts-app")[0]
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    with RawClient(egress.port) as client:
        client.send(request_bytes("POST", "/openai/v1/chat/completions", {"Authorization": f"Bearer {key}"}, body))
        return client.read_response("POST")


@pytest.fixture
def keyed():
    providers = []

    def start(plans: dict) -> KeyedProvider:
        provider = KeyedProvider(plans)
        providers.append(provider)
        return provider

    yield start
    for provider in providers:
        provider.stop()


def test_a_429_on_one_account_is_answered_by_the_next_with_no_error_for_the_caller(start_egress, keyed, tmp_path):
    upstream = keyed({KEY_A: lambda n: rate_limited(), KEY_B: completion})
    egress = start_egress(accounts_config(upstream, tmp_path))
    client = openai.OpenAI(base_url=egress.url + "/openai/v1", api_key=mint(ISSUER, "sdk")[0], max_retries=0)
    for _ in range(4):
        response = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
        assert response.parse().choices[0].message.content == "ok"
    # Once: a's 429 cooled it for the provider's 20 s, so later requests go to b alone.
    assert upstream.served(KEY_A) == 1
    assert upstream.served(KEY_B) == 4
    attempts = [chat(egress).headers["x-egress-attempts"] for _ in range(2)]
    assert attempts == ["1", "1"]
    status = orjson.loads(admin_get(egress.admin_port, "/status")[1])
    team_a = {row["name"]: row for row in status["providers"]["openai"]["accounts"]}["team-a"]
    assert team_a["state"] == "cooling" and team_a["reason"] == "rate_limited"
    assert team_a["until"] == pytest.approx(time.time() + 20, abs=5)
    found = samples(egress.admin_port)
    assert (
        value(found, "egress_upstream_attempts_total", provider="openai", account="team-a", outcome="retry_scheduled")
        == 1
    )
    assert value(found, "egress_upstream_attempts_total", provider="openai", account="team-b", outcome="success") == 6


def test_x_egress_attempts_counts_every_upstream_attempt(start_egress, keyed, tmp_path):
    upstream = keyed({KEY_A: lambda n: rate_limited(), KEY_B: completion})
    egress = start_egress(accounts_config(upstream, tmp_path))
    first = chat(egress)  # accounts start in their configured order: team-a, then team-b
    assert first.status == 200 and first.headers["x-egress-attempts"] == "2"
    assert chat(egress).headers["x-egress-attempts"] == "1"
    with RawClient(egress.port) as client:  # answered by egress itself: no attempt
        client.send(request_bytes("GET", "/nowhere/v1/models"))
        assert client.read_response().headers["x-egress-attempts"] == "0"


def test_traffic_leaves_an_account_before_its_429_when_its_quota_runs_out(start_egress, keyed, tmp_path):
    limit = 4

    def metered(n: int):
        if n >= limit:  # the provider's own limit: a 429, which egress must never provoke
            return rate_limited()
        left = limit - n - 1
        return completion(
            n,
            {
                "x-ratelimit-limit-requests": str(limit),
                "x-ratelimit-remaining-requests": str(left),
                "x-ratelimit-reset-requests": "1m0s",
            },
        )

    upstream = keyed({KEY_A: metered, KEY_B: metered})
    egress = start_egress(accounts_config(upstream, tmp_path))
    statuses = [chat(egress).status for _ in range(2 * limit)]
    assert statuses == [200] * (2 * limit)
    assert upstream.served(KEY_A) == limit and upstream.served(KEY_B) == limit
    # Both spent: egress answers itself, with when the first comes back, and sends nothing.
    refused = chat(egress)
    assert refused.status == 429 and refused.error_code == "all_accounts_cooling"
    assert 50 <= int(refused.headers["retry-after"]) <= 61
    assert refused.headers["x-egress-attempts"] == "0"
    assert len(upstream.seen) == 2 * limit


def test_when_every_account_is_limited_the_caller_gets_the_providers_own_429(start_egress, keyed, tmp_path):
    headers = {"retry-after": "1", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}
    upstream = keyed({KEY_A: lambda n: rate_limited(headers), KEY_B: lambda n: rate_limited(headers)})
    egress = start_egress(accounts_config(upstream, tmp_path))
    client = openai.OpenAI(base_url=egress.url + "/openai/v1", api_key=mint(ISSUER, "sdk")[0], max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    response = caught.value.response
    assert response.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"  # the provider's body, unchanged
    assert response.headers["retry-after"] == "1"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.headers["x-egress-attempts"] == "2"
    assert upstream.served(KEY_A) == 1 and upstream.served(KEY_B) == 1


def test_a_key_the_provider_refuses_is_disabled_and_the_request_still_answered(start_egress, keyed, tmp_path):
    upstream = keyed({KEY_B: completion})  # team-a's key is unknown to the provider: 401
    egress = start_egress(accounts_config(upstream, tmp_path))
    assert [chat(egress).status for _ in range(3)] == [200, 200, 200]
    assert upstream.served(KEY_A) == 1
    status = orjson.loads(admin_get(egress.admin_port, "/status")[1])
    rows = {row["name"]: row for row in status["providers"]["openai"]["accounts"]}
    assert rows["team-a"]["state"] == "disabled" and rows["team-a"]["reason"] == "unauthorized"
    assert rows["team-b"]["state"] == "healthy"
    assert '"event":"account_disabled"' in egress.logs()


def test_a_pool_key_the_provider_refuses_is_never_quoted_back_to_the_caller(start_egress, keyed, tmp_path):
    # OpenAI's 401 quotes the key it refused: "Incorrect API key provided: sk-proj-****wxyz" (and a
    # short key whole). With no other account to take it, the caller gets egress's own answer.
    def refused(count: int):
        message = f"Incorrect API key provided: {KEY_A[:8]}****{KEY_A[-4:]}. You can find your API key at ..."
        return 401, {"x-should-retry": "false"}, _error("invalid_api_key", message, "invalid_request_error")

    upstream = keyed({KEY_A: refused, KEY_B: refused})
    egress = start_egress(accounts_config(upstream, tmp_path))
    first, second, third = (chat(egress) for _ in range(3))
    for response in (first, second):  # each account refused in turn: x-should-retry false keeps it there
        assert response.status == 502, response.body
        error = orjson.loads(response.body)["error"]
        assert error["code"] == "pool_key_refused" and "401" in error["message"]
        assert KEY_A[-4:].encode() not in response.body and b"Incorrect API key" not in response.body
    assert third.status == 503 and orjson.loads(third.body)["error"]["code"] == "all_accounts_disabled"
    assert upstream.served(KEY_A) == 1 and upstream.served(KEY_B) == 1
    assert egress.logs().count('"event":"account_disabled"') == 2
    assert KEY_A[-4:] not in egress.logs()


def test_a_401_for_a_scope_one_endpoint_lacks_disables_no_account(start_egress, keyed, tmp_path):
    # A restricted key without api.responses.write gets a 401 on /v1/responses only (OpenAI's body,
    # continuedev/continue#10059); chat still works. Disabling on it let any caller disable every key.
    scope = (
        "You have insufficient permissions for this operation. Missing scopes: api.responses.write. "
        "Check that you have the correct role in your organization (Reader, Writer, Owner)."
    )
    upstream = None

    def restricted(count: int):
        if upstream.seen[-1][1].endswith("/responses"):
            return (
                401,
                {},
                orjson.dumps(
                    {"error": {"message": scope, "type": "invalid_request_error", "param": None, "code": None}}
                ),
            )
        if upstream.seen[-1][1].endswith("/models/gpt-4o"):
            message = "Project `proj_x` does not have access to model `gpt-4o`"
            return 403, {}, _error("model_not_found", message, "invalid_request_error")
        return completion(count)

    upstream = keyed({KEY_A: restricted, KEY_B: restricted})
    egress = start_egress(accounts_config(upstream, tmp_path))
    key = mint(ISSUER, "accounts-app")[0]
    with RawClient(egress.port) as client:
        body = b'{"model":"gpt-4o","input":"hi"}'
        client.send(request_bytes("POST", "/openai/v1/responses", {"Authorization": f"Bearer {key}"}, body))
        refused = client.read_response("POST")
        client.send(request_bytes("GET", "/openai/v1/models/gpt-4o", {"Authorization": f"Bearer {key}"}))
        forbidden = client.read_response()
    assert refused.status == 401 and b"Missing scopes" in refused.body  # the provider's own word, relayed
    assert forbidden.status == 403 and b"does not have access" in forbidden.body
    assert [chat(egress, key).status for _ in range(4)] == [200] * 4
    status = orjson.loads(admin_get(egress.admin_port, "/status")[1])
    assert {row["state"] for row in status["providers"]["openai"]["accounts"]} == {"healthy"}
    assert '"event":"account_disabled"' not in egress.logs()


def test_a_401_with_a_body_too_long_to_judge_is_a_502_never_a_part_of_it(start_egress, keyed, tmp_path):
    def huge(count: int):
        return 401, {}, b'{"error":{"message":"' + b"x" * 100_000 + b'"}}'

    upstream = keyed({KEY_A: huge, KEY_B: huge})
    egress = start_egress(accounts_config(upstream, tmp_path))
    response = chat(egress)
    assert response.status == 502 and orjson.loads(response.body)["error"]["code"] == "upstream_protocol_error"
    assert chat(egress).status == 502  # and the connection pool is fine for the next
    assert '"event":"account_disabled"' not in egress.logs()


@pytest.mark.parametrize(
    ("body", "refused"),
    [
        (_error("invalid_api_key", "Incorrect API key provided: sk-abc****wxyz."), True),
        (b'{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}', True),
        (b"<html>401 Authorization Required</html>", True),
        (b"", True),
        (_error(None, "You have insufficient permissions for this operation. Missing scopes: model.request."), False),
    ],
)
def test_a_401_refuses_the_key_unless_it_names_a_missing_permission(body, refused):
    assert retries.key_refused(body) is refused
    assert retries.key_refused(retries.Refusal(body)) is refused  # as held (a bytearray subclass)


def test_the_retry_budget_stops_a_storm(start_egress, keyed, tmp_path):
    def down(n: int):  # a 500: no cooldown, so every request would otherwise retry
        return 500, {}, _error("server_error", "The server had an error", "server_error")

    upstream = keyed({KEY_A: down, KEY_B: down})
    extra = "[accounts]\nmax_attempts = 3\nretry_budget = 0.2\nretry_floor = 2\nretry_window = 60.0\n"
    egress = start_egress(accounts_config(upstream, tmp_path, extra))
    requests = 30
    statuses = []
    for _ in range(requests):
        response = chat(egress)
        statuses.append(response.status)
    assert statuses == [500] * requests  # the provider's answer, relayed once attempts or budget ran out
    # Without a budget: up to 3 attempts each. With it: each request once, plus the floor and 20 %.
    assert len(upstream.seen) <= requests + 2 + 0.2 * requests + 1
    found = samples(egress.admin_port)
    assert value(found, "egress_retry_budget_exhausted_total") >= 1


def test_x_should_retry_false_is_obeyed_as_the_sdks_obey_it(start_egress, keyed, tmp_path):
    # openai-python _base_client.py:932-941, anthropic-sdk-python :940-949: "If the server
    # explicitly says whether or not to retry, obey". A 429 alone would go to the other account.
    def refused(n: int):
        return 429, {"x-should-retry": "false", "retry-after": "20"}, _error("rate_limit_exceeded", "Do not retry")

    upstream = keyed({KEY_A: refused, KEY_B: refused})
    egress = start_egress(accounts_config(upstream, tmp_path))
    response = chat(egress)
    assert response.status == 429 and response.error_code == "rate_limit_exceeded"
    assert response.headers["x-egress-attempts"] == "1"
    assert len(upstream.seen) == 1  # sent nowhere else
    found = samples(egress.admin_port)
    assert value(found, "egress_upstream_attempts_total", outcome="not_retryable") == 1


def test_x_should_retry_true_retries_what_the_status_alone_would_not(start_egress, keyed, tmp_path):
    def conflict_once(n: int):  # a 409, which egress never retries on its own
        if n == 0:
            return 409, {"x-should-retry": "true"}, _error("conflict", "Try again")
        return completion(n)

    upstream = keyed({KEY_A: conflict_once, KEY_B: conflict_once})
    egress = start_egress(accounts_config(upstream, tmp_path))
    response = chat(egress)
    assert response.status == 200
    assert response.headers["x-egress-attempts"] == "3"  # a, then b, each 409 once; then a again
    assert sorted((upstream.served(KEY_A), upstream.served(KEY_B))) == [1, 2]


def test_a_byo_key_is_never_moved_to_another_account(start_egress, keyed, tmp_path):
    byo = "sk-byo-caller-0123456789"
    upstream = keyed({byo: lambda n: rate_limited(), KEY_A: completion, KEY_B: completion})
    egress = start_egress(accounts_config(upstream, tmp_path))
    response = chat(egress, key=byo)
    assert response.status == 429
    assert response.headers["x-egress-attempts"] == "1"
    assert upstream.served(byo) == 1 and upstream.served(KEY_A) == upstream.served(KEY_B) == 0


def sse(events: list[bytes], extra: dict | None = None):
    return 200, {"content-type": "text/event-stream", **(extra or {})}, b"".join(events)


OVERLOADED_EVENT = (
    b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
)


def stream_chat(egress):
    body = orjson.dumps({"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    with RawClient(egress.port) as client:
        headers = {"Authorization": f"Bearer {mint(ISSUER, 'stream-app')[0]}"}
        client.send(request_bytes("POST", "/openai/v1/chat/completions", headers, body))
        return client.read_response("POST")


def test_a_stream_whose_first_event_is_an_error_is_retried_on_the_next_account(start_egress, keyed, tmp_path):
    good = [
        b": keep-alive\n\n",
        b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"ok"}}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    upstream = keyed({KEY_A: lambda n: sse([OVERLOADED_EVENT]), KEY_B: lambda n: sse(good)})
    egress = start_egress(accounts_config(upstream, tmp_path))
    response = stream_chat(egress)
    assert response.status == 200 and response.complete
    assert response.body == b"".join(good)  # the caller never saw the error event
    assert response.headers["x-egress-attempts"] == "2"
    status = orjson.loads(admin_get(egress.admin_port, "/status")[1])
    team_a = {row["name"]: row for row in status["providers"]["openai"]["accounts"]}["team-a"]
    assert team_a["state"] == "cooling" and team_a["reason"] == "stream_error"


def test_a_stream_error_with_no_account_left_reaches_the_caller_as_sent(start_egress, keyed, tmp_path):
    upstream = keyed({})
    upstream.plans[KEY_A] = upstream.plans[KEY_B] = lambda n: (
        200,
        {"content-type": "text/event-stream"},
        OVERLOADED_EVENT,
    )
    egress = start_egress(accounts_config(upstream, tmp_path))
    response = stream_chat(egress)
    assert response.status == 200
    assert response.body == OVERLOADED_EVENT
    assert response.headers["x-egress-attempts"] == "2"


def test_a_good_stream_is_relayed_once_its_first_event_is_in(start_egress, keyed, tmp_path):
    events = [b'data: {"id":"c%d","choices":[{"index":0,"delta":{"content":"x"}}]}\n\n' % i for i in range(50)]
    upstream = keyed({KEY_A: lambda n: sse(events), KEY_B: lambda n: sse(events)})
    egress = start_egress(accounts_config(upstream, tmp_path))
    response = stream_chat(egress)
    assert response.body == b"".join(events)
    assert response.headers["x-egress-attempts"] == "1"


def test_status_names_accounts_and_never_shows_a_key(start_egress, keyed, tmp_path):
    upstream = keyed({KEY_A: completion, KEY_B: completion})
    egress = start_egress(accounts_config(upstream, tmp_path))
    chat(egress)
    code, body = admin_get(egress.admin_port, "/status")
    assert code == 200
    document = orjson.loads(body)
    assert document["build"]["version"]
    assert re.fullmatch(r"[0-9a-f]{12}", document["config_hash"])
    # The worker that answered runs the config it reports, as its row in `workers` says.
    assert [row["config_hash"] for row in document["workers"]] == [document["config_hash"]]
    assert document["uptime_s"] >= 0
    names = [row["name"] for row in document["providers"]["openai"]["accounts"]]
    assert names == ["team-a", "team-b"]
    assert sum(row["requests"] for row in document["providers"]["openai"]["accounts"]) == 1
    assert document["usage"]["jsonl_dropped"] == 0
    for secret in (KEY_A, KEY_B, "sk-acct"):
        assert secret not in body.decode()
        assert secret not in egress.logs()


def _event_end_reference(buffer: bytes, start: int) -> int | None:
    """The first blank line's end by the plain rule: the earlier of LF LF and CRLF CRLF."""
    ends = [index for index in (buffer.find(b"\n\n", start), buffer.find(b"\r\n\r\n", start)) if index >= 0]
    if not ends:
        return None
    end = min(ends)
    return end + (4 if buffer.startswith(b"\r\n\r\n", end) else 2)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=40).map(lambda raw: bytes(b"\r\na:"[byte % 4] for byte in raw)), st.integers(0, 10))
def test_the_first_event_is_found_where_the_plain_rule_finds_it(buffer, start):
    assert retries._event_end(buffer, start) == _event_end_reference(buffer, start)
    assert retries.first_event(buffer) == retries.first_event(bytearray(buffer))


def test_a_whole_stream_in_one_read_is_judged_on_its_first_event():
    body = b'data: {"a":1}\n\n' + b'data: {"b":2}\n\n' * 1000
    assert retries.first_event(body) == "ok"
    assert retries.first_event(b'event: error\ndata: {"error":{"type":"overloaded_error"}}\n\n' + body) == "error"
    assert retries.first_event(b'data: {"a":1}\r\n\r\n') == "ok"
    assert retries.first_event(b'data: {"a":1}\r\n') is None


class _HeldExchange:
    """What retries' hold reads and calls on an exchange, recording what is relayed."""

    def __init__(self, loop) -> None:
        self.client = type(
            "Client", (), {"loop": loop, "state": type("State", (), {"config": _FIRST_EVENT_CONFIG})()}
        )()
        self.streamed, self.tries, self.settled = True, 1, False
        self.held = self.hold_timer = None
        self.head_sent, self.ttfb, self.started = True, None, time.monotonic()
        self.relayed: list[bytes] = []

    def upstream_body(self, data: bytes) -> None:
        self.relayed.append(bytes(data))

    def upstream_read_done(self) -> None:
        pass


_FIRST_EVENT_CONFIG = type("Config", (), {"accounts": type("Accounts", (), {"first_event_timeout": 30.0})()})()


@pytest.mark.parametrize("reads", [[b'data: {"a":1}\n\n'], [b'data: {"a"', b":1}\n\n"]])
def test_the_first_events_deadline_is_cancelled_once_it_is_judged(reads):
    loop = asyncio.new_event_loop()
    try:
        exchange = _HeldExchange(loop)
        retries.hold_stream(exchange, 200)
        timer = exchange.hold_timer
        assert timer is not None and not timer.cancelled()
        for data in reads:
            retries.held_body(exchange, data)
        # Relayed as it came, and the deadline (which kept the exchange alive) is gone.
        assert b"".join(exchange.relayed) == b"".join(reads)
        assert exchange.held is None and exchange.hold_timer is None and timer.cancelled()
    finally:
        loop.close()


def test_the_providers_time_on_a_retried_attempt_is_not_egress_overhead(start_egress, tmp_path):
    """A 429 after 0.4 s, then the other account's 200 after 0.4 s: egress's overhead is its own
    few milliseconds, not the first attempt's wait (egress_overhead_seconds)."""
    slow429 = (
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
        b"retry-after: 5\r\ncontent-length: 2\r\n\r\n{}"
    )
    ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"

    class Slow(support.ScriptedUpstream):
        def _serve(self, conn) -> None:
            time.sleep(0.4)  # the provider's time before its head, on every attempt
            super()._serve(conn)

    upstream = Slow([slow429, ok])
    try:
        egress = start_egress(accounts_config(upstream, tmp_path))
        body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
        with RawClient(egress.port, timeout=20) as client:
            headers = {"Authorization": f"Bearer {mint(ISSUER, 'overhead')[0]}"}
            client.send(request_bytes("POST", "/openai/v1/chat/completions", headers, body))
            response = client.read_response("POST")
        assert (response.status, response.headers.get("x-egress-attempts")) == (200, "2")
        found = samples(egress.admin_port)
        assert value(found, "egress_request_duration_seconds_sum", provider="openai") >= 0.8
        assert value(found, "egress_overhead_seconds_sum", provider="openai") < 0.3
    finally:
        upstream.stop()

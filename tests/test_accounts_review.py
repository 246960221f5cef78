"""Review of accounts, cooldowns, retries, the retry budget and the waiting line: each case a bug
found against the real code (the table directly; the proxy through the real `egress serve`)."""

from __future__ import annotations

import time

import orjson
import pytest

from egress.vkeys import mint, public_key_text
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
from tests.test_accounts import (  # noqa: F401  (keyed: the fixture)
    ISSUER,
    KEY_A,
    KEY_B,
    OVERLOADED_EVENT,
    _error,
    accounts_config,
    bound,
    chat,
    completion,
    keyed,
    quota,
    rate_limited,
    stream_chat,
)
from tests.test_admission import OrderedProvider, _reload

# --- the retry budget ---------------------------------------------------------------------------


def test_requests_count_in_the_budget_window_they_were_made_in():
    """The budget's windows rolled only when a retry asked: requests after a quiet spell were
    counted in a window long over, and the next retry zeroed them, leaving the floor alone."""
    table, (a,) = bound("a")
    table.ratio, table.floor, table.window = 0.2, 3.0, 10.0
    assert table.may_retry(0.5, count=False)  # a retry long ago: the budget's window starts then
    for _ in range(50):  # a burst, 25 s later
        assert table.take([a], 25.0) is a
    assert sum(table.may_retry(25.5) for _ in range(50)) == 13  # 3 + 20 % of 50 (was 3)
    # A window on, those 50 weigh by how much of the sliding window still covers them.
    table2, (b,) = bound("b")
    table2.ratio, table2.floor, table2.window = 0.2, 3.0, 10.0
    assert table2.may_retry(100.0, count=False)
    for _ in range(50):
        table2.take([b], 115.0)
    assert sum(table2.may_retry(119.0) for _ in range(50)) == 13  # same window: all 50 count (was 3)


# --- the waiting line and reloads ---------------------------------------------------------------


def _chat(name: str, key: str) -> bytes:
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": name}]})
    return request_bytes("POST", "/openai/v1/chat/completions", {"Authorization": f"Bearer {key}"}, body)


@pytest.mark.parametrize("cap", [2, 0])
def test_a_pooled_waiter_goes_once_a_reload_raises_the_providers_cap(start_egress, tmp_path, cap):
    """A pooled request waits for a capped provider; the operator raises the cap (or lifts it): it
    goes at once, as a BYO one does (test_admission), not when the request ahead ends or its
    queue_timeout runs out. It waited under the cap of the pool its key was given before the reload."""
    upstream = OrderedProvider(hung=1)
    try:
        extra = "\n[upstream]\nfirst_byte_timeout = 60.0\n"

        def config(row: str) -> str:
            return accounts_config(upstream, tmp_path, extra=extra, row=row)

        egress = start_egress(config("max_concurrent = 1\nqueue_timeout = 20"))
        key = mint(ISSUER, "reload-wait")[0]
        with RawClient(egress.port, timeout=30) as first, RawClient(egress.port, timeout=30) as waiter:
            first.send(_chat("first", key))
            assert wait_until(lambda: len(upstream.seen) == 1, timeout=10)
            waiter.send(_chat("waiter", key))
            time.sleep(0.5)
            assert upstream.seen == ["first"]  # it waits, the cap reached
            _reload(egress, config(f"max_concurrent = {cap}\nqueue_timeout = 20"))
            started = time.monotonic()
            assert wait_until(lambda: len(upstream.seen) == 2, timeout=10), "the waiter still waits"
            assert time.monotonic() - started < 5
            response = waiter.read_response("POST")
            assert response.status == 200, response.body
            upstream.release.set()
            assert first.read_response("POST").status == 200
    finally:
        upstream.stop()


# --- cooldowns ----------------------------------------------------------------------------------


def test_streams_failing_at_their_first_event_back_off_longer_each_time(start_egress, keyed, tmp_path):  # noqa: F811
    """The 200 head of a stream reset the account's consecutive failures before its first event
    was judged, so an account whose every stream began with an error always cooled the first
    step (0.5-1 s) and never backed off (hints.cooldown: 1 s doubling per consecutive failure)."""
    failing = lambda n: (200, {"content-type": "text/event-stream"}, OVERLOADED_EVENT)  # noqa: E731
    upstream = keyed({KEY_A: failing, KEY_B: failing})
    egress = start_egress(accounts_config(upstream, tmp_path))

    def failures() -> list[int]:
        status = orjson.loads(admin_get(egress.admin_port, "/status")[1])
        return [row["consecutive_failures"] for row in status["providers"]["openai"]["accounts"]]

    for round_ in (1, 2, 3):
        response = stream_chat(egress)
        assert response.status == 200 and response.body == OVERLOADED_EVENT  # no account left: as sent
        assert failures() == [round_, round_]
        if round_ < 3:
            time.sleep(2.0 ** (round_ - 1) + 0.1)  # the longest cooldown of this round: both usable again
    assert len(upstream.seen) == 6


def test_a_success_that_was_none_gives_back_the_failures_it_cleared():
    table, (a, b) = bound("a", "b")
    for _ in range(3):
        table.failed(a, "server_error", 0.0)
    table.succeeded(a)  # a 200 stream's head
    assert table.failures(a) == 0
    table.relapsed(a)  # its first event: an error
    assert table.failures(a) == 3
    table.succeeded(a)
    table.succeeded(a)  # a real success after: nothing left to give back
    table.relapsed(a)
    assert table.failures(a) == 0
    table.relapsed(b)  # never cleared: nothing changes
    assert table.failures(b) == 0


# --- a retried translated stream ----------------------------------------------------------------

_MESSAGE_STREAM = b"".join(
    b"event: %s\ndata: %s\n\n" % (event["type"].encode(), orjson.dumps(event))
    for event in (
        {
            "type": "message_start",
            "message": {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "model": "claude-x",
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 3, "output_tokens": 1},
            },
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ok"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 1},
        },
        {"type": "message_stop"},
    )
)


class _AnthropicAccounts(LoopbackServer):
    """Anthropic by pool key: `sk-ant-a…` streams an overloaded error first (request-id req_a),
    any other key a whole message (req_b)."""

    def _serve(self, conn) -> None:
        for raw in self._requests(conn, _split_request):
            failing = b"x-api-key: sk-ant-a" in raw.split(b"\r\n\r\n", 1)[0].lower()
            body, request_id = (OVERLOADED_EVENT, b"req_a") if failing else (_MESSAGE_STREAM, b"req_b")
            head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nrequest-id: %s\r\ncontent-length: %d\r\n\r\n"
            try:
                conn.sendall(head % (request_id, len(body)) + body)
            except OSError:
                return


def test_a_translated_stream_retried_after_its_head_carries_the_answering_attempts_id(start_egress, tmp_path):
    """NEEDS /tmp/review_accounts/surface.py.patch. An OpenAI chat stream translated to Anthropic:
    the first account's stream begins with an error and the request goes to the next account. The
    caller got the dropped attempt's id as x-request-id (the translation's filter added it at the
    first head only) beside the answering attempt's request-id."""
    upstream = _AnthropicAccounts()
    try:
        (tmp_path / "a.key").write_text("sk-ant-a-0123456789\n")
        (tmp_path / "b.key").write_text("sk-ant-b-0123456789\n")
        egress = start_egress(f"""
[providers.anthropic]
base_url = "{upstream.base_url}"
pool_keys = [
    {{ name = "a", key = "file:{tmp_path / "a.key"}" }},
    {{ name = "b", key = "file:{tmp_path / "b.key"}" }},
]
models = ["claude-x"]

[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]

[[routes]]
match = "claude-x"
provider = "anthropic"
""")
        body = orjson.dumps({"model": "claude-x", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        with RawClient(egress.port) as client:
            headers = {"Authorization": f"Bearer {mint(ISSUER, 'translated')[0]}"}
            client.send(request_bytes("POST", "/v1/chat/completions", headers, body))
            response = client.read_response("POST")
        assert response.status == 200 and b'"content":"ok"' in response.body
        assert response.headers["x-egress-attempts"] == "2"
        assert response.headers["request-id"] == "req_b"
        assert response.headers["x-request-id"] == "req_b"  # was req_a, the dropped attempt's
    finally:
        upstream.stop()


# --- an account whose billing is spent ----------------------------------------------------------
# OpenAI answers a spent account (its credits used up, or its monthly hard limit reached) with a
# 429 whose code is insufficient_quota (https://help.openai.com/en/articles/6891831); Anthropic with
# a 400 invalid_request_error, "Your credit balance is too low to access the Anthropic API"
# (anthropics/claude-code#4208, #66314). Taken for a rate limit, the account was cooled for the
# default back-off and tried again every minute or so for good.

_OPENAI_SPENT = (
    "You exceeded your current quota, please check your plan and billing details. For more information "
    "on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors."
)
_ANTHROPIC_SPENT = orjson.dumps(
    {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "Your credit balance is too low to access the Anthropic API. "
            "Please go to Plans & Billing to upgrade or purchase credits.",
        },
        "request_id": "req_011CbrFTcXhtiMzr3s6EocF7",
    }
)


def _spent(count: int):
    return 429, {}, _error("insufficient_quota", _OPENAI_SPENT, "insufficient_quota")


def _accounts_of(egress, provider: str = "openai") -> dict:
    status = orjson.loads(admin_get(egress.admin_port, "/status")[1])
    return {row["name"]: row for row in status["providers"][provider]["accounts"]}


def test_an_account_whose_billing_is_spent_is_disabled_not_cooled(start_egress, keyed, tmp_path):  # noqa: F811
    upstream = keyed({KEY_A: _spent, KEY_B: completion})
    egress = start_egress(accounts_config(upstream, tmp_path))
    first = chat(egress)  # team-a first: spent, so team-b answers
    assert first.status == 200 and first.headers["x-egress-attempts"] == "2"
    time.sleep(1.2)  # past the first default cooldown (0.5-1 s): a cooled team-a would be tried again
    assert [chat(egress).status for _ in range(4)] == [200] * 4
    assert upstream.served(KEY_A) == 1  # was 2: cooled, then tried again
    rows = _accounts_of(egress)
    assert rows["team-a"]["state"] == "disabled" and rows["team-a"]["reason"] == "billing_spent"
    assert rows["team-b"]["state"] == "healthy"
    assert '"event":"account_disabled"' in egress.logs() and '"reason":"billing_spent"' in egress.logs()
    found = samples(egress.admin_port)
    outcome = "account_disabled"
    assert value(found, "egress_upstream_attempts_total", provider="openai", account="team-a", outcome=outcome) == 1


def test_with_every_account_spent_the_caller_gets_pool_key_refused(start_egress, keyed, tmp_path):  # noqa: F811
    upstream = keyed({KEY_A: _spent, KEY_B: _spent})
    egress = start_egress(accounts_config(upstream, tmp_path))
    first = chat(egress)
    assert first.status == 502, first.body  # the 429 was about egress's billing, not the caller's
    error = orjson.loads(first.body)["error"]
    assert error["code"] == "pool_key_refused" and "429" in error["message"]
    assert first.headers["x-egress-attempts"] == "2"
    second = chat(egress)  # nothing is sent to a spent account again, until a reload
    assert second.status == 503 and orjson.loads(second.body)["error"]["code"] == "all_accounts_disabled"
    assert upstream.served(KEY_A) == 1 and upstream.served(KEY_B) == 1


def test_a_byo_keys_spent_billing_is_the_callers_answer_untouched(start_egress, keyed, tmp_path):  # noqa: F811
    byo = "sk-byo-caller-0123456789"
    upstream = keyed({byo: _spent, KEY_A: completion, KEY_B: completion})
    egress = start_egress(accounts_config(upstream, tmp_path))
    response = chat(egress, key=byo)
    assert response.status == 429 and response.body == _spent(0)[2]
    assert upstream.served(KEY_A) == upstream.served(KEY_B) == 0


def test_a_rate_limit_429_is_still_cooled_and_retried(start_egress, keyed, tmp_path):  # noqa: F811
    # Its body judged first, a plain 429 is what it was: cooled for the provider's word, retried.
    upstream = keyed({KEY_A: lambda n: rate_limited(), KEY_B: completion})
    egress = start_egress(accounts_config(upstream, tmp_path))
    assert chat(egress).headers["x-egress-attempts"] == "2"
    rows = _accounts_of(egress)
    assert rows["team-a"]["state"] == "cooling" and rows["team-a"]["reason"] == "rate_limited"


class _AnthropicPlans(LoopbackServer):
    """Anthropic by pool key: `plans[prefix of x-api-key]` -> (status, headers, body); the rest a message."""

    def __init__(self, plans: dict) -> None:
        self.plans = plans
        self.seen: list[str] = []
        super().__init__()

    def _serve(self, conn) -> None:
        for raw in self._requests(conn, _split_request):
            head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            headers = {n.lower(): v.strip() for n, _, v in (line.partition(":") for line in head[1:])}
            key = headers.get("x-api-key", "")
            self.seen.append(key)
            plan = next((plan for prefix, plan in self.plans.items() if key.startswith(prefix)), None)
            status, extra, body = plan if plan else (200, {"content-type": "application/json"}, _MESSAGE)
            lines = [f"HTTP/1.1 {status} X", f"content-length: {len(body)}", "request-id: req_x"]
            lines += [f"{name}: {value}" for name, value in extra.items()]
            try:
                conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            except OSError:
                return


_MESSAGE = orjson.dumps(
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 3, "output_tokens": 1},
    }
)


def _anthropic_config(upstream, tmp_path, extra: str = "") -> str:
    (tmp_path / "a.key").write_text("sk-ant-a-0123456789\n")
    (tmp_path / "b.key").write_text("sk-ant-b-0123456789\n")
    return f"""
[providers.anthropic]
base_url = "{upstream.base_url}"
pool_keys = [
    {{ name = "a", key = "file:{tmp_path / "a.key"}" }},
    {{ name = "b", key = "file:{tmp_path / "b.key"}" }},
]
models = ["claude-x"]

[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]

[[routes]]
match = "claude-x"
provider = "anthropic"
{extra}
"""


def _messages(egress, stream: bool = False):
    body = orjson.dumps(
        {"model": "claude-x", "max_tokens": 8, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}
    )
    with RawClient(egress.port) as client:
        headers = {"x-api-key": mint(ISSUER, "anthropic-app")[0], "anthropic-version": "2023-06-01"}
        client.send(request_bytes("POST", "/anthropic/v1/messages", headers, body))
        return client.read_response("POST")


def test_an_anthropic_account_whose_credit_is_spent_is_disabled(start_egress, tmp_path):
    upstream = _AnthropicPlans({"sk-ant-a": (400, {"content-type": "application/json"}, _ANTHROPIC_SPENT)})
    try:
        egress = start_egress(_anthropic_config(upstream, tmp_path))
        first = _messages(egress)
        assert first.status == 200 and first.headers["x-egress-attempts"] == "2", first.body  # was the 400
        rows = _accounts_of(egress, "anthropic")
        assert rows["a"]["state"] == "disabled" and rows["a"]["reason"] == "billing_spent"
        assert [_messages(egress).status for _ in range(2)] == [200, 200]
        assert upstream.seen.count("sk-ant-a-0123456789") == 1
    finally:
        upstream.stop()


def test_any_other_400_is_the_callers_answer_and_disables_nothing(start_egress, tmp_path):
    bad = orjson.dumps(
        {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}
    )
    upstream = _AnthropicPlans({"sk-ant-": (400, {"content-type": "application/json"}, bad)})
    try:
        egress = start_egress(_anthropic_config(upstream, tmp_path))
        response = _messages(egress)
        assert response.status == 400 and response.body == bad
        assert response.headers["x-egress-attempts"] == "1"
        assert {row["state"] for row in _accounts_of(egress, "anthropic").values()} == {"healthy"}
    finally:
        upstream.stop()


@pytest.mark.parametrize(
    ("body", "spent"),
    [
        (_spent(0)[2], True),
        # An older shape: the type alone says it (HuggingGPT discussion #5 quotes code None).
        (orjson.dumps({"error": {"message": _OPENAI_SPENT, "type": "insufficient_quota", "code": None}}), True),
        (_ANTHROPIC_SPENT, True),
        (_error("rate_limit_exceeded", "Rate limit reached for gpt-4o"), False),
        (b'{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: Field required"}}', False),
        (b"<html>429 Too Many Requests</html>", False),
        (b"", False),
        (b"[1, 2]", False),
        (b'{"error": "insufficient_quota"}', False),
        # Anthropic's words, but not its error: a message is judged only as an invalid_request_error.
        (b'{"type":"error","error":{"type":"api_error","message":"Your credit balance is too low"}}', False),
        # A caller's words quoted in a provider's message come after its own: never its start.
        (_error("invalid_value", "Invalid 'user': 'Your credit balance is too low'", "invalid_request_error"), False),
    ],
)
def test_a_spent_billing_is_told_by_its_body(body, spent):
    from egress import retries

    assert retries.billing_spent(body) is spent
    assert retries.billing_spent(retries.Refusal(body)) is spent


# --- a bound on the provider's cooldown ---------------------------------------------------------


def test_a_providers_cooldown_is_bounded_by_max_cooldown(start_egress, keyed, tmp_path):  # noqa: F811
    # A retry-after of a year (hints.MAX_WAIT) was obeyed exactly: the key was benched until restart.
    year = {"retry-after": "31536000"}
    upstream = keyed({KEY_A: lambda n: rate_limited(year), KEY_B: completion})
    egress = start_egress(accounts_config(upstream, tmp_path, extra="\n[accounts]\nmax_cooldown = 30\n"))
    assert chat(egress).status == 200
    team_a = _accounts_of(egress)["team-a"]
    assert team_a["state"] == "cooling"
    assert team_a["until"] == pytest.approx(time.time() + 30, abs=5)  # was a year away


def test_the_default_cooldown_bound_is_an_hour():
    from egress.config import parse_config

    assert parse_config({}).accounts.max_cooldown == 3600.0


@pytest.mark.parametrize("bad", [0, 0.5, -1, 400 * 24 * 3600.0, float("inf"), float("nan"), "1h", True])
def test_max_cooldown_must_be_a_sane_number_of_seconds(bad):
    from egress.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"accounts\.max_cooldown"):
        parse_config({"accounts": {"max_cooldown": bad}})


def test_cooldowns_past_a_new_bound_end_within_it():
    """A reload lowering max_cooldown (or the first one to bring it) shortens every cooldown that
    would outlast it from now: one bad header set under the old bound no longer benches the key."""
    table, (a, b, c) = bound("a", "b", "c")
    table.cool(a, 31536000.0, "rate_limited", 100.0)  # a year, set before any bound
    table.cool(b, 10.0, "rate_limited", 100.0)  # short: untouched
    table.disable(c, "payment_required")
    table.limit_cooldowns([a, b, c], 200.0, 60.0)
    assert table.snapshot(a, 200.0, 1000.0)["until"] == pytest.approx(1060.0)
    assert table.state_of(a, 259.0) == 1 and table.state_of(a, 260.5) == 0  # healthy from now + 60 s
    assert table.snapshot(b, 100.0, 1000.0)["until"] == pytest.approx(1010.0)
    assert table.state_of(c, 1e9) == 2  # a disabled account stays disabled: only bind lifts that
    # A spent quota whose reset is a year away is a wait like any other: bounded the same.
    table.observe(b, quota(0, 10, reset=31536000.0), 300.0, 1000.0)
    assert table.choose([b], 301.0) is None
    table.limit_cooldowns([b], 400.0, 60.0)
    assert table.choose([b], 459.0) is None and table.choose([b], 461.0) is b


def test_a_cooldown_and_a_quota_reset_are_bounded_as_they_are_recorded():
    from egress.hints import RateHints, cooldown

    assert cooldown(429, RateHints(retry_after=31536000.0), 0, 0.5, 3600.0) == 3600.0
    assert cooldown(429, RateHints(retry_after=20.0), 0, 0.5, 3600.0) == 20.0  # shorter: exactly
    assert cooldown(503, RateHints(), 12, 0.99, 30.0) <= 30.0  # the default back-off too
    assert cooldown(500, RateHints(retry_after=31536000.0), 0, 0.5, 3600.0) == 3600.0
    table, (a,) = bound("a")
    table.observe(a, quota(0, 10, reset=31536000.0), 0.0, 1000.0, 3600.0)
    assert table.choose([a], 3599.0) is None and table.choose([a], 3601.0) is a


# --- an error event before message_start --------------------------------------------------------

_PING = b'event: ping\ndata: {"type": "ping"}\n\n'


@pytest.mark.parametrize("before", [b"", _PING, b": keep-alive\n\n" + _PING])
def test_an_anthropic_stream_failing_before_message_start_is_retried(start_egress, tmp_path, before):
    """Passthrough: an Anthropic stream's error event before its message_start, after any number of
    pings (https://docs.anthropic.com/en/docs/build-with-claude/streaming: "Event streams may also
    include any number of ping events"): a ping says nothing of the answer, the error does."""
    failing = (200, {"content-type": "text/event-stream"}, before + OVERLOADED_EVENT)
    good = (200, {"content-type": "text/event-stream"}, _PING + _MESSAGE_STREAM)
    upstream = _AnthropicPlans({"sk-ant-a": failing, "sk-ant-b": good})
    try:
        egress = start_egress(_anthropic_config(upstream, tmp_path))
        response = _messages(egress, stream=True)
        assert response.status == 200 and response.headers["x-egress-attempts"] == "2", response.body
        assert response.body == _PING + _MESSAGE_STREAM
        assert _accounts_of(egress, "anthropic")["a"]["reason"] == "stream_error"
    finally:
        upstream.stop()


@pytest.mark.parametrize("before", [b"", _PING])
def test_a_translated_stream_failing_before_message_start_is_retried(start_egress, tmp_path, before):
    failing = (200, {"content-type": "text/event-stream"}, before + OVERLOADED_EVENT)
    good = (200, {"content-type": "text/event-stream"}, _PING + _MESSAGE_STREAM)
    upstream = _AnthropicPlans({"sk-ant-a": failing, "sk-ant-b": good})
    try:
        egress = start_egress(_anthropic_config(upstream, tmp_path))
        body = orjson.dumps({"model": "claude-x", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        with RawClient(egress.port) as client:
            headers = {"Authorization": f"Bearer {mint(ISSUER, 'translated')[0]}"}
            client.send(request_bytes("POST", "/v1/chat/completions", headers, body))
            response = client.read_response("POST")
        assert response.status == 200 and response.headers["x-egress-attempts"] == "2", response.body
        assert b'"content":"ok"' in response.body and b"overloaded" not in response.body
    finally:
        upstream.stop()


@pytest.mark.parametrize(
    ("buffer", "verdict"),
    [
        (_PING + OVERLOADED_EVENT, "error"),
        (_PING + _PING, None),  # only pings so far: nothing said yet
        (_PING + _MESSAGE_STREAM, "ok"),
        (b'event: ping\r\ndata: {"type":"ping"}\r\n\r\n' + OVERLOADED_EVENT, "error"),
        (b'data: {"type": "ping"}\n\n' + OVERLOADED_EVENT, "error"),
        (b"event: ping\ndata: {}\n\n" + _MESSAGE_STREAM, "ok"),
    ],
)
def test_pings_before_the_first_event_say_nothing(buffer, verdict):
    from egress import retries

    assert retries.first_event(buffer) == verdict


def test_a_reload_lowering_max_cooldown_ends_longer_cooldowns_within_it(start_egress, keyed, tmp_path):  # noqa: F811
    """NEEDS /tmp/review_accounts2/auth.py.patch. An account cooled for the hour the old bound
    allowed: a reload to `max_cooldown = 5` ends that cooldown 5 s from the reload, not an hour on."""
    year = {"retry-after": "31536000"}
    upstream = keyed({KEY_A: lambda n: rate_limited(year) if n == 0 else completion(n), KEY_B: completion})
    egress = start_egress(accounts_config(upstream, tmp_path))
    assert chat(egress).status == 200
    assert _accounts_of(egress)["team-a"]["until"] == pytest.approx(time.time() + 3600, abs=5)  # the default
    _reload(egress, accounts_config(upstream, tmp_path, extra="\n[accounts]\nmax_cooldown = 5\n"))
    assert _accounts_of(egress)["team-a"]["until"] == pytest.approx(time.time() + 5, abs=2)  # was an hour on


def test_a_429_too_long_to_judge_is_still_cooled_retried_and_relayed_whole(start_egress, keyed, tmp_path):  # noqa: F811
    # Past the 64 KiB a body is judged on, a 429 is a rate limit: cooled, retried, and the last one
    # relayed as it came, every byte (no spent billing is told at such length).
    long = _error("rate_limit_exceeded", "Rate limit reached " + "x" * 100_000)
    upstream = keyed({KEY_A: lambda n: (429, {}, long), KEY_B: lambda n: (429, {}, long)})
    egress = start_egress(accounts_config(upstream, tmp_path))
    response = chat(egress)
    assert response.status == 429 and response.body == long
    assert response.headers["x-egress-attempts"] == "2"
    assert {row["state"] for row in _accounts_of(egress).values()} == {"cooling"}


def test_a_spent_account_with_no_other_goes_to_the_routes_fallback(start_egress, keyed, tmp_path):  # noqa: F811
    upstream = keyed({KEY_A: _spent, KEY_B: completion})
    (tmp_path / "a.key").write_text(KEY_A + "\n")
    (tmp_path / "b.key").write_text(KEY_B + "\n")
    egress = start_egress(f"""
[providers.openai]
base_url = "{upstream.base_url}"
pool_keys = ["file:{tmp_path / "a.key"}"]

[providers.backup]
base_url = "{upstream.base_url}"
pool_keys = ["file:{tmp_path / "b.key"}"]

[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]

[[routes]]
match = "gpt-4o"
provider = "openai"
fallbacks = ["backup:gpt-4o"]
""")
    body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    for _ in range(2):
        with RawClient(egress.port) as client:
            headers = {"Authorization": f"Bearer {mint(ISSUER, 'fallback-app')[0]}"}
            client.send(request_bytes("POST", "/v1/chat/completions", headers, body))
            response = client.read_response("POST")
        assert response.status == 200, response.body
        time.sleep(1.2)  # past the first default cooldown (0.5-1 s): a cooled account would be tried again
    chats = [key for key, path in upstream.seen if path.endswith("/chat/completions")]  # not the model lists
    assert chats.count(KEY_A) == 1 and chats.count(KEY_B) == 2  # the second went to backup at once


def test_a_spent_quotas_reset_is_bounded_by_max_cooldown(start_egress, keyed, tmp_path):  # noqa: F811
    # A 200 saying the requests are spent until a reset 8000 hours away skipped the account that long.
    far = {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "8000h",
    }
    upstream = keyed({KEY_A: lambda n: completion(n, far), KEY_B: completion})
    egress = start_egress(accounts_config(upstream, tmp_path, extra="\n[accounts]\nmax_cooldown = 30\n"))
    assert chat(egress).status == 200
    reset = _accounts_of(egress)["team-a"]["quota"]["requests"]["reset_in_s"]
    assert 25 <= reset <= 30  # was 28.8 million


def test_a_translated_400_is_judged_then_translated_as_before(start_egress, tmp_path):
    # Held to be judged, a 400 goes through the translation's filter on its release all the same.
    bad = orjson.dumps(
        {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}
    )
    upstream = _AnthropicPlans({"sk-ant-": (400, {"content-type": "application/json"}, bad)})
    try:
        egress = start_egress(_anthropic_config(upstream, tmp_path))
        body = orjson.dumps({"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]})
        with RawClient(egress.port) as client:
            headers = {"Authorization": f"Bearer {mint(ISSUER, 'translated')[0]}"}
            client.send(request_bytes("POST", "/v1/chat/completions", headers, body))
            response = client.read_response("POST")
        assert response.status == 400 and response.headers["x-egress-attempts"] == "1"
        assert orjson.loads(response.body)["error"]["message"] == "max_tokens: Field required"
        assert {row["state"] for row in _accounts_of(egress, "anthropic").values()} == {"healthy"}
    finally:
        upstream.stop()

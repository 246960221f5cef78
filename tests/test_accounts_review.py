"""Review of accounts, cooldowns, retries, the retry budget and the waiting line: each case a bug
found against the real code (the table directly; the proxy through the real `egress serve`)."""

from __future__ import annotations

import time

import orjson
import pytest

from egress.vkeys import mint, public_key_text
from tests.support import LoopbackServer, RawClient, _split_request, admin_get, request_bytes, wait_until
from tests.test_accounts import (  # noqa: F401  (keyed: the fixture)
    ISSUER,
    KEY_A,
    KEY_B,
    OVERLOADED_EVENT,
    accounts_config,
    bound,
    keyed,
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


# --- a provider that can't be reached -----------------------------------------------------------


def test_a_provider_whose_connect_times_out_falls_back(start_egress, fake_provider, ca_file, tmp_path):
    # The first route's provider drops SYNs: its connect times out, nothing was sent. Before, a
    # timeout was never retried (the provider might be generating), so the caller got a 504 while
    # the route's fallback was healthy; a connect timeout is a connect failure (Envoy's
    # connect-failure), and the request goes on to the fallback.
    from tests.test_fallbacks import ISSUER, OPENAI_POOL, sdk, upstream_calls
    from tests.test_upstream_review import dropping_syns

    (tmp_path / "openai.key").write_text(OPENAI_POOL + "\n")
    (tmp_path / "dead.key").write_text("sk-dead-pool-key-0123456789\n")
    with dropping_syns() as (host, port):
        egress = start_egress(
            f"""
[upstream]
ca_file = "{ca_file}"
connect_timeout = 1.0

[providers.dead]
base_url = "https://{host}:{port}"
pool_keys = ["file:{tmp_path / "dead.key"}"]

[providers.openai]
base_url = "{fake_provider.base_url}"
pool_keys = ["file:{tmp_path / "openai.key"}"]

[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]

[[routes]]
match = "gpt-dead"
provider = "dead"
fallbacks = ["openai:gpt-fake"]
"""
        )
        started = time.monotonic()
        answer = sdk(egress).chat.completions.create(model="gpt-dead", messages=[{"role": "user", "content": "hi"}])
        took = time.monotonic() - started
    assert answer.model == "gpt-fake"
    assert [call[:2] for call in upstream_calls(fake_provider)] == [("chat", "gpt-fake")]
    assert 0.9 <= took < 5.0  # one connect timeout, then the fallback

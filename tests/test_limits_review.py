"""Limits review: rate limiting, admission and account selection, each case a bug found in review
(reproduced against the real process or the real module) and the behaviour that fixed it."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.accounts import Account, AccountTable
from egress.hints import RateHints
from egress.secrets import Secret
from egress.vkeys import mint, public_key_text
from tests.support import RawClient, ScriptedUpstream, request_bytes

ISSUER = Ed25519PrivateKey.generate()


def _one_key_config(upstream, tmp_path: Path, row: str = "") -> str:
    (tmp_path / "pool.key").write_text("sk-review-0123456789abcdef\n")
    return f"""
[providers.openai]
base_url = "{upstream.base_url}"
pool_keys = [{{ name = "team-a", key = "file:{tmp_path / "pool.key"}" }}]
models = ["gpt-4o"]
{row}

[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]
"""


def _chat(stream: bool = False) -> bytes:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return request_bytes(
        "POST",
        "/openai/v1/chat/completions",
        {"Authorization": f"Bearer {mint(ISSUER, 'review-app')[0]}"},
        orjson.dumps(body),
    )


# --- selection: a request whose answer already came is in the provider's count, not unknown ----------

_FIRST_EVENT = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"o"}}]}\n\n'


def _stream_head(remaining: int, limit: int) -> bytes:
    # OpenAI's quota headers on every answer, streams included:
    # https://platform.openai.com/docs/guides/rate-limits#rate-limits-in-headers
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
        b"x-ratelimit-limit-requests: %d\r\nx-ratelimit-remaining-requests: %d\r\n"
        b"x-ratelimit-reset-requests: 40s\r\n\r\n"
        % (limit, remaining)
        + b"%x\r\n%s\r\n" % (len(_FIRST_EVENT), _FIRST_EVENT)
    )


def _table(*names: str) -> tuple[AccountTable, list[Account]]:
    table = AccountTable()
    rows = [Account("openai", n, (b"authorization", Secret(b"Bearer sk-" + n.encode(), "env:X"))) for n in names]
    table.bind(rows)
    return table, rows


def _requests_left(remaining: int, limit: int = 3) -> RateHints:
    return RateHints(remaining={"requests": remaining}, limit={"requests": limit}, reset={"requests": 40.0})


def test_only_requests_whose_answer_has_not_come_are_subtracted_from_the_remaining_quota():
    table, (a,) = _table("a")
    assert table.take([a], 100.0) is a
    table.heard(a)  # its head: the provider counted it, and says one is left
    table.observe(a, _requests_left(1), 100.0, 0.0)
    assert table.take([a], 100.5) is a  # the one left, though the first is still streaming
    # Sent, no answer yet: the provider's count may not hold it, so the quota is spent meanwhile.
    assert table.take([a], 100.6) is None
    assert table.soonest([a], 100.6) == pytest.approx(39.4)
    table.heard(a)
    table.observe(a, _requests_left(0), 101.0, 0.0)
    assert table.take([a], 101.5) is None  # the provider's own word now
    # A burst before any answer still counts every request sent.
    table2, (b,) = _table("b")
    table2.observe(b, _requests_left(2), 100.0, 0.0)
    assert table2.take([b], 100.1) is b and table2.take([b], 100.1) is b
    assert table2.take([b], 100.1) is None


def test_an_attempt_that_ends_without_an_answer_stops_awaiting_one():
    table, (a,) = _table("a")
    table.observe(a, _requests_left(1), 100.0, 0.0)
    assert table.take([a], 100.0) is a
    table.end(a)  # timed out, or the caller left, before the head: no heard()
    assert table.take([a], 100.1) is a
    table.heard(a)
    table.resend(a)  # a retry on the same account after its 500: awaiting again
    assert table.take([a], 100.2) is None
    table.end(a)
    assert table.take([a], 100.3) is a


def test_a_stream_under_way_is_not_counted_twice_against_the_quota_it_reported(start_egress, tmp_path):
    # The provider counted the stream when it began, and its head says one request is left. The
    # stream is still running: egress used to subtract it again (remaining 1 - 1 in flight = 0) and
    # answered the next request 429 all_accounts_cooling, though the provider would serve it.
    done = b'{"id":"c2","object":"chat.completion","choices":[]}'
    second = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(done), done)
    upstream = ScriptedUpstream([(_stream_head(1, 3), "hang"), second])
    try:
        egress = start_egress(_one_key_config(upstream, tmp_path))
        with RawClient(egress.port) as streaming:
            streaming.send(_chat(stream=True))
            got = b""
            while b"chat.completion.chunk" not in got:  # the stream's first event reached the caller
                got += streaming.sock.recv(65536)
            with RawClient(egress.port) as client:
                client.send(_chat())
                answer = client.read_response("POST")
            assert answer.status == 200, answer.body
            assert len(upstream.requests) == 2
    finally:
        upstream.stop()

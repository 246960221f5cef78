"""Retries before the first byte keep what the request is owed (retries.py, proxy.py): its response
filter on every attempt, whichever account answers, and a held 429's consequences when its caller
leaves before the body is judged. Against the real `egress serve`, with scripted providers."""

from __future__ import annotations

import time

import orjson
import pytest

from egress.vkeys import mint, public_key_text
from tests.support import RawClient, ScriptedUpstream, admin_get, request_bytes, samples, value, wait_until
from tests.test_accounts import ISSUER, KEY_A, KEY_B

# A 400 the provider says to retry (the SDKs obey x-should-retry before the status): held, judged on
# its body (no spent billing), then sent again, to the same account when it is the only one.
_RETRY_ME = b'{"error": {"message": "Please retry", "type": "server_error", "code": null}}'
_RETRY_400 = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nx-should-retry: true\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_RETRY_ME), _RETRY_ME)
)
# A chat stream answering include_usage: a usage:null on each chunk, then the usage-only chunk.
_EVENTS = (
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,'
    b'"delta":{"content":"ok"},"finish_reason":null}],"usage":null}\n\n'
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o","choices":[],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}\n\n'
    b"data: [DONE]\n\n"
)
_STREAM_200 = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s" % (
    len(_EVENTS),
    _EVENTS,
)


def _openai_config(upstream, tmp_path, keys: tuple[str, ...] = (KEY_A,), extra: str = "") -> str:
    rows = []
    for index, key in enumerate(keys):
        path = tmp_path / f"k{index}.key"
        path.write_text(key + "\n")
        rows.append(f'{{ name = "team-{index}", key = "file:{path}" }}')
    return f"""
[providers.openai]
base_url = "{upstream.base_url}"
pool_keys = [{", ".join(rows)}]
models = ["gpt-4o"]

[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]
{extra}
"""


def _stream_chat(egress, timeout: float = 10.0):
    body = orjson.dumps({"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    with RawClient(egress.port, timeout=timeout) as client:
        headers = {"Authorization": f"Bearer {mint(ISSUER, 'retry-filters')[0]}"}
        client.send(request_bytes("POST", "/openai/v1/chat/completions", headers, body))
        return client.read_response("POST")


def test_a_stream_retried_on_the_same_account_keeps_the_usage_it_was_not_asked_for_hidden(start_egress, tmp_path):
    # The 400's head dropped the injected-usage filter (it stays on a 2xx stream only), and a retry
    # to the same account never made it again: the caller got the usage chunk it never asked for.
    upstream = ScriptedUpstream([_RETRY_400, _STREAM_200])
    try:
        egress = start_egress(_openai_config(upstream, tmp_path))
        response = _stream_chat(egress)
        assert response.status == 200 and response.complete, response.body
        assert response.headers["x-egress-attempts"] == "2"
        assert len(upstream.requests) == 2
        for request in upstream.requests:  # both attempts asked for usage
            assert orjson.loads(request.split(b"\r\n\r\n", 1)[1])["stream_options"] == {"include_usage": True}
        assert b"usage" not in response.body
        assert b'"content":"ok"' in response.body and response.body.endswith(b"data: [DONE]\n\n")
    finally:
        upstream.stop()


def test_a_stream_retried_on_another_account_keeps_its_filter(start_egress, tmp_path):
    upstream = ScriptedUpstream([_RETRY_400, _STREAM_200])
    try:
        egress = start_egress(_openai_config(upstream, tmp_path, keys=(KEY_A, KEY_B)))
        response = _stream_chat(egress)
        assert response.status == 200 and response.headers["x-egress-attempts"] == "2", response.body
        keys = {b"Bearer " + key.encode() for key in (KEY_A, KEY_B)}
        sent = [
            next(line.split(b":", 1)[1].strip() for line in request.split(b"\r\n") if line.startswith(b"authorization"))
            for request in upstream.requests
        ]
        assert set(sent) == keys  # moved to the other account
        assert b"usage" not in response.body and response.body.endswith(b"data: [DONE]\n\n")
    finally:
        upstream.stop()


def test_a_stream_retried_on_a_fallback_keeps_its_filter(start_egress, tmp_path):
    upstream = ScriptedUpstream([_RETRY_400, _STREAM_200])
    routes = '\n[[routes]]\nmatch = "gpt-4o"\nprovider = "openai"\nfallbacks = ["openai:gpt-4o-mini"]\n'
    try:
        egress = start_egress(
            _openai_config(upstream, tmp_path, extra=routes).replace('"gpt-4o"]', '"gpt-4o", "gpt-4o-mini"]')
        )
        body = orjson.dumps({"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
        with RawClient(egress.port) as client:
            headers = {"Authorization": f"Bearer {mint(ISSUER, 'retry-filters')[0]}"}
            client.send(request_bytes("POST", "/v1/chat/completions", headers, body))
            response = client.read_response("POST")
        assert response.status == 200 and response.headers["x-egress-attempts"] == "2", response.body
        assert orjson.loads(upstream.requests[1].split(b"\r\n\r\n", 1)[1])["model"] == "gpt-4o-mini"
        assert b"usage" not in response.body and response.body.endswith(b"data: [DONE]\n\n")
    finally:
        upstream.stop()


_BATCH_ID = "msgbatch_01retry"


def _batch_200(origin: str) -> bytes:
    body = orjson.dumps(
        {
            "id": _BATCH_ID,
            "type": "message_batch",
            "processing_status": "ended",
            "request_counts": {"processing": 0, "succeeded": 1, "errored": 0, "canceled": 0, "expired": 0},
            "results_url": f"{origin}/v1/messages/batches/{_BATCH_ID}/results",
        }
    )
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


def test_a_batch_retried_on_the_same_account_still_gets_a_results_url_through_egress(start_egress, tmp_path):
    # Unfiltered, the absolute results_url sent the caller's SDK (and its key) straight to the
    # provider, and the results were never metered.
    upstream = ScriptedUpstream([])
    upstream.replies += [_RETRY_400, _batch_200(upstream.base_url)]
    key = tmp_path / "ant.key"
    key.write_text("sk-ant-a-0123456789\n")
    config = f"""
[providers.anthropic]
base_url = "{upstream.base_url}"
pool_keys = [{{ name = "a", key = "file:{key}" }}]
models = ["claude-x"]

[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]
"""
    try:
        egress = start_egress(config)
        with RawClient(egress.port) as client:
            headers = {"x-api-key": mint(ISSUER, "batch-app")[0], "anthropic-version": "2023-06-01"}
            client.send(request_bytes("GET", f"/anthropic/v1/messages/batches/{_BATCH_ID}", headers))
            response = client.read_response("GET")
        assert response.status == 200 and response.headers["x-egress-attempts"] == "2", response.body
        assert response.json()["results_url"] == f"/v1/messages/batches/{_BATCH_ID}/results"
    finally:
        upstream.stop()


# --- a held 429 whose caller leaves ----------------------------------------------------------------

_LIMITED = b'{"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}'


def _account(egress, name: str) -> dict:
    status = orjson.loads(admin_get(egress.admin_port, "/status")[1])
    return {row["name"]: row for row in status["providers"]["openai"]["accounts"]}[name]


@pytest.mark.parametrize("retry_header", [b"", b"x-should-retry: false\r\n"])
def test_a_held_429_whose_caller_leaves_still_cools_its_account(start_egress, tmp_path, retry_header):
    # Its head's retry-after was read only once the body was judged, which a caller gone never let
    # happen: the account stayed healthy and the next request got the provider's 429 again.
    head = (
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\nretry-after: 20\r\n%s"
        b"content-length: %d\r\n\r\n" % (retry_header, len(_LIMITED))
    )
    upstream = ScriptedUpstream([(head + _LIMITED[:20], "hang")])
    try:
        egress = start_egress(_openai_config(upstream, tmp_path, extra="\n[accounts]\nfirst_event_timeout = 10\n"))
        body = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
        with RawClient(egress.port) as client:
            headers = {"Authorization": f"Bearer {mint(ISSUER, 'leaver')[0]}"}
            client.send(request_bytes("POST", "/openai/v1/chat/completions", headers, body))
            assert wait_until(lambda: len(upstream.requests) == 1, 5.0)
            time.sleep(0.3)  # the head and part of the body reach egress, which holds them
        assert wait_until(lambda: _account(egress, "team-0")["state"] == "cooling", 5.0), _account(egress, "team-0")
        row = _account(egress, "team-0")
        assert row["reason"] == "rate_limited" and row["until"] == pytest.approx(time.time() + 20, abs=5)
        with RawClient(egress.port) as client:
            client.send(request_bytes("POST", "/openai/v1/chat/completions", headers, body))
            again = client.read_response("POST")
        assert again.status == 429 and again.error_code == "all_accounts_cooling", again.body
        assert len(upstream.requests) == 1  # never sent again: not for the caller who left, nor this one
        outcomes = samples(egress.admin_port)
        total = sum(
            value(outcomes, "egress_upstream_attempts_total", account="team-0", outcome=outcome)
            for outcome in ("success", "retry_scheduled", "retry_exhausted", "not_retryable", "account_disabled")
        )
        assert total == 1  # the attempt has its one outcome
    finally:
        upstream.stop()

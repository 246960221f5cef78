"""The client-facing HTTP/1.1 server against the real egress process: cases found in review.

- An `Upgrade` on a request with a body (`Upgrade: h2c`, sent on a plain-http POST by Java's
  HttpClient and `curl --http2`) is ignored, as nginx and Envoy ignore it (RFC 9110 §7.8: a server
  MAY): the request is served over HTTP/1.1 with its whole body. httptools makes llhttp skip the
  body of such a request, which egress once answered with a 400 for every Java client's first POST.
- A request refused before it is routed (a Content-Length over the cap, a head too large, a head
  that times out) is answered in its caller's dialect, as the same refusal later in the body is.
"""

from __future__ import annotations

import subprocess
import time

import anthropic
import pytest

from tests.support import RawClient, ScriptedUpstream, request_bytes, samples, value, wait_until

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n" + b'{"ok":true}'
MAX_BODY = 64 * 1024
# What Java's java.net.http.HttpClient (HTTP_2, its default) sends on an http:// URL, from
# jetty/jetty.project#9998; curl --http2 sends the same three headers.
H2C = (
    "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    "HTTP2-Settings: AAEAAEAAAAIAAAABAAMAAABkAAQBAAAAAAUAAEAA\r\n"
)
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'


@pytest.fixture
def scripted():
    upstream = ScriptedUpstream([OK] * 8)
    yield upstream
    upstream.stop()


@pytest.fixture
def gateway(start_egress, scripted):
    return start_egress(
        f"[server]\nmax_body_bytes = {MAX_BODY}\nheader_timeout = 0.5\n"
        f'[providers.raw]\nbase_url = "{scripted.base_url}"\n'
    )


def h2c_post(body: bytes, chunked: bool = False) -> bytes:
    head = f"POST /raw/v1/chat/completions HTTP/1.1\r\nHost: egress.test\r\n{H2C}"
    head += "Authorization: Bearer sk-byo\r\nContent-Type: application/json\r\n"
    if chunked:
        half = len(body) // 2
        framed = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:])) + b"0\r\n\r\n"
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + framed
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("pieces", ["whole", "byte-by-byte"])
def test_an_h2c_upgrade_post_is_served_over_http11_with_its_body(gateway, scripted, chunked, pieces):
    wire = h2c_post(BODY, chunked) + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    with RawClient(gateway.port) as client:
        if pieces == "whole":
            client.send(wire)
        else:
            for index in range(len(wire)):
                client.send(wire[index : index + 1])
        first = client.read_response("POST")
        assert first.status == 200, first.body
        assert first.body == b'{"ok":true}'
        assert "upgrade" not in first.headers  # no 101: egress speaks HTTP/1.1 on
        second = client.read_response("GET")  # the bytes after the body are the next request
        assert second.status == 200 and second.json()["status"] == "ok"
        assert client.keeps_alive()
    assert len(scripted.requests) == 1
    sent = scripted.requests[0]
    head, _, body = sent.partition(b"\r\n\r\n")
    assert body == BODY
    assert b"content-length: %d" % len(BODY) in head.lower()
    for hop in (b"upgrade", b"http2-settings", b"connection"):  # hop-by-hop: never forwarded
        assert hop + b":" not in head.lower()


def test_curl_http2_post_over_plain_http_is_answered(gateway, scripted):
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2",
            "-H",
            "Authorization: Bearer sk-byo",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            BODY.decode(),
            "-w",
            "\n%{http_code} %{http_version}",
            f"{gateway.url}/raw/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.stdout.splitlines()[-1] == "200 1.1", result.stdout + result.stderr
    assert scripted.requests[0].endswith(BODY)


def test_an_h2c_upgrade_body_is_held_to_the_body_limits(gateway, scripted):
    with RawClient(gateway.port) as client:
        client.send(h2c_post(b"x" * (MAX_BODY + 1), chunked=True))
        answer = client.read_response("POST")
        assert answer.status == 413 and answer.error_code == "body_too_large"
        assert answer.headers["connection"] == "close"
        assert client.server_closed()
    with RawClient(gateway.port) as client:  # a refused caller's body is read and dropped
        client.send(h2c_post(BODY).replace(b"Authorization: Bearer sk-byo\r\n", b""))
        answer = client.read_response("POST")
        assert answer.status == 401, answer.body
        client.send(request_bytes("GET", "/healthz"))
        assert client.read_response().status == 200  # the body was skipped whole: framing kept
    assert scripted.requests == []


ANTHROPIC = (
    "POST /anthropic/v1/messages HTTP/1.1\r\nHost: a\r\nx-api-key: sk-ant-x\r\nanthropic-version: 2023-06-01\r\n"
)
OPENAI = "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer sk-x\r\n"
REFUSED_BEFORE_ROUTING = {
    "content-length over the cap": (f"Content-Length: {MAX_BODY + 1}\r\n\r\n", 413, "request_too_large"),
    "101 header fields": ("".join(f"X-{index}: v\r\n" for index in range(99)) + "\r\n", 431, "invalid_request_error"),
    "head timed out": ("Content-Type: application/json\r\n", 408, "invalid_request_error"),
}


@pytest.mark.parametrize("case", list(REFUSED_BEFORE_ROUTING))
def test_a_refusal_before_routing_is_in_the_callers_dialect(gateway, case):
    tail, status, anthropic_type = REFUSED_BEFORE_ROUTING[case]
    with RawClient(gateway.port) as client:
        client.send((ANTHROPIC + tail).encode())
        answer = client.read_response("POST")
    assert answer.status == status
    # docs.claude.com/en/api/errors: {"type": "error", "error": {"type": ..., "message": ...}}
    document = answer.json()
    assert document["type"] == "error" and document["error"]["type"] == anthropic_type, document
    with RawClient(gateway.port) as client:
        client.send((OPENAI + tail).encode())
        answer = client.read_response("POST")
    assert answer.status == status
    assert answer.json()["error"]["type"] == "invalid_request_error"  # OpenAI's shape, as before


def test_the_anthropic_sdk_reads_a_too_large_request_as_anthropic_s_error(gateway):
    client = anthropic.Anthropic(base_url=f"{gateway.url}/anthropic", api_key="sk-ant-x", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as raised:
        client.messages.create(
            model="claude-test-model", max_tokens=5, messages=[{"role": "user", "content": "a" * (MAX_BODY + 1)}]
        )
    assert raised.value.status_code == 413
    assert raised.value.body["error"]["type"] == "request_too_large"
    assert wait_until(lambda: b'"code":"body_too_large"' in gateway.stdout_path.read_bytes(), 5)


def logged(gateway, request_id_count: int) -> list[dict]:
    wait_until(lambda: len(gateway.access_records()) >= request_id_count, 5)
    return gateway.access_records()


def test_a_request_cut_mid_body_is_logged_as_client_gone(gateway, scripted):
    head = b"POST /raw/v1/chat/completions HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer sk-byo\r\n"
    with RawClient(gateway.port) as client:
        client.send(head + b"Content-Length: 100\r\n\r\n" + BODY[:10])
        time.sleep(0.3)  # the head is read and routed, then the client leaves
    records = logged(gateway, 1)
    assert len(records) == 1, records
    record = records[0]
    assert (record["method"], record["path"], record["provider"]) == ("POST", "/raw/v1/chat/completions", "raw")
    assert (record["status"], record["outcome"], record["bytes_in"]) == (0, "client_gone", 10)
    assert scripted.requests == []
    found = samples(gateway.admin_port)
    assert value(found, "egress_responses_incomplete_total", provider="raw", outcome="client_gone") == 1


def test_pipelined_requests_left_unanswered_are_logged_as_client_gone(gateway, scripted):
    scripted.replies[:] = [ScriptedUpstream.HANG]  # the first request is never answered
    first = request_bytes("POST", "/raw/v1/chat/completions", {"Authorization": "Bearer sk-byo"}, BODY)
    second = request_bytes("GET", "/raw/v1/models", {"Authorization": "Bearer sk-byo"})
    with RawClient(gateway.port) as client:
        client.send(first + second)
        assert wait_until(lambda: len(scripted.requests) == 1, 5)
    records = logged(gateway, 2)
    assert sorted((record["method"], record["outcome"]) for record in records) == [
        ("GET", "client_gone"),
        ("POST", "client_gone"),
    ], records
    assert len(scripted.requests) == 1  # the queued one never went upstream

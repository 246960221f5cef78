"""HTTP/1.1 behaviour of the real egress process on raw sockets: errors, limits, strictness, framing.

Each response is parsed by h11 (tests/support.py), an independent HTTP parser, so every test here
also proves that what egress wrote is well-formed.
"""

from __future__ import annotations

import socket
import struct
import time

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.vkeys import mint, public_key_text
from tests.conftest import provider_config, start_fake_provider
from tests.support import (
    EgressProcess,
    LoopbackServer,
    RawClient,
    ScriptedUpstream,
    _split_request,
    admin_get,
    request_bytes,
    wait_until,
)


@pytest.fixture(scope="module")
def gateway(certificate_authority, ca_file, tmp_path_factory):
    fake = start_fake_provider(certificate_authority)
    config = provider_config(
        fake,
        ca_file,
        server="max_body_bytes = 4096\nheader_timeout = 1.0\nbody_timeout = 1.0\nkeepalive_timeout = 1.0",
        upstream="first_byte_timeout = 1.0",
        extra='[providers.closed-port]\nbase_url = "http://127.0.0.1:9"',
    )
    process = EgressProcess(tmp_path_factory.mktemp("gateway"), config).start()
    yield process, fake
    process.stop()
    fake.stop()


@pytest.fixture
def egress_proc(gateway, request):
    process, _ = gateway
    yield process
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(process.logs())


@pytest.fixture
def fake(gateway):
    return gateway[1]


def chat_body(stream: bool = False) -> bytes:
    suffix = b',"stream":true' if stream else b""
    return b'{"model":"gpt-fake","messages":[{"role":"user","content":"hi"}]' + suffix + b"}"


def post_chat(target: str = "/openai/v1/chat/completions", headers: dict | None = None, body: bytes | None = None):
    return request_bytes(
        "POST", target, {"Content-Type": "application/json", **(headers or {})}, chat_body() if body is None else body
    )


def expect_error(port: int, data: bytes, status: int, code: str, closes: bool, method: str = "GET"):
    with RawClient(port) as client:
        client.send(data)
        response = client.read_response(method)
        assert response.status == status, response.body
        assert response.error_code == code
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-egress-request-id"]
        if closes:
            assert response.headers.get("connection") == "close"
            assert client.server_closed()
        else:
            assert response.headers.get("connection") != "close"
            assert not client.server_closed(timeout=0.2)
        return response


# -- 6. errors -------------------------------------------------------------------------------


def test_malformed_request_is_400_and_closes(egress_proc):
    expect_error(
        egress_proc.port,
        b"GET /openai/v1/models HTTP/1.1\r\nHost: a\r\nno colon here\r\n\r\n",
        400,
        "bad_request",
        closes=True,
    )


def test_unknown_provider_is_404_listing_known_ones_and_keeps_alive(egress_proc):
    response = expect_error(
        egress_proc.port, request_bytes("GET", "/nosuch/v1/models"), 404, "unknown_provider", closes=False
    )
    message = response.json()["error"]["message"]
    for name in ("openai", "anthropic", "groq", "xai", "local-vllm"):
        assert name in message


def test_unknown_provider_in_anthropic_dialect(egress_proc):
    data = request_bytes("POST", "/nosuch/v1/messages", {"anthropic-version": "2023-06-01"}, b"{}")
    with RawClient(egress_proc.port) as client:
        client.send(data)
        document = client.read_response().json()
    assert document["type"] == "error"
    assert document["error"]["type"] == "not_found_error"
    assert document["error"]["code"] == "unknown_provider"


def test_declared_body_over_cap_is_413_before_reading_it(egress_proc, fake):
    before = len(fake.requests)
    head = b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n"
    expect_error(egress_proc.port, head, 413, "body_too_large", closes=True)
    assert len(fake.requests) == before


def test_chunked_body_over_cap_is_413_as_it_arrives(egress_proc, fake):
    before = len(fake.requests)
    chunk = b"1000\r\n" + b"x" * 4096 + b"\r\n"
    data = b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + chunk
    expect_error(egress_proc.port, data, 413, "body_too_large", closes=True)
    assert len(fake.requests) == before


def test_too_many_header_fields_is_431(egress_proc):
    headers = {f"X-Filler-{i}": "v" for i in range(101)}
    expect_error(
        egress_proc.port, request_bytes("GET", "/openai/v1/models", headers), 431, "headers_too_large", closes=True
    )


def test_header_bytes_over_32k_is_431(egress_proc):
    headers = {f"X-Big-{i}": "v" * 4000 for i in range(9)}
    expect_error(
        egress_proc.port, request_bytes("GET", "/openai/v1/models", headers), 431, "headers_too_large", closes=True
    )


def test_one_giant_header_is_431_before_it_ends(egress_proc):
    with RawClient(egress_proc.port) as client:
        client.send(b"GET /openai/v1/models HTTP/1.1\r\nHost: a\r\nX-Huge: ")
        try:
            for _ in range(8):
                client.send(b"v" * 16384)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = client.read_response()
        assert response.status == 431
        assert client.server_closed()


def test_upstream_connect_failure_is_502(egress_proc):
    expect_error(
        egress_proc.port, request_bytes("GET", "/closed-port/v1/models"), 502, "upstream_connect_error", closes=False
    )


def test_upstream_header_with_cr_is_502_never_relayed(egress_proc):
    response = expect_error(
        egress_proc.port,
        post_chat(headers={"x-fake-scenario": "bad-header"}),
        502,
        "upstream_protocol_error",
        closes=False,
        method="POST",
    )
    assert "x-bad" not in response.headers


def test_upstream_first_byte_timeout_is_504(egress_proc):
    started = time.monotonic()
    expect_error(
        egress_proc.port,
        post_chat(headers={"x-fake-scenario": "slow-head", "x-fake-delay": "3"}),
        504,
        "upstream_timeout",
        closes=False,
        method="POST",
    )
    assert time.monotonic() - started < 2.5


def test_upstream_error_passes_through_unchanged(egress_proc, fake):
    with RawClient(egress_proc.port) as client:
        client.send(post_chat(headers={"x-fake-scenario": "rate-limited"}))
        response = client.read_response("POST")
    assert response.status == 429
    assert response.headers["retry-after"] == "1"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.body == fake.sent_bodies[response.headers["x-request-id"]]


def test_draining_refuses_new_requests_with_503(certificate_authority, ca_file, tmp_path):
    fake = start_fake_provider(certificate_authority)
    process = EgressProcess(tmp_path, provider_config(fake, ca_file)).start()
    try:
        streaming = RawClient(process.port)
        stream_headers = {"x-fake-scenario": "long-stream", "x-fake-events": "30", "x-fake-interval": "0.05"}
        streaming.send(post_chat(headers=stream_headers, body=chat_body(stream=True)))
        partial = RawClient(process.port)
        partial.send(b"GET /healthz HTTP/1.1\r\n")  # a head in progress is not an idle connection
        idle = RawClient(process.port)
        assert wait_until(lambda: fake.streams, timeout=5)
        process.signal()
        assert idle.server_closed(), "idle keep-alive connections close at once when draining"
        partial.send(b"Host: a\r\n\r\n")
        response = partial.read_response()
        assert response.status == 503 and response.error_code == "draining"
        assert partial.server_closed()
        streaming.send(request_bytes("GET", "/openai/v1/models"))  # arrives during the drain
        streamed = streaming.read_response("POST")
        assert streamed.complete and streamed.status == 200 and streamed.body.endswith(b"data: [DONE]\n\n")
        refused = streaming.read_response()
        assert refused.status == 503 and refused.error_code == "draining"
        assert streaming.server_closed()
        assert process.wait(timeout=10) == 0
    finally:
        process.stop()
        fake.stop()


# -- 7. limits and timeouts ------------------------------------------------------------------


def test_request_target_over_8k_is_414(egress_proc):
    expect_error(
        egress_proc.port, request_bytes("GET", "/openai/v1/models?q=" + "a" * 9000), 414, "uri_too_long", closes=True
    )


def test_slowloris_head_is_408_then_close(egress_proc):
    with RawClient(egress_proc.port) as client:
        client.send(b"GET /openai/v1/models HTTP/1.1\r\nHost: a\r\n")
        started = time.monotonic()
        for _ in range(4):  # keeps trickling, but the whole head never arrives in time
            time.sleep(0.3)
            try:
                client.send(b"X-Drip: 1\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
        response = client.read_response()
        assert response.status == 408 and response.error_code == "request_timeout"
        assert client.server_closed()
        assert time.monotonic() - started < 3


def test_silent_connection_is_closed_after_header_timeout(egress_proc):
    with RawClient(egress_proc.port) as client:
        assert client.server_closed(timeout=3)


def test_idle_keep_alive_closes_quietly(egress_proc):
    with RawClient(egress_proc.port) as client:
        client.send(request_bytes("GET", "/healthz"))
        assert client.read_response().status == 200
        started = time.monotonic()
        assert client.server_closed(timeout=3)
        assert 0.5 < time.monotonic() - started < 2.5


def test_stalled_body_is_408_then_close(egress_proc):
    with RawClient(egress_proc.port) as client:
        client.send(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{")
        response = client.read_response("POST")
        assert response.status == 408 and response.error_code == "request_timeout"
        assert client.server_closed()


def test_connection_cap_refuses_newcomers_and_spares_open_streams(certificate_authority, ca_file, tmp_path):
    fake = start_fake_provider(certificate_authority)
    config = provider_config(fake, ca_file, server="max_connections = 2")
    process = EgressProcess(tmp_path, config).start()
    try:
        streaming = RawClient(process.port)
        streaming.send(
            post_chat(headers={"x-fake-scenario": "long-stream", "x-fake-events": "10"}, body=chat_body(stream=True))
        )
        idle = RawClient(process.port)
        idle.send(request_bytes("GET", "/healthz"))
        assert idle.read_response().status == 200
        with RawClient(process.port) as refused:
            response = refused.read_response()
            assert response.status == 503 and response.error_code == "too_many_connections"
            assert refused.server_closed()
        streamed = streaming.read_response("POST")
        assert streamed.complete and streamed.body.count(b"data: ") == 11
    finally:
        process.stop()
        fake.stop()


STRICTNESS_CASES = {
    "content-length with transfer-encoding": (
        b"POST /openai/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "duplicate content-length": (
        b"POST /openai/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        400,
    ),
    "transfer-encoding ,chunked": (
        b"POST /openai/v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "transfer-encoding gzip, chunked": (
        b"POST /openai/v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "transfer-encoding identity": (
        b"POST /openai/v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
        400,
    ),
    "transfer-encoding twice": (
        b"POST /openai/v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n",
        400,
    ),
    "transfer-encoding on HTTP/1.0": (
        b"POST /openai/v1/x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "invalid chunk size": (
        b"POST /openai/v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
        400,
    ),
    "chunk size without CR": (
        b"POST /openai/v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\nab\r\n0\r\n\r\n",
        400,
    ),
    "chunk data overrun": (
        b"POST /openai/v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "obs-fold": (b"GET /openai/v1/models HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    "bare LF line endings": (b"GET /openai/v1/models HTTP/1.1\nHost: a\n\n", 400),
    "bare CR in header": (b"GET /openai/v1/models HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", 400),
    "bare CR in value": (b"GET /openai/v1/models HTTP/1.1\r\nHost: a\r\nX: y\rz\r\n\r\n", 400),
    "NUL in value": (b"GET /openai/v1/models HTTP/1.1\r\nHost: a\r\nX: y\x00z\r\n\r\n", 400),
    "space before colon": (b"GET /openai/v1/models HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "missing Host on 1.1": (b"GET /openai/v1/models HTTP/1.1\r\nX: y\r\n\r\n", 400),
    "two Host headers": (b"GET /openai/v1/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "absolute-form target": (b"GET http://evil.test/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "CONNECT": (b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n", 405),
    # An Upgrade on a request with a body is no violation: it is ignored (test_http_review.py).
    "HTTP/2.0 version": (b"GET /openai/v1/models HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    "HTTP/1.2 version": (b"GET /openai/v1/models HTTP/1.2\r\nHost: a\r\n\r\n", 505),
    "HTTP/0.9 version": (b"GET /openai/v1/models HTTP/0.9\r\nHost: a\r\n\r\n", 505),
    "unsupported expectation": (
        b"POST /openai/v1/x HTTP/1.1\r\nHost: a\r\nExpect: teapot\r\nContent-Length: 2\r\n\r\n{}",
        417,
    ),
}


@pytest.mark.parametrize("name", list(STRICTNESS_CASES))
def test_rfc9112_violations_are_refused_and_closed(egress_proc, fake, name):
    data, status = STRICTNESS_CASES[name]
    before = len(fake.requests)
    with RawClient(egress_proc.port) as client:
        client.send(data)
        response = client.read_response()
        assert response.status == status, response.body
        assert response.headers["connection"] == "close"
        assert client.server_closed()
    assert len(fake.requests) == before, "a refused request must never reach the provider"


@pytest.mark.parametrize("name", list(STRICTNESS_CASES))
def test_violations_fed_byte_by_byte_are_refused_too(egress_proc, name):
    data, status = STRICTNESS_CASES[name]
    with RawClient(egress_proc.port) as client:
        for index in range(len(data)):
            try:
                client.send(data[index : index + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
        assert client.read_response().status == status


# -- framing and passthrough -----------------------------------------------------------------


def test_upgrade_h2c_is_never_tunnelled(egress_proc, fake):
    data = request_bytes(
        "GET",
        "/openai/v1/models",
        {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": "AAMAAABkAAQAAP__"},
    )
    with RawClient(egress_proc.port) as client:
        client.send(data + request_bytes("GET", "/healthz"))
        assert client.read_response().status == 200
        assert client.read_response().status == 200  # the request after it is parsed normally
    seen = fake.requests[-1]
    assert seen.header("upgrade") is None and seen.header("http2-settings") is None


def test_hop_by_hop_headers_stay_and_end_to_end_pass(egress_proc, fake):
    data = request_bytes(
        "GET",
        "/openai/v1/models?limit=5&after=a%2Fb",
        {
            "Connection": "keep-alive, X-Internal-Hop",
            "X-Internal-Hop": "secret-hop",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "Trailer": "X-T",
            "OpenAI-Beta": "assistants=v2",
            "X-Custom-End-To-End": "kept",
            "Authorization": "Bearer sk-byo-raw",
        },
    )
    with RawClient(egress_proc.port) as client:
        client.send(data)
        response = client.read_response()
    assert response.status == 200
    seen = fake.requests[-1]
    assert seen.target == "/v1/models?limit=5&after=a%2Fb"
    for hop in ("x-internal-hop", "keep-alive", "te", "proxy-authorization", "trailer", "connection"):
        assert seen.header(hop) is None, hop
    assert seen.header("openai-beta") == "assistants=v2"
    assert seen.header("x-custom-end-to-end") == "kept"
    assert seen.header("authorization") == "Bearer sk-byo-raw"
    assert seen.header("x-forwarded-for") is None and seen.header("via") is None
    assert "sk-byo-raw" not in egress_proc.logs()


def test_configured_provider_base_path_and_unknown_endpoints(egress_proc, fake):
    with RawClient(egress_proc.port) as client:
        client.send(
            request_bytes(
                "POST",
                "/local-vllm/v1/embeddings?x=1",
                {"Content-Type": "application/json"},
                b'{"input":"hi","model":"e"}',
            )
        )
        response = client.read_response("POST")
    assert response.status == 200 and response.json()["data"][0]["embedding"] == [0.1, 0.2]
    assert fake.requests[-1].target == "/vllm-prefix/v1/embeddings?x=1"


def test_pipelined_requests_are_answered_in_order(egress_proc, fake):
    data = (
        post_chat(body=chat_body())
        + request_bytes("GET", "/nosuch/x")
        + request_bytes("GET", "/healthz")
        + request_bytes("GET", "/openai/v1/models")
    )
    with RawClient(egress_proc.port) as client:
        client.send(data)
        statuses = [client.read_response("POST").status] + [client.read_response().status for _ in range(3)]
        assert statuses == [200, 404, 200, 200]
        assert client.keeps_alive()


def test_http10_closes_unless_keep_alive_asked(egress_proc):
    with RawClient(egress_proc.port) as client:
        client.send(b"GET /openai/v1/models HTTP/1.0\r\nAuthorization: Bearer sk-byo\r\n\r\n")
        response = client.read_response()
        assert response.status == 200 and response.headers.get("connection") == "close"
        assert client.server_closed()
    with RawClient(egress_proc.port) as client:
        client.send(b"GET /openai/v1/models HTTP/1.0\r\nConnection: keep-alive\r\nAuthorization: Bearer sk-byo\r\n\r\n")
        response = client.read_response()
        assert response.status == 200 and response.headers["connection"] == "keep-alive"
        assert "content-length" in response.headers
        assert not client.server_closed(timeout=0.3)


def test_http10_client_gets_stream_delimited_by_close(egress_proc):
    with RawClient(egress_proc.port) as client:
        body = chat_body(stream=True)
        client.send(
            b"POST /openai/v1/chat/completions HTTP/1.0\r\nContent-Type: application/json\r\n"
            b"Connection: keep-alive\r\nAuthorization: Bearer sk-byo\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        response = client.read_response("POST")
        assert response.status == 200 and "transfer-encoding" not in response.headers
        assert response.body.endswith(b"data: [DONE]\n\n")


def test_expect_100_continue(egress_proc, fake):
    body = chat_body()
    with RawClient(egress_proc.port) as client:
        client.send(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer sk-byo\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        client.sock.settimeout(2)
        assert client.sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(body)
        response = client.read_response("POST")
    assert response.status == 200
    assert fake.requests[-1].header("expect") is None


def test_expect_100_continue_refused_early_for_unknown_provider(egress_proc):
    with RawClient(egress_proc.port) as client:
        client.send(b"POST /nosuch/v1/x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n")
        response = client.read_response("POST")
        assert response.status == 404 and response.informational == []
        assert client.server_closed()


def test_chunked_request_body_goes_upstream_with_content_length(egress_proc, fake):
    body = chat_body()
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:10], body[10:])) + b"0\r\n\r\n"
    with RawClient(egress_proc.port) as client:
        client.send(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer sk-byo\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
        )
        assert client.read_response("POST").status == 200
    seen = fake.requests[-1]
    assert seen.body == body
    assert seen.header("content-length") == str(len(body)) and seen.header("transfer-encoding") is None


def test_head_request(egress_proc):
    with RawClient(egress_proc.port) as client:
        client.send(request_bytes("HEAD", "/openai/v1/models"))
        response = client.read_response("HEAD")
        assert response.status == 200 and response.body == b"" and int(response.headers["content-length"]) > 0
        client.send(request_bytes("GET", "/healthz"))
        assert client.read_response().status == 200


def test_upstream_response_framed_by_close(egress_proc, fake):
    with RawClient(egress_proc.port) as client:
        client.send(request_bytes("GET", "/openai/v1/models", {"x-fake-scenario": "until-close"}))
        response = client.read_response()
        assert response.status == 200 and response.headers["transfer-encoding"] == "chunked"
        assert response.body == fake.sent_bodies[fake.requests[-1].response_id]
        assert client.keeps_alive()


def test_access_log_has_one_line_per_request_without_query(egress_proc):
    with RawClient(egress_proc.port) as client:
        client.send(request_bytes("GET", "/openai/v1/models?api_key=sk-in-query-zzz"))
        response = client.read_response()
    request_id = response.headers["x-egress-request-id"]
    assert wait_until(lambda: any(r.get("request_id") == request_id for r in egress_proc.access_records()), 3)
    record = next(r for r in egress_proc.access_records() if r.get("request_id") == request_id)
    assert record["path"] == "/openai/v1/models" and record["provider"] == "openai" and record["status"] == 200
    assert record["bytes_out"] == len(response.body) and record["ttfb_ms"] > 0
    assert "sk-in-query-zzz" not in egress_proc.logs()


def test_healthz(egress_proc):
    with RawClient(egress_proc.port) as client:
        client.send(request_bytes("GET", "/healthz"))
        response = client.read_response()
    assert response.status == 200 and response.json()["status"] == "ok"
    assert response.json()["deny_set"] == {"size": 0, "stream_connected": False, "age_seconds": None}


def test_garbage_then_nothing_crashes(egress_proc):
    for payload in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"\r\n\r\n\r\n", b"GET\r\n\r\n", b"\x00" * 64):
        with socket.create_connection(("127.0.0.1", egress_proc.port), timeout=3) as sock:
            sock.sendall(payload)
            sock.settimeout(3)
            reply = sock.recv(4096)
            assert reply == b"" or reply.startswith(b"HTTP/1.1 400 ")
    with RawClient(egress_proc.port) as client:
        client.send(request_bytes("GET", "/healthz"))
        assert client.read_response().status == 200


# -- request bodies and credentials that used to get through --------------------------------


def chunked_request(target: str, body: bytes, chunk: int, trailer: bytes = b"", headers: str = "") -> bytes:
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + chunk]), body[i : i + chunk]) for i in range(0, len(body), chunk)
    )
    return (
        (
            f"POST {target} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer sk-byo\r\nTransfer-Encoding: chunked\r\n{headers}\r\n"
        ).encode()
        + chunks
        + b"0\r\n"
        + trailer
        + b"\r\n"
    )


def test_a_chunked_trailer_is_accepted_and_dropped(egress_proc, fake):
    body = chat_body()
    with RawClient(egress_proc.port) as client:
        client.send(chunked_request("/openai/v1/chat/completions", body, 7, trailer=b"X-Checksum: abc\r\nX-T: v\r\n"))
        assert client.read_response("POST").status == 200
        client.send(request_bytes("GET", "/healthz"))  # the connection is still in step
        assert client.read_response().status == 200
    seen = fake.requests[-1]
    assert seen.body == body and seen.header("x-checksum") is None and seen.header("x-t") is None


@pytest.mark.parametrize("where", ["trailer", "chunk-extension"])
def test_framing_without_body_bytes_is_bounded(egress_proc, where):
    with RawClient(egress_proc.port) as client:
        client.send(chunked_request("/openai/v1/chat/completions", chat_body(), 64)[:-5])  # before "0\r\n\r\n"
        endless = b"0\r\nX-Big: " if where == "trailer" else b"1;ext="
        client.send(endless)
        try:
            for _ in range(64):  # 4 MiB at most; refused after 32 KiB
                client.send(b"a" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = client.read_response("POST")
        assert client.server_closed()
    # Whichever bound the reads meet first: framing with no body byte past 32 KiB, or (this
    # gateway's cap is 4 KiB) body framing past 8 x the cap.
    assert (response.status, response.error_code) in {(431, "headers_too_large"), (413, "body_too_large")}


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer bai_revoked", "authorization": "Bearer sk-other"},
        {"x-api-key": "sk-one", "X-Api-Key": "sk-two"},
    ],
    ids=["authorization", "x-api-key"],
)
def test_duplicate_credential_headers_are_a_400(egress_proc, fake, headers):
    before = len(fake.requests)
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    data = f"GET /openai/v1/models HTTP/1.1\r\nHost: a\r\n{lines}\r\n".encode()
    response = expect_error(egress_proc.port, data, 400, "bad_request", closes=True)
    assert "more than one" in response.json()["error"]["message"]
    assert len(fake.requests) == before


def peak_rss_kib(process: EgressProcess) -> int:
    with open(f"/proc/{process.pid}/status") as fh:
        status = fh.read()
    return int(status.split("VmHWM:")[1].split()[0])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunk", [1, 2])
def test_a_chunked_body_in_tiny_chunks_costs_memory_of_its_size(start_egress, chunk):
    size = 4 * 1024 * 1024 - 4096  # near the cap configured below
    upstream = ScriptedUpstream([b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"] * 2)
    try:
        egress = start_egress(
            f'[server]\nmax_body_bytes = {4 * 1024 * 1024}\n[providers.raw]\nbase_url = "{upstream.base_url}"\n'
        )
        with RawClient(egress.port, timeout=60) as client:  # warm up: first-request allocations
            client.send(request_bytes("GET", "/raw/v1/models"))
            assert client.read_response().status == 200
        before = peak_rss_kib(egress)
        wire = chunked_request("/raw/v1/chat/completions", b"x" * size, chunk)
        with RawClient(egress.port, timeout=60) as client:
            client.sock.sendall(wire)
            response = client.read_response("POST")
        assert response.status == 200
        assert len(upstream.requests[-1]) > size
        grown = (peak_rss_kib(egress) - before) * 1024
        assert grown < 2 * size, f"egress grew by {grown / size:.1f} x the body"
    finally:
        upstream.stop()


def test_many_pipelined_answers_behind_an_upstream_request_are_all_given(egress_proc):
    # egress answers /healthz itself: each of those finishes inside the loop that started it. With
    # 300 queued behind a slow upstream request, that used to recurse until RecursionError.
    first = post_chat(headers={"x-fake-scenario": "slow-head", "x-fake-delay": "0.3"})
    with RawClient(egress_proc.port, timeout=10) as client:
        client.send(first + request_bytes("GET", "/healthz") * 300 + request_bytes("GET", "/nosuch/x"))
        assert client.read_response("POST").status == 200
        statuses = [client.read_response().status for _ in range(301)]
    assert statuses == [200] * 300 + [404]
    assert b"internal_error" not in egress_proc.stderr_path.read_bytes()


def test_a_refusal_to_head_has_no_body(egress_proc):
    fields = "".join(f"X-{index}: v\r\n" for index in range(101))
    with socket.create_connection(("127.0.0.1", egress_proc.port), timeout=5) as sock:
        sock.sendall(f"HEAD /openai/v1/models HTTP/1.1\r\nHost: a\r\n{fields}\r\n".encode())
        received = b""
        while data := sock.recv(65536):  # egress closes after a 431
            received += data
    assert received.startswith(b"HTTP/1.1 431 ")
    assert received.endswith(b"\r\n\r\n") and received.count(b"\r\n\r\n") == 1, "a body after the head"


class ClosingOnReuse(LoopbackServer):
    """An upstream whose first `pooled` connections each answer one request, slowly enough that
    egress opens them all at once, then close when the next request arrives on them (its keep-alive
    timer firing as the request comes); every later connection answers every request."""

    OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"

    def __init__(self, pooled: int) -> None:
        self.pooled = pooled
        super().__init__()

    @property
    def accepted(self) -> int:
        return self.connections

    def _serve(self, conn: socket.socket) -> None:
        closes_on_reuse = self.connections <= self.pooled  # counted before this thread started
        for served, _ in enumerate(self._requests(conn, _split_request)):
            if closes_on_reuse and served:
                conn.close()  # closed as the next request arrives: it never reached the provider
                return
            if closes_on_reuse:
                time.sleep(0.3)
            try:
                conn.sendall(self.OK)
            except OSError:
                return


def test_a_request_on_a_pooled_connection_the_upstream_closed_is_retried_on_a_new_one(start_egress):
    """Two pooled connections, both closed by the upstream as they are reused: the one retry goes
    to a new connection, not to the other pooled one, which is as likely to be closing."""
    upstream = ClosingOnReuse(pooled=2)
    try:
        egress = start_egress(f'[providers.raw]\nbase_url = "{upstream.base_url}"\n')
        clients = [RawClient(egress.port), RawClient(egress.port)]
        for client in clients:  # both at once: egress opens two upstream connections, then pools both
            client.send(request_bytes("GET", "/raw/v1/models"))
        assert [client.read_response().status for client in clients] == [200, 200]
        for client in clients:
            client.close()
        assert upstream.accepted == 2
        with RawClient(egress.port) as client:
            client.send(request_bytes("GET", "/raw/v1/models"))
            response = client.read_response()
        assert response.status == 200, response.body
        assert response.headers.get("x-egress-attempts") in (None, "1")
        assert upstream.accepted == 3, "the retry opened a new connection"
    finally:
        upstream.stop()


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param((b"HTTP/1.1 200 OK\r\n", "close"), id="status line then close"),
        pytest.param((b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n", "reset"), id="half a head then reset"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\ncontent-type : application/json\r\ncontent-length: 2\r\n\r\n{}", id="malformed head"
        ),
    ],
)
def test_a_post_the_provider_began_to_answer_is_never_sent_again(start_egress, tmp_path, reply):
    """A pooled POST whose answer broke after its first byte reached the provider: sent again (to
    another account) it would be generated and billed twice. One attempt, one 502."""
    upstream = ScriptedUpstream([reply] * 3)
    try:
        for name in ("a", "b"):
            (tmp_path / f"{name}.key").write_text(f"sk-pool-{name}\n")
        issuer = Ed25519PrivateKey.generate()
        egress = start_egress(
            f'[providers.raw]\nbase_url = "{upstream.base_url}"\n'
            f'pool_keys = ["file:{tmp_path / "a.key"}", "file:{tmp_path / "b.key"}"]\n'
            f'[keys]\ntrusted_issuers = ["{public_key_text(issuer.public_key())}"]\n'
            "[accounts]\nmax_attempts = 3\n"
        )
        key = mint(issuer, "replay")[0]  # a pooled request: a failure before any byte moves accounts
        with RawClient(egress.port) as client:
            headers = {"Authorization": f"Bearer {key}"}
            client.send(request_bytes("POST", "/raw/v1/chat/completions", headers, b'{"model":"m"}'))
            response = client.read_response("POST")
        assert response.status == 502 and response.error_code == "upstream_protocol_error"
        assert response.headers.get("x-egress-attempts") == "1"
        assert [request.split(b" ", 1)[0] for request in upstream.requests] == [b"POST"]
    finally:
        upstream.stop()


# -- pipelining clients that misbehave ------------------------------------------------------------


def test_a_pipelining_client_that_never_reads_holds_bounded_memory(start_egress):
    """Answers egress gives itself (here /healthz) used to be made and buffered for as long as the
    client kept sending: ~40 MB/s. Now it stops answering above the write buffer's high mark and
    holds at most 64 KiB of unread requests, so the client's sends soon block."""
    egress = start_egress("")
    before = egress.rss_kib()
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 500
    sent = 0
    with socket.create_connection(("127.0.0.1", egress.port)) as sock:  # and never reads
        sock.settimeout(0.2)
        give_up_at = time.monotonic() + 3
        while time.monotonic() < give_up_at:
            try:
                sent += sock.send(request)
            except TimeoutError:
                continue  # egress stopped reading for now: the send buffer is full
        time.sleep(1.0)  # what egress read, it has answered (and buffered) by now
        grown = egress.rss_kib() - before
    assert sent < 8 << 20, "egress kept reading a client that never reads"
    assert grown < 24 * 1024, f"{grown} KiB more after {sent} bytes of pipelined requests"


class _HeldOpen(LoopbackServer):
    """An upstream that reads a request and never answers, noting how long each connection stayed
    open once its request came: how soon egress aborted it."""

    def __init__(self) -> None:
        self.open_for: list[float] = []
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        started = None
        for _ in self._requests(conn, _split_request):
            started = time.monotonic()
        if started is not None and not self._stop.is_set():
            self.open_for.append(time.monotonic() - started)


def test_a_client_that_leaves_with_a_pipelined_request_queued_ends_the_upstream_at_once(start_egress):
    """The provider is generating (no first byte yet) and a second request waits its turn: the
    client leaving must still abort the upstream, not leave it to first_byte_timeout."""
    upstream = _HeldOpen()
    try:
        egress = start_egress(f'[providers.raw]\nbase_url = "http://127.0.0.1:{upstream.port}"\n')
        request = request_bytes("POST", "/raw/v1/chat/completions", {"Authorization": "Bearer x"}, b'{"model":"m"}')
        with socket.create_connection(("127.0.0.1", egress.port)) as sock:
            sock.sendall(request * 2)
            time.sleep(0.5)
        assert wait_until(lambda: upstream.open_for, timeout=5), "the upstream connection stayed open"
        assert upstream.open_for[0] < 2.0
        assert wait_until(lambda: len(egress.access_records()) == 2, timeout=3)
        # The queued one, never sent, is logged too (test_http_review.py): each request read has its line.
        assert [(r["status"], r["outcome"]) for r in egress.access_records()] == [(0, "client_gone")] * 2
    finally:
        upstream.stop()


def test_a_pipelined_request_whose_client_left_is_never_sent(start_egress):
    """Two pipelined POSTs, then a reset while the first one's answer goes out: the second, whose
    turn came as the client left, must not go upstream holding a place under the provider's cap
    that nothing gives back (the cap of 5 was used up for good after a few such clients)."""
    upstream = ScriptedUpstream([ClosingOnReuse.OK] * 200)
    try:
        egress = start_egress(
            f'[providers.raw]\nbase_url = "{upstream.base_url}"\nmax_concurrent = 5\nqueue_timeout = 1.0\n'
        )
        request = request_bytes("POST", "/raw/v1/chat/completions", {"Authorization": "Bearer x"}, b'{"model":"m"}')
        for _ in range(30):
            sock = socket.create_connection(("127.0.0.1", egress.port))
            sock.sendall(request * 2)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
            time.sleep(0.002)

        def in_flight() -> int:
            document = orjson.loads(admin_get(egress.admin_port, "/status")[1])
            return document["providers"]["raw"]["in_flight"]

        assert wait_until(lambda: in_flight() == 0, timeout=5), in_flight()
        with RawClient(egress.port) as client:
            client.send(request)
            assert client.read_response("POST").status == 200
        # Every request that reached the provider is logged: none went out after its log line.
        assert wait_until(lambda: len(egress.access_records()) >= 31, timeout=3)
        assert len(upstream.requests) <= len(egress.access_records())
    finally:
        upstream.stop()


class _SlowFirstEvent(LoopbackServer):
    """An SSE answer whose head comes at once and whose first event comes `delay` seconds later,
    as a provider's does: the time to first token is in the wait for the event."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        for _ in self._requests(conn, _split_request):
            event = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
            try:
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                )
                time.sleep(self.delay)
                conn.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
            except OSError:
                return


def test_a_held_streams_time_to_first_byte_is_when_the_caller_got_its_head(start_egress, tmp_path):
    """A pooled stream's head is held until its first event is judged: the caller's time to first
    byte (access log, egress_ttfb_seconds) is that moment, not the provider's head's."""
    upstream = _SlowFirstEvent(0.5)
    try:
        (tmp_path / "a.key").write_text("sk-pool-a\n")
        issuer = Ed25519PrivateKey.generate()
        egress = start_egress(
            f'[providers.raw]\nbase_url = "{upstream.base_url}"\npool_keys = ["file:{tmp_path / "a.key"}"]\n'
            f'[keys]\ntrusted_issuers = ["{public_key_text(issuer.public_key())}"]\n'
        )
        headers = {"Authorization": f"Bearer {mint(issuer, 'ttfb')[0]}"}
        with RawClient(egress.port) as client:
            started = time.monotonic()
            client.send(request_bytes("POST", "/raw/v1/chat/completions", headers, b'{"model":"m","stream":true}'))
            response = client.read_response("POST")
            took = time.monotonic() - started
        assert response.status == 200 and took >= 0.5
        assert wait_until(lambda: egress.access_records(), timeout=3)
        (record,) = egress.access_records()
        assert 450 <= record["ttfb_ms"] <= record["total_ms"], record
    finally:
        upstream.stop()

"""The upstream client inside the real process: TLS verification and the keep-alive pool."""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import provider_config, start_fake_provider
from tests.support import RawClient, ScriptedUpstream, request_bytes, wait_until


def test_untrusted_upstream_certificate_is_refused(start_egress, fake_provider, tmp_path):
    # No ca_file: the fake's trustme certificate is not trusted by the system store.
    config = f'[providers.openai]\nbase_url = "{fake_provider.base_url}"\n'
    egress = start_egress(config)
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/openai/v1/models"))
        response = client.read_response()
    assert response.status == 502 and response.error_code == "upstream_connect_error"
    assert "certificate" in response.json()["error"]["message"]
    assert fake_provider.requests == []


def test_certificate_for_another_name_is_refused(start_egress, certificate_authority, ca_file):
    # Signed by the trusted CA, but for another host name than the one egress dials.
    impostor = start_fake_provider(certificate_authority, names=("api.other.test",))
    try:
        egress = start_egress(provider_config(impostor, ca_file))
        with RawClient(egress.port) as client:
            client.send(request_bytes("GET", "/openai/v1/models"))
            response = client.read_response()
        assert response.status == 502 and response.error_code == "upstream_connect_error"
        assert "certificate" in response.json()["error"]["message"]
        assert impostor.requests == []
    finally:
        impostor.stop()


@pytest.mark.parametrize("path", ["/openai/v1/models", "/anthropic/v1/models"])
def test_idle_upstream_connections_close_after_pool_idle_timeout(start_egress, fake_provider, ca_file, path):
    egress = start_egress(provider_config(fake_provider, ca_file, upstream="pool_idle_timeout = 1.5"))
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", path))
        assert client.read_response().status == 200
        assert fake_provider.connections_closed == 0
        assert wait_until(lambda: fake_provider.connections_closed == 1, timeout=4)
        client.send(request_bytes("GET", path))
        assert client.read_response().status == 200
    assert fake_provider.connections_opened == 2


def test_pool_keeps_at_most_max_idle_per_origin(start_egress, fake_provider, ca_file):
    egress = start_egress(provider_config(fake_provider, ca_file, upstream="max_idle_per_origin = 1"))
    clients = [RawClient(egress.port) for _ in range(3)]
    try:
        stream = b'{"model":"m","messages":[],"stream":true}'
        headers = {"Content-Type": "application/json", "x-fake-scenario": "long-stream", "x-fake-events": "5"}
        for client in clients:  # three concurrent requests need three upstream connections
            client.send(request_bytes("POST", "/openai/v1/chat/completions", headers, stream))
        for client in clients:
            assert client.read_response("POST").status == 200
    finally:
        for client in clients:
            client.close()
    assert fake_provider.connections_opened == 3
    assert wait_until(lambda: fake_provider.connections_closed == 2, timeout=3)


def test_bytes_after_a_complete_response_are_never_read_as_the_next_one(start_egress, fake_provider, ca_file):
    egress = start_egress(provider_config(fake_provider, ca_file))
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/openai/v1/models", {"x-fake-scenario": "extra-response"}))
        first = client.read_response()
        assert first.status == 200 and first.body == b'{"object":"list","data":[]}'
        # The connection that carried the stray response is closed, not pooled: the next request
        # gets the provider's real answer on a new connection.
        client.send(request_bytes("GET", "/openai/v1/models"))
        second = client.read_response()
    assert second.status == 200 and second.json()["data"][0]["id"] == "gpt-fake"
    assert wait_until(lambda: fake_provider.connections_opened == 2, timeout=3)
    assert wait_until(lambda: fake_provider.connections_closed >= 1, timeout=3)


@pytest.mark.parametrize("split", [False, True])
def test_early_hints_are_not_relayed_and_the_answer_is(start_egress, fake_provider, ca_file, split):
    egress = start_egress(provider_config(fake_provider, ca_file))
    headers = {"x-fake-scenario": "early-hints", **({"x-fake-split": "1"} if split else {})}
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/openai/v1/models", headers))
        response = client.read_response()
        assert response.status == 200 and response.json() == {"object": "list", "data": []}
        assert response.headers["x-request-id"].startswith("req_fake")
        assert "link" not in response.headers
        # The connection stays in the pool and serves the next request.
        client.send(request_bytes("GET", "/openai/v1/models"))
        assert client.read_response().status == 200
    assert fake_provider.connections_opened == 1


def test_an_endless_response_head_is_refused_with_bounded_memory(start_egress, fake_provider, ca_file):
    egress = start_egress(provider_config(fake_provider, ca_file))
    rss_before = egress.rss_kib()
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/openai/v1/models", {"x-fake-scenario": "huge-head"}))
        response = client.read_response()
    assert response.status == 502 and response.error_code == "upstream_protocol_error"
    assert "too large" in response.json()["error"]["message"]
    assert egress.rss_kib() - rss_before < 4 * 1024  # a 64 KiB bound plus one read, not the 1 MiB sent


# -- a hostile or broken upstream (ScriptedUpstream answers with raw bytes) -------------------


@pytest.fixture
def scripted(start_egress, request):
    """A ScriptedUpstream (or `kind`, one of its kind) with the test's replies, and an egress
    routing `/raw/` to it."""
    started = []

    def start(replies: list, upstream: str = "", kind: type = ScriptedUpstream) -> tuple:
        raw = kind(replies)
        started.append(raw)
        egress = start_egress(f'[upstream]\n{upstream}\n[providers.raw]\nbase_url = "{raw.base_url}"\n')
        return egress, raw

    yield start
    for raw in started:
        raw.stop()


OK_KEEP_ALIVE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


def test_a_post_whose_upstream_never_answers_is_not_replayed(scripted):
    # The first request pools the connection; the POST on it then gets no first byte. Replaying it
    # on a fresh connection would have the provider generate (and bill) twice.
    egress, raw = scripted([OK_KEEP_ALIVE, ScriptedUpstream.HANG, OK_KEEP_ALIVE], upstream="first_byte_timeout = 1.0")
    with RawClient(egress.port, timeout=10) as client:
        client.send(request_bytes("GET", "/raw/v1/models"))
        assert client.read_response().status == 200
        started = time.monotonic()
        client.send(request_bytes("POST", "/raw/v1/chat/completions", body=b'{"model":"m"}'))
        response = client.read_response("POST")
        waited = time.monotonic() - started
    assert response.status == 504 and response.error_code == "upstream_timeout"
    assert [request.split(b" ", 1)[0] for request in raw.requests] == [b"GET", b"POST"]
    assert waited < 1.9, "the caller waited one timeout, not two"


def test_an_upstream_switching_protocols_is_a_502(scripted):
    switch = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n\x81\x05hello"
    egress, _ = scripted([switch, OK_KEEP_ALIVE])
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/raw/v1/models"))
        response = client.read_response()
        assert response.status == 502 and response.error_code == "upstream_protocol_error"
        client.send(request_bytes("GET", "/raw/v1/models"))
        assert client.read_response().status == 200
    assert b"Traceback" not in egress.stderr_path.read_bytes()


def test_an_upstream_request_id_never_reaches_the_client(scripted):
    spoof = b"HTTP/1.1 200 OK\r\nX-Egress-Request-Id: spoofed\r\ncontent-length: 2\r\n\r\n{}"
    egress, _ = scripted([spoof])
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/raw/v1/models"))
        response = client.read_response()
    ids = [value for name, value in response.header_list if name == "x-egress-request-id"]
    assert response.status == 200 and len(ids) == 1 and ids[0] != "spoofed"
    assert wait_until(lambda: egress.access_records(), timeout=3)
    assert ids[0] == egress.access_records()[-1]["request_id"]


def test_a_chunked_response_with_trailers_is_relayed_without_them(scripted):
    reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: CHUNKED\r\n\r\n5\r\nhello\r\n0\r\nx-t: v\r\nx-u: w\r\n\r\n"
    egress, _ = scripted([reply, OK_KEEP_ALIVE])
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/raw/v1/models"))
        response = client.read_response()
        assert response.status == 200 and response.complete and response.body == b"hello"
        assert "x-t" not in response.headers
        client.send(request_bytes("GET", "/raw/v1/models"))  # the pooled connection is still in step
        assert client.read_response().body == b"{}"


def test_endless_trailers_cut_the_response_with_bounded_memory(scripted):
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
    egress, _ = scripted([(reply + b"a: b\r\n" * 1_500_000 + b"\r\n", "close")])
    rss_before = egress.rss_kib()
    with RawClient(egress.port, timeout=10) as client:
        client.send(request_bytes("GET", "/raw/v1/models"))
        response = client.read_response()
    assert response.status == 200 and not response.complete  # cut, never a clean end
    assert egress.rss_kib() - rss_before < 4 * 1024  # 9 MB of trailer fields were sent


@pytest.mark.parametrize("coding", [b"xchunked", b"chunked, gzip", b"gzip, chunked", b"gzip", b"chunked\t"], ids=repr)
def test_a_transfer_coding_other_than_chunked_is_refused(scripted, coding):
    # llhttp decodes chunked and nothing else; anything more would reach the client still coded
    # (or, for xchunked and chunked-with-a-tab, framed otherwise than egress reads it).
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: " + coding + b"\r\n\r\n"
    egress, _ = scripted([(reply + b"5\r\nhello\r\n0\r\n\r\n", True)])
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/raw/v1/models"))
        response = client.read_response()
    assert response.status == 502 and response.error_code == "upstream_protocol_error"


@pytest.mark.parametrize("after", ["reset", "hang"])
def test_a_close_delimited_response_cut_by_reset_or_silence_is_a_cut(scripted, after):
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: 1\n\n"
    egress, _ = scripted([(reply, after)], upstream="read_idle_timeout = 1.0")
    with RawClient(egress.port, timeout=10) as client:
        client.send(request_bytes("GET", "/raw/v1/models"))
        response = client.read_response()
    assert response.status == 200 and response.body == b"data: 1\n\n"
    assert not response.complete, "an orderly close ends such a body; a reset or a timeout cuts it"
    assert wait_until(lambda: egress.access_records() and egress.access_records()[-1]["outcome"] == "upstream_cut", 3)


@pytest.mark.parametrize("status", [b"099", b"000", b"600"])
def test_a_status_outside_100_to_599_is_a_502(scripted, status):
    egress, _ = scripted([(b"HTTP/1.1 " + status + b" X\r\ncontent-length: 2\r\n\r\n{}", "hang")])
    started = time.monotonic()
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/raw/v1/models"))
        response = client.read_response()
    assert response.status == 502 and response.error_code == "upstream_protocol_error"
    assert time.monotonic() - started < 2


def test_a_204_never_carries_a_content_length(scripted):
    egress, _ = scripted([b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n", OK_KEEP_ALIVE])
    with RawClient(egress.port) as client:
        client.send(request_bytes("DELETE", "/raw/v1/files/x"))
        response = client.read_response("DELETE")
        assert response.status == 204 and "content-length" not in response.headers
        client.send(request_bytes("GET", "/raw/v1/models"))
        assert client.read_response().status == 200


def test_a_response_ending_in_a_large_read_frees_the_connection_for_the_next_request(scripted):
    # The client pauses, so egress stops reading the upstream; when it reads again the rest of the
    # response, end included, comes in one large read. The exchange must still settle, or the
    # client's kept-alive connection never takes its next request.
    big = b"x" * (4 * 1024 * 1024)
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % len(big) + big
    egress, _ = scripted([reply, OK_KEEP_ALIVE])
    with RawClient(egress.port, timeout=5) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.send(request_bytes("GET", "/raw/v1/big"))
        time.sleep(0.5)
        assert client.read_response().body == big
        client.send(request_bytes("GET", "/raw/v1/models"))
        assert client.read_response().body == b"{}"
    assert wait_until(lambda: len(egress.access_records()) == 2, timeout=3)
    assert [record["outcome"] for record in egress.access_records()] == ["complete", "complete"]

"""Streams through the real egress process: back-pressure, disconnects, cuts and graceful stop."""

from __future__ import annotations

import socket
import time

import pytest

from tests.conftest import provider_config
from tests.support import RawClient, request_bytes, wait_until

# Usage asked for by the caller: egress injects nothing, so the relay is byte for byte.
STREAM_BODY = (
    b'{"model":"gpt-fake","messages":[{"role":"user","content":"hi"}],"stream":true,'
    b'"stream_options":{"include_usage":true}}'
)


def stream_request(scenario: str, **fake_headers: str) -> bytes:
    headers = {"Content-Type": "application/json", "x-fake-scenario": scenario}
    headers.update({f"x-fake-{name.replace('_', '-')}": value for name, value in fake_headers.items()})
    return request_bytes("POST", "/openai/v1/chat/completions", headers, STREAM_BODY)


def test_slow_reader_pauses_the_upstream_and_memory_stays_bounded(egress, fake_provider):
    total = 256 * 1024 * 1024
    sock = socket.create_connection(("127.0.0.1", egress.port), timeout=10)
    # A small receive window, so what egress can park in the kernel on our side stays small too.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        rss_before = egress.rss_kib()
        sock.sendall(stream_request("big-stream", bytes=str(total)))
        assert wait_until(lambda: fake_provider.streams, timeout=5)
        record = next(iter(fake_provider.streams.values()))
        sock.recv(65536)
        time.sleep(2.0)  # the reader stalls; egress must stop reading from the provider
        sent_while_stalled = record.bytes_sent
        rss_stalled = egress.rss_kib()
        time.sleep(1.0)
        assert record.bytes_sent == sent_while_stalled, "the provider kept sending while the client was stalled"
        # What left the provider is bounded by socket buffers and egress's write-buffer mark.
        assert sent_while_stalled < 32 * 1024 * 1024
        # Measured at about 1.4 MiB; the bound leaves room for allocator noise, not for buffering.
        assert rss_stalled - rss_before < 8 * 1024, f"RSS grew {rss_stalled - rss_before} KiB"
        # Reading again resumes the stream.
        received = 0
        sock.settimeout(5)
        while received < 8 * 1024 * 1024:
            received += len(sock.recv(1 << 20))
        assert record.bytes_sent > sent_while_stalled
    finally:
        sock.close()
    assert wait_until(lambda: record.peer_closed_at is not None, timeout=3)


def test_client_disconnect_closes_the_upstream_within_a_second(egress, fake_provider):
    with RawClient(egress.port) as client:
        client.send(stream_request("long-stream", events="400", interval="0.02"))
        assert wait_until(lambda: fake_provider.streams, timeout=5)
        record = next(iter(fake_provider.streams.values()))
        assert wait_until(lambda: record.bytes_sent > 0, timeout=5)
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    closed_at = time.monotonic()
    assert wait_until(lambda: record.peer_closed_at is not None, timeout=1.0), "the provider kept generating"
    assert record.peer_closed_at - closed_at < 1.0
    assert not record.finished
    assert wait_until(lambda: any(r.get("outcome") == "client_gone" for r in egress.access_records()), timeout=3)
    with RawClient(egress.port) as client:  # and egress carries on
        client.send(request_bytes("GET", "/openai/v1/models"))
        assert client.read_response().status == 200


def test_upstream_cut_mid_stream_never_looks_complete(egress, fake_provider):
    with RawClient(egress.port) as client:
        client.send(stream_request("cut-stream"))
        response = client.read_response("POST")
        assert response.status == 200
        assert not response.complete, "a cut stream must not end with the terminating chunk"
        assert response.body == fake_provider.sent_bodies[response.headers["x-request-id"]]
        assert response.body.count(b"data: ") == 2
    assert wait_until(lambda: any(r.get("outcome") == "upstream_cut" for r in egress.access_records()), timeout=3)
    (cut,) = [r for r in egress.access_records() if r.get("outcome") == "upstream_cut"]
    assert cut["code"] == "upstream_protocol_error", cut  # why: the provider's connection ended mid-body


def test_upstream_cut_is_an_error_for_the_official_sdk(egress, fake_provider):
    import httpx2 as httpx
    import openai

    client = openai.OpenAI(base_url=egress.url + "/openai/v1", api_key="sk-byo", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-fake",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-fake-scenario": "cut-stream"},
    )
    with pytest.raises((httpx.RemoteProtocolError, openai.APIConnectionError)):
        for _ in stream:
            pass


def test_sigterm_during_a_long_stream_lets_it_finish_then_exits_zero(egress, fake_provider):
    with RawClient(egress.port, timeout=10) as client:
        client.send(stream_request("long-stream", events="40", interval="0.05"))
        assert wait_until(lambda: fake_provider.streams, timeout=5)
        egress.signal()
        response = client.read_response("POST")
        assert response.complete and response.status == 200
        assert response.body.count(b"data: ") == 41 and response.body.endswith(b"data: [DONE]\n\n")
        assert response.headers.get("connection") != "close" or client.server_closed()
    assert egress.wait(timeout=10) == 0
    assert '"event":"stopped","forced_closed":0' in egress.logs()


def test_a_client_that_stops_reading_is_cut_after_send_timeout(start_egress, fake_provider, ca_file):
    egress = start_egress(
        provider_config(fake_provider, ca_file, server="send_timeout = 1.0", upstream="read_idle_timeout = 30")
    )
    sock = socket.create_connection(("127.0.0.1", egress.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    try:
        sock.sendall(stream_request("big-stream", bytes=str(256 * 1024 * 1024)))
        assert wait_until(lambda: fake_provider.streams, timeout=5)
        record = next(iter(fake_provider.streams.values()))
        sock.recv(65536)
        # It never reads again: without a send deadline it would hold the connection, the
        # provider's stream and a write buffer forever.
        assert wait_until(lambda: record.peer_closed_at is not None, timeout=5), "the provider kept the stream"
        assert wait_until(lambda: egress.access_records(), timeout=3)
        assert egress.access_records()[-1]["outcome"] == "client_gone"
        sock.settimeout(5)
        received = 0
        try:
            while data := sock.recv(1 << 20):  # what the kernel still held, then the end
                received += len(data)
        except ConnectionResetError:
            pass
        assert received < 64 * 1024 * 1024
    finally:
        sock.close()


def test_a_slow_client_is_not_mistaken_for_an_idle_provider(start_egress, fake_provider, ca_file):
    # egress stops reading the provider while the client is slow: that pause is not the provider
    # going idle, and must not cut the stream at read_idle_timeout.
    egress = start_egress(
        provider_config(fake_provider, ca_file, server="send_timeout = 30", upstream="read_idle_timeout = 1.0")
    )
    total = 16 * 1024 * 1024
    with RawClient(egress.port, timeout=10) as client:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.send(stream_request("big-stream", bytes=str(total)))
        assert wait_until(lambda: fake_provider.streams, timeout=5)
        time.sleep(2.5)  # not reading, longer than read_idle_timeout
        response = client.read_response("POST")
    assert response.status == 200 and response.complete
    assert wait_until(lambda: egress.access_records(), timeout=3)
    assert egress.access_records()[-1]["outcome"] == "complete"

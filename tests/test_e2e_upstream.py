"""The upstream client inside the real process: TLS verification and the keep-alive pool."""

from __future__ import annotations

import pytest

from tests.conftest import provider_config, start_fake_provider
from tests.support import RawClient, request_bytes, wait_until


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

"""The access log: one JSON line per request, to the configured place, or nowhere."""

from __future__ import annotations

import orjson

from tests.conftest import provider_config
from tests.support import RawClient, request_bytes, wait_until


def _three_requests(port: int) -> None:
    with RawClient(port) as client:
        for target in ("/openai/v1/models", "/nosuch/x", "/healthz"):
            client.send(request_bytes("GET", target, {"Authorization": "Bearer sk-never-logged"}))
            client.read_response()


def test_access_log_to_a_file(start_egress, fake_provider, ca_file, tmp_path):
    log_path = tmp_path / "access.jsonl"
    egress = start_egress(provider_config(fake_provider, ca_file, server=f'access_log = "{log_path}"'))
    _three_requests(egress.port)
    assert wait_until(lambda: log_path.exists() and len(log_path.read_bytes().splitlines()) == 3, timeout=3)
    records = [orjson.loads(line) for line in log_path.read_bytes().splitlines()]
    assert [(r["path"], r["status"], r["code"]) for r in records] == [
        ("/openai/v1/models", 200, None),
        ("/nosuch/x", 404, "unknown_provider"),
        ("/healthz", 200, None),
    ]
    assert len({r["request_id"] for r in records}) == 3
    assert all(r["client"].startswith("127.0.0.1:") and r["total_ms"] >= 0 for r in records)
    assert b"sk-never-logged" not in log_path.read_bytes()
    assert egress.stdout_path.read_bytes() == b""


def test_access_log_off(start_egress, fake_provider, ca_file):
    egress = start_egress(provider_config(fake_provider, ca_file, server='access_log = "off"'))
    _three_requests(egress.port)
    egress.stop()
    assert egress.stdout_path.read_bytes() == b""
    assert b'"event":"stopped"' in egress.stderr_path.read_bytes()


def test_a_refused_target_is_logged_without_the_credential_in_it(start_egress, fake_provider, ca_file, tmp_path):
    log_path = tmp_path / "access.jsonl"
    egress = start_egress(provider_config(fake_provider, ca_file, server=f'access_log = "{log_path}"'))
    targets = [
        "http://user:sk-in-userinfo@127.0.0.1/openai/v1/models",  # absolute-form, userinfo
        "/openai/v1/models#key=sk-in-fragment",
        "/openai/v1/models?key=sk-in-query",
    ]
    statuses = []
    for target in targets:
        with RawClient(egress.port) as client:
            client.send(f"GET {target} HTTP/1.1\r\nHost: egress\r\n\r\n".encode())
            statuses.append(client.read_response().status)
    assert wait_until(lambda: log_path.exists() and len(log_path.read_bytes().splitlines()) == 3, timeout=3)
    logged = log_path.read_bytes()
    assert b"sk-in-" not in logged, logged
    paths = [orjson.loads(line)["path"] for line in logged.splitlines()]
    assert paths == ["http://127.0.0.1/openai/v1/models", "/openai/v1/models", "/openai/v1/models"], (paths, statuses)

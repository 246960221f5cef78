"""The distributed deny-set against a real nats-server (JetStream) and real egress processes."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.vkeys import mint, public_key_text
from tests.conftest import provider_config
from tests.support import EgressProcess, NatsServer, RawClient, request_bytes, run_egress_cli, wait_until

ISSUER = Ed25519PrivateKey.generate()
POOL_KEY = "sk-pool-nats-dddddddddddddddd"


def nats_config(fake, ca_file, workdir: Path, nats: NatsServer, name: str) -> str:
    pool = workdir / "pool.keys"
    pool.write_text(POOL_KEY + "\n")
    return provider_config(
        fake,
        ca_file,
        pool_keys={"openai": pool},
        extra=f"""
[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]

[nats]
url = "{nats.url}"
snapshot = "{workdir / f"{name}.snapshot"}"
max_reconnect_wait = 0.5
""",
    )


def start(workdir: Path, fake, ca_file, nats: NatsServer, name: str) -> EgressProcess:
    process = EgressProcess(workdir, nats_config(fake, ca_file, workdir, nats, name), name=name).start()
    return process


def following(process: EgressProcess, times: int = 1) -> bool:
    return process.stderr_path.read_bytes().count(b'"event":"revocations_following"') >= times


def status_for(process: EgressProcess, token: str) -> int:
    with RawClient(process.port) as client:
        client.send(request_bytes("GET", "/openai/v1/models", {"Authorization": f"Bearer {token}"}))
        response = client.read_response()
    if response.status != 200:
        assert response.error_code == "key_revoked", response.body
    return response.status


def revoke(config: Path, kid: str) -> None:
    result = run_egress_cli("keys", "revoke", kid, "--config", str(config))
    assert result.returncode == 0, result.stderr


def health(process: EgressProcess) -> dict:
    with RawClient(process.port) as client:
        client.send(request_bytes("GET", "/healthz"))
        return orjson.loads(client.read_response().body)["deny_set"]


@pytest.fixture
def processes():
    started: list[EgressProcess] = []
    yield started
    for process in started:
        process.stop()


def test_revocation_reaches_two_instances_within_a_second(nats_server, fake_provider, ca_file, tmp_path, processes):
    first = start(tmp_path, fake_provider, ca_file, nats_server, "first")
    second = start(tmp_path, fake_provider, ca_file, nats_server, "second")
    processes += [first, second]
    assert wait_until(lambda: following(first) and following(second), timeout=10)
    token, claims = mint(ISSUER, "app")
    assert status_for(first, token) == 200 and status_for(second, token) == 200
    assert fake_provider.requests[-1].header("authorization") == f"Bearer {POOL_KEY}"

    revoke(first.config_path, claims.kid)  # returns once JetStream has acknowledged the publish
    assert wait_until(lambda: status_for(first, token) == 401 and status_for(second, token) == 401, timeout=1.0)
    snapshot = orjson.loads((tmp_path / "first.snapshot").read_bytes())
    assert claims.kid in snapshot["kids"] and snapshot["last_sequence"] == 1
    assert ((tmp_path / "first.snapshot").stat().st_mode & 0o777) == 0o600
    other, _ = mint(ISSUER, "other-app")
    assert status_for(first, other) == 200


def test_snapshot_enforces_revocations_before_the_broker_is_back(
    nats_server, fake_provider, ca_file, tmp_path, processes
):
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    assert wait_until(lambda: following(egress), timeout=10)
    token, claims = mint(ISSUER, "app")
    revoke(egress.config_path, claims.kid)
    assert wait_until(lambda: status_for(egress, token) == 401, timeout=2)
    egress.stop()
    nats_server.kill()

    restarted = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(restarted)
    assert status_for(restarted, token) == 401  # the very first request, with no broker at all
    valid, _ = mint(ISSUER, "app")
    assert status_for(restarted, valid) == 200
    assert health(restarted)["stream_connected"] is False


def test_revocations_published_while_down_are_applied_gap_free(
    nats_server, fake_provider, ca_file, tmp_path, processes
):
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    assert wait_until(lambda: following(egress), timeout=10)
    tokens = [mint(ISSUER, f"app-{index}") for index in range(4)]
    revoke(egress.config_path, tokens[0][1].kid)
    assert wait_until(lambda: status_for(egress, tokens[0][0]) == 401, timeout=2)
    egress.stop()

    for _, claims in tokens[1:3]:  # published while egress is down
        revoke(egress.config_path, claims.kid)
    restarted = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(restarted)
    assert wait_until(lambda: following(restarted), timeout=10)
    assert b'"from_sequence":2' in restarted.stderr_path.read_bytes()  # resumed, not replayed
    for token, _ in tokens[:3]:
        assert wait_until(lambda token=token: status_for(restarted, token) == 401, timeout=2)
    assert status_for(restarted, tokens[3][0]) == 200


def test_broker_killed_mid_run(nats_server, fake_provider, ca_file, tmp_path, processes):
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    assert wait_until(lambda: following(egress), timeout=10)
    valid, _ = mint(ISSUER, "app")
    revoked, claims = mint(ISSUER, "app")
    revoke(egress.config_path, claims.kid)
    assert wait_until(lambda: status_for(egress, revoked) == 401, timeout=2)
    assert health(egress)["stream_connected"] is True and health(egress)["age_seconds"] == 0

    nats_server.kill()
    assert wait_until(lambda: health(egress)["stream_connected"] is False, timeout=3)
    for _ in range(5):
        assert status_for(egress, valid) == 200
        assert status_for(egress, revoked) == 401
    time.sleep(0.3)
    assert health(egress)["age_seconds"] > 0

    nats_server.start()  # same port, same store: egress finds its way back
    assert wait_until(lambda: following(egress, times=2), timeout=10)
    later, later_claims = mint(ISSUER, "app")
    revoke(egress.config_path, later_claims.kid)
    assert wait_until(lambda: status_for(egress, later) == 401, timeout=2)
    assert status_for(egress, valid) == 200


def test_no_secret_in_any_log(nats_server, fake_provider, ca_file, tmp_path, processes):
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    token, _ = mint(ISSUER, "app")
    client = openai.OpenAI(base_url=egress.url + "/openai/v1", api_key=token, max_retries=0)
    client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    egress.stop()
    captured = egress.logs() + nats_server.log.read_text()
    assert POOL_KEY not in captured and token not in captured and token[4:60] not in captured

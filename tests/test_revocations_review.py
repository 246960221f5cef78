"""Revocations across restarts and broker outages, and the `egress keys mint` CLI's edge cases."""

from __future__ import annotations

import time

import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from egress.vkeys import decode_unverified, mint
from tests.support import RawClient, request_bytes, run_egress_cli, wait_until
from tests.test_revocations import ISSUER, following, health, nats_config, revoke


def status_for(port: int, token: str) -> int:
    with RawClient(port) as client:
        client.send(request_bytes("GET", "/openai/v1/models", {"Authorization": f"Bearer {token}"}))
        return client.read_response().status


def test_a_restart_during_a_broker_outage_keeps_the_deny_sets_age(
    nats_server, fake_provider, ca_file, tmp_path, start_egress
):
    """The snapshot a stop writes used to stamp the deny-set as fresh: after a deploy in the middle of a
    broker outage, `age_seconds` (and egress_deny_set_age_seconds) read ~0 and an alert on it cleared."""
    config = nats_config(fake_provider, ca_file, tmp_path, nats_server, "egress")
    egress = start_egress(config)
    assert wait_until(lambda: following(egress), timeout=10)
    token, claims = mint(ISSUER, "app")
    revoke(egress.config_path, claims.kid)
    assert wait_until(lambda: status_for(egress.port, token) == 401, timeout=3)
    nats_server.kill()
    assert wait_until(lambda: health(egress)["stream_connected"] is False, timeout=3)
    time.sleep(3)
    assert health(egress)["age_seconds"] >= 3
    egress.stop()

    restarted = start_egress(config)  # the broker is still down: the snapshot applies
    assert status_for(restarted.port, token) == 401
    assert health(restarted)["stream_connected"] is False
    assert health(restarted)["age_seconds"] >= 3


def _issuer_files(tmp_path):
    """An issuer key as `issuer-new` writes it, and the files an operator may pass by mistake."""
    issuer = tmp_path / "issuer.pem"
    assert run_egress_cli("keys", "issuer-new", "--out", str(issuer)).returncode == 0
    key = serialization.load_pem_private_key(issuer.read_bytes(), password=None)
    mistakes = {
        "public key": key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "encrypted": key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
        ),
        "not pem": b"not a key at all\n",
    }
    paths = {}
    for name, data in mistakes.items():
        paths[name] = tmp_path / f"{name.replace(' ', '-')}.pem"
        paths[name].write_bytes(data)
    return issuer, paths


def test_mint_refuses_a_wrong_issuer_file_in_one_line(tmp_path):
    """A public key, an encrypted key or garbage given as --issuer-key used to end in a traceback."""
    _, paths = _issuer_files(tmp_path)
    for name, path in paths.items():
        result = run_egress_cli("keys", "mint", "--issuer-key", str(path), "--sub", "app")
        assert result.returncode == 2, (name, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""
        assert result.stderr.strip().splitlines() == [
            f"egress: config error: {path} is not an unencrypted Ed25519 private key"
            " (PEM, as `egress keys issuer-new` writes)"
        ]


@pytest.mark.parametrize(
    "arguments",
    [
        ["--ttl", "0s"],  # expired the moment it is minted
        ["--ttl", "0d"],
        ["--ttl", ""],  # `--ttl "$TTL"` with TTL unset used to mint a key that never expires
        ["--ttl", "99999999999999999999d"],  # used to be a traceback (an integer past 64 bits)
        ["--sub", ""],  # used to be a traceback
        ["--sub", "  "],
    ],
)
def test_mint_refuses_a_lifetime_or_subject_no_key_should_have(tmp_path, arguments):
    issuer, _ = _issuer_files(tmp_path)
    options = {"--sub": "app", **dict(zip(arguments[::2], arguments[1::2], strict=True))}
    result = run_egress_cli("keys", "mint", "--issuer-key", str(issuer), *(x for kv in options.items() for x in kv))
    assert result.returncode == 2 and result.stdout == "", result
    assert "Traceback" not in result.stderr and result.stderr.startswith("egress: config error: ")
    assert len(result.stderr.strip().splitlines()) == 1


def test_mint_takes_the_longest_lifetime_it_allows(tmp_path):
    issuer, _ = _issuer_files(tmp_path)
    result = run_egress_cli("keys", "mint", "--issuer-key", str(issuer), "--sub", "app", "--ttl", "36500d")
    assert result.returncode == 0, result.stderr
    _, _, claims = decode_unverified(result.stdout.strip().encode())
    assert claims.exp - claims.iat == 36500 * 86400


def events_named(process, name: str) -> list[dict]:
    return [
        event
        for event in map(orjson.loads, process.stderr_path.read_bytes().splitlines())
        if event.get("event") == name
    ]


def test_a_broker_outage_is_logged_once_not_once_per_retry(nats_server, fake_provider, ca_file, tmp_path, start_egress):
    """Every reconnect attempt used to log `revocations_unavailable`: a broker down for an hour was
    720 lines per worker at the default 5 s max_reconnect_wait, the deny-set's story lost in them."""
    egress = start_egress(nats_config(fake_provider, ca_file, tmp_path, nats_server, "egress"))
    assert wait_until(lambda: following(egress), timeout=10)
    for outage in (1, 2):
        nats_server.kill()
        # max_reconnect_wait = 0.5 s: a dozen attempts or so in 4 s
        time.sleep(4)
        unavailable = events_named(egress, "revocations_unavailable")
        assert len(unavailable) == outage, unavailable
        assert unavailable[-1]["reason"] == "broker unreachable" and unavailable[-1]["max_retry_wait_s"] == 0.5
        nats_server.start()
        assert wait_until(lambda outage=outage: following(egress, times=outage + 1), timeout=10)
        back = events_named(egress, "revocations_following")[-1]
        assert back["failed_attempts"] >= 4, back  # counted, if not logged one by one
    token, claims = mint(ISSUER, "app")
    revoke(egress.config_path, claims.kid)
    assert wait_until(lambda: status_for(egress.port, token) == 401, timeout=3)

"""Rate limits against the real process: one key over its limit, its neighbours untouched."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.vkeys import mint, public_key_text
from tests.conftest import virtual_key_config
from tests.support import RawClient, request_bytes

ISSUER = Ed25519PrivateKey.generate()


@pytest.fixture
def limited(start_egress, fake_provider, ca_file, tmp_path):
    config = virtual_key_config(
        fake_provider,
        ca_file,
        tmp_path,
        public_key_text(ISSUER.public_key()),
        extra="""
[limits]
requests_per_minute = 3

[limits.tiers.gold]
requests_per_minute = 50
""",
    )
    return start_egress(config)


def statuses(egress, key: str, count: int, provider: str = "openai"):
    responses = []
    with RawClient(egress.port) as client:
        for _ in range(count):
            client.send(request_bytes("GET", f"/{provider}/v1/models", {"Authorization": f"Bearer {key}"}))
            responses.append(client.read_response())
    return responses


def test_a_key_over_its_limit_gets_429_while_another_is_untouched(limited):
    noisy, _ = mint(ISSUER, "noisy-app")
    quiet, _ = mint(ISSUER, "quiet-app")
    responses = statuses(limited, noisy, 5)
    assert [r.status for r in responses] == [200, 200, 200, 429, 429]
    refused = responses[3]
    assert refused.error_code == "rate_limited"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 120
    assert refused.headers["x-ratelimit-reset-requests"] == f"{retry_after}s"
    assert [r.status for r in statuses(limited, quiet, 3)] == [200, 200, 200]
    # Limits are per provider too: the same key still reaches another provider.
    assert statuses(limited, noisy, 1, provider="anthropic")[0].status == 200


def test_tiers_and_byo_keys(limited):
    gold, _ = mint(ISSUER, "gold-app", tier="gold")
    assert all(r.status == 200 for r in statuses(limited, gold, 8))
    first_byo = [r.status for r in statuses(limited, "sk-byo-first-caller", 4)]
    second_byo = [r.status for r in statuses(limited, "sk-byo-second-caller", 3)]
    assert first_byo == [200, 200, 200, 429] and second_byo == [200, 200, 200]
    assert "sk-byo-first-caller" not in limited.logs()


def test_anthropic_dialect_429(limited):
    key, _ = mint(ISSUER, "claude-app")
    with RawClient(limited.port) as client:
        for _ in range(4):
            client.send(request_bytes("POST", "/anthropic/v1/messages", {"x-api-key": key}, b"{}"))
            response = client.read_response("POST")
    assert response.status == 429
    assert response.json()["error"]["type"] == "rate_limit_error" and response.json()["type"] == "error"

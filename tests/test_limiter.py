"""Rate limits against the real process (one key over its limit, its neighbours untouched), and
the limiter in process where a case needs token counts the fake provider can't make cheaply."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.config import parse_config
from egress.errors import EgressError
from egress.limiter import RateLimiter
from egress.vkeys import Claims, mint, public_key_text
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


def test_a_tier_keeps_the_default_limits_it_does_not_set():
    """README's example: `[limits.tiers.batch] requests_per_minute = 60` under a default token
    limit. The batch key was limited in requests only, and spent 50 x the default's tokens."""
    tiers = {"batch": {"requests_per_minute": 2}}
    limits = parse_config({"limits": {"requests_per_minute": 600, "tokens_per_minute": 1000, "tiers": tiers}}).limits
    limiter = RateLimiter(limits)

    def exchange(kid: str) -> SimpleNamespace:
        claims = Claims(kid, "0" * 16, "app", 0, tier="batch")
        return SimpleNamespace(claims=claims, facts=None, route=None, identity=None, limit_slots=None)

    spender = exchange("00112233445566aa")
    limiter.admit(spender, "openai", 100.0)
    limiter.record_tokens(spender, 50_000, 100.5)
    with pytest.raises(EgressError) as refused:
        limiter.admit(spender, "openai", 101.0)
    assert refused.value.code == "rate_limited"
    assert dict(refused.value.headers)[b"x-ratelimit-limit-tokens"] == b"1000"  # the default's
    # And the tier's own limit is the one that counts requests.
    caller = exchange("00112233445566bb")
    limiter.admit(caller, "openai", 100.0)
    limiter.admit(caller, "openai", 100.1)
    with pytest.raises(EgressError) as refused:
        limiter.admit(caller, "openai", 100.2)
    assert dict(refused.value.headers)[b"x-ratelimit-limit-requests"] == b"2"

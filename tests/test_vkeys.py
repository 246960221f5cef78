"""The virtual-key codec: what verifies, and that nothing else does."""

from __future__ import annotations

import base64

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from egress.auth import check_claims
from egress.errors import EgressError
from egress.vkeys import PREFIX, Verifier, decode_unverified, issuer_id, mint, parse_public_key, public_key_text

ISSUER = Ed25519PrivateKey.generate()
OTHER_ISSUER = Ed25519PrivateKey.generate()
VERIFIER = Verifier([ISSUER.public_key()])
TOKEN, CLAIMS = mint(ISSUER, "billing-app", providers=["openai", "anthropic"], ttl_seconds=3600, tier="gold", now=1000)


def test_round_trip():
    claims = VERIFIER.verify(TOKEN.encode())
    assert claims == CLAIMS
    assert claims.sub == "billing-app" and claims.exp == 4600 and claims.tier == "gold"
    assert claims.providers == frozenset({"openai", "anthropic"})
    assert claims.iss == issuer_id(ISSUER.public_key()) and len(claims.kid) == 16
    assert TOKEN.startswith("bai_")


def test_minimal_key_and_unique_kids():
    first, a = mint(ISSUER, "app")
    second, b = mint(ISSUER, "app")
    assert a.kid != b.kid and first != second
    claims = VERIFIER.verify(first.encode())
    assert claims.exp is None and claims.providers is None and claims.tier is None


def test_several_issuers_trusted_at_once():
    token, _ = mint(OTHER_ISSUER, "app")
    with pytest.raises(EgressError, match="untrusted issuer"):
        VERIFIER.verify(token.encode())
    rotated = Verifier([ISSUER.public_key(), OTHER_ISSUER.public_key()])
    assert rotated.verify(token.encode()).sub == "app"
    assert rotated.verify(TOKEN.encode()).sub == "billing-app"


def test_public_key_text_round_trip():
    text = public_key_text(ISSUER.public_key())
    assert issuer_id(parse_public_key(text)) == issuer_id(ISSUER.public_key())
    with pytest.raises(ValueError):
        parse_public_key(text[:-2])


def test_issuer_id_inside_a_payload_cannot_borrow_another_issuers_trust():
    payload, _, _ = decode_unverified(TOKEN.encode())
    forged = OTHER_ISSUER.sign(b"bai1." + payload)  # same claims, claiming ISSUER's iss
    token = PREFIX + TOKEN.encode()[4:].split(b".")[0] + b"." + base64.urlsafe_b64encode(forged).rstrip(b"=")
    with pytest.raises(EgressError, match="signature"):
        VERIFIER.verify(token)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t + b"=",
        lambda t: t.replace(b".", b""),
        lambda t: t + b".x",
        lambda t: t[: t.index(b".") + 5],
        lambda t: b"bai_.",
        lambda t: b"bai_" + base64.urlsafe_b64encode(b'{"v":1}').rstrip(b"=") + t[t.index(b".") :],
    ],
)
def test_malformed_keys(mangle):
    with pytest.raises(EgressError) as raised:
        VERIFIER.verify(mangle(TOKEN.encode()))
    assert raised.value.code == "invalid_key"


def test_non_canonical_payload_is_refused_even_if_signed():
    document = {"v": 1, "kid": "0123456789abcdef", "iss": issuer_id(ISSUER.public_key()), "sub": "a", "iat": 1}
    payload = orjson.dumps(document)  # not sorted: kid before iat
    assert payload != orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    signature = ISSUER.sign(b"bai1." + payload)
    token = (
        b"bai_"
        + base64.urlsafe_b64encode(payload).rstrip(b"=")
        + b"."
        + base64.urlsafe_b64encode(signature).rstrip(b"=")
    )
    with pytest.raises(EgressError):
        VERIFIER.verify(token)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_byte_flipped_anywhere_fails(data):
    token = TOKEN.encode()
    index = data.draw(st.integers(0, len(token) - 1))
    flip = data.draw(st.integers(1, 255))
    mangled = token[:index] + bytes([token[index] ^ flip]) + token[index + 1 :]
    with pytest.raises(EgressError) as raised:
        VERIFIER.verify(mangled)
    assert raised.value.code == "invalid_key"


# No allowlist, or one naming at least one provider: mint refuses an empty one.
ALLOWLISTS = st.none() | st.lists(st.sampled_from(["openai", "groq", "xai"]), min_size=1, max_size=3)


@settings(max_examples=50, deadline=None)
@given(st.text(min_size=1, max_size=40), ALLOWLISTS)
def test_any_minted_key_verifies_and_an_untrusted_issuer_never_does(sub, providers):
    token, claims = mint(ISSUER, sub, providers=providers)
    assert VERIFIER.verify(token.encode()) == claims
    untrusted, _ = mint(OTHER_ISSUER, sub, providers=providers)
    with pytest.raises(EgressError):
        VERIFIER.verify(untrusted.encode())


@settings(max_examples=200, deadline=None)
@given(issued=st.integers(0, 2**40), ttl=st.integers(1, 10**8), elapsed=st.integers(0, 2 * 10**8))
def test_a_key_is_refused_exactly_from_its_expiry_on(issued, ttl, elapsed):
    token, _ = mint(ISSUER, "app", ttl_seconds=ttl, now=issued)
    claims = VERIFIER.verify(token.encode())
    now = issued + elapsed
    if elapsed >= ttl:
        with pytest.raises(EgressError) as raised:
            check_claims(claims, now, set(), "openai")
        assert raised.value.code == "key_expired"
    else:
        check_claims(claims, now, set(), "openai")


def test_revocation_and_allowlist_checks():
    claims = VERIFIER.verify(TOKEN.encode())
    check_claims(claims, 2000, {"0000000000000000"}, "openai")
    for revoked, provider, code in (({claims.kid}, "openai", "key_revoked"), (set(), "groq", "provider_not_permitted")):
        with pytest.raises(EgressError) as raised:
            check_claims(claims, 2000, revoked, provider)
        assert raised.value.code == code


@pytest.mark.parametrize("allowlist", [{"providers": []}, {"models": []}, {"providers": ["openai"], "models": ()}])
def test_an_empty_allowlist_is_refused_not_minted_as_none(allowlist):
    # The key carries no `prv`/`mdl` for an empty list, and a key with none may use everything.
    with pytest.raises(ValueError, match="must name at least one"):
        mint(ISSUER, "app", **allowlist)


@pytest.mark.parametrize("ttl", [0, -1])
def test_a_key_expired_at_birth_is_refused_not_minted(ttl):
    with pytest.raises(ValueError):
        mint(ISSUER, "app", ttl_seconds=ttl)

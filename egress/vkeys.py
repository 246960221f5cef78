"""Virtual keys (`bai_…`): Ed25519-signed, self-contained, verified without a database (sans-IO).

Format, version 1:

    bai_ <base64url(payload)> . <base64url(signature)>

    payload   = canonical JSON (sorted keys, no spaces) of
                {"v": 1, "kid": 16 hex, "iss": 16 hex, "sub": str, "iat": int,
                 "exp": int (optional), "prv": [provider, ...] (optional), "tier": str (optional),
                 "mdl": [model glob, ...] (optional: the models the key may use, routes.model_permitted)}
    signature = Ed25519(issuer private key, b"bai1." + payload)

`iss` is the first 8 bytes of SHA-256 over the issuer's raw public key, so several issuers can be
trusted at once and rotated. The `bai1.` prefix separates these signatures from anything else the
issuer key might sign. Base64url is unpadded and must be canonical: a token whose text re-encodes
differently is refused, so no two texts carry one signature.

Contract: `Verifier.verify(token)` returns `Claims` or raises `EgressError("invalid_key")`;
expiry, revocation and provider checks are the caller's, at request time, so a cached `Claims`
stays correct. `mint()` is used by the CLI only; it refuses (ValueError) an empty allowlist, which
a key could only carry as no allowlist at all, and a lifetime under 1 s, which would be expired at birth.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import time
from dataclasses import dataclass

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from egress.errors import EgressError

PREFIX = b"bai_"
SIGNING_DOMAIN = b"bai1."
_HEX = frozenset(b"0123456789abcdef")


@dataclass(frozen=True, slots=True)
class Claims:
    kid: str
    iss: str
    sub: str
    iat: int
    exp: int | None = None
    providers: frozenset[str] | None = None
    tier: str | None = None
    models: tuple[str, ...] | None = None


def issuer_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_text(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _b64encode(raw).decode()


def parse_public_key(text: str) -> Ed25519PublicKey:
    raw = _b64decode(text.strip().encode())
    if raw is None or len(raw) != 32:
        raise ValueError("an issuer public key is 32 bytes, base64url without padding")
    return Ed25519PublicKey.from_public_bytes(raw)


def mint(
    private_key: Ed25519PrivateKey,
    sub: str,
    providers: list[str] | None = None,
    ttl_seconds: int | None = None,
    tier: str | None = None,
    now: int | None = None,
    models: list[str] | None = None,
) -> tuple[str, Claims]:
    if (providers is not None and not providers) or (models is not None and not models):
        # An empty allowlist would be left out of the key, which would then allow everything.
        raise ValueError("an allowlist of providers or models must name at least one; pass None for no allowlist")
    if ttl_seconds is not None and ttl_seconds <= 0:
        raise ValueError("a key's lifetime is at least 1 s; pass None for no expiry")  # else expired at birth
    issued = int(time.time()) if now is None else now
    document: dict = {"v": 1, "kid": secrets.token_hex(8), "iss": issuer_id(private_key.public_key()), "sub": sub}
    document["iat"] = issued
    if ttl_seconds is not None:
        document["exp"] = issued + ttl_seconds
    if providers:
        document["prv"] = sorted(set(providers))
    if tier:
        document["tier"] = tier
    if models:
        document["mdl"] = sorted(set(models))
    payload = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    signature = private_key.sign(SIGNING_DOMAIN + payload)
    token = PREFIX + _b64encode(payload) + b"." + _b64encode(signature)
    return token.decode(), _claims(document)


def decode_unverified(token: bytes) -> tuple[bytes, bytes, Claims]:
    """Split and parse a token without checking its signature; raises EgressError(invalid_key)."""
    if not token.startswith(PREFIX):
        raise _invalid("not a virtual key")
    encoded_payload, dot, encoded_signature = token[len(PREFIX) :].partition(b".")
    payload = _b64decode(encoded_payload)
    signature = _b64decode(encoded_signature)
    if not dot or payload is None or signature is None or len(signature) != 64:
        raise _invalid("malformed virtual key")
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise _invalid("malformed virtual key") from None
    if not isinstance(document, dict) or orjson.dumps(document, option=orjson.OPT_SORT_KEYS) != payload:
        raise _invalid("malformed virtual key")  # only the canonical encoding is ever signed
    try:
        return payload, signature, _claims(document)
    except (KeyError, TypeError, ValueError):
        raise _invalid("malformed virtual key") from None


class Verifier:
    __slots__ = ("_trusted",)

    def __init__(self, trusted: list[Ed25519PublicKey]) -> None:
        self._trusted = {issuer_id(key): key for key in trusted}

    @property
    def issuers(self) -> list[str]:
        return sorted(self._trusted)

    def verify(self, token: bytes) -> Claims:
        payload, signature, claims = decode_unverified(token)
        key = self._trusted.get(claims.iss)
        if key is None:
            raise _invalid("virtual key from an untrusted issuer")
        try:
            key.verify(signature, SIGNING_DOMAIN + payload)
        except InvalidSignature:
            raise _invalid("virtual key signature does not verify") from None
        return claims


def _claims(document: dict) -> Claims:
    if document.get("v") != 1:
        raise ValueError("unknown version")
    known = {"v", "kid", "iss", "sub", "iat", "exp", "prv", "tier", "mdl"}
    if not known.issuperset(document):
        raise ValueError("unknown field")
    kid, iss, sub, iat = document["kid"], document["iss"], document["sub"], document["iat"]
    exp, prv, tier, mdl = document.get("exp"), document.get("prv"), document.get("tier"), document.get("mdl")
    if not (_is_hex16(kid) and _is_hex16(iss) and isinstance(sub, str) and sub and _is_int(iat)):
        raise ValueError("bad claims")
    if exp is not None and not _is_int(exp):
        raise ValueError("bad exp")
    if prv is not None and not (isinstance(prv, list) and prv and all(isinstance(p, str) for p in prv)):
        raise ValueError("bad prv")
    if tier is not None and not isinstance(tier, str):
        raise ValueError("bad tier")
    if mdl is not None and not (isinstance(mdl, list) and mdl and all(isinstance(m, str) and m for m in mdl)):
        raise ValueError("bad mdl")
    models = tuple(mdl) if mdl is not None else None
    return Claims(kid, iss, sub, iat, exp, frozenset(prv) if prv is not None else None, tier, models)


def _is_hex16(value: object) -> bool:
    return isinstance(value, str) and len(value) == 16 and _HEX.issuperset(value.encode())


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _b64encode(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _b64decode(text: bytes) -> bytes | None:
    try:
        data = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if _b64encode(data) == text else None  # canonical text only


def _invalid(message: str) -> EgressError:
    return EgressError("invalid_key", message)

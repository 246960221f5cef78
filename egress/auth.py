"""The authenticate phase: virtual keys are verified and swapped for a pool key; BYO keys pass.

Contract: `Authenticator.authenticate(exchange, provider)` runs once the request head is parsed and
routed. It returns normally (the exchange's forward headers now carry the right credential) or
raises EgressError: 401 missing_key / invalid_key / key_expired / key_revoked, 403
provider_not_permitted / no_pool_key.

Order for a `bai_` token (in `Authorization: Bearer` or `x-api-key`, where the Anthropic SDK puts
it): verify the signature (cached) -> expiry -> deny-set -> provider allowlist -> strip the caller's
credential headers -> add a pool key in the provider's own scheme. Expiry and the deny-set are
checked on every request, cached or not, so a revocation takes effect on the very next request.
Any other token is the caller's own provider key and passes through untouched.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from typing import TYPE_CHECKING

from egress.errors import EgressError
from egress.secrets import Secret, load_secrets
from egress.vkeys import PREFIX, Claims, Verifier, parse_public_key

if TYPE_CHECKING:
    from egress.config import Config
    from egress.denyset import DenySet
    from egress.providers import Provider
    from egress.proxy import Exchange

_CREDENTIAL_HEADERS = (b"authorization", b"x-api-key")


class PoolRotation:
    """A provider's pool keys as ready header values, handed out round-robin."""

    __slots__ = ("_headers", "_next")

    def __init__(self, provider: Provider, secrets: list[Secret]) -> None:
        if provider.auth == "x-api-key":
            name, prefix = b"x-api-key", b""
        else:
            name, prefix = b"authorization", b"Bearer "
        self._headers = [(name, Secret(prefix + secret.reveal(), secret.source)) for secret in secrets]
        self._next = 0

    def take(self) -> tuple[bytes, bytearray]:
        index = self._next
        self._next = (index + 1) % len(self._headers)
        name, secret = self._headers[index]
        return name, secret.reveal()

    def wipe(self) -> None:
        for _, secret in self._headers:
            secret.wipe()


def load_pools(config: Config) -> dict[str, PoolRotation]:
    """Read every provider's pool keys; raises SecretSourceError naming a source that fails."""
    pools = {}
    for provider in config.providers.values():
        if provider.pool_keys:
            loaded = [secret for source in provider.pool_keys for secret in load_secrets(source)]
            pools[provider.name] = PoolRotation(provider, loaded)
            for secret in loaded:
                secret.wipe()  # the rotation holds its own copies, as header values
    return pools


def check_claims(claims: Claims, now: float, revoked: set[str], provider: str) -> None:
    """The per-request checks of a verified key, never cached: expiry, revocation, allowlist."""
    if claims.exp is not None and claims.exp <= now:
        raise EgressError("key_expired", f"virtual key {claims.kid} has expired")
    if claims.kid in revoked:
        raise EgressError("key_revoked", f"virtual key {claims.kid} has been revoked")
    if claims.providers is not None and provider not in claims.providers:
        raise EgressError("provider_not_permitted", f"virtual key {claims.kid} may not use {provider}")


class Authenticator:
    __slots__ = ("_cache", "_cache_size", "_verifier", "denyset", "pools")

    def __init__(self, config: Config, denyset: DenySet, pools: dict[str, PoolRotation]) -> None:
        self._verifier = Verifier([parse_public_key(text) for text in config.keys.trusted_issuers])
        self._cache: OrderedDict[bytes, Claims] = OrderedDict()
        self._cache_size = config.keys.verify_cache_size
        self.denyset = denyset
        self.pools = pools

    def authenticate(self, exchange: Exchange, provider: Provider) -> None:
        facts = exchange.facts
        bearer = facts.authorization
        if bearer is not None and bearer[:7].lower() == b"bearer ":
            bearer = bearer[7:].strip()
        api_key = facts.api_key
        if api_key is not None:
            api_key = api_key.strip()
        if bearer is not None and bearer.startswith(PREFIX):
            token = bearer
        elif api_key is not None and api_key.startswith(PREFIX):
            token = api_key
        elif bearer or api_key or provider.allow_anonymous:
            return  # BYO: the caller's own provider key, untouched
        else:
            raise EgressError("missing_key", "no API key: send a virtual key or your provider key")
        claims = self.claims_for(token)
        exchange.claims = claims
        check_claims(claims, time.time(), self.denyset.kids, provider.name)
        pool = self.pools.get(provider.name)
        if pool is None:
            raise EgressError("no_pool_key", f"no pool key is configured for {provider.name}")
        headers = [header for header in facts.forward_headers if header[0] not in _CREDENTIAL_HEADERS]
        headers.append(pool.take())
        facts.forward_headers = headers

    def claims_for(self, token: bytes) -> Claims:
        """Verified claims, from the cache when this token was verified before."""
        digest = hashlib.blake2b(token, digest_size=16).digest()
        cache = self._cache
        claims = cache.get(digest)
        if claims is not None:
            cache.move_to_end(digest)
            return claims
        claims = self._verifier.verify(token)
        cache[digest] = claims
        if len(cache) > self._cache_size:
            cache.popitem(last=False)
        return claims

    def wipe(self) -> None:
        for pool in self.pools.values():
            pool.wipe()

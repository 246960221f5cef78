"""The authenticate phase: virtual keys are verified and swapped for a pool key; BYO keys pass.

Contract: `Authenticator.authenticate(exchange, provider)` runs once the request head is parsed and
routed. It returns normally (the exchange's forward headers now carry the right credential) or
raises EgressError: 401 missing_key / invalid_key / key_expired / key_not_yet_valid / key_revoked,
403 provider_not_permitted / no_pool_key, 429 too_many_invalid_keys.

Order for a `bai_` token (in `Authorization: Bearer` or `x-api-key`, where the Anthropic SDK puts
it): verify the signature (cached) -> expiry and not-before -> deny-set -> provider allowlist ->
strip every credential the caller sent (the headers of http1.CREDENTIAL_HEADERS, with the billing
scope headers of POOL_KEY_DROPPED_HEADERS, and a `key=` query
parameter) -> add a pool key in the provider's own scheme. Expiry and the deny-set are checked on
every request, cached or not, so a revocation takes effect on the very next request. Any other
token is the caller's own provider key and passes through untouched, with everything it came with.

The cost of a forged key is bounded: structure, canonical encoding and a trusted issuer id are
checked before the signature (microseconds); a token that failed is remembered, so repeating it
costs a dict look-up; and each client address (an IPv6 one by its /64, `client_of`) may fail at
most `invalid_key_burst` verifications, refilled at `invalid_key_rate` per second, after which its
unknown keys are refused unverified.
That allowance is each worker process's own (the buckets are a plain dict): the kernel spreads an
address's connections over the workers (SO_REUSEPORT), so a host of N workers lets one address
fail up to N x burst at once, refilled at N x rate. Still bounded, and a verification is only
~0.1-0.3 ms; sharing the buckets would add a shared table to every worker for that factor.

Pool-key lifetime: each exchange that took a pool key holds its `PoolRotation` (`exchange.lease`).
A rotation retired by a reload is wiped when the last exchange holding it is gone (a finalizer),
never on a timer: a request that authenticated before a reload sends the key it was given.
"""

from __future__ import annotations

import hashlib
import math
import socket
import time
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING

from egress.accounts import Account, AccountTable, account_id
from egress.errors import EgressError
from egress.http1 import OTHER_CREDENTIAL_HEADERS, POOL_KEY_DROPPED_HEADERS, bearer_token
from egress.providers import KeyFormats, query_credentials, without_query_credential
from egress.secrets import Secret, load_secrets
from egress.vkeys import PREFIX, Claims, Verifier, parse_public_key

if TYPE_CHECKING:
    from collections.abc import Iterable

    from egress.config import Config
    from egress.denyset import DenySet
    from egress.providers import Provider
    from egress.proxy import Exchange

# Longer than any key `mint` makes (a payload of a few hundred bytes): refused before decoding.
_MAX_TOKEN = 4096
_FAILED_CACHE_SIZE = 4096
_ADDRESS_BUCKETS = 65_536
# Every PoolRotation alive, so the exit path can wipe retired ones still held by an exchange.
_ALL_ROTATIONS: weakref.WeakSet[PoolRotation] = weakref.WeakSet()


def _wipe_headers(headers: list[tuple[bytes, Secret]]) -> None:
    for _, secret in headers:
        secret.wipe()


class PoolRotation:
    """A provider's pool keys: its accounts (accounts.py), each with its ready credential header."""

    __slots__ = ("__weakref__", "_headers", "accounts", "gate")

    def __init__(self, provider: Provider, secrets: list[tuple]) -> None:
        """`secrets`: each key with the operator's name for it ("" for none: the id is a key hash),
        and optionally its own concurrency cap (else the provider's account_max_concurrent)."""
        if provider.auth == "x-api-key":
            name, prefix = b"x-api-key", b""
        else:
            name, prefix = b"authorization", b"Bearer "
        self._headers = [(name, Secret(prefix + entry[0].reveal(), entry[0].source)) for entry in secrets]
        self.accounts = [
            Account(
                provider.name,
                label or account_id(secret.reveal()),
                header,
                label or None,
                (rest[0] if rest else 0) or provider.account_max_concurrent,
            )
            for (secret, label, *rest), header in zip(secrets, self._headers, strict=True)
        ]
        # The provider's slot and cap (Authenticator): (0, 0) when no cap can make a request wait.
        self.gate = (0, 0)
        # Runs when the last reference goes: the live Authenticator's, or the last exchange's lease.
        weakref.finalize(self, _wipe_headers, self._headers)
        _ALL_ROTATIONS.add(self)

    def wipe(self) -> None:
        _wipe_headers(self._headers)


def wipe_all_pool_keys() -> None:
    """At exit: every rotation still in memory, the live one and any a lingering exchange holds."""
    for rotation in list(_ALL_ROTATIONS):
        rotation.wipe()


def load_pools(config: Config) -> dict[str, PoolRotation]:
    """Read every provider's pool keys; raises SecretSourceError naming a source that fails."""
    pools = {}
    for provider in config.providers.values():
        if provider.pool_keys:
            loaded = []
            for source, name, cap in zip(
                provider.pool_keys, provider.pool_key_names, provider.pool_key_caps, strict=True
            ):
                secrets = load_secrets(source)
                # A named file of several keys: one account each, "name-1", "name-2", ...
                names = (
                    [f"{name}-{index}" for index in range(1, len(secrets) + 1)]
                    if name and len(secrets) > 1
                    else [name] * len(secrets)
                )
                loaded += [(secret, label, cap) for secret, label in zip(secrets, names, strict=True)]
            pools[provider.name] = PoolRotation(provider, loaded)
            for secret, _, _ in loaded:
                secret.wipe()  # the rotation holds its own copies, as header values
    return pools


def no_account_error(table: AccountTable, accounts: list[Account], now: float) -> EgressError:
    """Every account of the provider is cooling, spent or disabled: when the first comes back."""
    soonest = table.soonest(accounts, now)
    if soonest is None:
        return EgressError("all_accounts_disabled", "every pool key of this provider was refused by the provider")
    wait = max(1, math.ceil(soonest))
    return EgressError(
        "all_accounts_cooling",
        f"every pool key of this provider is cooling down; retry in {wait} s",
        ((b"retry-after", b"%d" % wait),),
    )


def other_credentials(exchange: Exchange) -> list[bytes]:
    """The caller's credentials besides Authorization and x-api-key: the values of the other
    credential headers, and of a `key=` query parameter (Google's). Each would go upstream as sent."""
    facts = exchange.facts
    found = (
        [value.strip() for name, value in facts.forward_headers if name in OTHER_CREDENTIAL_HEADERS]
        if facts.other_credential  # noted by the head's one pass (http1.inspect_request): most send none
        else []
    )
    target = exchange.route.upstream_target
    if b"?" in target:  # rare: most SDKs send no query
        found += query_credentials(target)
    return found


_BYO_NOT_ALLOWED = "only virtual keys (bai_…) are accepted here"


def _any_byo(credentials: list[bytes]) -> bool:
    return any(value and not value.startswith(PREFIX) for value in credentials)


def check_claims(claims: Claims, now: float, revoked: set[str], provider: str | None, clock_skew: float = 60.0) -> None:
    """The per-request checks of a verified key, never cached: validity period, revocation, allowlist."""
    if claims.exp is not None and claims.exp <= now:
        raise EgressError("key_expired", f"virtual key {claims.kid} has expired")
    if claims.iat > now + clock_skew:
        # Issued in the future: a wrong clock at the issuer, or a key minted to be held back.
        raise EgressError("key_not_yet_valid", f"virtual key {claims.kid} is not valid yet")
    if claims.kid in revoked:
        raise EgressError("key_revoked", f"virtual key {claims.kid} has been revoked")
    if provider is not None and claims.providers is not None and provider not in claims.providers:
        raise EgressError("provider_not_permitted", f"virtual key {claims.kid} may not use {provider}")


def client_of(peer: str | None) -> str:
    """Whose invalid-key allowance a connection from `peer` ("host:port") spends: an IPv4 address,
    or an IPv6 address's /64. An IPv6 host is routinely given a whole /64 and may take any address
    in it as its source (RFC 8981 temporary addresses), so per address its allowance had no end:
    each new source address came with a fresh burst. A /64 is what one host or one LAN holds
    (RFC 6177); the same grouping IPv6 rate limits commonly use."""
    address = peer.rpartition(":")[0] if peer else ""
    if ":" in address and "." not in address:  # IPv6, not an IPv4-mapped one (::ffff:1.2.3.4)
        try:
            packed = socket.inet_pton(socket.AF_INET6, address.partition("%")[0])  # without a zone (%eth0)
        except OSError:
            return address
        return packed[:8].hex() + "/64"
    return address


class Authenticator:
    __slots__ = (
        "_allow_byo",
        "_buckets",
        "_burst",
        "_cache",
        "_cache_size",
        "_clock_skew",
        "_failed",
        "_key_formats",
        "_rate",
        "_verifier",
        "accounts",
        "denyset",
        "gates",
        "pools",
    )

    def __init__(
        self, config: Config, denyset: DenySet, pools: dict[str, PoolRotation], accounts: AccountTable | None = None
    ) -> None:
        keys = config.keys
        self._verifier = Verifier([parse_public_key(text) for text in keys.trusted_issuers])
        self._cache: OrderedDict[bytes, Claims] = OrderedDict()
        self._cache_size = keys.verify_cache_size
        self._clock_skew = keys.clock_skew
        self._failed: dict[bytes, EgressError] = {}  # digest -> why it failed, for repeats
        self._buckets: dict[str, list[float]] = {}  # client address -> [allowance, updated at]
        self._rate = keys.invalid_key_rate
        self._burst = float(keys.invalid_key_burst)
        self._allow_byo = keys.allow_byo
        self._key_formats = KeyFormats(config.providers.values())
        self.denyset = denyset
        self.pools = pools
        self.accounts = accounts if accounts is not None else AccountTable()
        table = self.accounts
        table.ratio = config.accounts.retry_budget
        table.floor = float(config.accounts.retry_floor)
        table.window = config.accounts.retry_window
        pooled = [account for pool in pools.values() for account in pool.accounts]
        table.bind(pooled)
        # Every new cooldown is bounded as it is set (retries: hints.cooldown); one set under a
        # longer bound, or before there was one, ends by the bound a reload brings, from now.
        table.limit_cooldowns(pooled, time.monotonic(), config.accounts.max_cooldown)
        # Provider name -> (its gate's slot, cap), for providers with a max_concurrent.
        self.gates = {
            provider.name: (table.bind_gate(provider.name), provider.max_concurrent)
            for provider in config.providers.values()
            if provider.max_concurrent
        }
        # A pool's requests wait in its provider's line when a cap can make them (cap 0: the
        # accounts' caps alone, the slot is the line and counts nothing).
        for name, pool in pools.items():
            gate = self.gates.get(name)
            if gate is None and any(account.max_concurrent for account in pool.accounts):
                gate = (table.bind_gate(name), 0)
            if gate is not None:
                pool.gate = gate

    def authenticate(self, exchange: Exchange, provider: Provider | None) -> Claims | None:
        """The caller's credential, for `provider`: a virtual key's claims (and, with a provider,
        its pool key swapped in), or None for a BYO key. `provider=None` (`/v1/models`) checks the
        key for no provider and swaps nothing; a key is required there."""
        facts = exchange.facts
        bearer = facts.authorization
        if bearer is not None:
            bearer = bearer_token(bearer)
        api_key = facts.api_key
        if api_key is not None:
            api_key = api_key.strip()
        if bearer is not None and bearer.startswith(PREFIX):
            token = bearer
        elif api_key is not None and api_key.startswith(PREFIX):
            token = api_key
        elif bearer or api_key:
            if not self._allow_byo:
                raise EgressError("byo_not_allowed", _BYO_NOT_ALLOWED)
            if provider is not None and provider.key_prefixes:
                self._check_byo(provider, (bearer, api_key, *other_credentials(exchange)))
            return None  # BYO: the caller's own provider key, untouched
        else:
            # A key in the header its provider reads (Azure OpenAI's api-key, Gemini's x-goog-api-key)
            # or in `?key=` is the caller's own, as one in Authorization, forwarded as sent; none at all
            # passes only to a provider that takes requests with no key (a local model server).
            others = other_credentials(exchange)
            byo = _any_byo(others)
            if not byo and (provider is None or not provider.allow_anonymous):
                raise EgressError("missing_key", "no API key: send a virtual key or your provider key")
            if byo and not self._allow_byo:
                raise EgressError("byo_not_allowed", _BYO_NOT_ALLOWED)
            if provider is not None and provider.key_prefixes:
                self._check_byo(provider, others)
            return None
        claims = self.claims_for(token, exchange.client.peer)
        exchange.claims = claims
        if provider is None:
            check_claims(claims, time.time(), self.denyset.kids, None, self._clock_skew)
            return claims
        check_claims(claims, time.time(), self.denyset.kids, provider.name, self._clock_skew)
        pool = self.pools.get(provider.name)
        if pool is None:
            raise EgressError("no_pool_key", f"no pool key is configured for {provider.name}")
        # Every credential the caller sent goes, in any header or as `?key=`; which account's key
        # replaces them is chosen when the request goes upstream (admission.py), where a busy
        # provider can be waited for.
        facts.forward_headers = [
            header for header in facts.forward_headers if header[0] not in POOL_KEY_DROPPED_HEADERS
        ]
        if b"?" in exchange.route.upstream_target:  # rare: most SDKs send no query
            exchange.route = without_query_credential(exchange.route)
        exchange.lease = pool  # keeps the key's bytes alive (unwiped) as long as this exchange
        return claims

    def _check_byo(self, provider: Provider, keys: Iterable[bytes | None]) -> None:
        """Refuse a caller's own key that is another provider's (providers.KeyFormats): routed by a
        model or a path to `provider`, it would hand that provider a secret it has no business
        seeing (and fail there). `keys`: every credential the request carries, each of which would
        be sent. The message names where the request was routed, never the key."""
        formats = self._key_formats
        for key in keys:
            if not key:
                continue
            owners = formats.foreign_owners(key, provider)
            if owners:
                raise EgressError(
                    "byo_key_wrong_provider",
                    f"this request is routed to {provider.name}, and the API key sent with it is a key of "
                    f"{' or '.join(owners)}: it was not sent. Use a {provider.name} key, a virtual key, "
                    "or a model that routes to the key's provider",
                )

    def claims_for(self, token: bytes, peer: str | None = None) -> Claims:
        """Verified claims, from the cache when this token was verified before."""
        digest = hashlib.blake2b(token, digest_size=16).digest()
        cache = self._cache
        claims = cache.get(digest)
        if claims is not None:
            cache.move_to_end(digest)
            return claims
        failed = self._failed.get(digest)
        if failed is not None:
            raise failed.with_traceback(None)  # raised again and again: its traceback must not grow
        if len(token) > _MAX_TOKEN:
            raise EgressError("invalid_key", "malformed virtual key")
        bucket = self._bucket(client_of(peer))
        if bucket[0] < 1.0:
            wait = max(1, math.ceil((1.0 - bucket[0]) / self._rate))
            raise EgressError(
                "too_many_invalid_keys",
                "too many invalid virtual keys from this address; retry later",
                ((b"retry-after", b"%d" % wait),),
            )
        try:
            claims = self._verifier.verify(token)
        except EgressError as error:
            bucket[0] -= 1.0
            failed = self._failed
            if len(failed) >= _FAILED_CACHE_SIZE:
                failed.clear()  # rebuilt by the next failures; a bounded dict, not an LRU
            failed[digest] = error
            raise
        cache[digest] = claims
        if len(cache) > self._cache_size:
            cache.popitem(last=False)
        return claims

    def _bucket(self, address: str) -> list[float]:
        """The address's failure allowance, refilled for the time since it was last looked at."""
        now = time.monotonic()
        buckets = self._buckets
        bucket = buckets.get(address)
        if bucket is None:
            if len(buckets) >= _ADDRESS_BUCKETS:
                buckets.clear()  # at worst, an address gets a fresh burst
            bucket = buckets[address] = [self._burst, now]
        else:
            bucket[0] = min(self._burst, bucket[0] + (now - bucket[1]) * self._rate)
            bucket[1] = now
        return bucket

    def wipe(self) -> None:
        for pool in self.pools.values():
            pool.wipe()

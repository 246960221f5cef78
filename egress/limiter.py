"""The limit phase: requests and tokens per minute, per caller identity and provider.

Contract: `RateLimiter.admit(exchange, provider, now)` runs after authentication. It returns
normally and counts the request, or raises EgressError("rate_limited") carrying Retry-After and
x-ratelimit-{limit,remaining,reset}-requests (or -tokens) headers. A refused request is not
counted, so a client that backs off recovers. `record_tokens(exchange, tokens, now)` feeds the
token window from the usage meter after a response.

Identity: a virtual key's `kid`; for a BYO key, a BLAKE2b hash keyed with `byo_hash_key`, never
the token. A limit applies per identity and provider. Limits come from the key's tier, else the
defaults; 0 means unlimited. Counting uses count-min sketches (sketch.py) in fixed memory: they
can only over-count, so a key may be limited a little early, never late.
"""

from __future__ import annotations

import hashlib
import math
import os
from typing import TYPE_CHECKING

from egress.errors import EgressError
from egress.http1 import bearer_token
from egress.secrets import load_secrets
from egress.sketch import HALF, SlidingWindow

if TYPE_CHECKING:
    from egress.config import LimitsConfig, TierConfig
    from egress.proxy import Exchange

WINDOW_SECONDS = 60.0
_SLOT_CACHE_SIZE = 100_000


def shared_bytes_needed(config: LimitsConfig) -> int:
    """The size of the buffer a RateLimiter keeps its two windows in (one mmap for all workers)."""
    return 2 * SlidingWindow.bytes_needed(config.sketch_width, config.sketch_depth)


def byo_identity(token: bytes, key: bytes) -> bytes:
    return b"byo:" + hashlib.blake2b(token, key=key, digest_size=12).hexdigest().encode()


def byo_credential(authorization: bytes | None, api_key: bytes | None, scheme: str) -> bytes | None:
    """The credential itself, however it was spelled: the identity a BYO caller is limited by.

    One key written with `Bearer`, `bearer` or `BEARER`, with extra spaces or tabs, or in
    `x-api-key` instead of `Authorization` is one caller: each spelling used to get a limit of its
    own. The header the provider reads first (its auth scheme) names the caller when both are sent.
    """
    bearer = bearer_token(authorization) if authorization is not None else None
    key = api_key.strip() if api_key is not None else None
    first, second = (key, bearer) if scheme == "x-api-key" else (bearer, key)
    return first or second or None


class RateLimiter:
    __slots__ = ("_default", "_hash_key", "_kids", "_requests", "_slots", "_tiers", "_tokens", "enabled")

    def __init__(
        self, config: LimitsConfig, shared: memoryview | None = None, default_hash_key: bytes | None = None
    ) -> None:
        self.set_tiers(config)
        if config.byo_hash_key is not None:
            self._hash_key = bytes(load_secrets(config.byo_hash_key)[0].reveal())[:64]
        else:
            # Shared by the workers of one supervisor; BYO attribution then holds until a restart.
            self._hash_key = default_hash_key or os.urandom(32)
        width, depth = config.sketch_width, config.sketch_depth
        size = SlidingWindow.bytes_needed(width, depth)
        if shared is None:
            shared = memoryview(bytearray(2 * size))
        self._requests = SlidingWindow(width, depth, WINDOW_SECONDS, shared[:size])
        self._tokens = SlidingWindow(width, depth, WINDOW_SECONDS, shared[size : 2 * size])
        # Counter positions per (identity, provider): a hash per new caller, a dict hit afterwards.
        self._slots: dict[tuple[bytes, str], tuple[int, ...]] = {}
        self._kids: dict[str, bytes] = {}  # a virtual key's kid -> its identity

    def set_tiers(self, config: LimitsConfig) -> None:
        """New limits (on reload); the counts so far stay."""
        self._default = config.default_tier
        self._tiers = dict(config.tiers)
        self.enabled = any(
            tier.requests_per_minute or tier.tokens_per_minute for tier in (self._default, *self._tiers.values())
        )

    def identity(self, exchange: Exchange) -> bytes | None:
        claims = exchange.claims
        if claims is not None:
            identity = self._kids.get(claims.kid)
            if identity is None:
                if len(self._kids) >= _SLOT_CACHE_SIZE:
                    self._kids.clear()
                # One bytes object per kid: its hash is computed once, not per request.
                identity = self._kids[claims.kid] = b"kid:" + claims.kid.encode()
            return identity
        facts = exchange.facts
        route = exchange.route
        token = byo_credential(facts.authorization, facts.api_key, route.provider.auth if route is not None else "")
        return byo_identity(token, self._hash_key) if token else None

    def admit(self, exchange: Exchange, provider: str, now: float) -> None:
        if not self.enabled:
            return
        identity = self.identity(exchange)
        if identity is None:
            return
        exchange.identity = identity
        tier = self._tier_for(exchange)
        slots = self._slots.get((identity, provider))
        if slots is None:
            if len(self._slots) >= _SLOT_CACHE_SIZE:
                self._slots.clear()  # rare and cheap to rebuild: a hash per caller
            slots = self._slots[identity, provider] = self._requests.slots(identity + b"\x00" + provider.encode())
        exchange.limit_slots = slots
        if tier.tokens_per_minute:
            used = self._tokens.estimate(slots, now)
            if used >= tier.tokens_per_minute:
                wait = self._tokens.seconds_until_below(slots, tier.tokens_per_minute - 1, now)
                raise _limited("tokens", tier.tokens_per_minute, used, wait)
        # Counted only if admitted: a refused request is not, so a client that backs off recovers.
        used = self._requests.take(slots, now, tier.requests_per_minute)
        if used is not None:
            # When `take` would admit it: the estimate at most limit - HALF (sketch.py).
            wait = self._requests.seconds_until_below(slots, tier.requests_per_minute - HALF, now)
            raise _limited("requests", tier.requests_per_minute, used, wait)

    def record_tokens(self, exchange: Exchange, tokens: int, now: float) -> None:
        if self.enabled and exchange.limit_slots is not None and tokens > 0:
            self._tokens.add(exchange.limit_slots, tokens, now)

    def _tier_for(self, exchange: Exchange) -> TierConfig:
        claims = exchange.claims
        if claims is not None and claims.tier is not None:
            return self._tiers.get(claims.tier, self._default)
        return self._default


def _limited(what: str, limit: int, used: float, wait: float) -> EgressError:
    retry_after = max(1, math.ceil(wait))
    headers = (
        (b"retry-after", b"%d" % retry_after),
        (b"x-ratelimit-limit-" + what.encode(), b"%d" % limit),
        (b"x-ratelimit-remaining-" + what.encode(), b"%d" % max(0, limit - math.ceil(used))),
        (b"x-ratelimit-reset-" + what.encode(), b"%ds" % retry_after),
    )
    return EgressError("rate_limited", f"rate limit of {limit} {what} per minute reached", headers)

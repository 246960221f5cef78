"""Rate-limit hints in a provider's response: how long to wait, and how much quota is left.

Contract (sans-IO: no I/O, no clock, no randomness; `now` and `rand` come from the caller):
  `read_hints(headers, now)` reads one response head, (name, value) byte pairs, into a `RateHints`:
      `retry_after` (seconds from now), and by dimension (`DIMENSIONS`) `limit`, `remaining` and
      `reset` (seconds from now until that dimension refills, a reset in the past being 0).
      A value that is malformed, negative, NaN or infinite, non-ASCII, or more than a year away is
      ignored as if the header were absent; nothing here raises on what a provider sends. A
      repeated header: its last valid value counts. Names are matched as HTTP field names are,
      case-insensitively (RFC 9110 §5.1).
  `cooldown(status, hints, failures, rand, bound)` is how long an account rests after a response
      (at most `bound`, the operator's `[accounts] max_cooldown`);
  `exhausted_until(hints)` how long until every spent dimension has refilled (to skip an account
      before it earns a 429).
  `should_retry(headers)` the provider's `x-should-retry` (True, False, or None: the status decides).

The headers, each checked against its provider's page:
  retry-after       RFC 9110 §10.2.3 (https://www.rfc-editor.org/rfc/rfc9110#section-10.2.3):
                    delay-seconds or an HTTP-date (IMF-fixdate, or the obsolete RFC 850 and asctime
                    forms, which a recipient must still accept: §5.6.7). A decimal is accepted as the
                    SDKs accept one: openai-python and anthropic-sdk-python `_parse_retry_after_header`
                    (src/*/_base_client.py) try `float(value)`, then `email.utils.parsedate_tz`.
                    Anthropic sends it on a 429 ("the number of seconds to wait until you can retry
                    the request", https://docs.anthropic.com/en/api/rate-limits); so does Groq
                    (https://console.groq.com/docs/rate-limits).
  retry-after-ms    milliseconds, decimal allowed, in no RFC: openai-python and anthropic-sdk-python
                    read it before retry-after (`_parse_retry_after_header`; openai-python: "Prefer
                    milliseconds, then seconds"); azure-core reads it too (`get_retry_after`,
                    sdk/core/azure-core/azure/core/pipeline/policies/_utils.py), though after retry-after.
  x-ms-retry-after-ms  Azure's own spelling, in milliseconds: azure-core reads it after retry-after-ms;
                    Azure's docs give it as "the amount of time, in milliseconds, that the user must
                    wait before reattempting the request" (Azure Cosmos DB, "Performance tips for
                    Azure Cosmos DB Java SDK v4", https://learn.microsoft.com/en-us/azure/cosmos-db/nosql/performance-tips-java-sdk-v4).
  x-ratelimit-{limit,remaining,reset}-{requests,tokens}
                    OpenAI (https://platform.openai.com/docs/guides/rate-limits#rate-limits-in-headers:
                    limit 60 / 150000, remaining 59 / 149984, reset `1s` / `6m0s`, "the time until the
                    rate limit ... resets to its initial state") and Groq, which documents the same six
                    headers (https://console.groq.com/docs/rate-limits; reset `2m59.56s`, `7.66s`).
                    Reset is a Go duration string (time.Duration.String: `1h2m3s`, `200ms`, `0s`).
                    Other x-ratelimit-* families (Mistral's `-req-10-second`, Together's bare
                    `x-ratelimit-limit`) are not these and are not read.
  anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}
                    https://docs.anthropic.com/en/api/rate-limits: reset is "the time when the ... rate
                    limit will be fully replenished, provided in RFC 3339 format"
                    (https://www.rfc-editor.org/rfc/rfc3339#section-5.6).

Precedence of the retry-after family: retry-after-ms, then x-ms-retry-after-ms, then retry-after,
the first present and valid one winning (an invalid one counts as absent, so the next is used, as
the SDKs' loop does). openai-python and anthropic-sdk-python rank retry-after-ms over retry-after;
azure-core ranks retry-after-ms over x-ms-retry-after-ms (but retry-after first of all). egress
follows the two LLM SDKs, whose clients are the ones it stands in for: a millisecond value is the
more precise of two answers to the same question.
"""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date

DIMENSIONS = ("requests", "tokens", "input_tokens", "output_tokens")

# A wait or reset further away than this is a provider bug or garbage, not a plan: ignored.
MAX_WAIT = 365 * 24 * 3600.0

# The default cooldown without any hint: 1 s doubling per consecutive failure, at most 60 s, with
# jitter so that accounts failed together do not come back together.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0

# Statuses that say "this account, not this request": rate limited, unavailable, overloaded
# (529 is Anthropic's overloaded_error, https://docs.anthropic.com/en/api/errors).
_COOLING_STATUSES = frozenset((429, 503, 529))

# Longer than any real value (an IMF-fixdate is 29 bytes, a Go duration from OpenAI ~13); the cap
# keeps a hostile megabyte header from reaching a regex or int().
_MAX_VALUE = 64
_MAX_COUNT_DIGITS = 18  # below 2**63: a count that fits every signed 64-bit reader

# -- the header table: one dict look-up per header name, nothing else for the ~14 of 20 that are not hints
_LIMIT, _REMAINING, _RESET_DURATION, _RESET_DATE, _RETRY_MS, _X_MS_RETRY_MS, _RETRY_AFTER = range(7)

_HINTS: dict[bytes, tuple[int, str]] = {
    b"retry-after": (_RETRY_AFTER, ""),
    b"retry-after-ms": (_RETRY_MS, ""),
    b"x-ms-retry-after-ms": (_X_MS_RETRY_MS, ""),
}
for _dim in ("requests", "tokens"):  # OpenAI and Groq document these two only
    _HINTS[b"x-ratelimit-limit-" + _dim.encode()] = (_LIMIT, _dim)
    _HINTS[b"x-ratelimit-remaining-" + _dim.encode()] = (_REMAINING, _dim)
    _HINTS[b"x-ratelimit-reset-" + _dim.encode()] = (_RESET_DURATION, _dim)
for _dim in DIMENSIONS:
    _wire = b"anthropic-ratelimit-" + _dim.replace("_", "-").encode()
    _HINTS[_wire + b"-limit"] = (_LIMIT, _dim)
    _HINTS[_wire + b"-remaining"] = (_REMAINING, _dim)
    _HINTS[_wire + b"-reset"] = (_RESET_DATE, _dim)
del _dim, _wire
# Whether the provider wants the request retried at all, in no RFC: openai-python and
# anthropic-sdk-python obey it before looking at the status (`_should_retry`,
# src/openai/_base_client.py:932-941, src/anthropic/_base_client.py:940-949: "If the server
# explicitly says whether or not to retry, obey"). Read by `should_retry`, not by read_hints: only
# an error response needs it.
SHOULD_RETRY = b"x-should-retry"
# Every hint's name, lower-case: the response head's one pass picks these out (http1.inspect_response).
HINT_NAMES = frozenset((*_HINTS, SHOULD_RETRY))

# Bytes patterns: `[0-9]`, never `\d`, so that no non-ASCII digit is ever a number.
_DECIMAL = re.compile(rb"[0-9]+(?:\.[0-9]+)?")
# Go's time.ParseDuration grammar without the sign: one or more (number, unit) pairs, units in any
# order; a number may be `5`, `5.`, `.5` or `5.25`. `ms` before `m`, so `30ms` is never 30 minutes.
_GO_DURATION = re.compile(rb"(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:h|ms|us|ns|m|s))+")
_GO_PART = re.compile(rb"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(h|ms|us|ns|m|s)")
_GO_UNIT = {b"h": 3600.0, b"m": 60.0, b"s": 1.0, b"ms": 1e-3, b"us": 1e-6, b"ns": 1e-9}
# RFC 3339 §5.6 date-time; `T`/`t` or the space its §5.6 note allows; `Z`/`z` or a numeric offset.
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_RFC3339 = re.compile(
    rb"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    rb"(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))"
)


@dataclass(slots=True)
class RateHints:
    # Seconds from now the provider asks to wait: retry-after-ms, else x-ms-retry-after-ms, else
    # retry-after (module docstring says why that order). None when none is present and valid.
    retry_after: float | None = None
    remaining: dict[str, int] = field(default_factory=dict)  # by dimension, only those present and valid
    limit: dict[str, int] = field(default_factory=dict)
    reset: dict[str, float] = field(default_factory=dict)  # seconds from now until it refills, never negative


NO_HINTS = RateHints()


def read_hints(headers: Iterable[tuple[bytes, bytes]], now: float) -> RateHints:
    """One pass over a response head; `now` is wall-clock epoch seconds (for HTTP-date and RFC 3339)."""
    limit: dict[str, int] = {}
    remaining: dict[str, int] = {}
    reset: dict[str, float] = {}
    retry_ms = x_ms_retry_ms = retry_after = None
    table = _HINTS
    for name, value in headers:
        entry = table.get(name)
        if entry is None:
            if name.islower():
                continue  # the common case: providers send lower-case names, over HTTP/1.1 as well
            entry = table.get(name.lower())
            if entry is None:
                continue
        kind, dim = entry
        if kind <= _REMAINING:  # _LIMIT or _REMAINING
            count = _count(value)
            if count is not None:
                (remaining if kind == _REMAINING else limit)[dim] = count
        elif kind == _RESET_DURATION:
            seconds = _duration(value)
            if seconds is not None:
                reset[dim] = seconds
        elif kind == _RESET_DATE:
            when = _rfc3339(value)
            if when is not None:
                wait = when - now
                if wait <= MAX_WAIT:  # False for NaN too
                    reset[dim] = wait if wait > 0.0 else 0.0
        elif kind == _RETRY_AFTER:
            seconds = parse_retry_after(value, now)
            if seconds is not None:
                retry_after = seconds
        else:
            seconds = _milliseconds(value)
            if seconds is not None:
                if kind == _RETRY_MS:
                    retry_ms = seconds
                else:
                    x_ms_retry_ms = seconds
    if retry_ms is None:
        retry_ms = x_ms_retry_ms if x_ms_retry_ms is not None else retry_after
        if retry_ms is None and not (remaining or limit or reset):
            return NO_HINTS  # most responses: one shared value, never changed by its readers
    return RateHints(retry_ms, remaining, limit, reset)


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration (`6m0s`, `2m59.56s`, `200ms`, `1h2m3s`) or a plain number of seconds.

    None for anything else: empty, signed, NaN/inf, an unknown unit, non-ASCII, over a year.
    """
    try:
        raw = text.encode("ascii")
    except (UnicodeEncodeError, AttributeError):
        return None
    return _duration(raw)


def parse_retry_after(value: bytes, now: float) -> float | None:
    """Seconds from `now` in a retry-after value: delay-seconds (a decimal too) or an HTTP-date.

    A date in the past is 0: the provider's wait is over. None when malformed or over a year away.
    """
    value = value.strip()
    if len(value) > _MAX_VALUE:
        return None
    if _DECIMAL.fullmatch(value) is not None:
        seconds = float(value)
        return seconds if seconds <= MAX_WAIT else None
    try:
        when = email.utils.parsedate_to_datetime(value.decode("ascii"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)  # asctime carries no zone; every HTTP-date is GMT
        wait = when.timestamp() - now
    except (UnicodeDecodeError, ValueError, TypeError, IndexError, OverflowError):
        return None
    if not wait <= MAX_WAIT:  # over a year away, or NaN from a NaN `now`
        return None
    return wait if wait > 0.0 else 0.0


def parse_rfc3339(text: str) -> float | None:
    """Epoch seconds of an RFC 3339 date-time (`2024-01-01T00:00:30Z`, `...30.25+02:00`), or None."""
    try:
        raw = text.encode("ascii")
    except (UnicodeEncodeError, AttributeError):
        return None
    return _rfc3339(raw)


def cooldown(status: int, hints: RateHints, failures: int, rand: float, bound: float = math.inf) -> float | None:
    """Seconds an account cools after a response with `status`, or None when it need not cool.

    429, 503 and 529: the provider's own word when it gives one, honoured exactly up to `bound`
    (`[accounts] max_cooldown`), shorter or longer than the default (an hour-long reset is an hour):
    retry_after first; else, for a 429, the latest reset among the dimensions at 0 remaining (else
    the latest reset given at all). Without any hint: 1 s doubling per earlier consecutive failure
    (`failures`, 0 for the first), capped at 60 s, with full jitter over 50-100 % of that step from
    the caller's `rand` in [0, 1). Any other status cools only if it is a 5xx that carries a
    retry-after. Never longer than `bound`: a year's retry-after is a valid header (MAX_WAIT lets it
    through), and obeyed exactly it benched the key until a restart, since a cooldown is never
    shortened (accounts.AccountTable.cool).
    """
    if status in _COOLING_STATUSES:
        if hints.retry_after is not None:
            seconds = hints.retry_after
        elif status == 429 and hints.reset:
            remaining = hints.remaining
            spent = [seconds for dim, seconds in hints.reset.items() if remaining.get(dim) == 0]
            seconds = max(spent) if spent else max(hints.reset.values())
        else:
            seconds = backoff(failures, rand)
    elif 500 <= status <= 599 and hints.retry_after is not None:
        seconds = hints.retry_after
    else:
        return None
    return seconds if seconds <= bound else bound


def backoff(failures: int, rand: float) -> float:
    """The default cooldown: min(60, 1 * 2**failures) s, scaled into [50 %, 100 %) by `rand`."""
    step = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** min(max(failures, 0), 64))  # 2.0**64: no overflow, past any cap
    if not 0.0 <= rand < 1.0:  # out of contract (or NaN): the shortest wait, never an exception
        rand = 0.0
    return step * (0.5 + 0.5 * rand)


def should_retry(headers: Iterable[tuple[bytes, bytes]]) -> bool | None:
    """The provider's `x-should-retry`: True for `true`, False for `false`, None when absent or
    anything else, as the SDKs read it: `response.headers.get("x-should-retry") == "true"` (httpx
    joins repeated fields with ", ", so two of them match neither), case-sensitive value, the name
    matched as HTTP field names are (RFC 9110 §5.1)."""
    values = [value.strip() for name, value in headers if name == SHOULD_RETRY or name.lower() == SHOULD_RETRY]
    value = values[0] if len(values) == 1 else None
    return True if value == b"true" else False if value == b"false" else None


def exhausted_until(hints: RateHints) -> float | None:
    """Seconds until every dimension at 0 remaining has refilled, or None when none is at 0.

    A dimension at 0 whose reset the provider did not give adds nothing to wait for; if no spent
    dimension has a reset, the answer is None and the provider's 429 will say how long.
    """
    reset = hints.reset
    waits = [reset[dim] for dim, left in hints.remaining.items() if left == 0 and dim in reset]
    return max(waits) if waits else None


# -- value parsers over the raw bytes, shared by read_hints and the public str functions


def _count(value: bytes) -> int | None:
    value = value.strip()
    # bytes.isdigit() is ASCII-only: no Unicode digit, sign, underscore or space reaches int().
    if 0 < len(value) <= _MAX_COUNT_DIGITS and value.isdigit():
        return int(value)
    return None


def _duration(value: bytes) -> float | None:
    value = value.strip()
    if len(value) > _MAX_VALUE:
        return None
    # What OpenAI and Groq send most (`0s`, `2ms`, `26ms`, `10.332999999s`) skips the unit regexes:
    # ~0.35 against ~1 µs.
    if value[-2:] == b"ms" and value[:-2].isdigit():
        seconds = int(value[:-2]) / 1000.0
    elif value[-1:] == b"s" and _DECIMAL.fullmatch(value, 0, len(value) - 1) is not None:
        seconds = float(value[:-1])
    elif _DECIMAL.fullmatch(value) is not None:
        seconds = float(value)
    elif _GO_DURATION.fullmatch(value) is not None:
        seconds = 0.0
        for number, unit in _GO_PART.findall(value):
            seconds += float(number) * _GO_UNIT[unit]
    else:
        return None
    return seconds if seconds <= MAX_WAIT else None  # False for 1e63 and inf alike


def _milliseconds(value: bytes) -> float | None:
    value = value.strip()
    if len(value) > _MAX_VALUE or _DECIMAL.fullmatch(value) is None:
        return None
    seconds = float(value) / 1000.0
    return seconds if seconds <= MAX_WAIT else None


def _rfc3339(value: bytes) -> float | None:
    match = _RFC3339.fullmatch(value.strip())
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, sign, offset_hours, offset_minutes = match.groups()
    hour, minute, second = int(hour), int(minute), int(second)
    if hour > 23 or minute > 59 or second > 60:  # RFC 3339 §5.6 allows the leap second 60
        return None
    try:
        days = date(int(year), int(month), int(day)).toordinal() - _EPOCH_ORDINAL  # checks Feb 30, month 13
    except ValueError:
        return None
    epoch = float(days * 86400 + hour * 3600 + minute * 60 + second)  # cheaper than an aware datetime.timestamp()
    if fraction:
        epoch += float(fraction)
    if sign:
        hours, minutes = int(offset_hours), int(offset_minutes)
        if hours > 23 or minutes > 59:
            return None
        offset = hours * 3600 + minutes * 60
        epoch += -offset if sign == b"+" else offset  # 10:00+02:00 is 08:00 UTC
    return epoch

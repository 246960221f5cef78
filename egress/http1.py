"""HTTP/1.1 framing decisions and header blocks (sans-IO: bytes and values in, bytes and values out).

Contract:
  inspect_request(...)   -> RequestFacts, or raises EgressError for what llhttp lets through but
                            RFC 9112 forbids (it accepts `Transfer-Encoding: ,chunked`, TE on
                            HTTP/1.0, HTTP/0.9 and 2.0 version strings, a missing Host).
  inspect_response(...)  -> ResponseFacts, or raises EgressError("upstream_protocol_error").
  response_head(...) / simple_response(...) -> the bytes of one header block, written in one call.
Hop-by-hop headers (RFC 9110 §7.6.1) never cross egress in either direction.
"""

from __future__ import annotations

import re
import time
from email.utils import formatdate
from http import HTTPStatus

from egress.errors import EgressError

# Framing of the response egress writes to its client.
NO_BODY, CONTENT_LENGTH, CHUNKED, UNTIL_CLOSE = range(4)

STATUS_LINE: dict[int, bytes] = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode("ascii") for status in HTTPStatus
}

# RFC 9110 §7.6.1, plus the de-facto ones (Keep-Alive, Proxy-Connection) and the headers a proxy
# consumes itself (Proxy-Authorization, Expect) or regenerates (Host, Content-Length).
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"http2-settings",
    }
)
# Headers egress writes itself on every response: an upstream's own copy would reach the client
# beside egress's (a spoofed request id, first, where a log search would find it).
EGRESS_RESPONSE_HEADERS = frozenset({b"x-egress-request-id", b"x-egress-dropped-params", b"x-egress-attempts"})
_NOT_RELAYED_DOWNSTREAM = _HOP_BY_HOP | EGRESS_RESPONSE_HEADERS | {b"content-length"}
# Connection tokens that name nothing else to drop: the common `keep-alive` and `close`.
_HOP_BY_HOP_TOKENS = _HOP_BY_HOP | {b"close", b""}

# Every header a caller may put a provider credential in: the OpenAI SDK's Authorization, the
# Anthropic SDK's x-api-key, Gemini's x-goog-api-key (ai.google.dev/api#authentication), Azure
# OpenAI's api-key (learn.microsoft.com/azure/ai-services/openai/reference#authentication). When
# egress sends a pool key in a virtual key's place, all of them go (auth.py): a second credential
# beside the pool key would reach a provider that reads it.
# The last two are not read by the head phase (RequestFacts holds Authorization and x-api-key), only
# noted (`other_credential`) for auth.other_credentials.
OTHER_CREDENTIAL_HEADERS = (b"x-goog-api-key", b"api-key")
CREDENTIAL_HEADERS = (b"authorization", b"x-api-key", *OTHER_CREDENTIAL_HEADERS)
# And the headers that pick which of a key's organizations or projects is billed: with the pool
# key, that is the operator's choice (the key's own scope), never the caller's.
# https://platform.openai.com/docs/api-reference/authentication (OpenAI-Organization, OpenAI-Project)
POOL_KEY_DROPPED_HEADERS = (*CREDENTIAL_HEADERS, b"openai-organization", b"openai-project")

# What a request header means to egress; a header not listed is forwarded as it is.
_HOP, _HOST, _CONTENT_LENGTH, _TRANSFER_ENCODING, _CONNECTION, _EXPECT = range(6)
_AUTHORIZATION, _API_KEY, _ANTHROPIC_VERSION, _ACCEPT_ENCODING, _REQUEST_ID, _OTHER_CREDENTIAL = range(6, 12)
_REQUEST_ROLES = {
    **dict.fromkeys(_HOP_BY_HOP, _HOP),
    b"host": _HOST,  # regenerated for the upstream
    b"content-length": _CONTENT_LENGTH,  # regenerated: egress sends the body it read
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"connection": _CONNECTION,
    b"expect": _EXPECT,  # answered by egress itself
    b"authorization": _AUTHORIZATION,
    b"x-api-key": _API_KEY,
    b"anthropic-version": _ANTHROPIC_VERSION,
    b"accept-encoding": _ACCEPT_ENCODING,  # narrowed to what the usage meter can decode
    b"x-request-id": _REQUEST_ID,  # the caller's own id: forwarded, and logged beside egress's
    # Gemini's and Azure's credential headers: forwarded, and noted (auth.other_credentials reads them).
    **dict.fromkeys(OTHER_CREDENTIAL_HEADERS, _OTHER_CREDENTIAL),
}

# The provider's id for a response, by the name each sends it under (OpenAI and Groq
# `x-request-id`, Anthropic `request-id`, Mistral `mistral-correlation-id`; tests/recordings):
# what its support asks for, logged beside egress's own id. The first of these present is taken.
UPSTREAM_ID_NAMES = (b"x-request-id", b"request-id", b"mistral-correlation-id")
# An id longer than this is cut: a header value is bounded only by the head's size.
MAX_ID_BYTES = 128

# Content codings the usage meter decodes (zlib, standard library). br and zstd are left out: no
# incremental decoder for them ships with Python, and a provider answers identity when asked for
# nothing else (RFC 9110 §12.5.3).
_DECODABLE_CODINGS = frozenset({b"gzip", b"x-gzip", b"deflate", b"identity"})
_narrowed: dict[bytes, bytes] = {}  # clients send a handful of distinct values

Headers = list[tuple[bytes, bytes]]


class _Discard:
    """Where header fields parsed after a head go: the trailer section of a chunked message.

    RFC 9110 §6.5.1 lets a proxy discard trailers. egress sends request bodies with a Content-Length
    and relays response bodies re-chunked without trailers, so there is nowhere to put them. Their
    size is bounded by the connections (framing read with no body byte counts like a head).
    """

    __slots__ = ()

    def append(self, field: tuple[bytes, bytes]) -> None:
        pass


DISCARD_FIELDS = _Discard()

_MAX_CONTENT_LENGTH = 2**63 - 1

# llhttp already refuses these in strict mode; checked again because relaying one would let an
# upstream split the client's response.
_UNSAFE_IN_VALUE = re.compile(rb"[\r\n\x00]")


class RequestFacts:
    __slots__ = (
        "api_key",
        "authorization",
        "chunked",
        "close_requested",
        "content_length",
        "expect_continue",
        "forward_headers",
        "has_anthropic_headers",
        "other_credential",
        "request_id",
    )

    def __init__(self) -> None:
        self.content_length: int | None = None
        self.chunked = False
        self.expect_continue = False
        self.close_requested = False
        self.has_anthropic_headers = False
        self.authorization: bytes | None = None
        self.api_key: bytes | None = None
        self.request_id: bytes | None = None  # the caller's X-Request-Id, if it sent one
        self.other_credential = False  # an x-goog-api-key or api-key header came (forwarded as sent)
        self.forward_headers: Headers = []


def inspect_request(headers: Headers, http_version: str) -> RequestFacts:
    if http_version not in ("1.1", "1.0"):
        raise EgressError("http_version_not_supported", f"HTTP/{http_version} is not supported")
    facts = RequestFacts()
    forward = facts.forward_headers
    host_count = 0
    connection_tokens: set[bytes] | None = None
    for name, value in headers:
        lower = name.lower()
        role = _REQUEST_ROLES.get(lower)
        if role is None:
            forward.append((lower, value))  # most headers: one dict miss and they are forwarded
        elif role == _AUTHORIZATION:
            if facts.authorization is not None:
                # Which one decides would differ between egress and the provider: a revoked virtual
                # key first and another key second passed, and both were forwarded.
                raise EgressError("bad_request", "more than one Authorization header")
            facts.authorization = value
            forward.append((lower, value))
        elif role == _HOST:
            host_count += 1
        elif role == _CONTENT_LENGTH:
            if facts.content_length is not None or not value.strip().isdigit():
                raise EgressError("bad_request", "invalid Content-Length")  # llhttp refuses these first
            try:
                facts.content_length = int(value)
            except ValueError:  # past int()'s 4,300 digits: leading zeros (content_length_of)
                facts.content_length = content_length_of(value)
        elif role == _TRANSFER_ENCODING:
            # Only "chunked" is valid for a request body egress reads (RFC 9112 §6.1); anything else
            # ("gzip, chunked", ",chunked", repeated headers) is a smuggling vector, not a feature.
            if facts.chunked or value.strip().lower() != b"chunked":
                raise EgressError("bad_request", "Transfer-Encoding must be exactly 'chunked'")
            if http_version == "1.0":
                raise EgressError("bad_request", "Transfer-Encoding is not allowed in HTTP/1.0")
            facts.chunked = True
        elif role == _CONNECTION:
            connection_tokens = _add_connection_tokens(connection_tokens, value)
        elif role == _EXPECT:
            if value.strip().lower() != b"100-continue":
                raise EgressError("expectation_failed", "only 'Expect: 100-continue' is supported")
            facts.expect_continue = http_version == "1.1"
        elif role == _API_KEY:
            if facts.api_key is not None:
                raise EgressError("bad_request", "more than one x-api-key header")
            facts.api_key = value
            facts.has_anthropic_headers = True
            forward.append((lower, value))
        elif role == _ANTHROPIC_VERSION:
            facts.has_anthropic_headers = True
            forward.append((lower, value))
        elif role == _ACCEPT_ENCODING:
            narrowed = narrow_accept_encoding(value)
            if narrowed:
                forward.append((lower, narrowed))
        elif role == _REQUEST_ID:
            facts.request_id = value
            forward.append((lower, value))
        elif role == _OTHER_CREDENTIAL:
            facts.other_credential = True
            forward.append((lower, value))
        # _HOP: consumed here, never forwarded
    if host_count > 1 or (host_count == 0 and http_version == "1.1"):
        # RFC 9112 §3.2: a server MUST answer 400 to a 1.1 request with no Host or more than one.
        raise EgressError("bad_request", "exactly one Host header is required")
    if connection_tokens:
        facts.close_requested = b"close" in connection_tokens
        if not connection_tokens <= _HOP_BY_HOP_TOKENS:
            # Headers the client named in Connection are hop-by-hop too (RFC 9110 §7.6.1).
            facts.forward_headers = [header for header in forward if header[0] not in connection_tokens]
    return facts


def content_length_of(value: bytes) -> int | None:
    """A Content-Length value as a number (RFC 9110 §8.6: 1*DIGIT, leading zeros allowed), or None.

    llhttp takes any number of leading zeros (it checks only that the value fits 64 bits), and int()
    refuses a string past 4,300 digits with a ValueError: `Content-Length: 000…02` used to be a 500
    internal_error. A value that still has more than 20 digits without its zeros is past any length
    (2^64 has 20): it reads as one past the largest a client can frame, refused by the callers' bounds.
    """
    if len(value) < 20:  # every real value: one check and int()
        return int(value) if value.strip().isdigit() else None
    digits = value.strip()
    if not digits.isdigit():
        return None
    digits = digits.lstrip(b"0") or b"0"
    return int(digits) if len(digits) <= 20 else _MAX_CONTENT_LENGTH + 1


def grow(held: bytes | bytearray, piece: bytes) -> bytes | bytearray:
    """`held` with `piece` appended: one growing buffer for a body that arrives in pieces.

    A body in one piece stays the very bytes object it came in (no copy); from the second piece on
    it is one bytearray grown in place. A list of pieces cost ~28 x the body in memory when they
    were 1 or 2 bytes each (an object header per piece), on requests and on metered responses.
    """
    if not held:
        return piece
    if held.__class__ is bytearray:
        held += piece
        return held
    grown = bytearray(held)
    grown += piece
    return grown


def narrow_accept_encoding(value: bytes) -> bytes:
    """The caller's Accept-Encoding with only the codings egress can decode to meter the body.

    `gzip, deflate, br, zstd` -> `gzip, deflate`; `*` stands for gzip and deflate; nothing left ->
    b"" (the header is dropped, and the provider answers identity). Parameters (q-values) are kept.
    """
    narrowed = _narrowed.get(value)
    if narrowed is None:
        kept = []
        for token in value.split(b","):
            token = token.strip()
            coding, semicolon, params = token.partition(b";")
            coding = coding.strip().lower()
            if coding in _DECODABLE_CODINGS:
                kept.append(token)
            elif coding == b"*":
                kept += (b"gzip" + semicolon + params, b"deflate" + semicolon + params)
        narrowed = b", ".join(kept)
        if len(_narrowed) < 256:
            _narrowed[value] = narrowed
    return narrowed


_OWS_OR_NOTHING = (b" ", b"\t", b"")


def bearer_token(authorization: bytes) -> bytes:
    """An Authorization value without its `Bearer` scheme, in any case, and without spaces or tabs.

    One function for the authenticate phase (is this a virtual key?) and the limiter (who is this
    BYO caller?): `Bearer\tbai_…` must not pass for a BYO key, nor `bearer  sk-…` for a new caller.
    """
    if (
        authorization[:7] == b"Bearer "
        and authorization[7:8] not in _OWS_OR_NOTHING
        and authorization[-1:] not in _OWS_OR_NOTHING  # llhttp keeps a value's trailing spaces
    ):
        return authorization[7:]  # what every SDK sends: one slice
    value = authorization.strip(b" \t")
    if value[:6].lower() == b"bearer" and value[6:7] in (b" ", b"\t"):
        return value[7:].strip(b" \t")
    return value


class ResponseFacts:
    __slots__ = ("chunked", "content_encoding", "content_length", "content_type", "headers", "kept")

    def __init__(
        self,
        headers: Headers,
        content_length: int | None,
        content_type: bytes,
        chunked: bool,
        content_encoding: bytes,
        kept: Headers,
    ) -> None:
        self.headers = headers
        self.content_length = content_length
        self.content_type = content_type
        self.chunked = chunked  # framed by the upstream's chunked coding (otherwise length or close)
        self.content_encoding = content_encoding  # b"" when the body is not content-coded
        self.kept = kept  # the relayed headers named in `keep`, names lower-cased


_KEEP_NONE: frozenset[bytes] = frozenset()


def inspect_response(headers: Headers, keep: frozenset[bytes] = _KEEP_NONE) -> ResponseFacts:
    """Filter an upstream response head for relay; refuse anything that could split a response.

    `keep`: lower-case names the caller reads itself (the rate-limit hints), listed apart in the
    same pass over the head, so that no other pass over every header is needed for them.
    """
    relayed: Headers = []
    kept: Headers = []
    content_length = None
    content_type = b""
    content_encoding = b""
    chunked = False
    connection_tokens: set[bytes] | None = None
    for name, value in headers:
        lower = name.lower()
        if lower not in _NOT_RELAYED_DOWNSTREAM:
            if lower == b"content-type":
                content_type = value
            elif lower == b"content-encoding":
                content_encoding = value
            elif lower in keep:
                kept.append((lower, value))
            relayed.append((name, value))
        elif lower == b"content-length":
            if not value.strip().isdigit():
                raise EgressError("upstream_protocol_error", "upstream sent an invalid Content-Length")
            try:
                content_length = int(value)
            except ValueError:  # past int()'s 4,300 digits: leading zeros (content_length_of)
                content_length = content_length_of(value)
            if content_length > _MAX_CONTENT_LENGTH:
                # llhttp takes up to 2^64-1; clients parsing a signed 64-bit length refuse the rest.
                raise EgressError("upstream_protocol_error", "upstream sent a Content-Length out of range")
        elif lower == b"connection":
            connection_tokens = _add_connection_tokens(connection_tokens, value)
        elif lower == b"transfer-encoding":
            _refuse_codings_other_than_chunked(value)
            chunked = True
    # llhttp already refuses these in strict mode; checked again, once over all values, because
    # relaying one would let an upstream split the client's response.
    if _UNSAFE_IN_VALUE.search(b"\t".join([value for _, value in headers])) is not None:
        raise EgressError("upstream_protocol_error", "upstream sent a header value with CR, LF or NUL")
    if connection_tokens and not connection_tokens <= _HOP_BY_HOP_TOKENS:
        relayed = [(name, value) for name, value in relayed if name.lower() not in connection_tokens]
    return ResponseFacts(relayed, content_length, content_type, chunked, content_encoding, kept)


def _refuse_codings_other_than_chunked(value: bytes) -> None:
    """A response's Transfer-Encoding, accepted only where egress and llhttp read it alike.

    `chunked` alone is the one coding egress relays (it re-chunks the decoded bytes). Any other
    coding (`gzip`, `gzip, chunked`, `xchunked`, `chunked, gzip`) would reach the client as coded
    bytes with no header to say so: llhttp decodes only the chunking, and a proxy can't re-apply a
    transfer coding it does not implement, so these are refused. llhttp ignores trailing spaces
    but not a trailing tab (`chunked\t` is read until close, not by chunks): refused too, so the
    two parsers never disagree about where the response ends.
    """
    for token in value.split(b","):
        if token.strip(b" \t").lower() != b"chunked":
            raise EgressError("upstream_protocol_error", "upstream sent a transfer coding other than chunked")
    if value.rstrip(b" ").endswith(b"\t"):
        raise EgressError("upstream_protocol_error", "upstream sent an ambiguous Transfer-Encoding")


def _add_connection_tokens(tokens: set[bytes] | None, value: bytes) -> set[bytes]:
    found = {token.strip().lower() for token in value.split(b",")}
    return found if tokens is None else tokens | found


def response_framing(status: int, head_request: bool, content_length: int | None, client_http11: bool) -> int:
    if head_request or status in (204, 304) or status < 200:
        return NO_BODY
    if content_length is not None:
        return CONTENT_LENGTH
    return CHUNKED if client_http11 else UNTIL_CLOSE


def upstream_request_head(
    method: bytes, target: bytes, host: bytes, headers: Headers, body_length: int | None
) -> bytes:
    parts = [method, b" ", target, b" HTTP/1.1\r\nhost: ", host, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if body_length is not None:
        parts += (b"content-length: ", b"%d" % body_length, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def response_head(
    status: int,
    headers: Headers,
    framing: int,
    content_length: int | None,
    request_id: bytes,
    keep_alive: bool,
    client_http11: bool,
    attempts: int = 1,
) -> bytes:
    parts = [STATUS_LINE.get(status) or b"HTTP/1.1 %d \r\n" % status]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if framing == CHUNKED:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif content_length is not None:
        parts += (b"content-length: ", b"%d" % content_length, b"\r\n")
    parts += (
        b"x-egress-request-id: ",
        request_id,
        _ATTEMPTS[attempts] if attempts < 10 else b"\r\nx-egress-attempts: %d\r\n" % attempts,
    )
    parts.append(_connection_header(keep_alive, client_http11))
    parts.append(b"\r\n")
    return b"".join(parts)


# How many upstream attempts the response took (accounts.py retries), closing the request-id line.
_ATTEMPTS = tuple(b"\r\nx-egress-attempts: %d\r\n" % count for count in range(10))


IDENTITY = (b"accept-encoding", b"identity")


def identity_only(headers: Headers) -> Headers:
    """`headers` asking for an uncompressed body, for a filter that edits it: the caller's
    Accept-Encoding replaced by `identity`. Dropped alone it asked for nothing: with no
    Accept-Encoding any coding is acceptable (RFC 9110 §12.5.3), and a gzip answer went unedited."""
    return [header for header in headers if header[0] != b"accept-encoding"] + [IDENTITY]


def simple_response(
    status: int,
    body: bytes,
    request_id: bytes,
    keep_alive: bool,
    client_http11: bool = True,
    content_type: bytes = b"application/json",
    head_request: bool = False,
    extra_headers: Headers | tuple = (),
    attempts: int = 0,
) -> bytes:
    """A whole response egress answers itself (errors, health), header block and body in one buffer.

    Its id goes under egress's name and under the names the SDKs read a request id from: OpenAI's
    `x-request-id` (an error's `request_id`; openai-python _exceptions.py, openai-node
    src/core/error.ts) and Anthropic's `request-id` (anthropic-sdk-python _exceptions.py). An
    egress error read through an SDK then names the access-log line that explains it."""
    parts = [
        STATUS_LINE.get(status) or b"HTTP/1.1 %d \r\n" % status,
        b"date: ",
        http_date(),
        b"\r\ncontent-type: ",
        content_type,
        b"\r\ncontent-length: %d\r\nx-egress-request-id: " % len(body),
        request_id,
        b"\r\nx-request-id: ",
        request_id,
        b"\r\nrequest-id: ",
        request_id,
        _ATTEMPTS[attempts] if attempts < 10 else b"\r\nx-egress-attempts: %d\r\n" % attempts,
    ]
    for name, value in extra_headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (_connection_header(keep_alive, client_http11), b"\r\n")
    head = b"".join(parts)
    return head if head_request else head + body


def _connection_header(keep_alive: bool, client_http11: bool) -> bytes:
    if not keep_alive:
        return b"connection: close\r\n"
    return b"" if client_http11 else b"connection: keep-alive\r\n"


_date_cache: list = [0, b""]


def http_date() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True).encode("ascii")
    return _date_cache[1]


def chunk_header(size: int) -> bytes:
    return b"%x\r\n" % size

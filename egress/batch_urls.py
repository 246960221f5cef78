"""Anthropic's Message Batch objects, with a `results_url` the caller's SDK reads through egress.

Contract:
  `BatchUrlFilter(origin)` is a response-body filter (the seam proxy.Exchange.body_filter names:
      `head`, `feed`, `finish`, `extra_headers`, `answered`) for the batch objects an anthropic-dialect
      row answers: POST `/v1/messages/batches`, GET `/v1/messages/batches/{id}`, the list (GET
      `/v1/messages/batches`, `data[]`), POST `.../{id}/cancel`. On a 2xx JSON body it rewrites each
      `results_url` value that is the row's own absolute URL (its origin and base path, providers.py's
      `Origin`) to the path after the base path: `https://api.anthropic.com/v1/messages/batches/{id}/results`
      becomes `/v1/messages/batches/{id}/results`. Every other byte is relayed as it came: the value
      is replaced in place, the document never serialised again. A body that is not JSON, has no
      such value (`null` while the batch is processing), or names another host goes out untouched,
      as does a value whose path would start `//` (a relative `//host/…` names another host);
      so does one over `MAX_BODY`, relayed as it comes from there on.
Why: the Anthropic SDKs read a batch's results by retrieving the batch, then GETting its
`results_url` (Python `messages.batches.results`, TS `batches.results`). An absolute URL bypasses
egress: the results are never metered (the batch never billed, usage.BatchResultsMeter), and the
caller's key goes straight to the provider, a virtual key (`bai_…`) among them: a secret handed to a
third party, which refuses it. A relative URL is joined to the SDK's own base URL (Python
`_base_client._prepare_url`: the base's path, always ending in `/`, plus the URL's path without its
leading `/`; TS `buildURL`: base + path, one `/` dropped when both have it), so
`http://egress/anthropic` + `/v1/messages/batches/{id}/results` lands on egress's
`/anthropic/v1/messages/batches/{id}/results` route, and the drop-in's `http://egress` on its `/v1/…`
route. A passthrough relays the provider's body byte for byte (ARCHITECTURE.md); this is its one
documented exception beside the usage egress itself asked for (stream_usage.py): a URL the caller
must follow through egress for the batch to be billed and for its key to stay with egress.
The body is buffered (a batch object is < 1 KiB; a list of the most, 1000, about 500 KiB:
https://docs.anthropic.com/en/api/listing-message-batches), so its length changes and the proxy
reframes it as chunked; egress asks the provider for it uncompressed (proxy.upstream_request).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:
    from egress.providers import Origin

# Past this many bytes the body is relayed as it comes, untouched (a list of 1000 batches is about
# half of it).
MAX_BODY = 1 << 20
_KEY = b'"results_url"'
# In a valid JSON text every `"` outside a string opens one, so scanning for string tokens from the
# start finds each exactly (the body is checked valid first). A `results_url` key's string value is
# group 1; any other string is consumed whole, so a key-like text inside a value never matches.
_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_TOKENS = re.compile(rb'"results_url"[ \t\r\n]*:[ \t\r\n]*(' + _STRING + rb")|" + _STRING, re.S)


class BatchUrlFilter:
    __slots__ = ("_body", "_done", "_origin", "_passing")

    extra_headers: tuple = ()

    def __init__(self, origin: Origin) -> None:
        self._origin = origin
        self._body = bytearray()
        self._passing = False  # over MAX_BODY: relayed as it comes
        self._done = False

    @property
    def answered(self) -> bool:
        """The filter seam's (proxy.Exchange.client_left): the body went out whole (at finish)."""
        return self._done

    def head(self, status: int, content_type: bytes, kept: tuple = ()) -> bool:
        """The response-filter seam (proxy.Exchange.upstream_head): stay on a 2xx JSON body only."""
        return 200 <= status < 300 and content_type[:16].lower() == b"application/json"

    def feed(self, chunk: bytes) -> bytes:
        if self._passing:
            return chunk
        body = self._body
        if len(body) + len(chunk) > MAX_BODY:
            self._passing = True
            held = bytes(body) + chunk
            body.clear()
            return held
        body += chunk
        return b""

    def finish(self) -> bytes:
        self._done = True
        if self._passing:
            return b""
        body = bytes(self._body)
        self._body.clear()
        return self.rewrite(body)

    def rewrite(self, body: bytes) -> bytes:
        """`body` with each `results_url` that names the row made relative; `body` itself otherwise."""
        if _KEY not in body:
            return body
        try:
            orjson.loads(body)  # the token scan is exact on valid JSON only
        except orjson.JSONDecodeError:
            return body
        parts = []
        last = 0
        for match in _TOKENS.finditer(body):
            start, end = match.span(1)
            if start == -1:
                continue
            url = orjson.loads(match.group(1))
            relative = self._relative(url)
            if relative is None:
                continue
            parts += (body[last:start], orjson.dumps(relative))
            last = end
        if not parts:
            return body
        parts.append(body[last:])
        return b"".join(parts)

    def _relative(self, url: str) -> str | None:
        """The part of `url` after the row's origin and base path, starting with `/`; None when `url`
        is not the row's own (another host, already relative, not a URL egress could route)."""
        origin = self._origin
        if any(character <= " " or character == "\x7f" for character in url):
            return None  # a URL parser would drop or refuse these: not one to follow through egress
        scheme, separator, rest = url.partition("://")
        if not separator or scheme.lower() != origin.scheme:
            return None
        authority, slash, path = rest.partition("/")
        if "@" in authority or not _same_host(authority.lower(), origin):
            return None
        path = slash + path
        base = origin.base_path.decode("ascii")
        if not path.startswith(base + "/"):
            return None
        relative = path[len(base) :]
        if relative[1:2] in ("/", "\\"):
            # `//host/…` (WHATWG URL parsers read `/\host/…` alike) is a network-path reference (RFC
            # 3986 §4.2): resolved as a URL, not joined as the SDKs join, it names another host, which
            # would get the caller's key. Absolute, it names the provider's own.
            return None
        return relative


def _same_host(authority: str, origin: Origin) -> bool:
    default = 443 if origin.scheme == "https" else 80
    host = f"[{origin.host}]" if ":" in origin.host else origin.host
    if origin.port == default and authority == host:
        return True
    return authority == f"{host}:{origin.port}"

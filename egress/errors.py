"""Every error egress itself answers with: status, stable code, dialect-aware body, connection fate.

Contract: raise `EgressError(code, message)`; `render_error(error, dialect)` gives the JSON body in
the caller's dialect; `ERROR_KINDS[code].closes` says whether HTTP requires the connection to close
afterwards (a request whose framing is unknown or untrusted can't be followed by another).
An upstream's own 4xx/5xx is never rendered here: it passes through unchanged.

Bodies follow each provider's documented shape:
  OpenAI     {"error": {"message", "type", "param", "code"}}
             https://platform.openai.com/docs/guides/error-codes
  Anthropic  {"type": "error", "error": {"type", "message"}}
             https://docs.claude.com/en/api/errors
The stable egress `code` rides inside `error` in both, where the SDKs expose it and ignore extras.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import orjson


@dataclass(frozen=True, slots=True)
class ErrorKind:
    status: int
    openai_type: str
    anthropic_type: str
    closes: bool  # the connection must close after this response


_INVALID = "invalid_request_error"

ERROR_KINDS: dict[str, ErrorKind] = {
    # Client framing errors: the byte stream can't be trusted past this point (RFC 9112 §11.2).
    "bad_request": ErrorKind(400, _INVALID, _INVALID, closes=True),
    "request_timeout": ErrorKind(408, _INVALID, _INVALID, closes=True),
    "body_too_large": ErrorKind(413, _INVALID, "request_too_large", closes=True),
    "uri_too_long": ErrorKind(414, _INVALID, _INVALID, closes=True),
    "expectation_failed": ErrorKind(417, _INVALID, _INVALID, closes=True),
    "headers_too_large": ErrorKind(431, _INVALID, _INVALID, closes=True),
    "http_version_not_supported": ErrorKind(505, _INVALID, _INVALID, closes=True),
    "method_not_allowed": ErrorKind(405, _INVALID, _INVALID, closes=True),
    # Routing and authentication: the request was well framed, so the connection lives on.
    "unknown_provider": ErrorKind(404, _INVALID, "not_found_error", closes=False),
    "missing_key": ErrorKind(401, "authentication_error", "authentication_error", closes=False),
    "invalid_key": ErrorKind(401, "authentication_error", "authentication_error", closes=False),
    "key_expired": ErrorKind(401, "authentication_error", "authentication_error", closes=False),
    "key_revoked": ErrorKind(401, "authentication_error", "authentication_error", closes=False),
    "key_not_yet_valid": ErrorKind(401, "authentication_error", "authentication_error", closes=False),
    "byo_not_allowed": ErrorKind(401, "authentication_error", "authentication_error", closes=False),
    # A caller's own key that is another provider's (providers.KeyFormats): refused, never sent.
    "byo_key_wrong_provider": ErrorKind(401, "authentication_error", "authentication_error", closes=False),
    "provider_not_permitted": ErrorKind(403, "permission_error", "permission_error", closes=False),
    "no_pool_key": ErrorKind(403, "permission_error", "permission_error", closes=False),
    # The unified surface (/v1/chat/completions routed by model): always in the OpenAI dialect.
    "model_required": ErrorKind(400, _INVALID, _INVALID, closes=False),
    "model_not_found": ErrorKind(404, _INVALID, "not_found_error", closes=False),
    "model_not_permitted": ErrorKind(403, "permission_error", "permission_error", closes=False),
    "unsupported_parameter": ErrorKind(400, _INVALID, _INVALID, closes=False),
    # /v1/responses routed to an OpenAI-dialect provider whose row does not say it serves that API.
    "responses_not_supported_for_provider": ErrorKind(400, _INVALID, _INVALID, closes=False),
    "invalid_request": ErrorKind(400, _INVALID, _INVALID, closes=False),
    # Upstream and lifecycle.
    "upstream_connect_error": ErrorKind(502, "server_error", "api_error", closes=False),
    "upstream_protocol_error": ErrorKind(502, "server_error", "api_error", closes=False),
    "upstream_timeout": ErrorKind(504, "server_error", "api_error", closes=False),
    "rate_limited": ErrorKind(429, "rate_limit_error", "rate_limit_error", closes=False),
    "too_many_invalid_keys": ErrorKind(429, "rate_limit_error", "rate_limit_error", closes=False),
    # Accounts (accounts.py): every pool key of the provider is cooling, or refused by it.
    "all_accounts_cooling": ErrorKind(429, "rate_limit_error", "rate_limit_error", closes=False),
    "all_accounts_disabled": ErrorKind(503, "server_error", "overloaded_error", closes=False),
    # The provider refused the pool key egress sent (401, 402, 403) and no other account could take
    # the request: its own body, about that key, is not relayed (retries.py disables the account).
    "pool_key_refused": ErrorKind(502, "server_error", "api_error", closes=False),
    # Every account, or the provider itself, stayed at its max_concurrent for the queue_timeout.
    "provider_busy": ErrorKind(503, "server_error", "overloaded_error", closes=False),
    "draining": ErrorKind(503, "server_error", "overloaded_error", closes=True),
    "too_many_connections": ErrorKind(503, "server_error", "overloaded_error", closes=True),
    "internal_error": ErrorKind(500, "server_error", "api_error", closes=True),
}


class EgressError(Exception):
    """An error egress answers itself. The message must never contain a credential."""

    __slots__ = ("code", "headers", "kind", "message", "param")

    def __init__(
        self, code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = (), param: str | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.kind = ERROR_KINDS[code]
        self.message = message
        self.headers = headers  # extra response headers, e.g. Retry-After on a 429
        self.param = param  # the request field at fault, where one is (OpenAI's `param`)

    @property
    def status(self) -> int:
        return self.kind.status


def render_error(error: EgressError, dialect: str) -> bytes:
    kind = error.kind
    if dialect == "anthropic":
        body = {
            "type": "error",
            "error": {"type": kind.anthropic_type, "message": error.message, "code": error.code},
        }
    else:
        body = {"error": {"message": error.message, "type": kind.openai_type, "param": error.param, "code": error.code}}
    return orjson.dumps(body)


class StartupError(Exception):
    """egress can't start: the message says what, where and why (an address and the errno text)."""


def cannot_listen(setting: str, address: str, exc: OSError) -> StartupError:
    """The one line for a listener that can't be had: the setting, the address, the errno's text
    (asyncio's own message repeats the address). The workers' pre-fork probe and the bind say it alike."""
    # A resolver's error (socket.gaierror) numbers its codes apart from errno: os.strerror(-2)
    # reads "Unknown error -2" where its own text says "Name or service not known".
    resolver = isinstance(exc, socket.gaierror)
    reason = os.strerror(exc.errno) if exc.errno and not resolver else (exc.strerror or str(exc))
    return StartupError(f"server.{setting} {address}: cannot listen: {reason}")

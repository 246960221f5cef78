"""The unified surface: `/v1/chat/completions`, `/v1/embeddings` and `/v1/models`, routed by model.

Phase contract: `prepare(exchange)` runs in the upstream-request phase of a request whose route is a
surface route (providers.Router marks bare /v1/chat/completions, /v1/embeddings and /v1/models), once
its body is read. It returns True when the request goes upstream (the exchange now carries the real
`Route`, its credential, its body and, for a translated request, its response filter) and False when
it was answered here (the model list, or an error). Passthrough requests never come here.

Order: parse the body -> route by `model` (routes.ModelRoutes) -> the model policy for the
provider -> authenticate for that provider (a virtual key gets its pool key; a BYO key is moved to
the provider's auth scheme) -> the model policy with the key's own model list -> limits -> the
upstream request: the caller's model stays the caller's (only `provider:model` is rewritten to the
provider's own name), and a Chat Completions request for an Anthropic-dialect provider is
translated (anthropic_codec) with a `TranslatedChat` filter for the response.
Errors are always in the OpenAI dialect, with the codes of errors.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import unquote

import orjson

from egress import anthropic_codec, http1, responses_codec
from egress.errors import EgressError
from egress.http1 import bearer_token
from egress.providers import ANTHROPIC_VERSION, Provider, Route
from egress.routes import Fallback, Target, can_serve, check_model, listed_models, needs
from egress.usage import api_of

if TYPE_CHECKING:
    from egress.proxy import Exchange

_DROPPED_HEADER = b"x-egress-dropped-params"


def prepare(exchange: Exchange) -> bool:
    from egress import proxy  # the phases module; imported here to keep this module's import light

    surface = exchange.route.surface
    try:
        if surface == "models":
            whole = exchange.path == b"/v1/models"
            if exchange.method in (b"GET", b"HEAD"):
                proxy.respond(exchange, 200, _model_list(exchange) if whole else _one_model(exchange))
                return False
            if whole:
                raise EgressError("method_not_allowed", "the model list is read with GET")
            return _passthrough(exchange)  # DELETE /v1/models/{id}: OpenAI's, the model policy on its id
        if exchange.method != b"POST":
            # Only a POST is routed by its body's model. OpenAI's other methods on these paths
            # (GET /v1/chat/completions lists stored completions) go where the drop-in sends them.
            return _passthrough(exchange)
        _route_by_model(exchange)
    except EgressError as error:
        exchange.dialect = "openai"
        proxy.respond_error(exchange, error)
        return False
    return True


def _model_list(exchange: Exchange) -> bytes:
    state = exchange.client.state
    claims = state.auth.authenticate(exchange, None)  # a key is required; no provider yet
    return orjson.dumps({"object": "list", "data": listed_models(state.model_routes, claims, state.catalog.models)})


def _one_model(exchange: Exchange) -> bytes:
    """`GET /v1/models/{id}`: the list's own entry for the id, or 404: what the list shows, one by one."""
    state = exchange.client.state
    claims = state.auth.authenticate(exchange, None)
    wanted = unquote(exchange.path.rsplit(b"/", 1)[1].decode("latin-1"))
    for entry in listed_models(state.model_routes, claims, state.catalog.models):
        if entry["id"] == wanted:
            return orjson.dumps(entry)
    raise EgressError("model_not_found", f"no model {wanted!r} is listed for this key", param="model")


def _passthrough(exchange: Exchange) -> bool:
    """A surface path's request that is not routed by model: sent as the drop-in sends it, with
    what the head phase does for a provider's route (server.py): authenticate, limit."""
    from egress import proxy

    # A surface route exists only beside an openai row: drop_in finds it.
    proxy.take_route(exchange, exchange.client.state.router.drop_in(exchange.target))
    return True


def _route_by_model(exchange: Exchange) -> None:
    state = exchange.client.state
    try:
        document = orjson.loads(exchange.body) if exchange.body else None
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        raise EgressError("invalid_request", "the request body must be a JSON object")
    requested = document.get("model")
    if requested.__class__ is str:
        exchange.asked_model = requested  # the fact's requested_model, whatever goes upstream
    target = state.model_routes.resolve(requested)
    body, headers = exchange.body, exchange.facts.forward_headers
    route = target.route
    drop_params = route is not None and route.drop_params
    _aim(exchange, document, target, requested, drop_params, admit=True)
    if route is not None and route.fallbacks and exchange.lease is not None:
        # Only a pooled request falls back: a BYO key is the caller's key for this one provider.
        exchange.fallbacks = Fallbacks(body, headers, route.fallbacks, drop_params)


def _aim(exchange: Exchange, document: dict, target: Target, requested: str, drop_params: bool, admit: bool) -> None:
    """Point the exchange at `target`: its upstream route, credential, policy, body and filter."""
    state = exchange.client.state
    surface = exchange.route.surface
    provider = target.provider
    model = target.upstream_model
    check_model(provider, model, None)  # the provider's own policy, before any credential work
    translate = provider.dialect == "anthropic"
    if translate and surface not in ("chat", "responses"):
        raise EgressError("model_not_found", f"{provider.name} serves no {surface} API for {requested!r}")
    if surface == "responses" and not translate and not provider.responses_api:
        raise EgressError(
            "responses_not_supported_for_provider",
            f"{provider.name} does not serve the Responses API (its row has no responses_api = true); "
            "use /v1/chat/completions for this model",
            param="model",
        )
    exchange.route = _upstream_route(provider, surface, translate, exchange.target.partition(b"?")[2])
    exchange.dialect = "openai"
    state.auth.authenticate(exchange, provider)
    check_model(provider, model, exchange.claims)
    if admit and state.limiter.enabled:
        state.limiter.admit(exchange, provider.name, state.loop_time())
    if translate and surface == "responses":
        dropped: list[str] | None = [] if drop_params else None  # the route's drop_params, as on chat
        # Translated first: it refuses a malformed request (400) before anything else reads it.
        chat, warnings = responses_codec.responses_to_chat(document, dropped=dropped)
        shell = responses_codec.response_shell(document, requested, int(time.time()))
        names = responses_codec.namespaced(document)
        stream = bool(document.get("stream"))
        document = chat
        _translate(exchange, document, model, requested, drop_params, dropped or (), responses_codec.responses_param)
        headers = exchange.body_filter.extra_headers + tuple((b"warning", _warning(text)) for text in warnings)
        exchange.body_filter = TranslatedResponses(shell, names, headers, stream)
    elif translate:
        _translate(exchange, document, model, requested, drop_params)
    if not translate and model != document.get("model"):
        # `provider:model`, or a fallback: the provider's own name for the model goes upstream.
        document["model"] = model
        exchange.body = orjson.dumps(document)


class Fallbacks:
    """A pooled request's way to its route's fallbacks: what it was before the surface touched it."""

    __slots__ = ("body", "drop_params", "entries", "headers", "index", "needed")

    def __init__(self, body: bytes | bytearray, headers: list, entries: tuple[Fallback, ...], drop_params: bool):
        self.body = body
        self.headers = headers
        self.entries = entries
        self.drop_params = drop_params
        self.index = 0
        self.needed: frozenset[str] | None = None  # what the request uses, worked out when needed

    def remaining(self) -> bool:
        return self.index < len(self.entries)


# What aiming at a fallback may change, restored when that fallback can't take the request.
_AIMED = ("route", "lease", "body", "body_filter", "claims", "dialect")


def aim_next(exchange: Exchange, fallbacks: Fallbacks) -> tuple | None:
    """Point the exchange at the next fallback that can serve it; the state it had before, to put
    back with `restore` if no account takes it, or None when this fallback can't serve it (the
    exchange is unchanged then). The limiter is not asked again: the caller made one request."""
    entry = fallbacks.entries[fallbacks.index]
    fallbacks.index += 1
    document = orjson.loads(fallbacks.body)
    if fallbacks.needed is None:
        fallbacks.needed = needs(document)
    if not can_serve(entry, fallbacks.needed):
        return None
    facts = exchange.facts
    saved = (tuple(getattr(exchange, name) for name in _AIMED), facts.forward_headers)
    try:
        target = exchange.client.state.model_routes.resolve(entry.model)
        exchange.body = fallbacks.body
        exchange.body_filter = None
        facts.forward_headers = fallbacks.headers
        # The fallback's own route says whether its translation may drop what it can't honour.
        drop_params = target.route.drop_params if target.route is not None else fallbacks.drop_params
        _aim(exchange, document, target, target.upstream_model, drop_params, admit=False)
    except EgressError:
        restore(exchange, saved)
        return None
    return saved


def restore(exchange: Exchange, saved: tuple) -> None:
    values, headers = saved
    for name, value in zip(_AIMED, values, strict=True):
        setattr(exchange, name, value)
    exchange.facts.forward_headers = headers


_UPSTREAM_PATHS = {"chat": "chat/completions", "responses": "responses", "embeddings": "embeddings"}
# The upstream Route of a provider row and surface, made once (never with a query: a query may
# carry a credential). Keyed by the row's identity (a frozen dataclass hashes every field on each
# look-up); the Route holds its row, so the id is not reused while cached.
_ROUTES: dict[tuple[int, str], Route] = {}


def _upstream_route(provider: Provider, surface: str, translate: bool, query: bytes) -> Route:
    key = (id(provider), surface)
    route = _ROUTES.get(key) if not query else None
    if route is None or route.provider is not provider:
        path = (provider.api_root + ("/messages" if translate else "/" + _UPSTREAM_PATHS[surface])).encode()
        upstream_target = provider.origin.base_path + path + (b"?" + query if query else b"")
        route = Route(provider, upstream_target, api_of(path, provider.dialect), surface)
        if not query:
            if len(_ROUTES) >= 1024:
                _ROUTES.clear()
            _ROUTES[key] = route
    return route


def _translate(
    exchange: Exchange,
    document: dict,
    model: str,
    requested: str,
    drop_params: bool,
    dropped_before: Sequence[str] = (),
    rename: Callable[[str], str] | None = None,
) -> None:
    """A chat request to Anthropic Messages. For a Responses request, `dropped_before` is what its
    own translation dropped (listed first) and `rename` gives a chat field its Responses name, in
    an error's `param` and in the dropped names, so the client sees the names it sent."""
    provider = exchange.route.provider
    warnings: list[str] = []
    try:
        body, dropped = anthropic_codec.chat_to_messages(
            document, default_max_tokens=provider.default_max_tokens, drop_params=drop_params, warnings=warnings
        )
    except EgressError as error:
        if rename is not None and error.param is not None:
            error.param = rename(error.param)
        raise
    dropped = [*dropped_before, *(map(rename, dropped) if rename is not None else dropped)]
    body["model"] = model
    exchange.body = orjson.dumps(body)
    facts = exchange.facts
    headers = []
    byo = None
    has_version = False
    for name, value in facts.forward_headers:
        if name == b"authorization":
            byo = bearer_token(value)  # a BYO key moves to Anthropic's scheme (x-api-key)
            continue
        if name == b"accept-encoding":
            continue  # the filter rewrites the body: identity, asked for below (http1.identity_only)
        if name == b"anthropic-version":
            has_version = True
        headers.append((name, value))
    if byo is not None and not any(name == b"x-api-key" for name, _ in headers):
        headers.append((b"x-api-key", byo))
    if not has_version:
        headers.append((b"anthropic-version", ANTHROPIC_VERSION))
    headers.append(http1.IDENTITY)
    facts.forward_headers = headers
    options = document.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    exchange.body_filter = TranslatedChat(
        requested, bool(document.get("stream")), include_usage, _dropped_names(dropped)
    )
    if len(warnings) > _WARNINGS:  # one a strict schema: 128 tools' would outgrow a client's header limit
        more = len(warnings) - _WARNINGS + 1
        rest = f"{more} more schemas: bounds not enforced by Anthropic; in descriptions"
        warnings = [*warnings[: _WARNINGS - 1], rest]
    for text in warnings:  # a field honoured in part (a schema's constraints), named as the caller sent it
        field, _, said = text.partition(":")
        text = f"{rename(field)}:{said}" if rename is not None else text
        exchange.body_filter.extra_headers += ((b"warning", _warning(text)),)


class _Translated:
    """A translated response's filter (Anthropic Messages upstream), whichever OpenAI API it becomes.

    A 2xx SSE stream is transcoded event by event (`_transcoder()`), written as it arrives. A JSON
    body, or any error body, is held (a provider's error or message is small) and translated whole
    at the end (`_message(message)`), or into OpenAI's error shape with the same status and the
    upstream's retry headers (a 429 stays a 429).
    """

    __slots__ = ("_base", "_held", "_status", "_stream", "_transcoder", "extra_headers")

    def __init__(self, extra_headers: tuple, stream: bool) -> None:
        self._transcoder = None
        self._held = bytearray()
        self._status = 0
        self._stream = stream
        self.extra_headers = extra_headers
        self._base: tuple | None = None  # extra_headers before any answer's id: set at the first head()

    @property
    def answered(self) -> bool:
        """The caller has its whole answer: the stream's end ([DONE], response.completed) went out.
        The OpenAI SDK closes at [DONE], before the provider's terminating chunk arrives: that
        close is the end of a complete response, not a client gone (proxy.Exchange.client_left)."""
        transcoder = self._transcoder
        return transcoder is not None and transcoder.ended

    def head(self, status: int, content_type: bytes, kept: tuple = ()) -> bool:
        self._status = status
        base = self._base
        if base is None:
            base = self._base = self.extra_headers  # the translation's own, its warnings included
        # This answer's id, not the first one's: an attempt dropped after its head (retries.py: a
        # stream whose first event is an error, a 401 refusing the pool key) is followed by another
        # answer, and its id went to the caller as the id of the one it got.
        self.extra_headers = base + _openai_request_id(kept)
        if 200 <= status < 300 and content_type.startswith(b"text/event-stream"):
            self._transcoder = self._new_transcoder()
        return True

    def feed(self, data: bytes) -> bytes:
        transcoder = self._transcoder
        if transcoder is not None:
            return transcoder.feed(data)
        self._held += data
        return b""

    def finish(self) -> bytes:
        """The rest of the body; raises upstream_protocol_error when the provider's answer is cut
        short (a stream without its end, a body that is not a message), so the caller sees a cut,
        never a clean end of a 200 that carries no answer."""
        transcoder = self._transcoder
        if transcoder is not None:
            rest = transcoder.finish()
            if not transcoder.ended:
                raise EgressError("upstream_protocol_error", "the provider's stream ended before its message_stop")
            return rest
        if 200 <= self._status < 300:
            if self._stream:
                # A stream was asked for and a whole message came: relayed as it is, the SDK's
                # stream would end cleanly with no chunk at all. A cut says the answer was not one,
                # as a 200 that is not SSE at all does.
                raise EgressError("upstream_protocol_error", "the provider answered a stream request with no stream")
            try:
                message = orjson.loads(self._held)
            except orjson.JSONDecodeError:
                message = None
            if not isinstance(message, dict):
                raise EgressError("upstream_protocol_error", "the provider's answer is not a whole message")
            return orjson.dumps(self._message(message))
        return self._error(anthropic_codec.error_to_openai(self._status, bytes(self._held)))

    def _error(self, body: bytes) -> bytes:
        return body

    def _new_transcoder(self):
        raise NotImplementedError

    def _message(self, message: dict) -> dict:
        raise NotImplementedError


class TranslatedChat(_Translated):
    """Chat Completions: `chat.completion` and `chat.completion.chunk` (anthropic_codec)."""

    __slots__ = ("_include_usage", "_model")

    def __init__(self, model: str, stream: bool, include_usage: bool, dropped: list[bytes]) -> None:
        super().__init__(((_DROPPED_HEADER, b", ".join(dropped)),) if dropped else (), stream)
        self._model = model
        self._include_usage = include_usage

    def _new_transcoder(self):
        return anthropic_codec.StreamTranscoder(
            model=self._model, created=int(time.time()), include_usage=self._include_usage
        )

    def _message(self, message: dict) -> dict:
        return anthropic_codec.message_to_chat(message, model=self._model, created=int(time.time()))


class TranslatedResponses(_Translated):
    """The Responses API: the `response` object and its event stream (responses_codec)."""

    __slots__ = ("_names", "_shell")

    def __init__(self, shell: dict, names: dict, extra_headers: tuple, stream: bool) -> None:
        super().__init__(extra_headers, stream)
        self._shell = shell
        self._names = names

    def _new_transcoder(self):
        return responses_codec.ResponsesTranscoder(self._shell, self._names)

    def _message(self, message: dict) -> dict:
        return responses_codec.message_to_response(message, self._shell, self._names)

    def _error(self, body: bytes) -> bytes:
        """The error's `param` under the Responses name the caller sent (a prompt too long for the
        model is `messages` on chat, `input` here), as a refusal egress makes itself names it."""
        document = orjson.loads(body)  # error_to_openai's own output: always an object with "error"
        param = document["error"].get("param")
        if param is None:
            return body
        document["error"]["param"] = responses_codec.responses_param(param)
        return orjson.dumps(document)


def _openai_request_id(kept) -> tuple:
    """The provider's id for its response under OpenAI's name, `x-request-id`, when it sent it under
    another (Anthropic's `request-id`): the OpenAI SDKs read their `_request_id` (node: `request_id`,
    an error's `requestID`) off `x-request-id` alone (openai-node src/core/error.ts, openai-python
    _base_client.py; https://platform.openai.com/docs/api-reference/debugging-requests), so a
    translated answer gave them none. The provider's own header is relayed as well."""
    found = dict(kept)
    value = found.get(b"request-id")
    if value is None or b"x-request-id" in found:
        return ()
    return ((b"x-request-id", value),)


_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_WARNING_CHARS = 1024  # a Warning's text at most this long (bounded names make it far shorter)
# Warning headers a translated answer carries at most (Node's and h11's header limit is 16 KiB in all).
_WARNINGS = 8


def _dropped_names(dropped: Sequence[str]) -> list[bytes]:
    """The dropped parameters' names for `x-egress-dropped-params`: header-safe and bounded.

    A name is any JSON key of the caller's body. One may hold CR and LF (`"x\\r\\nset-cookie: a=b"`):
    sent as it was, it ended egress's header block early and added headers, or a whole second
    response, to the caller's answer. And a body of ten thousand unknown keys made one header of
    megabytes: at most _DROPPED_SHOWN names, each at most _DROPPED_CHARS, then how many more."""
    names = [_CONTROL.sub(b"?", name[:_DROPPED_CHARS].encode("ascii", "replace")) for name in dropped[:_DROPPED_SHOWN]]
    if len(dropped) > _DROPPED_SHOWN:
        names.append(b"(%d more)" % (len(dropped) - _DROPPED_SHOWN))
    return names


_DROPPED_SHOWN = 32
_DROPPED_CHARS = 128


def _warning(text: str) -> bytes:
    """An RFC 9111 §5.5 style Warning value (299: a persistent warning) for something left out.

    A warning may quote the caller's own names (a schema's property): a control byte becomes `?`,
    never a line break that would end the header and start another, and the text is bounded."""
    raw = _CONTROL.sub(b"?", text[:_WARNING_CHARS].encode("ascii", "replace"))  # cut before quoting
    quoted = raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    return b'299 egress "' + quoted + b'"'

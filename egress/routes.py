"""Model routes and the one model policy (sans-IO): which provider serves a model, and who may use it.

Contract:
  `ModelRoutes(routes, providers).resolve(model)` -> `Target(provider, upstream_model, route)` for
      the unified surface (`/v1/chat/completions`, `/v1/embeddings`), or raises EgressError:
      400 model_required, 404 model_not_found. `provider:model` names a configured provider
      directly, and the provider's own model name goes upstream. Otherwise the first route whose
      `match` glob matches the WHOLE model name wins (fnmatch: * ? [...], case-sensitive): a prefix
      is never enough (LiteLLM PR #42090 routed `gpt-4o-mini` by a `gpt-4o` prefix).
  `model_permitted(provider, model, claims)` is THE policy: the provider's `deny_models` beat its
      `allow_models` (absent: all; `[]`: none), then the virtual key's `mdl` globs. The call path
      (`check_model`) and the `/v1/models` listing (`listed_models`) both call it, so what is listed
      is exactly what is served (LiteLLM #8113, #8688: the two drifted apart).
A refused model is 403 model_not_permitted and never falls through to a later route: a deny must
not turn into "another provider serves it".
  `body_models(body, content_type)` -> every model a provider-prefixed request's body names, read
      as the provider reads it, or None when it can't be read; the call path refuses the latter
      where a policy applies (unknown must not mean permitted).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes

import orjson

from egress.errors import EgressError

if TYPE_CHECKING:
    from egress.providers import Provider
    from egress.vkeys import Claims


# What a request may need of a model, and a fallback may declare it lacks (`serves`).
CAPABILITIES = ("tools", "images", "json_mode")


@dataclass(frozen=True, slots=True)
class Fallback:
    model: str  # `provider:model`, or a model name the routes resolve
    serves: frozenset[str] | None = None  # None: every capability; else only these


@dataclass(frozen=True, slots=True)
class ModelRoute:
    match: str  # a glob over the caller's model name, matched whole
    provider: str
    # Translated requests only: drop parameters the target can't honour instead of refusing them;
    # the dropped names go back in `x-egress-dropped-params`.
    drop_params: bool = False
    # Tried in order once this route's own accounts are exhausted (surface.fall_back); one level:
    # a fallback's own route's fallbacks are not followed.
    fallbacks: tuple[Fallback, ...] = ()


# Without [[routes]]: Claude models to Anthropic (translated), everything else to OpenAI, so the
# drop-in default of bare /v1 keeps working and Claude works through the OpenAI SDK out of the box.
DEFAULT_ROUTES = (ModelRoute("claude-*", "anthropic"), ModelRoute("*", "openai"))


@dataclass(frozen=True, slots=True)
class Target:
    provider: Provider
    upstream_model: str
    route: ModelRoute | None  # None when the caller named the provider (`provider:model`)


_RESOLVED_CACHE = 4096


class ModelRoutes:
    __slots__ = ("_providers", "_resolved", "routes")

    def __init__(self, routes: tuple[ModelRoute, ...], providers: dict[str, Provider]) -> None:
        self.routes = routes
        self._providers = providers
        # Answers by model name: the globs run once per distinct model, not per request.
        self._resolved: dict[str, Target] = {}

    def resolve(self, model: object) -> Target:
        target = self._resolved.get(model) if isinstance(model, str) else None
        if target is not None:
            return target
        target = self._resolve(model)
        if len(self._resolved) >= _RESOLVED_CACHE:
            self._resolved.clear()  # rebuilt by the next requests: a bounded dict, not an LRU
        self._resolved[model] = target
        return target

    def _resolve(self, model: object) -> Target:
        if not isinstance(model, str) or not model:
            raise EgressError("model_required", "the request names no model ('model' is required)")
        name, colon, rest = model.partition(":")
        if colon and rest and name in self._providers:
            return Target(self._providers[name], rest, None)
        for route in self.routes:
            if fnmatchcase(model, route.match):
                provider = self._providers.get(route.provider)
                if provider is not None:
                    return Target(provider, model, route)
        raise EgressError("model_not_found", f"no route serves the model {model!r}")

    def routed_providers(self) -> list[Provider]:
        """The providers the routes name, in route order, each once."""
        seen: dict[str, Provider] = {}
        for route in self.routes:
            provider = self._providers.get(route.provider)
            if provider is not None:
                seen.setdefault(provider.name, provider)
        return list(seen.values())


def needs(document: dict) -> frozenset[str]:
    """The CAPABILITIES a Chat Completions or Responses request uses: tools (or functions), image
    parts, JSON mode (`response_format`, or the Responses API's `text.format`)."""
    needed = set()
    if document.get("tools") or document.get("functions"):
        needed.add("tools")
    response_format = document.get("response_format")
    text = document.get("text")
    if isinstance(text, dict):
        response_format = text.get("format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        needed.add("json_mode")
    messages = document.get("messages")
    if messages is None:
        messages = document.get("input")  # the Responses API's items: messages among them
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and any(
                isinstance(part, dict) and part.get("type") in ("image_url", "input_image") for part in content
            ):
                needed.add("images")
                break
    return frozenset(needed)


def can_serve(fallback: Fallback, needed: frozenset[str]) -> bool:
    return fallback.serves is None or needed <= fallback.serves


def model_permitted(provider: Provider, model: str, claims: Claims | None) -> bool:
    """The one model policy: provider deny beats allow, then the virtual key's own model list."""
    if not has_model_policy(provider, claims):
        return True  # no policy anywhere: most requests
    if any(fnmatchcase(model, pattern) for pattern in provider.deny_models):
        return False
    allow = provider.allow_models
    if allow is not None and not any(fnmatchcase(model, pattern) for pattern in allow):
        return False
    if claims is not None and claims.models is not None:
        # A key's patterns name a model as the caller may (`gpt-4o`), or as /v1/models lists an id
        # two providers serve (`groq:gpt-4o`, `groq:*`): a model of that provider only.
        qualified = f"{provider.name}:{model}"
        return any(fnmatchcase(model, pattern) or fnmatchcase(qualified, pattern) for pattern in claims.models)
    return True


def has_model_policy(provider: Provider, claims: Claims | None) -> bool:
    """Whether a passthrough request must be read for its model at all (most pay nothing)."""
    return provider.model_policy or (claims is not None and claims.models is not None)


def check_model(provider: Provider, model: str, claims: Claims | None) -> None:
    if not model_permitted(provider, model, claims):
        raise EgressError("model_not_permitted", f"the model {model!r} is not permitted here")


def listed_models(
    routes: ModelRoutes, claims: Claims | None, fetched: Callable[[str], tuple[str, ...]] = lambda name: ()
) -> list[dict]:
    """`GET /v1/models`: each routed provider's models that the same policy permits.

    A provider's models are its row's `models` when set, else `fetched(name)`: the last list the
    provider itself gave (catalog.py). A virtual key is offered only the providers it can be served
    by: those its `prv` names, with a pool key to swap in. An id two providers serve is listed once per provider as
    `provider:model`, which the call path accepts; patterns are never listed, only literal ids.
    """
    offered: list[tuple[Provider, str]] = []
    for provider in routes.routed_providers():
        if claims is not None and (
            (claims.providers is not None and provider.name not in claims.providers) or not provider.pool_keys
        ):
            # What the call path refuses a virtual key (auth.check_claims: provider_not_permitted;
            # no pool to swap in: no_pool_key) is not offered to it either.
            continue
        models = provider.models or fetched(provider.name)
        offered += [(provider, model) for model in models if model_permitted(provider, model, claims)]
    counts: dict[str, int] = {}
    for _, model in offered:
        counts[model] = counts.get(model, 0) + 1
    listed = []
    for provider, model in offered:
        # The bare id only where the call path would take it to this very provider.
        shown = model if counts[model] == 1 and _routes_to(routes, model, provider) else f"{provider.name}:{model}"
        listed.append({"id": shown, "object": "model", "created": 0, "owned_by": provider.name})
    return listed


def _routes_to(routes: ModelRoutes, model: str, provider: Provider) -> bool:
    try:
        return routes.resolve(model).provider.name == provider.name
    except EgressError:
        return False


# multipart/form-data (RFC 7578): the boundary, and a Content-Disposition's `name` parameter, as
# a token, a quoted string or RFC 5987's `name*=charset'lang'value` (what Werkzeug and others read).
# The media type's parameters one by one (RFC 9110 §5.6.6: `;` name `=` token / quoted-string), so
# `boundary` is the parameter of that name, never the tail of another (`xboundary=A; boundary=B`:
# Werkzeug, Go's mime.ParseMediaType and Python's email package all read B).
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAMETER = re.compile(rb"[ \t]*;[ \t]*(?:(" + _TOKEN + rb")[ \t]*=[ \t]*(" + _TOKEN + rb'|"(?:[^"\\]|\\.)*"))?')
_DISPOSITION_NAME = re.compile(rb'(?:^|;)\s*name(\*?)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))', re.IGNORECASE)
# A part's head as the lenient parsers read it (Werkzeug's sansio multipart: a line break is CRLF,
# LF or CR; a line that starts with a space or tab continues the one before; whitespace may sit
# before the colon): a head egress read more strictly would hide a `model` field the provider sees.
_BLANK_LINE = re.compile(rb"\r\n\r\n|\r\r|\n\n")
_LINE_BREAK = re.compile(rb"\r\n|\n|\r")


def _header_lines(head: bytes) -> list[bytes]:
    lines: list[bytes] = []
    for line in _LINE_BREAK.split(head):
        if line[:1] in (b" ", b"\t") and lines:
            lines[-1] += b" " + line.strip()  # obs-fold (RFC 5322 §2.2.3), as Werkzeug unfolds it
        else:
            lines.append(line)
    return lines


def _boundary(content_type: bytes) -> bytes | None:
    """The `boundary` parameter of a media type; None when it has none, has two (which one a
    provider reads is anyone's guess) or its parameters can't be read whole."""
    position = content_type.find(b";")
    if position == -1:
        return None
    end = len(content_type.rstrip(b" \t"))
    boundary = None
    while position < end:
        found = _PARAMETER.match(content_type, position)
        if found is None:
            return None
        position = found.end()
        name, value = found.group(1), found.group(2)
        if name is not None and name.lower() == b"boundary":
            if boundary is not None:
                return None
            boundary = re.sub(rb"\\(.)", rb"\1", value[1:-1]) if value.startswith(b'"') else value
    # RFC 2046 §5.1.1: 1 to 70 characters; a longer one is still read, within reason.
    return boundary if boundary and len(boundary) <= 200 else None


def _form_models(body: bytes | bytearray, content_type: bytes) -> list[str] | None:
    """The values of a multipart form's `model` fields; None when the form can't be read whole."""
    boundary = _boundary(content_type)
    if boundary is None:
        return None
    delimiter = b"--" + boundary
    parts = bytes(body).split(delimiter)
    if len(parts) < 2 or not parts[-1].startswith(b"--"):
        return None  # no closing delimiter: not a form a server would read as this one
    models = []
    for part in parts[1:-1]:
        blank = _BLANK_LINE.search(part)
        if blank is None:
            return None
        head, value = part[: blank.start()], part[blank.end() :]
        for line in _header_lines(head):
            name, colon, rest = line.partition(b":")
            if not colon or name.strip().lower() != b"content-disposition":
                continue
            for star, quoted, token in _DISPOSITION_NAME.findall(rest):
                name = re.sub(rb"\\(.)", rb"\1", quoted) if quoted else token
                if star:  # RFC 5987: charset'language'percent-encoded
                    name = unquote_to_bytes(name.split(b"'", 2)[-1])
                if name == b"model":
                    # The line break before the next delimiter is the delimiter's, whichever it is.
                    models.append(value.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8", "replace"))
    return models


# Keys whose value no provider reads a model from: the conversation (`messages` at any depth, so in
# Anthropic's batches too; a list-valued `input`: the Responses API's items, embedding inputs), the
# caller's tags (`metadata`: https://platform.openai.com/docs/api-reference/chat/create#chat-create-metadata),
# a tool's JSON Schema and examples (`parameters`, `input_schema`, `input_examples`, and
# `response_format.json_schema.schema`). A dict-valued `input` is still read: a realtime session's
# `audio.input.transcription.model` is a model the provider runs.
_NOT_READ_FOR_MODELS = frozenset({"messages", "metadata", "parameters", "input_schema", "input_examples", "schema"})


def path_model(path: bytes) -> str | None:
    """The model a path names (`.../models/{id}`: read one, or delete a fine-tuned one), percent-
    decoded; None when it names none. Under a policy it is checked like a body's model."""
    _, found, model = path.rpartition(b"/models/")
    if not found or not model or b"/" in model:
        return None
    name = unquote_to_bytes(model).decode("utf-8", "replace")
    base, colon, action = name.rpartition(":")
    if colon and action in _MODEL_ACTIONS:
        return base  # Gemini's `models/{model}:generateContent`; an OpenAI ft: id keeps its colons
    return name


# The methods Gemini's API calls on a model in its path (https://ai.google.dev/api), after a colon.
_MODEL_ACTIONS = frozenset(
    {
        "generateContent",
        "streamGenerateContent",
        "countTokens",
        "embedContent",
        "batchEmbedContents",
        "batchGenerateContent",
        "predict",
        "predictLongRunning",
        "generateAnswer",
    }
)


def body_models(body: bytes | bytearray, content_type: bytes) -> list[str] | None:
    """Every model a request body names, as the provider reads them; None if it can't be read.

    JSON: parsed whole, as the provider parses it (escapes decoded, the last of a repeated key, a
    model after 64 KiB of messages), and every string under a `model` key at any depth: Anthropic's
    message batches carry one per request (`requests[].params.model`), OpenAI's Responses tools
    (`tools[].model` of image_generation) and realtime sessions (`session.audio.input.transcription.model`)
    nest theirs. Except inside what is conversation or the caller's own data (_NOT_READ_FOR_MODELS):
    a tool call's arguments sent back (Claude Code's Task tool takes `"model": "haiku"`), `metadata`
    tags, a tool's JSON Schema; no provider reads a model there, and refusing one would refuse every
    later turn of that conversation. A multipart form: its `model` fields. No body: no model. Any
    other body: None. An OpenAI batch's models sit in an uploaded file, which is not read here.
    """
    if not body:
        return []
    media = content_type.split(b";", 1)[0].strip().lower()
    if media == b"multipart/form-data":
        return _form_models(body, content_type)
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    models: list[str] = []
    pending = [document]
    while pending:  # a loop, not recursion: JSON may nest as deep as orjson allows
        value = pending.pop()
        if value.__class__ is dict:
            for key, item in value.items():
                if key == "model" and item.__class__ is str:
                    models.append(item)
                elif item.__class__ is dict or item.__class__ is list:
                    if key in _NOT_READ_FOR_MODELS or (key == "input" and item.__class__ is list):
                        continue  # the conversation or the caller's own data: no provider reads a model there
                    pending.append(item)
        elif value.__class__ is list:
            pending.extend(item for item in value if item.__class__ is dict or item.__class__ is list)
    return models

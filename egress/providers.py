"""Providers as data rows, and route resolution (sans-IO).

Contract: `Router.resolve(target)` maps a raw request-target (bytes, origin-form, query included) to a
`Route` (provider + the exact upstream request-target) or raises `EgressError("unknown_provider")`.
The path after the provider segment goes upstream verbatim: no decoding, no normalisation, no
per-provider rewriting, so any endpoint a provider adds tomorrow works today. The one exception is
`without_query_credential(route)`, for a request that sends a pool key: the caller's own `key=`
query parameter is dropped, every other byte of the target kept. `KeyFormats.foreign_owners(key,
provider)` says whose a caller's own key is when it is not `provider`'s (the rows' `key_prefixes`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from urllib.parse import unquote_to_bytes, urlsplit

from egress.errors import EgressError
from egress.usage import api_of

STREAM_USAGE_MODES = ("include_usage", "always", "unknown")
# The Messages API version egress speaks when it makes an Anthropic request itself (a translated
# request that names none, the model list): https://docs.anthropic.com/en/api/versioning
ANTHROPIC_VERSION = b"2023-06-01"


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    # Origin plus an optional path prefix; the SDK's own path ("/v1/...", "/openai/v1/...") follows it.
    base_url: str
    auth: str = "bearer"  # "bearer" (Authorization: Bearer) or "x-api-key"
    dialect: str = "openai"  # wire format of requests, responses and error bodies
    # Where the provider keys that replace a virtual key come from: "env:NAME" or "file:PATH".
    pool_keys: tuple[str, ...] = ()
    # The operator's account name for each source ("": the account id is a hash of the key).
    pool_key_names: tuple[str, ...] = ()
    # Requests with no credential at all pass (a local model server); otherwise 401 missing_key.
    allow_anonymous: bool = False
    # How the provider's OpenAI-style chat streams carry usage (STREAM_USAGE_MODES), from its docs:
    # "include_usage" only when asked with stream_options.include_usage, as OpenAI documents (egress
    # asks, and removes from the caller's stream exactly what asking added); "always" on its own
    # (egress never asks: the field may be refused, and the stream is relayed as sent); "unknown"
    # (egress doesn't ask, and a stream without usage is a fact whose reason says so).
    stream_usage: str = "include_usage"
    # An operator's override: never ask, whatever stream_usage says.
    inject_stream_usage: bool = True
    # Model policy (routes.model_permitted): globs; deny beats allow; allow None = all, () = none.
    allow_models: tuple[str, ...] | None = None
    deny_models: tuple[str, ...] = ()
    # The model ids `GET /v1/models` lists for this provider (literal ids, never patterns).
    models: tuple[str, ...] = ()
    # Anthropic requires max_tokens; a translated request that names none gets this.
    default_max_tokens: int = 4096
    # Where its OpenAI-compatible (or Anthropic) API sits under base_url: the unified surface sends
    # a routed request to base path + api_root + "/chat/completions" (or "/messages").
    api_root: str = "/v1"
    # Concurrency caps, held across the workers of a host (accounts.AccountTable.take): requests to
    # this provider at once (every request, the caller's own keys too), and per pool key (each
    # key's own `max_concurrent` in pool_keys, else `account_max_concurrent`); 0: no cap. A request
    # over a cap waits up to `queue_timeout` seconds, then gets 503 provider_busy.
    max_concurrent: int = 0
    account_max_concurrent: int = 0
    # It serves OpenAI's Responses API itself (at api_root + "/responses"): bare /v1/responses is
    # passed to it verbatim. Without it, /v1/responses for its models is refused (an Anthropic row
    # is translated instead).
    responses_api: bool = False
    pool_key_caps: tuple[int, ...] = ()
    queue_timeout: float = 10.0
    # How its API keys begin, as its docs and SDKs show them (BUILTIN_PROVIDERS); () for a provider
    # whose keys have no known form, which takes any key. A caller's own key that begins as another
    # provider's key does is refused before it is sent here (KeyFormats.foreign_owners).
    key_prefixes: tuple[str, ...] = ()
    origin: Origin = field(init=False, compare=False, repr=False)
    # Whether a passthrough request must be read for its model (routes.model_permitted).
    model_policy: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin", Origin.from_url(self.base_url))
        if len(self.pool_key_names) != len(self.pool_keys):
            object.__setattr__(self, "pool_key_names", ("",) * len(self.pool_keys))
        if len(self.pool_key_caps) != len(self.pool_keys):
            object.__setattr__(self, "pool_key_caps", (0,) * len(self.pool_keys))
        object.__setattr__(self, "model_policy", bool(self.deny_models) or self.allow_models is not None)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where upstream connections go; the connection pool is keyed by this."""

    scheme: str
    host: str
    port: int
    base_path: bytes  # "" or "/prefix" without a trailing slash
    host_header: bytes  # the Host value to send: host, plus the port when it is not the default
    # What the connection pool is keyed by: a str, whose hash is computed once (a dataclass's
    # generated __hash__ hashes every field on every look-up).
    pool_key: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pool_key", f"{self.scheme}://{self.host}:{self.port}")

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @classmethod
    def from_url(cls, url: str) -> Origin:
        parts = urlsplit(url)
        default_port = 443 if parts.scheme == "https" else 80
        port = parts.port or default_port
        host = parts.hostname or ""
        shown_host = f"[{host}]" if ":" in host else host
        host_header = shown_host if port == default_port else f"{shown_host}:{port}"
        return cls(
            scheme=parts.scheme,
            host=host,
            port=port,
            base_path=parts.path.rstrip("/").encode("ascii"),
            host_header=host_header.encode("ascii"),
        )


# The built-in rows. Hosts and API roots checked against each provider's own documentation:
#   openai      https://platform.openai.com/docs/api-reference/introduction  (https://api.openai.com/v1)
#   anthropic   https://docs.anthropic.com/en/api/overview                   (https://api.anthropic.com/v1, x-api-key)
#   openrouter  https://openrouter.ai/docs/quickstart                        (https://openrouter.ai/api/v1)
#   fireworks   https://docs.fireworks.ai/tools-sdks/openai-compatibility    (https://api.fireworks.ai/inference/v1)
#   groq        https://console.groq.com/docs/openai                         (https://api.groq.com/openai/v1)
#   deepseek    https://api-docs.deepseek.com/                               (https://api.deepseek.com, /v1 alias)
#   together    https://docs.together.ai/docs/openai-api-compatibility       (https://api.together.xyz/v1)
#   cerebras    https://inference-docs.cerebras.ai                           (https://api.cerebras.ai/v1)
#   mistral     https://docs.mistral.ai/api/                                 (https://api.mistral.ai/v1)
#   xai         https://docs.x.ai/docs/api-reference                         (https://api.x.ai/v1)
# base_url is the origin: the caller keeps the provider's own path in its SDK base URL, e.g.
# http://egress:8787/groq/openai/v1, so egress never rewrites a path.
#
# stream_usage, how a chat stream carries usage (providers.py STREAM_USAGE_MODES), per provider:
#   openai      include_usage  only when asked; then `"usage": null` on every chunk and one extra
#                              `choices: []` chunk: https://platform.openai.com/docs/api-reference/chat-streaming
#   anthropic   always         Messages streams: message_start + cumulative message_delta
#                              (https://docs.anthropic.com/en/docs/build-with-claude/streaming); its
#                              OpenAI-compatible endpoint is not asked either
#   groq        always         top-level `usage` and `x_groq.usage` on the finish chunk
#                              (https://console.groq.com/docs/api-reference; recorded streams)
#   deepseek    always         usage on the last chunk (https://api-docs.deepseek.com/api/create-chat-completion)
#   mistral     always         on the final chunk; `stream_options` is refused with 422 extra_forbidden
#                              (https://docs.mistral.ai/api; mistralai/client-python has no such field)
#   openrouter  always         "Full usage details are always included"
#                              (https://openrouter.ai/docs/use-cases/usage-accounting)
#   cerebras    always         on the finish chunk, asked or not (https://inference-docs.cerebras.ai/capabilities/streaming
#                              is silent; the official SDK's chunk type and recorded streams)
#   together    unknown        some models send none unless asked; what asking adds is not documented
#   fireworks   unknown        likewise (https://docs.fireworks.ai/faq-new/models-inference/how-to-get-performance-metrics-for-streaming-responses)
#   xai         unknown        none unless asked, and the asked-for shape is observed, not documented
#                              (https://docs.x.ai/docs/api-reference)
#
# key_prefixes, how each provider's API keys begin (what a caller's own key is recognised by), as the
# providers' pages and the secret scanners' rules for their keys show them:
#   openai      sk-proj- (project), sk-svcacct- (service account), sk-admin- (admin: `redacted_value`
#               "sk-admin...", developers.openai.com/api/reference/resources/organization/subresources/
#               admin_api_keys), sk- (legacy user keys, still valid)
#   anthropic   sk-ant- (sk-ant-api03- API keys, sk-ant-admin01- Admin API keys, sk-ant-api01- compliance
#               keys: platform.claude.com/docs/manage-claude/compliance-api-access)
#   openrouter  sk-or- (openrouter.ai/keys: "sk-or-v1-…")
#   groq        gsk_ (console.groq.com/keys; noseyparker np.groq.1, kingfisher.groq.1)
#   deepseek    sk- (platform.deepseek.com's keys, as its docs' DEEPSEEK_API_KEY examples): OpenAI's legacy form
#   cerebras    csk- and csk_ (cloud.cerebras.ai's keys)
#   xai         xai- (console.x.ai's keys)
#   fireworks   fw_ (app.fireworks.ai's current keys; older ones have no prefix and match no one's)
#   together, mistral: no documented form: they take any key.
# Prefixes overlap (sk- is OpenAI's and DeepSeek's, and begins sk-ant-, sk-or-, sk-proj-): a key is
# the providers' whose matching prefix is the longest (KeyFormats.foreign_owners).
BUILTIN_PROVIDERS: dict[str, Provider] = {
    row.name: row
    for row in (
        # responses_api: each provider's own docs list POST /responses
        # (platform.openai.com/docs/api-reference/responses, openrouter.ai/docs/api-reference/responses-api,
        # console.groq.com/docs/responses-api, docs.x.ai/docs/guides/responses-api).
        Provider(
            "openai",
            "https://api.openai.com",
            responses_api=True,
            key_prefixes=("sk-proj-", "sk-svcacct-", "sk-admin-", "sk-"),
        ),
        Provider(
            "anthropic",
            "https://api.anthropic.com",
            auth="x-api-key",
            dialect="anthropic",
            stream_usage="always",
            key_prefixes=("sk-ant-",),
        ),
        Provider(
            "openrouter",
            "https://openrouter.ai",
            stream_usage="always",
            api_root="/api/v1",
            responses_api=True,
            key_prefixes=("sk-or-",),
        ),
        Provider(
            "fireworks",
            "https://api.fireworks.ai",
            stream_usage="unknown",
            api_root="/inference/v1",
            key_prefixes=("fw_",),
        ),
        Provider(
            "groq",
            "https://api.groq.com",
            stream_usage="always",
            api_root="/openai/v1",
            responses_api=True,
            key_prefixes=("gsk_",),
        ),
        Provider("deepseek", "https://api.deepseek.com", stream_usage="always", key_prefixes=("sk-",)),
        Provider("together", "https://api.together.xyz", stream_usage="unknown"),
        Provider("cerebras", "https://api.cerebras.ai", stream_usage="always", key_prefixes=("csk-", "csk_")),
        Provider("mistral", "https://api.mistral.ai", stream_usage="always"),
        Provider("xai", "https://api.x.ai", stream_usage="unknown", responses_api=True, key_prefixes=("xai-",)),
    )
}


class KeyFormats:
    """Whose key a caller's own key is, by the key_prefixes of every configured provider row.

    The rule: a key is its provider's when it begins with one of that provider's prefixes and no
    other provider's longer prefix. `sk-proj-…` is OpenAI's (its sk-proj- beats DeepSeek's sk-),
    `sk-ant-…` Anthropic's, a bare `sk-…` OpenAI's or DeepSeek's alike (both take it), and a key
    that begins with no known prefix is no one's in particular. A row with no prefixes takes any key:
    a local model server or a gateway of the operator's choosing whose keys egress can't know.
    One regular expression of every prefix, longest first, finds a key's longest in one C call.
    """

    __slots__ = ("_owners", "_pattern")

    def __init__(self, providers) -> None:
        owners: dict[bytes, set[str]] = {}
        for row in providers:
            for prefix in row.key_prefixes:
                owners.setdefault(prefix.encode(), set()).add(row.name)
        # Alternatives are tried in order: longest first, the first that matches is the longest.
        ordered = sorted(owners, key=lambda prefix: (-len(prefix), prefix))
        self._pattern = re.compile(b"|".join(map(re.escape, ordered))) if ordered else None
        self._owners = {prefix: tuple(sorted(names)) for prefix, names in owners.items()}

    def foreign_owners(self, key: bytes, provider: Provider) -> tuple[str, ...]:
        """The providers `key` belongs to when `provider` is not one of them, else (): sent to
        `provider`, it would hand one provider's secret to another."""
        if not provider.key_prefixes or self._pattern is None:
            return ()
        found = self._pattern.match(key)
        if found is None:
            return ()
        owners = self._owners[found.group()]
        return () if provider.name in owners else owners


HEALTH_PATH = b"/healthz"
# First path segments egress keeps for itself: "/v1/..." is the drop-in default route.
RESERVED_NAMES = frozenset({"healthz", "readyz", "metrics", "v1"})


@dataclass(frozen=True, slots=True)
class Route:
    provider: Provider
    upstream_target: bytes  # request-target to send upstream, query included
    api: str = "openai"  # the API its bodies speak, for the usage meter (usage.api_of)
    # The unified surface, routed by model once the body is read: "chat", "responses", "embeddings";
    # and the model list, "models" (`/v1/models`, and one of it: `/v1/models/{id}`).
    surface: str | None = None


_ROUTE_CACHE_SIZE = 4096


class Router:
    __slots__ = ("_by_segment", "_drop_in_anthropic", "_drop_in_openai", "_known", "_routes")

    def __init__(self, providers: dict[str, Provider] | object) -> None:
        rows = dict(providers)  # type: ignore[call-overload]
        self._by_segment = {name.encode("ascii"): row for name, row in rows.items()}
        self._known = ", ".join(sorted(rows))
        self._drop_in_anthropic = rows.get("anthropic")
        self._drop_in_openai = rows.get("openai")
        # Callers use a handful of paths: remember their routes. Targets with a query are never
        # kept, as a query may carry a credential.
        self._routes: dict[bytes, Route] = {}

    def resolve(self, target: bytes) -> Route:
        route = self._routes.get(target)
        if route is None:
            route = self._resolve(target)
            if b"?" not in target:
                if len(self._routes) >= _ROUTE_CACHE_SIZE:
                    self._routes.clear()  # rare, and cheap to refill
                self._routes[target] = route
        return route

    def _resolve(self, target: bytes) -> Route:
        if not target.startswith(b"/"):
            raise EgressError("bad_request", "the request target must be a path starting with '/'")
        _refuse_dot_segments(target)
        end = len(target)
        for stop in (b"/", b"?"):
            index = target.find(stop, 1)
            if index != -1 and index < end:
                end = index
        segment = target[1:end]
        provider = self._by_segment.get(segment)
        if provider is not None:
            rest = target[end:]
            if not rest.startswith(b"/"):
                rest = b"/" + rest  # "/openai" or "/openai?x" -> "/" or "/?x"
            return Route(provider, provider.origin.base_path + rest, _api(rest, provider))
        if segment == b"v1":
            path = target.split(b"?", 1)[0]
            surface = _SURFACES.get(path)
            if surface is None and path.startswith(b"/v1/models/") and path.count(b"/") == 3 and len(path) > 11:
                surface = "models"  # one model of the list: answered as the list has it
            if surface is not None and self._drop_in_openai is not None:
                # Routed by the body's model once it is read (surface.py); the OpenAI row stands in
                # until then, for the dialect of an early error.
                return Route(self._drop_in_openai, target, "openai", surface)
            route = self.drop_in(target)
            if route is not None:
                return route
        raise EgressError(
            "unknown_provider",
            f"unknown provider {segment.decode('latin-1')!r}; known providers: {self._known}",
        )

    def drop_in(self, target: bytes) -> Route | None:
        """A `/v1/...` target as the drop-in default sends it, unrouted by model: to anthropic for
        `/v1/messages…`, else to openai (what a surface path's other methods are: OpenAI's stored
        chat completions listed by GET, a fine-tuned model deleted)."""
        provider = self._drop_in_anthropic if _is_messages(target) else self._drop_in_openai
        if provider is None:
            return None
        return Route(provider, provider.origin.base_path + target, _api(target, provider))


# Google's APIs take an API key in the query (`?key=`, cloud.google.com/docs/authentication/api-keys-use),
# and Gemini's OpenAI-compatible endpoint is one of them: the query's only credential a caller sends.
_QUERY_CREDENTIAL = b"key"


def without_query_credential(route: Route) -> Route:
    """`route` with no `key` parameter in its upstream query, for a request egress sends a pool key
    on: the caller's own key must not reach the provider beside it. The rest of the target is kept
    byte for byte (order, encoding, empty parameters); a query left empty goes with its `?`. The
    same Route comes back when there is nothing to drop, as for every target without a query."""
    target = route.upstream_target
    path, mark, query = target.partition(b"?")
    if not mark:
        return route
    kept = [part for part in query.split(b"&") if _parameter_name(part) != _QUERY_CREDENTIAL]
    if len(kept) == query.count(b"&") + 1:
        return route
    return replace(route, upstream_target=path + b"?" + b"&".join(kept) if kept else path)


def query_credentials(target: bytes) -> list[bytes]:
    """The values of the `key` parameters in a target's query, decoded (`%2D` is `-` to the
    provider): the caller's own keys there, as `without_query_credential` finds them."""
    query = target.partition(b"?")[2]
    found = []
    for part in query.split(b"&"):
        if _parameter_name(part) == _QUERY_CREDENTIAL:
            value = part.partition(b"=")[2]
            found.append(unquote_to_bytes(value.replace(b"+", b" ")) if b"%" in value or b"+" in value else value)
    return found


def _parameter_name(part: bytes) -> bytes:
    name = part.partition(b"=")[0]
    # `%6Bey` is `key` to a server that decodes the query (WHATWG URL's urlencoded parser does).
    return unquote_to_bytes(name) if b"%" in name else name


def _api(target: bytes, provider: Provider) -> str:
    # Decided once per route (routes are cached), not per response.
    return api_of(target.split(b"?", 1)[0], provider.dialect)


def _refuse_dot_segments(target: bytes) -> None:
    """A path that could leave the provider's base path upstream is refused: `.` and `..` segments,
    literal or %2e-encoded, and `..;x` (a path parameter, as Tomcat reads it). The target goes
    upstream verbatim under the base path, and an upstream that resolves them (RFC 3986 §5.2.4, as
    most servers do) would serve a path outside that base (`/bp/../admin` -> `/admin`). So is a
    slash egress can't see: `%2f` (nginx decodes it before resolving dots) and a backslash, `\\`
    or `%5c` (WHATWG URL parsers, node's among them, read it as `/`): `/bp/..%2fadmin`. And a
    fragment, which a request target never has (RFC 9112 §3.2.1). nginx normalises instead;
    refusing keeps the relay byte for byte. Cached routes skip this."""
    path, _, query = target.partition(b"?")
    if b"#" in query:
        raise EgressError("bad_request", "a request target has no fragment ('#')")
    if b"/." not in path and b"%" not in path and b"\\" not in path and b";" not in path and b"#" not in path:
        return
    lowered = path.lower()
    if b"#" in path:
        raise EgressError("bad_request", "a request target has no fragment ('#')")
    if b"\\" in path or b"%2f" in lowered or b"%5c" in lowered:
        raise EgressError("bad_request", "the path must not contain an encoded slash or a backslash")
    for segment in lowered.split(b"/"):
        if segment.partition(b";")[0].replace(b"%2e", b".") in (b".", b".."):
            raise EgressError("bad_request", "the path must not contain '.' or '..' segments")


_SURFACES = {
    b"/v1/chat/completions": "chat",
    b"/v1/responses": "responses",
    b"/v1/embeddings": "embeddings",
    b"/v1/models": "models",
}


def _is_messages(target: bytes) -> bool:
    return target.startswith(b"/v1/messages") and target[12:13] in (b"", b"/", b"?")


def guess_dialect(target: bytes, has_anthropic_headers: bool) -> str:
    """The caller's dialect when no provider matched, so even a 404 reads right to its SDK."""
    if has_anthropic_headers or _is_messages(target) or target.startswith(b"/anthropic"):
        return "anthropic"
    return "openai"

"""The providers' own model lists, for `GET /v1/models` when a provider row names no `models`.

Contract: `ModelCatalog(config).models(name)` -> the last good list of that provider's model ids
(empty until the first fetch succeeds): a dict look-up, so `/v1/models` never waits on a provider
or on inference traffic (Bifrost PR #6304: its listing queued behind inference for minutes).
`catalog.start(state)` runs one background task per routed provider that has no `models` in its
row and has pool keys: it fetches the list with a pool key, then again every `model_list_refresh`
seconds (jittered); a failed fetch keeps the last good list, is logged (class and status, never a
key) and retried with a doubling back-off capped at the refresh interval. A reload calls `start`
again: lists of providers whose row kept its origin stay.

The wire (sans-IO here: `list_target`, `parse_list`):
  OpenAI and the OpenAI-compatible rows: GET {api_root}/models -> {"object":"list","data":[{"id":…}]}
      https://platform.openai.com/docs/api-reference/models/list
  Anthropic: GET /v1/models?limit=1000[&after_id=…] -> {"data":[{"id":…,"type":"model"}],
      "has_more":bool,"last_id":…}, paged by after_id: https://docs.anthropic.com/en/api/models-list
Each fetch is its own connection (upstream.UpstreamPool.open_stream), a few a provider an hour.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING
from urllib.parse import quote

import h11
import orjson

from egress.accesslog import log_event
from egress.errors import EgressError
from egress.providers import ANTHROPIC_VERSION

if TYPE_CHECKING:
    from egress.config import UpstreamConfig
    from egress.providers import Provider
    from egress.server import ServerState

# Names egress's own requests in the provider's logs, apart from the traffic it relays.
USER_AGENT = "egress (model list)"
_MAX_BODY = 8 * 1024 * 1024  # OpenAI's list is ~20 KiB
_MAX_PAGES = 20
_MAX_MODELS = 10_000
_MAX_ID = 256
_FIRST_RETRY = 5.0


class ListError(ValueError):
    """A model list egress can't read; the message names what is wrong, never a value."""


def list_target(provider: Provider, after: str | None = None) -> bytes:
    """The request-target of a provider's model list (one page of it)."""
    base = provider.origin.base_path + provider.api_root.encode()
    if provider.dialect == "anthropic":
        query = b"?limit=1000" + (b"&after_id=" + _query_value(after) if after else b"")
        return base + b"/models" + query
    return base + b"/models"


def list_headers(provider: Provider, credential: tuple[bytes, bytearray], user_agent: str) -> list:
    """The head of a model-list request made with one account's credential (one request, then close)."""
    headers = [
        (b"host", provider.origin.host_header),
        credential,
        (b"accept", b"application/json"),
        (b"user-agent", user_agent.encode()),
        (b"connection", b"close"),
    ]
    if provider.dialect == "anthropic":
        headers.append((b"anthropic-version", ANTHROPIC_VERSION))
    return headers


def _query_value(value: str) -> bytes:
    return quote(value, safe="").encode("ascii")


def parse_list(body: bytes) -> tuple[list[str], str | None]:
    """One page: its model ids, and the `after_id` of the next page (None when it is the last)."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ListError("the model list is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("data"), list):
        raise ListError("the model list has no 'data' array")
    ids = []
    for entry in document["data"]:
        model = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(model, str) or not model or len(model) > _MAX_ID or not model.isprintable():
            raise ListError("a model list entry has no usable 'id'")
        ids.append(model)
    last = document.get("last_id")
    more = document.get("has_more") is True and isinstance(last, str) and bool(last)
    return ids, (last if more else None)


class ModelCatalog:
    __slots__ = ("_failures", "_lists", "_origins", "_tasks", "refresh", "timeout")

    def __init__(self, config: UpstreamConfig) -> None:
        self.refresh = config.model_list_refresh
        self.timeout = config.model_list_timeout
        self._lists: dict[str, tuple[str, ...]] = {}
        self._origins: dict[str, str] = {}  # provider -> the origin its list came from
        self._tasks: dict[str, asyncio.Task] = {}
        self._failures: dict[str, int] = {}  # failed fetches in a row, by provider

    def models(self, name: str) -> tuple[str, ...]:
        return self._lists.get(name, ())

    def snapshot(self) -> dict[str, tuple[str, ...]]:
        return dict(self._lists)

    def start(self, state: ServerState) -> None:
        """(Re)start the fetchers for the current config; a reload keeps still-valid lists."""
        self.refresh = state.config.upstream.model_list_refresh
        self.timeout = state.config.upstream.model_list_timeout
        self.stop()
        wanted = {
            provider.name: provider
            for provider in state.model_routes.routed_providers()
            if not provider.models and provider.name in state.auth.pools and provider.dialect in _DIALECTS
        }
        for name in list(self._lists):
            provider = wanted.get(name)
            if provider is None or self._origins.get(name) != provider.base_url:
                del self._lists[name]
        loop = asyncio.get_running_loop()
        for name, provider in wanted.items():
            self._tasks[name] = loop.create_task(self._keep_fresh(state, provider))

    def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    async def _keep_fresh(self, state: ServerState, provider: Provider) -> None:
        retry = min(_FIRST_RETRY, self.refresh)
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    models = await self._fetch(state, provider)
            except (EgressError, ListError, OSError, TimeoutError, h11.ProtocolError) as exc:
                log_event("model_list_failed", provider=provider.name, error=_describe(exc))
                state.metrics.tally.add(("model_lists", provider.name, "error"))
                self._failures[provider.name] = self._failures.get(provider.name, 0) + 1
                await asyncio.sleep(_jittered(retry))
                retry = min(retry * 2, self.refresh)
                continue
            self._lists[provider.name] = models
            self._origins[provider.name] = provider.base_url
            state.metrics.tally.add(("model_lists", provider.name, "ok"))
            self._failures.pop(provider.name, None)
            retry = min(_FIRST_RETRY, self.refresh)
            await asyncio.sleep(_jittered(self.refresh))

    async def _fetch(self, state: ServerState, provider: Provider) -> tuple[str, ...]:
        pool = state.auth.pools.get(provider.name)
        if pool is None:
            raise EgressError("no_pool_key", f"no pool key is configured for {provider.name}")
        models: list[str] = []
        after = None
        for _ in range(_MAX_PAGES):
            # The pool's accounts in turn across failed fetches, never moving the traffic's choice;
            # `pool` is held for the fetch, so the key stays unwiped.
            accounts = pool.accounts
            account = accounts[self._failures.get(provider.name, 0) % len(accounts)]
            headers = list_headers(provider, account.credential(), USER_AGENT)
            status, body = await _get(state.pool, provider, list_target(provider, after), headers)
            if status != 200:
                raise ListError(f"the provider answered {status}")
            page, after = parse_list(body)
            models += page
            if len(models) > _MAX_MODELS:
                raise ListError(f"the model list has more than {_MAX_MODELS} entries")
            if after is None:
                return tuple(dict.fromkeys(models))
        raise ListError(f"the model list has more than {_MAX_PAGES} pages")


_DIALECTS = ("openai", "anthropic")


async def _get(pool, provider: Provider, target: bytes, headers: list) -> tuple[int, bytes]:
    reader, writer = await pool.open_stream(provider.origin)
    try:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        writer.write(conn.send(h11.Request(method="GET", target=target, headers=headers)))
        writer.write(conn.send(h11.EndOfMessage()))
        status = 0
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_BODY:
                    raise ListError("the model list is larger than 8 MiB")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, bytes(body)
    finally:
        writer.close()


def _jittered(seconds: float) -> float:
    return seconds * random.uniform(0.9, 1.1)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, EgressError):
        return exc.code
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    if isinstance(exc, h11.ProtocolError):
        return "malformed HTTP response"
    return str(exc)

"""A local stand-in for an LLM provider, speaking OpenAI's and Anthropic's real wire formats.

It runs its own event loop in a thread, serves HTTP/1.1 over TLS (trustme certificate) with
keep-alive, parses requests with h11 and records every request and every response body it sends,
so tests compare egress's output with the provider's byte for byte.

Wire formats follow the providers' documentation:
  OpenAI chat completions and streaming chunks:
    https://platform.openai.com/docs/api-reference/chat/create
    https://platform.openai.com/docs/api-reference/chat-streaming
  Anthropic messages and their SSE event sequence:
    https://docs.anthropic.com/en/api/messages
    https://docs.anthropic.com/en/docs/build-with-claude/streaming

Scenarios are chosen by the `x-fake-scenario` request header (which egress passes through, as it
passes any unknown header):
  long-stream    N events (x-fake-events) every x-fake-interval seconds
  big-stream     x-fake-bytes of SSE as fast as the peer reads; `bytes_sent` counts what got out
  cut-stream     two events, then the TCP connection is aborted mid-body
  bad-header     a response header whose value carries a bare CR
  slow-head      waits x-fake-delay seconds before the status line
  until-close    an HTTP/1.0-style response framed by closing the connection
  rate-limited   OpenAI's 429 body and rate-limit headers (on /messages: Anthropic's, see below)

Anthropic `/v1/messages` is strict by default (`FakeProvider.strict_anthropic`): a request the real
Messages API refuses gets its 400 `{"type":"error","error":{"type":"invalid_request_error",...}}`
(https://docs.anthropic.com/en/api/errors) before any scenario runs; see `validate_anthropic_request`
for the rules and their sources. The transport scenarios above (long-stream, big-stream, cut-stream,
slow-head) test framing, not content, and skip the check. Anthropic scenarios, streamed when the
request says `"stream": true` (the SSE sequence of
https://docs.anthropic.com/en/docs/build-with-claude/streaming: message_start, content_block_start,
ping, content_block_delta..., content_block_stop per block, message_delta with cumulative usage,
message_stop; every event with its `event:` line):
  (none)          one text block, "Hello from the fake provider.", stop_reason end_turn
  tool-call       one tool_use block calling the first tool of `tools` with a minimal input valid for
                  its input_schema; stop_reason tool_use (the default text without tools or under
                  tool_choice none)
  parallel-tools  a text block, then two tool_use blocks (the first two tools, or the first one twice;
                  only one when tool_choice.disable_parallel_tool_use); stop_reason tool_use
  thinking        a thinking block (with its signature) then a text block, when the request enables
                  thinking (`enabled` or `adaptive`); only the text block otherwise
  thinking-tool-call  with thinking enabled: a thinking block, a redacted_thinking block, then the
                  tool_use of `tool-call`, stop_reason tool_use; once the conversation ends with tool
                  results, a thinking block and a text answer instead (end_turn). Without thinking: as
                  `tool-call`
  echo-images     a text block "images=N base64=B url=U media_types=..." counting the image blocks of
                  the request (message content and tool_result content)
  (output_config.format json_schema) the answer text of any scenario is `minimal_instance(schema)`
                  as JSON instead of the default text
  json-tool       when tool_choice forces a tool (`tool`: that one, `any`: the first), its tool_use
                  with a minimal valid input and no text; a plain text answer otherwise
  rate-limited    429 rate_limit_error with retry-after and anthropic-ratelimit-* headers
  overloaded      529 overloaded_error
  stream-error    message_start, a text block start and one text delta, then
                  `event: error` {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}
                  and the body ends (a non-streamed request gets the 529 instead)
  stream-cut      the text answer cut mid-body by a TCP abort: no message_stop (streamed: after two
                  text deltas; not streamed: half the JSON body)
Tool ids are unique per response (`toolu_<request id>_<n>`), so a conversation fed back stays valid.
Thinking signatures are a hash of the thinking text and redacted data carries a hash of its own
(`sign_thinking`, `redacted_data`), so the fake checks what it gets back as the real service does:
a thinking block whose text or signature changed is refused, and so is a final assistant turn with
tool_use that does not open with its thinking blocks when thinking is on (`_thinking_first`).
Usage is consistent within each answer: streamed output_tokens (cumulative, in message_delta) equal the
non-streamed ones (except the historic default scenario: 7 non-streamed, 6 streamed); a request
carrying any `cache_control` reports `cache_creation_input_tokens` > 0 the first time and
`cache_read_input_tokens` the same amount when the same prompt comes again.
For tests: `TINY_PNG_BASE64` (base64 image data is decoded and must match its media_type, as the real
service checks), `minimal_instance(schema)` (the tool input the fake sends) and `RecordedRequest.json()`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import itertools
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import NoReturn

import h11
import orjson

from egress.catalog import USER_AGENT as MODEL_LIST_AGENT


@dataclass
class RecordedRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    response_id: str

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def json(self):
        return orjson.loads(self.body)


@dataclass
class StreamRecord:
    """What happened to one streamed response, seen from the provider."""

    response_id: str
    bytes_sent: int = 0
    peer_closed_at: float | None = None
    finished: bool = False
    chunks: list[bytes] = field(default_factory=list)


class FakeProvider:
    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        self._ssl = ssl_context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="fake-provider")
        self._server: asyncio.AbstractServer | None = None
        self._ids = itertools.count(1)
        self.port = 0
        self.requests: list[RecordedRequest] = []
        # egress's own model-list fetches (catalog.py), apart: they come in the background, at any time.
        self.list_fetches: list[RecordedRequest] = []
        self.sent_bodies: dict[str, bytes] = {}
        self.streams: dict[str, StreamRecord] = {}
        self.connections_opened = 0
        self.connections_closed = 0
        # Refuse, as the real Messages API does, what it refuses (see validate_anthropic_request).
        self.strict_anthropic = True
        # Prompts seen with a cache_control marker: the second time they are cache reads.
        self._prompt_cache: set[bytes] = set()

    @property
    def base_url(self) -> str:
        scheme = "https" if self._ssl else "http"
        return f"{scheme}://localhost:{self.port}"

    def start(self) -> FakeProvider:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        future.result(timeout=10)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def request_for(self, response_id: str) -> RecordedRequest:
        return next(r for r in self.requests if r.response_id == response_id)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve_connection, "127.0.0.1", 0, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]

    # -- connection handling ----------------------------------------------------------------
    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_opened += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await _read_request(conn, reader)
                if request is None:
                    return
                keep_open = await self._respond(conn, request, body, reader, writer)
                if not keep_open or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError, ssl.SSLError, asyncio.CancelledError):
            return
        finally:
            self.connections_closed += 1
            writer.close()

    async def _respond(self, conn, request: h11.Request, body: bytes, reader, writer) -> bool:
        response_id = f"req_fake{next(self._ids):06d}"
        headers = [(k.decode().lower(), v.decode("latin-1")) for k, v in request.headers]
        recorded = RecordedRequest(
            request.method.decode(), request.target.decode("latin-1"), headers, body, response_id
        )
        if recorded.header("user-agent") == MODEL_LIST_AGENT:
            self.list_fetches.append(recorded)
        else:
            self.requests.append(recorded)
        scenario = recorded.header("x-fake-scenario") or ""
        target = recorded.target.split("?")[0]
        try:
            payload = orjson.loads(body) if body and recorded.header("content-type") == "application/json" else {}
        except orjson.JSONDecodeError:
            payload = {}

        failing = recorded.header("x-fake-overloaded-model")
        if failing and payload.get("model") in [name.strip() for name in failing.split(",")]:
            # That model is overloaded here, as each provider says it: Anthropic's 529
            # overloaded_error (docs.anthropic.com/en/api/errors), OpenAI's 503 "The engine is
            # currently overloaded" (platform.openai.com/docs/guides/error-codes).
            extra = (
                [("retry-after", recorded.header("x-fake-retry-after"))]
                if recorded.header("x-fake-retry-after")
                else []
            )
            if target.endswith("/messages"):
                await self._anthropic_error(conn, writer, 529, "overloaded_error", "Overloaded", response_id, extra)
            else:
                error = {
                    "error": {
                        "message": "The engine is currently overloaded, please try again later",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                }
                await self._send_json(conn, writer, 503, error, response_id, extra)
            return True
        if scenario == "slow-head":
            await asyncio.sleep(float(recorded.header("x-fake-delay") or "5"))
        if scenario == "bad-header":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-bad: a\rb\r\n\r\n{}")
            await writer.drain()
            return False
        if scenario == "early-hints":
            # 103 Early Hints before the answer (RFC 8297), in the same write or in a later one.
            writer.write(conn.send(h11.InformationalResponse(status_code=103, headers=[("link", "</a.css>")])))
            if recorded.header("x-fake-split"):
                await writer.drain()
                await asyncio.sleep(0.05)
            models = {"object": "list", "data": []}
            await self._send_json(conn, writer, 200, models, response_id)
            return True
        if scenario == "huge-head":
            # A head that never ends: one header value, 1 MiB and growing.
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-huge: ")
            for _ in range(64):
                writer.write(b"a" * 16384)
                await writer.drain()
            await reader.read()  # until egress gives up on it
            return False
        if scenario == "extra-response":
            # A provider that breaks framing: a second, unrequested response in the same write.
            body_bytes = b'{"object":"list","data":[]}'
            self.sent_bodies[response_id] = body_bytes
            head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            writer.write(head % len(body_bytes) + body_bytes + head % 2 + b"{}")
            await writer.drain()
            await reader.read()  # until egress closes the connection
            return False
        if scenario == "until-close":
            body_bytes = b'{"object":"list","data":[]}'
            self.sent_bodies[response_id] = body_bytes
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n" + body_bytes)
            await writer.drain()
            return False
        if target.endswith("/messages") and request.method == b"POST":
            return await self._anthropic(conn, reader, writer, recorded, body, payload, scenario)
        if scenario == "rate-limited":
            error = {
                "error": {
                    "message": "Rate limit reached for requests",
                    "type": "requests",
                    "param": None,
                    "code": "rate_limit_exceeded",
                }
            }
            extra = [("retry-after", "1"), ("x-ratelimit-remaining-requests", "0")]
            await self._send_json(conn, writer, 429, error, response_id, extra)
            return True
        if target.endswith("/chat/completions") and request.method == b"POST":
            if payload.get("stream"):
                return await self._stream(
                    conn, reader, writer, response_id, _openai_events(payload), scenario, recorded
                )
            await self._send_json(conn, writer, 200, _openai_completion(payload, response_id), response_id)
            return True
        if target.endswith("/models") and request.method in (b"GET", b"HEAD"):
            models = {"object": "list", "data": [{"id": "gpt-fake", "object": "model", "owned_by": "fake"}]}
            await self._send_json(conn, writer, 200, models, response_id, head=request.method == b"HEAD")
            return True
        if target.endswith("/embeddings"):
            embedding = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}]}
            await self._send_json(conn, writer, 200, embedding, response_id)
            return True
        not_found = {"error": {"message": f"Unknown path {target}", "type": "invalid_request_error", "code": None}}
        await self._send_json(conn, writer, 404, not_found, response_id)
        return True

    async def _anthropic(self, conn, reader, writer, recorded: RecordedRequest, body, payload, scenario) -> bool:
        response_id = recorded.response_id
        if self.strict_anthropic and scenario not in TRANSPORT_SCENARIOS:
            try:
                payload = orjson.loads(body)
            except orjson.JSONDecodeError:
                payload = None
            try:
                validate_anthropic_request(payload, recorded)
            except AnthropicInvalidRequest as refusal:
                await self._anthropic_error(conn, writer, 400, "invalid_request_error", str(refusal), response_id)
                return True
        if scenario == "rate-limited":
            # https://docs.anthropic.com/en/api/rate-limits#response-headers
            extra = [
                ("retry-after", "1"),
                ("anthropic-ratelimit-requests-limit", "50"),
                ("anthropic-ratelimit-requests-remaining", "0"),
                ("anthropic-ratelimit-requests-reset", "2026-11-23T00:00:01Z"),
                ("anthropic-ratelimit-tokens-limit", "40000"),
                ("anthropic-ratelimit-tokens-remaining", "0"),
                ("anthropic-ratelimit-tokens-reset", "2026-11-23T00:00:01Z"),
            ]
            message = "This request would exceed the rate limit for your organization of 50 requests per minute."
            await self._anthropic_error(conn, writer, 429, "rate_limit_error", message, response_id, extra)
            return True
        if scenario == "overloaded" or (scenario == "stream-error" and not payload.get("stream")):
            await self._anthropic_error(conn, writer, 529, "overloaded_error", "Overloaded", response_id)
            return True
        usage = self._anthropic_input_usage(payload)
        if payload.get("stream"):
            events = _anthropic_events(payload, scenario, response_id, usage)
            return await self._stream(conn, reader, writer, response_id, events, scenario, recorded)
        message = _anthropic_message(payload, scenario, response_id, usage)
        if scenario == "stream-cut":
            document = orjson.dumps(message)
            self.sent_bodies[response_id] = document[: len(document) // 2]
            headers = [("content-type", "application/json"), ("content-length", str(len(document)))]
            writer.write(conn.send(h11.Response(status_code=200, headers=[*headers, ("request-id", response_id)])))
            writer.write(conn.send(h11.Data(data=self.sent_bodies[response_id])))
            await writer.drain()
            writer.transport.abort()
            return False
        await self._send_json(conn, writer, 200, message, response_id, anthropic=True)
        return True

    def _anthropic_input_usage(self, payload: dict) -> dict | None:
        """Input-side usage for a request with a cache_control marker; None without one."""
        if not _has_cache_control(payload):
            return None
        prompt = orjson.dumps(
            {key: payload.get(key) for key in ("model", "system", "tools", "messages")}, option=orjson.OPT_SORT_KEYS
        )
        cached = max(1, len(prompt) // 4)
        if prompt in self._prompt_cache:
            return {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}
        self._prompt_cache.add(prompt)
        return {"input_tokens": 12, "cache_creation_input_tokens": cached, "cache_read_input_tokens": 0}

    async def _anthropic_error(self, conn, writer, status, kind, message, response_id, extra=()):
        # https://docs.anthropic.com/en/api/errors#error-shapes: a top-level error object with type and
        # message, and a request_id.
        document = {"type": "error", "error": {"type": kind, "message": message}, "request_id": response_id}
        await self._send_json(conn, writer, status, document, response_id, extra, anthropic=True)

    async def _send_json(self, conn, writer, status, document, response_id, extra=(), anthropic=False, head=False):
        body = orjson.dumps(document)
        self.sent_bodies[response_id] = body
        overridden = {name for name, _ in extra}
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("request-id" if anthropic else "x-request-id", response_id),
            *(header for header in _rate_limit_headers(anthropic) if header[0] not in overridden),
            *extra,
        ]
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)))
        if not head:
            writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()

    async def _stream(self, conn, reader, writer, response_id, events, scenario, recorded) -> bool:
        anthropic = recorded.target.split("?")[0].endswith("/messages")
        record = StreamRecord(response_id)
        self.streams[response_id] = record
        headers = [
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-cache"),
            ("transfer-encoding", "chunked"),
            ("request-id" if anthropic else "x-request-id", response_id),
            *_rate_limit_headers(anthropic),
        ]
        writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
        watcher = asyncio.ensure_future(_watch_peer_close(reader, record))
        try:
            if scenario == "long-stream":
                count = int(recorded.header("x-fake-events") or "20")
                interval = float(recorded.header("x-fake-interval") or "0.05")
                events = _numbered_events(count, anthropic)
            elif scenario == "big-stream":
                total = int(recorded.header("x-fake-bytes") or str(64 * 1024 * 1024))
                events = _filler_events(total)
                interval = 0.0
            else:
                interval = 0.0
            for index, event in enumerate(events):
                if record.peer_closed_at is not None:
                    return False
                if event is CUT or (scenario == "cut-stream" and index == 2):
                    self.sent_bodies[response_id] = b"".join(record.chunks)
                    writer.transport.abort()  # mid-body, no terminating chunk
                    return False
                writer.write(conn.send(h11.Data(data=event)))
                if scenario != "big-stream":
                    record.chunks.append(event)
                await writer.drain()
                record.bytes_sent += len(event)
                # drain() doesn't yield while the transport accepts writes; without a yield the loop
                # never runs the callbacks that report a peer gone, and writes vanish into a dead socket.
                await asyncio.sleep(interval)
            # Recorded before the last bytes leave: the client may compare as soon as it has them.
            self.sent_bodies[response_id] = b"".join(record.chunks)
            record.finished = True
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            return True
        except ConnectionError:
            if record.peer_closed_at is None:
                record.peer_closed_at = time.monotonic()
            return False
        finally:
            watcher.cancel()
            try:
                await watcher
            except asyncio.CancelledError:
                pass


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader):
    request = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            conn.receive_data(data)
            if not data and request is None:
                return None, b""
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None, b""


async def _watch_peer_close(reader: asyncio.StreamReader, record: StreamRecord) -> None:
    try:
        while await reader.read(65536):
            pass
    except (ConnectionError, ssl.SSLError):
        pass
    if record.peer_closed_at is None and not record.finished:
        record.peer_closed_at = time.monotonic()


def _rate_limit_headers(anthropic: bool) -> list[tuple[str, str]]:
    if anthropic:
        return [
            ("anthropic-ratelimit-requests-limit", "4000"),
            ("anthropic-ratelimit-requests-remaining", "3999"),
            ("anthropic-ratelimit-requests-reset", "2026-11-23T00:00:01Z"),
        ]
    return [
        ("openai-processing-ms", "12"),
        ("x-ratelimit-limit-requests", "10000"),
        ("x-ratelimit-remaining-requests", "9999"),
        ("x-ratelimit-reset-requests", "6ms"),
    ]


def _sse(document: dict | str, event: str | None = None) -> bytes:
    data = document if isinstance(document, str) else orjson.dumps(document).decode()
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {data}\n\n".encode()


def _openai_completion(payload: dict, response_id: str) -> dict:
    return {
        "id": "chatcmpl-fake1",
        "object": "chat.completion",
        "created": 1795400000,
        "model": payload.get("model", "gpt-fake"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the fake provider.", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 7,
            "total_tokens": 19,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
        "system_fingerprint": "fp_fake",
    }


def _openai_events(payload: dict) -> list[bytes]:
    model = payload.get("model", "gpt-fake")
    base = {
        "id": "chatcmpl-fake2",
        "object": "chat.completion.chunk",
        "created": 1795400000,
        "model": model,
        "system_fingerprint": "fp_fake",
    }
    include_usage = bool((payload.get("stream_options") or {}).get("include_usage"))
    usage_null = {"usage": None} if include_usage else {}
    events = [
        _sse(
            {
                **base,
                "choices": [
                    {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                ],
                **usage_null,
            }
        )
    ]
    for piece in ("Hello", " from", " the", " fake", " provider", "."):
        events.append(
            _sse(
                {
                    **base,
                    "choices": [{"index": 0, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}],
                    **usage_null,
                }
            )
        )
    events.append(
        _sse({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}], **usage_null})
    )
    if include_usage:
        events.append(
            _sse({**base, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}})
        )
    events.append(_sse("[DONE]"))
    return events


# -- Anthropic Messages: the answers ---------------------------------------------------------------

TRANSPORT_SCENARIOS = frozenset({"long-stream", "big-stream", "cut-stream", "slow-head"})
CUT = object()  # in an event list: abort the connection there, mid-body

# A 1x1 transparent PNG, for tests that need an image the strict fake accepts.
TINY_PNG_BASE64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="

_DEFAULT_TEXT = "Hello from the fake provider."


def _anthropic_plan(payload: dict, scenario: str, response_id: str) -> tuple[list[dict], str]:
    """The content blocks and stop_reason the fake answers `payload` with under `scenario`."""
    tools = [tool for tool in payload.get("tools") or [] if "input_schema" in tool]
    choice = payload.get("tool_choice") or {"type": "auto"}
    thinking = (payload.get("thinking") or {}).get("type") in ("enabled", "adaptive")
    text = {"type": "text", "text": _DEFAULT_TEXT}
    form = (payload.get("output_config") or {}).get("format") or {}
    if form.get("type") == "json_schema":
        # Structured outputs: the answer is JSON valid for the schema (the service constrains the text).
        text = {"type": "text", "text": orjson.dumps(minimal_instance(form.get("schema"))).decode()}

    def call(tool: dict, number: int) -> dict:
        tool_id = f"toolu_{response_id}_{number}"
        return {
            "type": "tool_use",
            "id": tool_id,
            "name": tool["name"],
            "input": minimal_instance(tool["input_schema"]),
        }

    if scenario == "tool-call" and tools and choice.get("type") != "none":
        return [call(tools[0], 1)], "tool_use"
    if scenario == "parallel-tools" and tools and choice.get("type") != "none":
        blocks = [{"type": "text", "text": "Let me call the tools."}, call(tools[0], 1)]
        if not choice.get("disable_parallel_tool_use"):
            blocks.append(call(tools[1] if len(tools) > 1 else tools[0], 2))
        return blocks, "tool_use"
    if scenario == "json-tool" and tools and choice.get("type") in ("tool", "any"):
        named = [tool for tool in tools if tool["name"] == choice.get("name")]
        return [call((named or tools)[0], 1)], "tool_use"
    if scenario == "thinking" and thinking:
        return [_thinking("The user says hi; a greeting back fits."), text], "end_turn"
    if scenario == "thinking-tool-call" and tools and choice.get("type") != "none":
        if not thinking:
            return [call(tools[0], 1)], "tool_use"
        if _ends_with_tool_results(payload.get("messages")):
            return [_thinking("The tool answered; time to tell the user."), text], "end_turn"
        redacted = {"type": "redacted_thinking", "data": redacted_data(response_id)}
        return [_thinking(f"The user needs {tools[0]['name']}; call it."), redacted, call(tools[0], 1)], "tool_use"
    if scenario.startswith("tool-once") and tools and choice.get("type") != "none":
        # `tool-once:NAME:JSON`: call the tool NAME (else the first) with JSON as its input (else a
        # minimal valid one), once; when the tool's result comes back, answer with text.
        if _ends_with_tool_results(payload.get("messages")):
            return [{"type": "text", "text": "Done: the tool answered."}], "end_turn"
        _, _, rest = scenario.partition(":")
        name, _, given = rest.partition(":")
        tool = next((tool for tool in tools if tool["name"] == name), tools[0])
        block = call(tool, 1)
        if given:
            block["input"] = orjson.loads(given)
        return [{"type": "text", "text": "Running it."}, block], "tool_use"
    if scenario == "echo-images":
        images = list(_image_blocks(payload.get("messages") or []))
        kinds = [image["source"]["type"] for image in images]
        media = sorted({image["source"].get("media_type", "") for image in images} - {""})
        counts = f"images={len(images)} base64={kinds.count('base64')} url={kinds.count('url')}"
        summary = f"{counts} media_types={','.join(media)}"
        return [{"type": "text", "text": summary}], "end_turn"
    return [text], "end_turn"


# Signatures and redacted data are opaque to clients and checked by the service; here they are hashes
# under a key of the fake's own, so a block handed back changed in any way no longer matches.
_SIGNING_KEY = b"fake-provider-thinking\0"


def sign_thinking(thinking: str) -> str:
    """The signature the fake gives (and expects back with) a thinking block of this text."""
    return "EqQB" + base64.b64encode(hashlib.sha256(_SIGNING_KEY + thinking.encode()).digest()).decode()


def redacted_data(seed: str) -> str:
    """Opaque redacted_thinking data: 16 bytes and their 16-byte MAC, base64."""
    body = hashlib.sha256(b"redacted\0" + seed.encode()).digest()[:16]
    return base64.b64encode(body + hashlib.sha256(_SIGNING_KEY + body).digest()[:16]).decode()


def _redacted_data_valid(data: str) -> bool:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return False
    return len(raw) == 32 and raw[16:] == hashlib.sha256(_SIGNING_KEY + raw[:16]).digest()[:16]


def _thinking(text: str) -> dict:
    return {"type": "thinking", "thinking": text, "signature": sign_thinking(text)}


def _ends_with_tool_results(messages) -> bool:
    last = messages[-1] if isinstance(messages, list) and messages else None
    content = last.get("content") if isinstance(last, dict) and last.get("role") == "user" else None
    return isinstance(content, list) and bool(content) and content[0].get("type") == "tool_result"


def _image_blocks(messages: list):
    for message in messages:
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            if block.get("type") == "image":
                yield block
            elif block.get("type") == "tool_result" and isinstance(block.get("content"), list):
                yield from (inner for inner in block["content"] if inner.get("type") == "image")


def minimal_instance(schema: dict):
    """A small value valid for a JSON schema: required properties only, first enum value, etc."""
    if not isinstance(schema, dict):
        return {}
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for union in ("anyOf", "oneOf", "allOf"):
        if schema.get(union):
            return minimal_instance(schema[union][0])
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties") or {}
        return {name: minimal_instance(properties.get(name, {})) for name in schema.get("required") or []}
    if kind == "array":
        return [minimal_instance(schema.get("items") or {}) for _ in range(schema.get("minItems") or 0)]
    if kind == "string":
        return "x" * max(1, schema.get("minLength") or 0) if "minLength" in schema else "fake"
    if kind == "integer":
        return max(1, schema.get("minimum") or 1)
    if kind == "number":
        return max(1.5, schema.get("minimum") or 1.5)
    if kind == "boolean":
        return True
    return None


def _output_tokens(blocks: list[dict]) -> int:
    size = 0
    for block in blocks:
        size += len(block.get("text") or block.get("thinking") or "") + len(orjson.dumps(block.get("input") or {}))
    return max(1, size // 4)


def _usage(input_usage: dict | None, output_tokens: int) -> dict:
    cache = input_usage or {"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    return {
        "input_tokens": (input_usage or {}).get("input_tokens", 12),
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": cache["cache_creation_input_tokens"],
        "cache_read_input_tokens": cache["cache_read_input_tokens"],
    }


def _anthropic_message(payload: dict, scenario: str = "", response_id: str = "", input_usage: dict | None = None):
    blocks, stop_reason = _anthropic_plan(payload, scenario, response_id)
    default = blocks == [{"type": "text", "text": _DEFAULT_TEXT}]
    return {
        "id": "msg_fake1" if default else f"msg_{response_id or 'fake1'}",
        "type": "message",
        "role": "assistant",
        "model": payload.get("model", "claude-fake"),
        "content": blocks,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _usage(input_usage, 7 if default else _output_tokens(blocks)),
    }


def _anthropic_events(payload: dict, scenario: str = "", response_id: str = "", input_usage: dict | None = None):
    blocks, stop_reason = _anthropic_plan(payload, scenario, response_id)
    default = blocks == [{"type": "text", "text": _DEFAULT_TEXT}]
    usage = _usage(input_usage, 6 if default else _output_tokens(blocks))
    message = {
        "id": "msg_fake2" if default else f"msg_{response_id or 'fake2'}",
        "type": "message",
        "role": "assistant",
        "model": payload.get("model", "claude-fake"),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    events = [_sse({"type": "message_start", "message": message}, "message_start")]
    for index, block in enumerate(blocks):
        events += _block_events(index, block)
        if index == 0:
            events.insert(2, _sse({"type": "ping"}, "ping"))
        if scenario == "stream-error":
            events = events[:4]  # message_start, content_block_start, ping, one text delta
            error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
            return [*events, _sse(error, "error")]
        if scenario == "stream-cut":
            return [*events[:5], CUT]  # two text deltas, then the connection goes
    # Cumulative usage (https://docs.anthropic.com/en/docs/build-with-claude/streaming#event-types); the
    # historic default stream reports output_tokens alone.
    delta_usage = {"output_tokens": usage["output_tokens"]} if default and input_usage is None else usage
    events += [
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": delta_usage,
            },
            "message_delta",
        ),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return events


def _block_events(index: int, block: dict) -> list[bytes]:
    def delta(body: dict) -> bytes:
        return _sse({"type": "content_block_delta", "index": index, "delta": body}, "content_block_delta")

    kind = block["type"]
    if kind == "text":
        start = {"type": "text", "text": ""}
        words = block["text"].split(" ")
        deltas = [delta({"type": "text_delta", "text": w if i == 0 else " " + w}) for i, w in enumerate(words)]
        if block["text"] == _DEFAULT_TEXT:  # the historic pieces
            pieces = ("Hello", " from", " the", " fake", " provider", ".")
            deltas = [delta({"type": "text_delta", "text": piece}) for piece in pieces]
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}  # as the service starts one
        middle = len(block["thinking"]) // 2
        halves = (block["thinking"][:middle], block["thinking"][middle:])
        deltas = [delta({"type": "thinking_delta", "thinking": half}) for half in halves]
        deltas.append(delta({"type": "signature_delta", "signature": block["signature"]}))
    elif kind == "redacted_thinking":  # [THINK] "Thinking redaction": whole in its start, no deltas
        start = dict(block)
        deltas = []
    else:  # tool_use: the input arrives as partial JSON, starting with an empty piece
        start = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
        document = orjson.dumps(block["input"]).decode()
        third = max(1, len(document) // 3)
        pieces = ["", document[:third], document[third : 2 * third], document[2 * third :]]
        deltas = [
            delta({"type": "input_json_delta", "partial_json": piece})
            for i, piece in enumerate(pieces)
            if piece or i == 0
        ]
    return [
        _sse({"type": "content_block_start", "index": index, "content_block": start}, "content_block_start"),
        *deltas,
        _sse({"type": "content_block_stop", "index": index}, "content_block_stop"),
    ]


# -- Anthropic Messages: what the real API refuses -------------------------------------------------
#
# Sources, cited rule by rule below:
#   [API]    https://docs.anthropic.com/en/api/messages (request body) and the field lists of the
#            official SDK's request types (anthropic 2.12: anthropic/types/message_create_params.py,
#            *_block_param.py, tool_param.py, tool_choice_*_param.py, thinking_config_*_param.py)
#   [ERR]    https://docs.anthropic.com/en/api/errors: 400 invalid_request_error, the error shape
#   [THINK]  https://docs.anthropic.com/en/docs/build-with-claude/extended-thinking
#   [TOOLS]  https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/implement-tool-use
#   [CACHE]  https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching: "Cache prefixes are created
#            in the following order: tools, system, then messages"; "Mixing different TTLs"
#   [SEEN]   messages the real API answered with, quoted in public issue threads:
#            "Extra inputs are not permitted": anthropics/claude-code#4378, amrit110/oli#7
#            tool_use without tool_result: anthropics/claude-code#5989 (and #1237, #2697)
#            unexpected tool_use_id: anthropics/claude-code#13460, router-for-me/CLIProxyAPI#497
#            empty content: anthropics/claude-code#6774, tidyverse/ellmer#709
#            no messages: langgenius/dify#25953; empty text blocks: mckaywrigley/chatbot-ui#1656
#            budget vs max_tokens: ProfSynapse/nexus#17
#            thinking must open the final assistant turn: anomalyco/opencode#3077, mastra-ai/mastra#7799,
#              deepset-ai/haystack-core-integrations#2146
#            invalid thinking signature: anthropics/claude-code#10627, anthropics/anthropic-sdk-python#1598
# Not refused, on purpose: consecutive messages with the same role ([API]: "Consecutive user or
# assistant turns in your request will be combined into a single turn") and a first message from the
# assistant (refused in 2024, "first message must use the user role", lobehub/lobehub#1601; the
# current [API] text no longer requires it).


class AnthropicInvalidRequest(Exception):
    """A request the real Messages API answers with 400 invalid_request_error; str() is its message."""


_TOP_LEVEL = frozenset(
    {
        # [API] MessageCreateParams (SDK 2.12) ...
        *("model", "messages", "max_tokens", "stream", "system", "metadata", "stop_sequences", "thinking"),
        *("tools", "tool_choice", "cache_control", "container", "diagnostics", "inference_geo", "output_config"),
        *("service_tier", "speed", "user_profile_id", "workspace_id"),
        # ... and the sampling parameters the reference documents (temperature 0..1, top_p, top_k), which
        # the newest SDK no longer lists but the API still takes.
        *("temperature", "top_p", "top_k"),
    }
)
# Beta request fields ([API] beta MessageCreateParams), accepted with an anthropic-beta header.
_BETA_TOP_LEVEL = frozenset({"mcp_servers", "context_management", "compaction", "container", "output_format"})
_BLOCK_FIELDS = {
    # [API] the *_block_param.py types: every field a block may carry
    "text": {"type", "text", "cache_control", "citations"},
    "image": {"type", "source", "cache_control", "transformations"},
    "document": {"type", "source", "cache_control", "citations", "context", "title"},
    "search_result": {"type", "source", "title", "content", "cache_control", "citations"},
    "tool_use": {"type", "id", "name", "input", "cache_control", "caller", "toolset_name"},
    "tool_result": {"type", "tool_use_id", "content", "is_error", "cache_control", "toolset_name"},
    "thinking": {"type", "thinking", "signature"},
    "redacted_thinking": {"type", "data"},
}
# The other block types of [API] ContentBlockParam (server tools); their fields are not checked here.
_SERVER_BLOCKS = frozenset(
    {
        "server_tool_use",
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "tool_search_tool_result",
        "container_upload",
    }
)
_TOOL_FIELDS = {
    # [API] tool_param.py
    *("name", "input_schema", "description", "cache_control", "type", "strict", "input_examples"),
    *("allowed_callers", "defer_loading", "eager_input_streaming"),
}
_TOOL_CHOICE_FIELDS = {
    "auto": {"type", "disable_parallel_tool_use"},
    "any": {"type", "disable_parallel_tool_use"},
    "tool": {"type", "name", "disable_parallel_tool_use"},
    "none": {"type"},
}
_IMAGE_MEDIA = {  # [API] base64_image_source_param.py; the magic numbers the service checks the data against
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "image/webp": (b"RIFF",),
}
_EMAIL = re.compile(r"[^\s@]+@[^\s@]+\.[^\s@]+")  # an email address anywhere in a metadata.user_id
_ID_PATTERN = re.compile(r"^[a-zA-Z0-9_-]+$")  # tool_use ids, [SEEN] "String should match pattern"
_TOOL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")  # [TOOLS] tool names
_SERVER_TOOL_TYPE = re.compile(r"^[a-z_]+_\d{8}$")  # [API] ToolUnionParam: versioned server tool types


# [SO] https://platform.claude.com/docs/en/build-with-claude/structured-outputs, "JSON Schema
# limitations": what constrained decoding refuses. The wording of the refusal is the API's own
# ("output_format.schema: For 'integer' type, property 'minimum' is not supported": agentjido/req_llm
# issue #302), under the GA parameter's name.
_UNSUPPORTED_SCHEMA = {
    "integer": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
    "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"),
    "string": ("minLength", "maxLength"),
    "array": ("maxItems", "uniqueItems"),
    "object": ("minProperties", "maxProperties"),
}
_SCHEMA_FORMATS = {"date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4", "ipv6", "uuid"}


def _structured_schema(where: str, schema, depth: int = 0) -> None:
    if not isinstance(schema, dict) or depth > 64:
        return
    kinds = schema.get("type") if isinstance(schema.get("type"), list) else [schema.get("type")]
    for kind in kinds:
        for name in _UNSUPPORTED_SCHEMA.get(kind, ()):
            if name in schema:
                _refuse(f"{where}: For '{kind}' type, property '{name}' is not supported")
    if "array" in kinds and schema.get("minItems") not in (None, 0, 1):
        _refuse(f"{where}: For 'array' type, property 'minItems' only supports values 0 or 1")
    pattern = schema.get("pattern")
    if isinstance(pattern, str) and re.search(r"\(\?<?[=!]|(?<!\\)\\[bBk1-9]", pattern):
        # [SO] regex support: no lookaround, backreferences or word boundaries
        _refuse(f"{where}: For 'string' type, the pattern '{pattern}' uses an unsupported regex feature")
    if "string" in kinds and "format" in schema and schema["format"] not in _SCHEMA_FORMATS:
        _refuse(f"{where}: For 'string' type, format '{schema['format']}' is not supported")
    if "object" in kinds and schema.get("additionalProperties") is not False:
        _refuse(f"{where}: For 'object' type, 'additionalProperties' must be explicitly set to false")
    if "oneOf" in schema:
        _refuse(f"{where}: 'oneOf' is not supported")
    for name in ("items", "not"):
        _structured_schema(where, schema.get(name), depth + 1)
    for name in ("anyOf", "allOf", "prefixItems"):
        for item in schema.get(name) or ():
            _structured_schema(where, item, depth + 1)
    for name in ("properties", "$defs", "definitions"):
        for item in (schema.get(name) or {}).values():
            _structured_schema(where, item, depth + 1)


def _refuse(message: str) -> NoReturn:
    raise AnthropicInvalidRequest(message)


def _extra(where: str, value: dict, allowed) -> None:
    for key in value:
        if key not in allowed:
            _refuse(
                f"{where}.{key}: Extra inputs are not permitted" if where else f"{key}: Extra inputs are not permitted"
            )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cache_control(where: str, block: dict) -> None:
    control = block.get("cache_control")
    if control is None:
        return
    where = f"{where}.cache_control" if where else "cache_control"
    # [API] cache_control_ephemeral_param.py: {"type": "ephemeral", "ttl"?: "5m" | "1h"}
    if not isinstance(control, dict) or control.get("type") != "ephemeral":
        _refuse(f"{where}.type: Input should be 'ephemeral'")
    _extra(where, control, {"type", "ttl"})
    if control.get("ttl", "5m") not in ("5m", "1h"):
        _refuse(f"{where}.ttl: Input should be '5m' or '1h'")


def _has_cache_control(value) -> bool:
    if isinstance(value, dict):
        return "cache_control" in value or any(_has_cache_control(inner) for inner in value.values())
    if isinstance(value, list):
        return any(_has_cache_control(inner) for inner in value)
    return False


def _text_block(where: str, block: dict) -> None:
    if not isinstance(block.get("text"), str):
        _refuse(
            f"{where}.text.text: Field required"
            if "text" not in block
            else f"{where}.text: Input should be a valid string"
        )
    if not block["text"]:
        _refuse("messages: text content blocks must be non-empty")  # [SEEN]
    if not block["text"].strip():
        # [SEEN] a block of whitespace alone (" ", "\n\n"), in the system prompt or a message, tool results'
        # included: "messages: text content blocks must contain non-whitespace text" (anthropics/claude-code#23440,
        # anomalyco/opencode#31259), "system: ..." for the system prompt (BoltAI/BoltAI#165)
        field = "system" if where.startswith("system") else "messages"
        _refuse(f"{field}: text content blocks must contain non-whitespace text")


def _image_block(where: str, block: dict) -> None:
    source = block.get("source")
    if not isinstance(source, dict):
        _refuse(f"{where}.image.source: Field required")
    kind = source.get("type")
    if kind == "base64":
        _extra(f"{where}.image.source.base64", source, {"type", "media_type", "data"})
        media_type, data = source.get("media_type"), source.get("data")
        if media_type not in _IMAGE_MEDIA:
            _refuse(
                f"{where}.image.source.base64.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or "
                "'image/webp'"
            )
        if not isinstance(data, str) or not data:
            _refuse(f"{where}.image.source.base64.data: Field required")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            _refuse(f"{where}.image.source.base64.data: The image data is not valid base64.")
        if not raw.startswith(_IMAGE_MEDIA[media_type]):
            _refuse(
                f"{where}.image.source.base64: The image was specified using the {media_type} media type, but "
                "the image data does not match it."
            )
    elif kind == "url":
        _extra(f"{where}.image.source.url", source, {"type", "url"})
        if not isinstance(source.get("url"), str) or not source["url"].startswith(("https://", "http://")):
            _refuse(f"{where}.image.source.url.url: Input should be a valid URL")
    else:
        _refuse(
            f"{where}.image.source: Input tag '{kind}' found using 'type' does not match any of the expected tags: "
            "'base64', 'url', 'file'"
        )


def _content_block(where: str, block, role: str, inside_tool_result: bool = False) -> None:
    if not isinstance(block, dict):
        _refuse(f"{where}: Input should be a valid dictionary or object to extract fields from")
    kind = block.get("type")
    if kind not in _BLOCK_FIELDS and kind not in _SERVER_BLOCKS:
        _refuse(f"{where}: Input tag '{kind}' found using 'type' does not match any of the expected tags")
    if kind in _SERVER_BLOCKS:
        return
    _extra(f"{where}.{kind}", block, _BLOCK_FIELDS[kind])
    _cache_control(f"{where}.{kind}", block)
    if inside_tool_result and kind not in ("text", "image", "document", "search_result"):
        _refuse(
            f"{where}: Input tag '{kind}' found using 'type' does not match any of the expected tags: "
            "'text', 'image', 'search_result', 'document'"
        )
    if kind == "text":
        _text_block(where, block)
    elif kind == "image":
        _image_block(where, block)
    elif kind == "tool_use":
        # [API] tool_use_block_param.py: id, name and input (an object) are required
        for field, check in (("id", str), ("name", str), ("input", dict)):
            if field not in block:
                _refuse(f"{where}.tool_use.{field}: Field required")
            if not isinstance(block[field], check):
                _refuse(
                    f"{where}.tool_use.{field}: Input should be a valid {'dictionary' if check is dict else 'string'}"
                )
        if not _ID_PATTERN.match(block["id"]):
            _refuse(f"{where}.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'")
        if role != "assistant":
            _refuse(f"{where}: tool_use blocks may only appear in assistant messages")
    elif kind == "tool_result":
        # [API] tool_result_block_param.py: tool_use_id required; content a string or text/image/... blocks
        if not isinstance(block.get("tool_use_id"), str):
            _refuse(f"{where}.tool_result.tool_use_id: Field required")
        content = block.get("content", "")
        if isinstance(content, list):
            for number, inner in enumerate(content):
                _content_block(f"{where}.tool_result.content.{number}", inner, role, inside_tool_result=True)
        elif not isinstance(content, str):
            _refuse(f"{where}.tool_result.content: Input should be a valid string or list")
        elif content and not content.strip():
            # [SEEN] a string is read as one text block, and one of whitespace alone ("\n", "   " from a
            # shell tool) is refused as any other: "text content blocks must contain non-whitespace
            # text" (NousResearch/hermes-agent#97641, scalar tool_result content on Anthropic and Bedrock)
            _refuse("messages: text content blocks must contain non-whitespace text")
        if "is_error" in block and not isinstance(block["is_error"], bool):
            _refuse(f"{where}.tool_result.is_error: Input should be a valid boolean")
        if role != "user":
            _refuse(f"{where}: tool_result blocks may only appear in user messages")
    elif kind == "thinking":
        for field in ("thinking", "signature"):
            if not isinstance(block.get(field), str):
                _refuse(f"{where}.thinking.{field}: Field required")
        if block["signature"] != sign_thinking(block["thinking"]):
            # [SEEN] the service's answer to a signature that does not match the thinking text
            _refuse(f"{where}: Invalid `signature` in `thinking` block")
    elif kind == "redacted_thinking":
        if not isinstance(block.get("data"), str):
            _refuse(f"{where}.redacted_thinking.data: Field required")
        if not _redacted_data_valid(block["data"]):
            _refuse(f"{where}: Invalid `data` in `redacted_thinking` block")  # modelled on the above


def _messages(messages) -> None:
    if not isinstance(messages, list):
        _refuse("messages: Input should be a valid list")
    if not messages:
        _refuse("messages: at least one message is required")  # [SEEN]
    seen_tool_ids: set[str] = set()
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            _refuse(f"{where}: Input should be a valid dictionary")
        _extra(where, message, {"role", "content"})
        if message.get("role") not in ("user", "assistant"):
            _refuse(f"{where}.role: Input should be 'user' or 'assistant'")  # [API]: roles are user, assistant
        if "content" not in message:
            _refuse(f"{where}.content: Field required")
        content = message["content"]
        last_assistant = index == len(messages) - 1 and message["role"] == "assistant"
        if not isinstance(content, str | list):
            _refuse(f"{where}.content: Input should be a valid string or list")
        if not content and not last_assistant:
            # [SEEN] the final assistant message (prefill) alone may be empty
            _refuse(
                f"{where}: all messages must have non-empty content except for the optional final assistant message"
            )
        for number, block in enumerate(content if isinstance(content, list) else []):
            _content_block(f"{where}.content.{number}", block, message["role"])
            if block.get("type") == "tool_use":
                if block["id"] in seen_tool_ids:
                    _refuse(f"{where}.content.{number}: `tool_use` ids must be unique")
                seen_tool_ids.add(block["id"])
    _tool_pairing(messages)


def _tool_pairing(messages: list) -> None:
    """[TOOLS] tool results must immediately follow their tool uses; [SEEN] gives both messages."""
    for index, message in enumerate(messages):
        content = message["content"] if isinstance(message["content"], list) else []
        previous = messages[index - 1] if index else None
        asked: list[str] = []
        if previous is not None and previous["role"] == "assistant" and isinstance(previous["content"], list):
            asked = [block["id"] for block in previous["content"] if block.get("type") == "tool_use"]
        if message["role"] == "user":
            for number, block in enumerate(content):
                if block.get("type") == "tool_result" and block["tool_use_id"] not in asked:
                    _refuse(
                        f"messages.{index}.content.{number}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{block['tool_use_id']}. Each `tool_result` block must have a corresponding `tool_use` "
                        "block in the previous message."
                    )
        if message["role"] != "assistant":
            continue
        uses = [number for number, block in enumerate(content) if block.get("type") == "tool_use"]
        if not uses:
            continue
        ids = [content[number]["id"] for number in uses]
        following = messages[index + 1] if index + 1 < len(messages) else None
        answered: set[str] = set()
        if following is not None and following["role"] == "user" and isinstance(following["content"], list):
            # [TOOLS] in the user message, tool_result blocks come first; text may only follow them
            for block in following["content"]:
                if block.get("type") != "tool_result":
                    break
                answered.add(block["tool_use_id"])
        # Nothing but more tool uses may follow the first tool use of an assistant turn.
        trailing = all(block.get("type") == "tool_use" for block in content[uses[0] :])
        missing = [tool_id for tool_id in ids if tool_id not in answered or not trailing]
        if missing:
            _refuse(
                f"messages.{index + 1}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block in the "
                "next message."
            )


def _thinking_first(messages: list) -> None:
    """[THINK] "Preserving thinking blocks": with thinking on, the last assistant message, when it has
    tool_use blocks answered by tool results, must open with its thinking (or redacted_thinking)
    blocks; their signatures and data are checked in `_content_block`. [SEEN] gives the message."""
    last = max((index for index, message in enumerate(messages) if message["role"] == "assistant"), default=-1)
    if last < 0 or last + 1 == len(messages) or not isinstance(messages[last]["content"], list):
        return
    content, following = messages[last]["content"], messages[last + 1]["content"]
    if not any(block.get("type") == "tool_use" for block in content):
        return
    if not isinstance(following, list) or not following or following[0].get("type") != "tool_result":
        return
    found = content[0].get("type")
    if found not in ("thinking", "redacted_thinking"):
        _refuse(
            f"messages.{last}.content.0.type: Expected `thinking` or `redacted_thinking`, but found `{found}`. When "
            "`thinking` is enabled, a final `assistant` message must start with a thinking block (preceeding the "
            "lastmost set of `tool_use` and `tool_result` blocks). We recommend you include thinking blocks from "
            "previous turns. To avoid this requirement, disable `thinking`. Please consult our documentation at "
            "https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
        )


def _tools(tools) -> list[str]:
    if not isinstance(tools, list):
        _refuse("tools: Input should be a valid list")
    names = []
    for index, tool in enumerate(tools):
        where = f"tools.{index}"
        if not isinstance(tool, dict):
            _refuse(f"{where}: Input should be a valid dictionary")
        if tool.get("type") not in (None, "custom"):
            # A server tool (web_search_20250305, bash_20250124, ...) has its own schema; anything else is refused.
            if not isinstance(tool.get("type"), str) or not _SERVER_TOOL_TYPE.match(tool["type"]):
                _refuse(f"{where}: Input tag '{tool.get('type')}' found using 'type' does not match the expected tags")
            names.append(tool.get("name"))
            continue
        _extra(f"{where}.custom", tool, _TOOL_FIELDS)
        if "name" not in tool:
            _refuse(f"{where}.custom.name: Field required")
        if not isinstance(tool["name"], str) or not _TOOL_NAME_PATTERN.match(tool["name"]):
            _refuse(f"{where}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
        schema = tool.get("input_schema")
        if schema is None:
            _refuse(f"{where}.custom.input_schema: Field required")
        if not isinstance(schema, dict) or schema.get("type") != "object":
            _refuse(f"{where}.custom.input_schema.type: Input should be 'object'")  # [API] tool_param.py
        _cache_control(f"{where}.custom", tool)
        names.append(tool["name"])
    if len(set(names)) != len(names):
        _refuse("tools: Tool names must be unique.")
    return names


def validate_anthropic_request(payload, recorded: RecordedRequest | None = None) -> None:
    """Raise AnthropicInvalidRequest for a /v1/messages body (and headers) the real API refuses."""
    if recorded is not None and recorded.header("anthropic-version") is None:
        _refuse("anthropic-version: header is required")  # [API] headers: anthropic-version is required
    if not isinstance(payload, dict):
        _refuse("There was an issue with the format or content of your request: the body must be a JSON object.")
    beta = recorded is not None and (recorded.header("anthropic-beta") is not None or "beta=true" in recorded.target)
    _extra("", payload, _TOP_LEVEL | (_BETA_TOP_LEVEL if beta else frozenset()))
    for required in ("model", "messages", "max_tokens"):  # [API] the three required fields
        if required not in payload:
            _refuse(f"{required}: Field required")
    if not isinstance(payload["model"], str) or not payload["model"]:
        _refuse("model: Input should be a valid string")
    max_tokens = payload["max_tokens"]
    if not _is_int(max_tokens):
        _refuse("max_tokens: Input should be a valid integer")
    if max_tokens < 1:
        _refuse("max_tokens: Input should be greater than or equal to 1")  # [API] max_tokens: x >= 1
    _messages(payload["messages"])
    if "stream" in payload and not isinstance(payload["stream"], bool):
        _refuse("stream: Input should be a valid boolean")
    system = payload.get("system")
    if system is not None and not isinstance(system, str):
        # [API] system: a string or a list of text blocks
        if not isinstance(system, list):
            _refuse("system: Input should be a valid string or list")
        for index, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                _refuse(f"system.{index}.type: Input should be 'text'")
            _extra(f"system.{index}", block, _BLOCK_FIELDS["text"])
            _cache_control(f"system.{index}", block)
            _text_block(f"system.{index}", block)
    stops = payload.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops)):
        _refuse("stop_sequences: Input should be a valid list of strings")  # [API] stop_sequences: string[]
    for name, low, high in (("temperature", 0.0, 1.0), ("top_p", 0.0, 1.0)):  # [API] both range 0..1
        value = payload.get(name)
        if value is not None and not _is_number(value):
            _refuse(f"{name}: Input should be a valid number")
        if value is not None and value > high:
            _refuse(f"{name}: Input should be less than or equal to {high:g}")
        if value is not None and value < low:
            _refuse(f"{name}: Input should be greater than or equal to {low:g}")
    if payload.get("top_k") is not None and (not _is_int(payload["top_k"]) or payload["top_k"] < 0):
        _refuse("top_k: Input should be greater than or equal to 0")
    metadata = payload.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            _refuse("metadata: Input should be a valid dictionary")
        _extra("metadata", metadata, {"user_id"})  # [API] metadata_param.py: user_id only
        if metadata.get("user_id") is not None and not isinstance(metadata["user_id"], str):
            _refuse("metadata.user_id: Input should be a valid string")
        if isinstance(metadata.get("user_id"), str) and _EMAIL.search(metadata["user_id"]):
            # [SEEN] "metadata.user_id: user_id appears to contain an email address. Please send a uuid or
            # hash value in ..." (BerriAI/litellm#10106); [API] asks for "a uuid, hash value, or other
            # opaque identifier"
            _refuse("metadata.user_id: user_id appears to contain an email address. Please send a uuid or hash value")
    names = _tools(payload["tools"]) if "tools" in payload else []
    for index, tool in enumerate(payload.get("tools") or ()):
        if tool.get("strict") is True:  # strict tool use compiles input_schema as structured outputs do
            _structured_schema(f"tools.{index}.custom.input_schema", tool.get("input_schema"))
    form = (payload.get("output_config") or {}).get("format")
    if isinstance(form, dict) and form.get("type") == "json_schema":
        _structured_schema("output_config.format.schema", form.get("schema"))
    choice = payload.get("tool_choice")
    if choice is not None:
        kind = choice.get("type") if isinstance(choice, dict) else None
        if kind not in _TOOL_CHOICE_FIELDS:
            _refuse(
                f"tool_choice: Input tag '{kind}' found using 'type' does not match any of the expected tags: "
                "'auto', 'any', 'tool', 'none'"
            )
        _extra(f"tool_choice.{kind}", choice, _TOOL_CHOICE_FIELDS[kind])
        if kind == "tool" and not isinstance(choice.get("name"), str):
            _refuse("tool_choice.tool.name: Field required")
        if kind != "none" and not names:
            _refuse("tool_choice may only be specified while providing tools.")
        if kind == "tool" and choice["name"] not in names:
            _refuse(f"tool_choice.tool.name: Tool '{choice['name']}' not found in tools.")
        if "disable_parallel_tool_use" in choice and not isinstance(choice["disable_parallel_tool_use"], bool):
            _refuse(f"tool_choice.{kind}.disable_parallel_tool_use: Input should be a valid boolean")
    thinking = payload.get("thinking")
    if thinking is not None:
        kind = thinking.get("type") if isinstance(thinking, dict) else None
        if kind not in ("enabled", "disabled", "adaptive"):
            _refuse(
                f"thinking: Input tag '{kind}' found using 'type' does not match any of the expected tags: "
                "'enabled', 'disabled', 'adaptive'"
            )
        _extra(
            f"thinking.{kind}",
            thinking,
            {"type", "budget_tokens", "display"}
            if kind == "enabled"
            else {"type", "display"}
            if kind == "adaptive"
            else {"type"},
        )
        if kind == "enabled":
            budget = thinking.get("budget_tokens")
            if not _is_int(budget):
                _refuse("thinking.enabled.budget_tokens: Field required")
            if budget < 1024:  # [THINK] / [API]: "Must be ≥1024 and less than max_tokens"
                _refuse("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
            if budget >= max_tokens:
                _refuse(
                    "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult our documentation at "
                    "https://docs.claude.com/en/docs/build-with-claude/extended-thinking#max-tokens-and-context-window-size"
                )
        if kind in ("enabled", "adaptive"):
            # [THINK] thinking is not compatible with temperature or top_k changes, nor with forced tool use
            if payload.get("temperature") not in (None, 1, 1.0):
                _refuse(
                    "`temperature` may only be set to 1 when thinking is enabled. Please consult our "
                    "documentation at https://docs.claude.com/en/docs/build-with-claude/extended-thinking"
                )
            if payload.get("top_k") is not None:
                _refuse("`top_k` must be unset when thinking is enabled.")
            if choice is not None and choice.get("type") in ("any", "tool"):
                _refuse("Thinking may not be enabled when tool_choice forces tool use.")
            _thinking_first(payload["messages"])
    if payload.get("cache_control") is not None:
        _cache_control("", {"cache_control": payload["cache_control"]})
    marks = _cache_marks(payload)
    if len(marks) > 4:
        # [SEEN] {"type":"invalid_request_error","message":"A maximum of 4 blocks with cache_control may be
        # provided. Found 5."} (tghamm/Anthropic.SDK#50); "You can define up to 4 cache breakpoints"
        # (https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching)
        _refuse(f"A maximum of 4 blocks with cache_control may be provided. Found {len(marks)}.")
    shorter = False
    for where, control in marks:
        # [CACHE] "Mixing different TTLs": "Cache entries with longer TTL must appear before shorter TTLs
        # (i.e., a 1-hour cache entry must appear before any 5-minute cache entries)", a ttl left out
        # being 5m; [SEEN] the wording: kristianvast/hermes-claude-auth#31, Kocoro-lab/Shannon#169
        ttl = control.get("ttl", "5m") if isinstance(control, dict) else None
        if ttl == "1h" and shorter:
            _refuse(
                f"{where}.cache_control.ttl: a ttl='1h' cache_control block must not come after a ttl='5m' "
                "cache_control block. Note that blocks are processed in the following order: `tools`, `system`, "
                "`messages`."
            )
        shorter = shorter or ttl == "5m"


def _cache_marks(payload: dict) -> list[tuple[str, object]]:
    """(where, cache_control) of every block that has one, in [CACHE]'s prompt order: tools, system
    blocks, then message blocks, a tool result's own content before the result's mark."""
    blocks = [(f"tools.{index}", tool) for index, tool in enumerate(payload.get("tools") or ())]
    system = payload.get("system")
    blocks += [(f"system.{index}", block) for index, block in enumerate(system if isinstance(system, list) else ())]
    for number, message in enumerate(payload["messages"]):
        for index, block in enumerate(message["content"] if isinstance(message["content"], list) else ()):
            where = f"messages.{number}.content.{index}"
            inner = block.get("content") if isinstance(block, dict) and block.get("type") == "tool_result" else None
            for place, part in enumerate(inner if isinstance(inner, list) else ()):
                blocks.append((f"{where}.content.{place}", part))
            blocks.append((where, block))
    return [
        (where, block["cache_control"])
        for where, block in blocks
        if isinstance(block, dict) and block.get("cache_control") is not None
    ]


def _numbered_events(count: int, anthropic: bool) -> list[bytes]:
    if anthropic:
        return [
            _sse(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"{i} "}},
                "content_block_delta",
            )
            for i in range(count)
        ]
    return [
        _sse(
            {
                "id": "chatcmpl-long",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": f"{i} "}, "finish_reason": None}],
            }
        )
        for i in range(count)
    ] + [_sse("[DONE]")]


def _filler_events(total: int):
    event = _sse({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "x" * 16000}}]})
    for _ in range(max(1, total // len(event))):
        yield event

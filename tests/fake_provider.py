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
  rate-limited   OpenAI's 429 body and rate-limit headers
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import threading
import time
from dataclasses import dataclass, field

import h11
import orjson


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
        self.sent_bodies: dict[str, bytes] = {}
        self.streams: dict[str, StreamRecord] = {}
        self.connections_opened = 0
        self.connections_closed = 0

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
        self.requests.append(recorded)
        scenario = recorded.header("x-fake-scenario") or ""
        target = recorded.target.split("?")[0]
        payload = orjson.loads(body) if body and recorded.header("content-type") == "application/json" else {}

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
        if target.endswith("/messages") and request.method == b"POST":
            if payload.get("stream"):
                return await self._stream(
                    conn, reader, writer, response_id, _anthropic_events(payload), scenario, recorded
                )
            await self._send_json(conn, writer, 200, _anthropic_message(payload), response_id, anthropic=True)
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

    async def _send_json(self, conn, writer, status, document, response_id, extra=(), anthropic=False, head=False):
        body = orjson.dumps(document)
        self.sent_bodies[response_id] = body
        headers = [
            ("content-type", "application/json"),
            ("content-length", str(len(body))),
            ("request-id" if anthropic else "x-request-id", response_id),
            *_rate_limit_headers(anthropic),
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
                if scenario == "cut-stream" and index == 2:
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


def _anthropic_message(payload: dict) -> dict:
    return {
        "id": "msg_fake1",
        "type": "message",
        "role": "assistant",
        "model": payload.get("model", "claude-fake"),
        "content": [{"type": "text", "text": "Hello from the fake provider."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 12,
            "output_tokens": 7,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def _anthropic_events(payload: dict) -> list[bytes]:
    model = payload.get("model", "claude-fake")
    message = {
        "id": "msg_fake2",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 12,
            "output_tokens": 1,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }
    events = [
        _sse({"type": "message_start", "message": message}, "message_start"),
        _sse(
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            "content_block_start",
        ),
        _sse({"type": "ping"}, "ping"),
    ]
    for piece in ("Hello", " from", " the", " fake", " provider", "."):
        events.append(
            _sse(
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}},
                "content_block_delta",
            )
        )
    events += [
        _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 6},
            },
            "message_delta",
        ),
        _sse({"type": "message_stop"}, "message_stop"),
    ]
    return events


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

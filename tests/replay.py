"""A loopback upstream that answers with recorded provider responses (tests/recordings/<case>/).

Each request names its recording with an `x-replay-case: <dir name>` header; the answer is the
recorded status, headers and body bytes, unchanged. JSON bodies go out with Content-Length, SSE
bodies chunked. `x-replay-piece: N` sends the body as chunked chunks of N bytes, each written (and
so flushed) on its own, so egress sees the body cut at arbitrary byte boundaries. Every request
received is kept (method, target, headers, body) for the test to inspect.

Strict where the provider is strict: Mistral validates chat requests with `extra="forbid"`, so an
unknown top-level field (egress injecting `stream_options`, say) is a 422 there, not ignored.
The body below is the one Mistral's API returned for an unknown field, as quoted in
https://github.com/editor-code-assistant/eca/issues/231 (2025-12, `max_completion_tokens`) and
https://github.com/nomtek/mistralai_client_dart/issues/44 (same envelope, `loc` under `messages`).
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from tests.support import LoopbackServer

RECORDINGS = Path(__file__).with_name("recordings")

# Top-level chat-completion fields Mistral documents (https://docs.mistral.ai/api/#tag/chat) plus the
# ones the recorded requests sent and Mistral accepted (prompt_cache_key, reasoning_effort).
MISTRAL_CHAT_FIELDS = frozenset(
    {
        "model",
        "messages",
        "temperature",
        "top_p",
        "max_tokens",
        "stream",
        "stop",
        "random_seed",
        "metadata",
        "response_format",
        "tools",
        "tool_choice",
        "presence_penalty",
        "frequency_penalty",
        "n",
        "prediction",
        "parallel_tool_calls",
        "prompt_mode",
        "safe_prompt",
        "prompt_cache_key",
        "reasoning_effort",
    }
)

_REASONS = {200: b"OK", 422: b"Unprocessable Entity", 404: b"Not Found", 400: b"Bad Request"}


@dataclass(frozen=True)
class Recording:
    name: str
    meta: dict
    body: bytes

    @property
    def provider(self) -> str:
        return self.meta["provider"]

    @property
    def streaming(self) -> bool:
        return any(name == "content-type" and "text/event-stream" in value for name, value in self.headers)

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [(name, value) for name, value in self.meta["response"]["headers"]]

    @property
    def request_body(self) -> bytes:
        body = self.meta["request"]["body"]
        return b"" if body is None else orjson.dumps(body)  # None: a GET, no body


def load_recordings() -> dict[str, Recording]:
    found = {}
    for meta_path in sorted(RECORDINGS.glob("*/meta.json")):
        case = meta_path.parent
        found[case.name] = Recording(case.name, orjson.loads(meta_path.read_bytes()), (case / "body").read_bytes())
    return found


@dataclass(frozen=True)
class ReceivedRequest:
    method: str
    target: str
    headers: dict[str, str]  # names lower-cased; the last of repeated names
    body: bytes


def mistral_refusal(body: bytes) -> bytes | None:
    """Mistral's 422 for a chat request with a top-level field it does not accept, else None."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    details = [
        {
            "type": "extra_forbidden",
            "loc": ["body", name],
            "msg": "Extra inputs are not permitted",
            "input": value,
        }
        for name, value in document.items()
        if name not in MISTRAL_CHAT_FIELDS
    ]
    if not details:
        return None
    return orjson.dumps(
        {
            "object": "error",
            "message": {"detail": details},
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    )


class ReplayUpstream(LoopbackServer):
    """Plain HTTP/1.1 on loopback, one thread per connection, keep-alive, bounded waits."""

    def __init__(self, recordings: dict[str, Recording]) -> None:
        self.recordings = recordings
        self.requests: list[ReceivedRequest] = []
        self._lock = threading.Lock()
        super().__init__(backlog=64)

    def _serve(self, conn: socket.socket) -> None:
        for request in self._requests(conn, _parse_request):
            with self._lock:
                self.requests.append(request)
            try:
                self._answer(conn, request)
            except OSError:
                return

    def _answer(self, conn: socket.socket, request: ReceivedRequest) -> None:
        recording = self.recordings.get(request.headers.get("x-replay-case", ""))
        if recording is None:
            conn.sendall(_head(404, [("content-type", "application/json")], length=2) + b"{}")
            return
        if recording.provider == "mistral" and request.target.split("?", 1)[0].endswith("/chat/completions"):
            refusal = mistral_refusal(request.body)
            if refusal is not None:
                headers = [("content-type", "application/json")]
                conn.sendall(_head(422, headers, length=len(refusal)) + refusal)
                return
        piece = int(request.headers.get("x-replay-piece", "0") or 0)
        status = recording.meta["response"]["status"]
        body = recording.body
        if not piece and not recording.streaming:
            conn.sendall(_head(status, recording.headers, length=len(body)) + body)
            return
        conn.sendall(_head(status, recording.headers, length=None))
        step = piece or 16384
        for start in range(0, len(body), step):
            chunk = body[start : start + step]
            conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if piece:
                time.sleep(0)  # let egress read this piece on its own more often than not
        conn.sendall(b"0\r\n\r\n")


def _head(status: int, headers: list[tuple[str, str]], length: int | None) -> bytes:
    lines = [b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Status"))]
    lines += [f"{name}: {value}".encode("latin-1") for name, value in headers]
    lines.append(b"content-length: %d" % length if length is not None else b"transfer-encoding: chunked")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _parse_request(buffer: bytes) -> tuple[ReceivedRequest, bytes] | None:
    """One request (Content-Length or chunked body) off the front of `buffer`, or None for more."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    lines = buffer[:head_end].decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    rest = buffer[head_end + 4 :]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        position = 0
        while True:
            size_end = rest.find(b"\r\n", position)
            if size_end < 0:
                return None
            size = int(rest[position:size_end].split(b";", 1)[0], 16)
            if size == 0:
                trailers_end = rest.find(b"\r\n\r\n", size_end)
                if trailers_end < 0:
                    return None
                return ReceivedRequest(method, target, headers, bytes(body)), rest[trailers_end + 4 :]
            if len(rest) < size_end + 2 + size + 2:
                return None
            body += rest[size_end + 2 : size_end + 2 + size]
            position = size_end + 2 + size + 2
    length = int(headers.get("content-length", "0") or 0)
    if len(rest) < length:
        return None
    return ReceivedRequest(method, target, headers, rest[:length]), rest[length:]

"""The admin listener: `/metrics` (Prometheus), `/status`, `/healthz`, `/readyz`; never on the main port.

Contract: one request per connection (scrapers and probes open a connection each time), answered
and closed; anything else is 404, or 405 for a method other than GET/HEAD. `/readyz` is 503 while
draining, so a load balancer stops sending new work before the process goes.
"""

from __future__ import annotations

import asyncio

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from egress import http1
from egress.metrics import MetricsCollector, publish_gauges
from egress.status import status_document
from egress.tally import read_slabs

_MAX_HEAD = 8192
_ALLOW = ((b"allow", b"GET, HEAD"),)


class AdminConnection(asyncio.Protocol):
    __slots__ = ("_buffer", "_host", "_registry", "_state", "_transport")

    def __init__(self, state, registry: CollectorRegistry, host: tuple[memoryview, int]) -> None:
        self._state = state
        self._registry = registry
        self._host = host  # the host's tally and its number of slabs
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        asyncio.get_running_loop().call_later(10, transport.close)  # no slow probes held open

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        head = self._buffer if end < 0 else self._buffer[: end + 4]
        if head.count(b"\n") != head.count(b"\r\n"):
            # A line ended by a bare LF: the main listener's parser refuses it (400), and so does this
            # one, at once; waiting for a CRLF CRLF that never comes held the prober 10 s for nothing.
            self._answer(400, b'{"error":"bad request: lines must end in CRLF"}', b"application/json", False)
            return
        if end < 0:
            if len(self._buffer) > _MAX_HEAD:
                self._answer(431, b'{"error":"request head too large"}', b"application/json", False)
            return
        request_line = self._buffer.split(b"\r\n", 1)[0].split(b" ")
        if len(request_line) != 3:
            self._answer(400, b'{"error":"bad request"}', b"application/json", False)
            return
        method, target = request_line[0], request_line[1].split(b"?", 1)[0]
        head = method == b"HEAD"
        if method not in (b"GET", b"HEAD"):
            # RFC 9110 §15.5.6: a 405 MUST carry Allow, the methods the resource supports.
            self._answer(405, b'{"error":"method not allowed"}', b"application/json", False, _ALLOW)
        elif target == b"/metrics":
            self._answer(200, generate_latest(self._registry), CONTENT_TYPE_LATEST.encode(), head)
        elif target == b"/status":
            publish_gauges(self._state)
            slabs = read_slabs(*self._host)
            self._answer(200, orjson.dumps(status_document(self._state, slabs)), b"application/json", head)
        elif target == b"/healthz":
            self._answer(200, b'{"status":"ok"}', b"application/json", head)
        elif target == b"/readyz":
            if self._state.draining:
                self._answer(503, b'{"status":"draining"}', b"application/json", head)
            else:
                self._answer(200, b'{"status":"ready"}', b"application/json", head)
        else:
            self._answer(404, b'{"error":"not found"}', b"application/json", head)

    def _answer(self, status: int, body: bytes, content_type: bytes, head: bool, extra: tuple = ()) -> None:
        request_id = self._state.new_request_id()
        self._transport.write(
            http1.simple_response(
                status, body, request_id, False, content_type=content_type, head_request=head, extra_headers=extra
            )
        )
        self._transport.close()
        self._buffer = b""


async def start_admin(
    state, host: str, port: int, slabs: memoryview, workers: int, reuse_port: bool = False
) -> asyncio.AbstractServer:
    """The admin listener; `slabs` is the host's tally (tally.py), `workers` slabs of it."""
    registry = CollectorRegistry(auto_describe=False)
    # The host's metrics, process_* (memory, CPU seconds, descriptors, start time) of each process
    # included, read from /proc at scrape time.
    registry.register(MetricsCollector(state, slabs, workers))
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: AdminConnection(state, registry, (slabs, workers)),
        host,
        port,
        reuse_address=True,
        reuse_port=reuse_port,
    )

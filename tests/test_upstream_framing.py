"""Where a message ends, on both edges: the upstream response reader and the client's parse loop.

RFC 9112 §6.3: a 1xx ends at its blank line and never has content; a response ends where its framing
says. §9.3: bytes past that end, with no request outstanding, mean the connection can't be reused.
llhttp reads some of these otherwise (a 101 without Upgrade is a whole message, a 150 with a
Content-Length has a body), so egress decides them at the head, before llhttp frames anything.

The in-process half drives `UpstreamConnection` and `ClientConnection` with recording transports and
no sockets: one case table, fed whole and byte by byte. The rest starts the real process against a
ScriptedUpstream that answers byte for byte.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time

import pytest

from egress import proxy
from egress.accesslog import AccessLog
from egress.auth import Authenticator, load_pools
from egress.config import parse_config
from egress.facts import FactSink
from egress.limiter import RateLimiter
from egress.providers import Router
from egress.serve import load_denyset
from egress.server import ClientConnection, ServerState
from egress.upstream import UpstreamConnection, UpstreamPool
from tests import test_e2e_upstream
from tests.support import RawClient, ScriptedUpstream, request_bytes, wait_until

OK_KEEP_ALIVE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
HI = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi"
HI_CHUNKED = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"

# -- in process: the upstream response reader -------------------------------------------------


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, parts) -> None:
        self.writes.append(b"".join(parts))

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = self.aborted = True


class RecordingExchange:
    """What UpstreamConnection reports to an Exchange, in order; takes the head as Exchange does."""

    def __init__(self, takes_head: bool = True) -> None:
        self.takes_head = takes_head
        self.events: list[tuple] = []
        self.head_sent = False
        self.head_request = False
        self.upstream_until_close = False

    def upstream_head(self, status: int, headers) -> None:
        self.events.append(("head", status))
        self.head_sent = self.takes_head

    def upstream_body(self, data: bytes) -> None:
        if not self.head_sent:
            self.events.append(("body before its head", bytes(data)))
        elif self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + bytes(data))
        else:
            self.events.append(("body", bytes(data)))

    def upstream_read_done(self) -> None:
        pass

    def upstream_end(self) -> None:
        self.events.append(("end",))

    def upstream_failed(self, error) -> None:
        self.events.append(("failed", error.code))


def feed_upstream(pieces: list[bytes], exchange: RecordingExchange | None = None):
    """The events one request's response gives, read in `pieces`; whether its connection is kept."""

    async def run():
        config = parse_config({"providers": {"raw": {"base_url": "http://127.0.0.1:9"}}})
        origin = Router(config.providers).resolve(b"/raw/v1/models").provider.origin
        conn = UpstreamConnection(UpstreamPool(config.upstream), origin)
        transport = RecordingTransport()
        conn.connection_made(transport)
        recorded = exchange or RecordingExchange()
        conn.send(recorded, [b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"])
        for piece in pieces:
            if transport.closing:
                break
            conn.data_received(memoryview(piece))
        kept = conn.reusable and not transport.closing
        conn.close()  # and its deadline timer
        return recorded.events, kept

    return asyncio.run(run())


# One table, fed whole and byte by byte: what the exchange sees, and whether the connection may
# serve another request ("kept"; a byte arriving while idle closes it, so pieces never keep more).
RESPONSES = {
    "200 Content-Length": (HI, [("head", 200), ("body", b"hi"), ("end",)], True),
    "200 chunked": (HI_CHUNKED, [("head", 200), ("body", b"hi"), ("end",)], True),
    "stray CRLF after the body": (HI + b"\r\n\r\n", [("head", 200), ("body", b"hi"), ("end",)], True),
    "a partial head after the body": (
        HI + b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n",
        [("head", 200), ("body", b"hi"), ("end",)],
        False,
    ),
    "an injected header after the body": (
        HI + b"HTTP/1.1 200 OK\r\nx-injected: 1\r\ncontent-length: 5\r\nx-pad: ",
        [("head", 200), ("body", b"hi"), ("end",)],
        False,
    ),
    "two bytes after the body": (HI + b"HT", [("head", 200), ("body", b"hi"), ("end",)], False),
    "a whole response after the body": (HI + HI, [("head", 200), ("body", b"hi"), ("end",)], False),
    "a partial head after the last chunk": (
        HI_CHUNKED + b"HTTP/1.1 200 OK\r\n",
        [("head", 200), ("body", b"hi"), ("end",)],
        False,
    ),
    "bare 101": (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", [("failed", "upstream_protocol_error")], False),
    "bare 101, then a 200": (
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + HI,
        [("failed", "upstream_protocol_error")],
        False,
    ),
    "101 with Upgrade": (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n\x81\x05hello",
        [("failed", "upstream_protocol_error")],
        False,
    ),
    "150 with Content-Length, then a 200": (
        b"HTTP/1.1 150 X\r\ncontent-length: 5\r\n\r\n" + HI,
        [("failed", "upstream_protocol_error")],
        False,
    ),
    "150 with a 5-byte body, then a 200": (
        b"HTTP/1.1 150 X\r\ncontent-length: 5\r\n\r\nhello" + HI,
        [("failed", "upstream_protocol_error")],
        False,
    ),
    "150 chunked, then a 200": (
        b"HTTP/1.1 150 X\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n" + HI,
        [("failed", "upstream_protocol_error")],
        False,
    ),
    "199 with Transfer-Encoding gzip": (
        b"HTTP/1.1 199 X\r\ntransfer-encoding: gzip\r\n\r\n" + HI,
        [("failed", "upstream_protocol_error")],
        False,
    ),
    "150 without framing fields, then a 200": (
        b"HTTP/1.1 150 X\r\nx-a: 1\r\n\r\n" + HI,
        [("head", 200), ("body", b"hi"), ("end",)],
        True,
    ),
    # llhttp ignores framing fields on 100, 102 and 103: nothing is misread, the answer is relayed.
    "100 with Content-Length, then a 200": (
        b"HTTP/1.1 100 Continue\r\ncontent-length: 5\r\n\r\n" + HI,
        [("head", 200), ("body", b"hi"), ("end",)],
        True,
    ),
    "103 chunked, then a 200": (
        b"HTTP/1.1 103 Early Hints\r\ntransfer-encoding: chunked\r\n\r\n" + HI,
        [("head", 200), ("body", b"hi"), ("end",)],
        True,
    ),
}


@pytest.mark.parametrize("name", RESPONSES)
def test_upstream_response_whole(name):
    data, events, kept = RESPONSES[name]
    assert feed_upstream([data]) == (events, kept)


@pytest.mark.parametrize("name", RESPONSES)
def test_upstream_response_byte_by_byte(name):
    data, events, kept = RESPONSES[name]
    seen, kept_in_pieces = feed_upstream([data[i : i + 1] for i in range(len(data))])
    assert seen == events
    assert kept or not kept_in_pieces


def test_an_end_with_no_head_taken_is_a_protocol_error_never_a_success():
    # The guard under every interim-status rule: a message that ends before the exchange took a
    # final head fails the exchange (a 502 for the client), and the connection is never reused.
    empty = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    events, kept = feed_upstream([empty], RecordingExchange(takes_head=False))
    assert events == [("head", 200), ("failed", "upstream_protocol_error")]
    assert not kept


# -- in process: the client's parse loop --------------------------------------------------------


def _server_state(config=None) -> ServerState:
    if config is None:
        config = parse_config(
            {
                "providers": {"raw": {"base_url": "http://127.0.0.1:9"}},
                "server": {"access_log": "off"},
                "usage": {"enabled": False},
            }
        )
    usage = config.usage
    return ServerState(
        config,
        Router(config.providers),
        UpstreamPool(config.upstream),
        AccessLog(config.server.access_log),
        Authenticator(config, load_denyset(config), load_pools(config), None),
        RateLimiter(config.limits),
        FactSink(usage.jsonl, usage.rotate_bytes, usage.keep_files, usage.queue_size),
    )


def feed_client(data: bytes) -> tuple[bytes, RecordingTransport, ClientConnection]:
    async def run():
        connection, transport = ClientConnection(_server_state()), RecordingTransport()
        connection.connection_made(transport)
        connection.data_received(data)
        await asyncio.sleep(0)
        for _ in range(10_000):  # a long pipeline is parsed 64 requests a loop turn
            if not connection._parse_scheduled:
                break
            await asyncio.sleep(0)
        connection._deadline.cancel()
        return b"".join(transport.writes), transport, connection

    return asyncio.run(run())


UPGRADE_HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: a\r\n\r\n"


def test_thousands_of_pipelined_upgrade_requests_in_one_read_are_all_answered():
    # Each Upgrade request stops llhttp; the rest of the read goes to a fresh parser. Once a
    # recursive call per request: RecursionError near 1000, and the connection left hanging.
    written, transport, connection = feed_client(UPGRADE_HEALTHZ * 3000)
    assert written.count(b"HTTP/1.1 200 OK\r\n") == 3000
    assert connection.active is None and not connection._pending and not transport.closing


def test_a_long_pipeline_is_answered_a_bounded_number_per_loop_turn():
    """One read of 3000 pipelined requests is not answered (and logged) in one unbroken run: a
    bounded number per turn of the loop, so other connections are served in between."""

    async def run():
        connection, transport = ClientConnection(_server_state()), RecordingTransport()
        connection.connection_made(transport)
        connection.data_received(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 3000)
        first_turn = b"".join(transport.writes).count(b"HTTP/1.1 200 OK\r\n")
        turns = 0
        while connection._parse_scheduled and turns < 10_000:
            await asyncio.sleep(0)
            turns += 1
        connection._deadline.cancel()
        return first_turn, turns, b"".join(transport.writes).count(b"HTTP/1.1 200 OK\r\n")

    first_turn, turns, answered = asyncio.run(run())
    assert first_turn < 1000 and turns > 1, (first_turn, turns)
    assert answered == 3000


def test_an_internal_error_while_answering_closes_the_connection(monkeypatch, capfd):
    def broken(exchange):
        raise RuntimeError("a bug")

    monkeypatch.setattr(proxy, "respond_health", broken)
    _, transport, _ = feed_client(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
    assert transport.closing, "a connection whose answer failed must close, not hang"
    assert '"event":"internal_error"' in capfd.readouterr().err


# -- the real process against a scripted upstream -------------------------------------------------


class PacedUpstream(ScriptedUpstream):
    """ScriptedUpstream whose reply may also be a list: bytes written as they are, a float a pause."""

    def _serve(self, conn: socket.socket) -> None:
        replies = self.replies
        for request in self._requests(conn, _one_request):
            self.requests.append(request)
            reply = replies.pop(0) if replies else OK_KEEP_ALIVE
            for piece in reply if isinstance(reply, list) else [reply]:
                if isinstance(piece, float):
                    self._stop.wait(piece)
                    continue
                try:
                    conn.sendall(piece)
                except OSError:
                    return


def _one_request(buffer: bytes):
    end = buffer.find(b"\r\n\r\n")
    return (buffer[: end + 4], buffer[end + 4 :]) if end >= 0 else None


scripted = test_e2e_upstream.scripted  # the fixture `paced` builds on


@pytest.fixture
def paced(scripted):
    """test_e2e_upstream's `scripted`, whose replies may also pause (PacedUpstream)."""
    return functools.partial(scripted, kind=PacedUpstream)


def _assert_no_internal_error(egress) -> None:
    logged = egress.stderr_path.read_bytes()
    assert b"Traceback" not in logged and b'"internal_error"' not in logged, logged[-2000:]


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(b"HTTP/1.1 101 Switching Protocols\r\n\r\n", id="bare 101"),
        pytest.param(
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n", id="101 Upgrade"
        ),
    ],
)
def test_a_101_is_a_502_and_the_pipelined_request_behind_it_gets_its_own_answer(paced, reply):
    egress, _ = paced([reply, b'HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n{"b":[2]}'])
    started = time.monotonic()
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/raw/v1/a") + request_bytes("GET", "/raw/v1/b"))
        first = client.read_response()
        second = client.read_response()
    assert first.status == 502 and first.error_code == "upstream_protocol_error"
    assert second.status == 200 and second.body == b'{"b":[2]}'
    assert time.monotonic() - started < 3, "answered at once, not after the upstream closed"
    assert wait_until(lambda: len(egress.access_records()) == 2, timeout=3)
    records = egress.access_records()
    assert [(r["status"], r["code"]) for r in records] == [(502, "upstream_protocol_error"), (200, None)]
    _assert_no_internal_error(egress)


@pytest.mark.parametrize(
    ("after", "reused"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n", False, id="a partial head"),
        pytest.param(b"HTTP/1.1 200 OK\r\nx-injected: 1\r\ncontent-length: 5\r\nx-pad: ", False, id="an injection"),
        pytest.param(b"HT", False, id="two bytes"),
        pytest.param(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL", False, id="a whole response"),
        pytest.param(b"\r\n", True, id="a stray CRLF"),
    ],
)
def test_bytes_after_a_response_never_reach_the_next_client(paced, after, reused):
    egress, raw = paced([HI + after, OK_KEEP_ALIVE])
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/raw/v1/first"))
        assert client.read_response().body == b"hi"
    with RawClient(egress.port) as client:  # an unrelated client, next on the pooled connection
        client.send(request_bytes("GET", "/raw/v1/second"))
        second = client.read_response()
    assert second.status == 200 and second.complete and second.body == b"{}"
    assert "x-injected" not in second.headers
    assert raw.connections == (1 if reused else 2)
    _assert_no_internal_error(egress)


def test_bytes_arriving_while_pooled_close_the_connection(paced):
    egress, raw = paced([[HI, 0.3, b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nEVIL"], OK_KEEP_ALIVE])
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/raw/v1/first"))
        assert client.read_response().body == b"hi"
        time.sleep(0.6)
        client.send(request_bytes("GET", "/raw/v1/second"))
        second = client.read_response()
    assert second.status == 200 and second.body == b"{}"
    assert raw.connections == 2


@pytest.mark.parametrize(
    "interim",
    [
        pytest.param(b"HTTP/1.1 150 X\r\ncontent-length: 5\r\n\r\n", id="150 Content-Length"),
        pytest.param(b"HTTP/1.1 150 X\r\ncontent-length: 5\r\n\r\nhello", id="150 with a body"),
        pytest.param(b"HTTP/1.1 150 X\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n", id="150 chunked"),
        pytest.param(b"HTTP/1.1 199 X\r\ntransfer-encoding: gzip\r\n\r\n", id="199 gzip"),
    ],
)
def test_an_informational_response_with_framing_fields_is_a_502(paced, interim):
    # RFC 9110 §15.2: a 1xx has no content. llhttp would read one, and with it the final response.
    egress, _ = paced([[interim + OK_KEEP_ALIVE, 30.0]])
    started = time.monotonic()
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/raw/v1/models"))
        response = client.read_response()
        assert response.status == 502 and response.error_code == "upstream_protocol_error"
        assert "informational" in response.json()["error"]["message"]
        assert time.monotonic() - started < 3
        client.send(request_bytes("GET", "/raw/v1/models"))  # a new upstream connection, in step
        assert client.read_response().body == b"{}"
    _assert_no_internal_error(egress)


@pytest.mark.parametrize(
    "interim",
    [
        pytest.param(b"HTTP/1.1 150 X\r\nx-a: 1\r\n\r\n", id="150"),
        pytest.param(b"HTTP/1.1 100 Continue\r\ncontent-length: 5\r\n\r\n", id="100 Content-Length"),
        pytest.param(b"HTTP/1.1 103 Early Hints\r\ntransfer-encoding: chunked\r\n\r\n", id="103 chunked"),
    ],
)
def test_an_informational_response_llhttp_frames_right_is_skipped(paced, interim):
    egress, raw = paced([interim + OK_KEEP_ALIVE, OK_KEEP_ALIVE])
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/raw/v1/models"))
        response = client.read_response()
        assert response.status == 200 and response.body == b"{}" and response.informational == []
        client.send(request_bytes("GET", "/raw/v1/models"))
        assert client.read_response().body == b"{}"
    assert raw.connections == 1


def test_a_closing_connection_whose_client_reads_a_little_then_stops_is_still_cut():
    """_close waits for the write buffer to drain, bounded by send_timeout. A client that read a
    little (resume_writing) and stopped again must not hold the connection open for ever."""

    class Buffered(RecordingTransport):
        def get_write_buffer_size(self) -> int:
            return 100_000  # a tail the client has not read

    async def run():
        connection, transport = ClientConnection(_server_state()), Buffered()
        connection.connection_made(transport)
        connection.pause_writing()
        connection._close()
        connection.resume_writing()  # it read a little
        armed = connection._stalled and connection._send_deadline is not None
        connection._send_deadline.cancel()
        connection._deadline.cancel()
        return armed

    assert asyncio.run(run())


def test_a_pipelined_request_held_behind_a_slow_reader_keeps_its_order_and_its_time():
    """A finishes while the client is not reading; B waits its turn; C's head (Expect: 100-continue)
    came with B and its body after. C's 100 Continue must not go out before B's answer, and C must
    not time out while its body waits held: its deadline is its own turn's."""
    config = parse_config(
        {
            "providers": {"raw": {"base_url": "http://127.0.0.1:9"}},
            "server": {"access_log": "off", "body_timeout": 0.2, "header_timeout": 0.2},
            "usage": {"enabled": False},
        }
    )

    async def run():
        connection, transport = ClientConnection(_server_state(config)), RecordingTransport()
        connection.connection_made(transport)
        first = proxy.Exchange(connection, b"A", time.monotonic())
        first.keep_alive = True
        connection.active = first  # A is being answered
        connection.data_received(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        connection.pause_writing()  # the client stops reading A's large answer
        connection.exchange_finished(first)
        before = b"".join(transport.writes)
        connection.data_received(b"hello")
        await asyncio.sleep(0.4)  # past body_timeout
        connection.resume_writing()
        for _ in range(10):
            await asyncio.sleep(0)
        connection._deadline.cancel()
        return before, b"".join(transport.writes), transport.closing

    before, written, closing = asyncio.run(run())
    assert before == b"", "nothing may go out for B or C before the client reads again"
    assert b"408" not in written and not closing
    answer = written.index(b"HTTP/1.1 200 OK")
    assert written.index(b"HTTP/1.1 100 Continue") > answer, "C's 100 Continue went out before B's answer"
    assert written.count(b"HTTP/1.1 200 OK") == 2

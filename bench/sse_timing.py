"""Time to first token and inter-chunk gaps of an SSE stream, direct and through egress.

An upstream of our own (asyncio, in a child process) sends each event as its own HTTP chunk, one
every `interval` seconds, as a provider streams tokens. A client on a raw socket stamps the arrival
of every event. What egress adds: the difference of the p50/p99 time to the first event, and of the
p99 gap between events (the provider's pacing is in both, so the difference is egress's jitter).

Used by bench/run; runnable alone: python3 bench/sse_timing.py EGRESS_PORT UPSTREAM_PORT
"""

from __future__ import annotations

import socket
import statistics
import sys
import time

UPSTREAM_CODE = r"""
import asyncio, sys
EVENT = b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
async def handle(reader, writer):
    while True:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return
        events, interval = int(sys.argv[2]), float(sys.argv[3])
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(events):
            writer.write(b"%x\r\n%s\r\n" % (len(EVENT), EVENT))
            await writer.drain()
            await asyncio.sleep(interval)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""


def measure(port: int, path: str, streams: int, events: int) -> tuple[list[float], list[float]]:
    """First-event times and inter-event gaps (seconds) over `streams` streams on one connection."""
    firsts: list[float] = []
    gaps: list[float] = []
    request = f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer sk-bench-byo\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(streams + 1):  # the first one warms up (egress opens its upstream connection)
            if index == 1:
                firsts.clear()
                gaps.clear()
            started = time.perf_counter()
            sock.sendall(request)
            seen, last, buffer = 0, None, b""
            while True:
                data = sock.recv(65536)
                now = time.perf_counter()
                if not data:
                    raise RuntimeError("stream ended early")
                buffer += data
                count = buffer.count(b"data: ")
                if count > seen:
                    if seen == 0:
                        firsts.append(now - started)
                    elif last is not None:
                        gaps.append(now - last)
                    last, seen = now, count
                if buffer.endswith(b"0\r\n\r\n") and seen >= events:
                    break
    return firsts, gaps


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


# 300 streams: a p99 of the time to the first event is then the 3rd worst of 300, not the worst of 30.
STREAMS, EVENTS = 300, 20


def compare(egress_port: int, upstream_port: int, streams: int = STREAMS, events: int = EVENTS) -> dict[str, float]:
    direct_first, direct_gaps = measure(upstream_port, "/v1/stream", streams, events)
    egress_first, egress_gaps = measure(egress_port, "/sse/v1/stream", streams, events)
    ms = 1000.0
    return {
        "streams": streams,
        "events": streams * events,
        "ttft_p50_added_ms": (statistics.median(egress_first) - statistics.median(direct_first)) * ms,
        "ttft_p99_added_ms": (percentile(egress_first, 0.99) - percentile(direct_first, 0.99)) * ms,
        "gap_p99_direct_ms": percentile(direct_gaps, 0.99) * ms,
        "gap_p99_egress_ms": percentile(egress_gaps, 0.99) * ms,
        "gap_p99_added_ms": (percentile(egress_gaps, 0.99) - percentile(direct_gaps, 0.99)) * ms,
    }


if __name__ == "__main__":
    print(compare(int(sys.argv[1]), int(sys.argv[2])))

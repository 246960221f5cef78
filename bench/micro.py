"""egress's own per-request cost, in process: the real connection classes, no sockets.

Twenty client connections and twenty pooled upstream connections, with transports that only
record what is written, take turns: every client sends a small JSON request, the loop turns
(egress writes the upstream requests), every upstream answers with nginx's head and bench/run's
completion body, the loop turns again (egress writes the responses and runs the log phase).
No kernel, no peer and no scheduler are involved, so this measures the Python (and httptools,
orjson) part alone, and it moves far less than a wrk run on a small shared machine. The best of
7 repetitions is reported.

Usage: python3 bench/micro.py [--mode MODE] [--headers N] [--requests N] [--opcodes]
  bare    BYO key, limiter and meter off, no access log (bench/run's `egress` row)
  key     bare with a virtual key (verified once, then cached) swapped for a pool key
  limits  key with the request limit on (the token limit, counted by metering, comes with `meter`)
  meter   limits with the usage meter, its JSONL usage file and the token limit on
  full    meter with the access log to a file: bench/run's `egress, full` row
  translated         bare, but the unified surface: `POST /v1/chat/completions` for a Claude model,
                     translated to Anthropic Messages, the upstream answering with bench/run's
                     Anthropic JSON body (bench/run's `translated JSON` row)
  translated-stream  likewise with `stream: true`, the upstream answering with the 500-event
                     Anthropic stream in one read (bench/run's `translated SSE` row)
  accounts  key with four pool keys (accounts) in a shared table under a process-shared lock, as
          workers have them, the upstream answering with OpenAI's six x-ratelimit headers: the
          cost of account selection, quota hints and in-flight counting over `key`
  account-costs  the two parts of `accounts` alone: selection (take + end under the shared lock)
          over 1, 4 and 16 accounts with quota, and reading six rate-limit headers into the table
  paced   bare, relaying a stream as a provider paces it: one SSE event per upstream read and
          per client write (bench/paced.py's upstream); reported per event, not per request
  codec   the translation alone, no request path: µs per chat_to_messages (a typical request),
          per message_to_chat (a typical response), per event of StreamTranscoder.feed
  --headers N   extra response headers (providers send 15-25; nginx sends 5)
  --sse         a passthrough mode (bare ... full) relaying bench/ab --sse's 500-event stream (60 KB,
                one upstream read) instead of the small JSON completion
  --opcodes     count the bytecode instructions per request instead, by function: exact and
                repeatable, but a guide only (C work, such as a regular expression, is not in it)
  --cold        one connection, one request at a time, the CPU caches emptied before each (a read
                of a buffer larger than the last-level cache): what a request costs on a gateway
                that is mostly idle, where the code and data it touches are no longer cached. The
                first token's added latency at low load is this, not the warm figure. Reported as
                medians, warm and cold, beside the cold cost of the two loop turns alone.
Compare builds with PYTHONPATH=TREE, e.g. a `git worktree` of an earlier commit.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import mmap
import multiprocessing
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import orjson
import uvloop

from egress import anthropic_codec, responses_codec
from egress.accesslog import AccessLog
from egress.accounts import AccountTable, table_bytes
from egress.auth import Authenticator, load_pools
from egress.config import parse_config
from egress.facts import FactSink
from egress.limiter import RateLimiter
from egress.providers import Router
from egress.serve import load_denyset
from egress.server import ClientConnection, ServerState
from egress.upstream import UpstreamConnection, UpstreamPool

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anthropic_bodies  # bench/anthropic_bodies.py, beside this file
import run as bench  # bench/run.py, beside this file

CONNECTIONS = 20
BODY = b'{"model":"gpt-bench","messages":[{"role":"user","content":"hi"}]}'


class RecordingTransport:
    """What egress's protocols call on a transport, recording writes and doing nothing else."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def writelines(self, parts: list[bytes]) -> None:
        self.writes.append(b"".join(parts))

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


# Each mode adds one feature to the one before it, so the differences between them split
# `full`'s extra cost by feature.
MODES = ("bare", "key", "limits", "meter", "full")
# bare's request path through the unified surface's translation (bench/run's translated rows).
TRANSLATED_MODES = ("translated", "translated-stream")
# OpenAI's rate-limit headers (https://platform.openai.com/docs/guides/rate-limits), for `accounts`.
RATE_LIMIT_HEADERS = (
    b"x-ratelimit-limit-requests: 10000\r\nx-ratelimit-limit-tokens: 2000000\r\n"
    b"x-ratelimit-remaining-requests: 9999\r\nx-ratelimit-remaining-tokens: 1999990\r\n"
    b"x-ratelimit-reset-requests: 6ms\r\nx-ratelimit-reset-tokens: 0s\r\n"
)


def make_state(mode: str, workdir: Path) -> tuple[ServerState, bytes]:
    """The shared state of one egress process, and the credential its clients send."""
    layers = MODES[: MODES.index(mode) + 1] if mode in MODES else ("bare", "key") if mode == "accounts" else ("bare",)
    raw: dict = {"providers": {"bench": {"base_url": "http://127.0.0.1:9"}}}
    if mode in TRANSLATED_MODES:
        rows = tomllib.loads(bench.translated_rows(9))  # bench/run's own rows, with its routes
        raw["providers"].update(rows["providers"])
        raw["routes"] = rows["routes"]
    raw["server"] = {"access_log": str(workdir / "access.log") if "full" in layers else "off"}
    raw["usage"] = {"jsonl": str(workdir / "usage.jsonl")} if "meter" in layers else {"enabled": False}
    token = "bench-byo-key"
    if "key" in layers:
        issuer, token = bench._bench_issuer()
        keys = 4 if mode == "accounts" else 1
        (workdir / "pool.keys").write_text("".join(f"sk-bench-pool-key-{index}\n" for index in range(keys)))
        raw["keys"] = {"trusted_issuers": [issuer]}
        raw["providers"]["bench"]["pool_keys"] = [f"file:{workdir / 'pool.keys'}"]
    if "limits" in layers:
        raw["limits"] = {"requests_per_minute": 10**9}
        if "meter" in layers:  # a token limit is counted by metering: config refuses it without
            raw["limits"]["tokens_per_minute"] = 10**9
    config = parse_config(raw)
    usage = config.usage
    state = ServerState(
        config,
        Router(config.providers),
        UpstreamPool(config.upstream),
        AccessLog(config.server.access_log),
        Authenticator(config, load_denyset(config), load_pools(config), _account_table(mode)),
        RateLimiter(config.limits),
        FactSink(usage.jsonl, usage.rotate_bytes, usage.keep_files, usage.queue_size),
    )
    return state, token.encode()


def _account_table(mode: str) -> AccountTable | None:
    if mode != "accounts":
        return None  # a private table, no lock: what a single process has
    return AccountTable(memoryview(mmap.mmap(-1, table_bytes())), multiprocessing.Lock())


# What each mode sends and what its upstream answers: (target, request body, upstream content
# type, upstream body, what egress's response to the client ends with, a mark it contains).
_EXCHANGES = {
    "passthrough": (
        b"/bench/v1/chat/completions",
        BODY,
        b"application/json",
        bench.COMPLETION.encode(),
        bench.COMPLETION.encode(),
        b"",
    ),
    # bench/ab --sse's response: the 500-event stream, from a static file (so with a Content-Length).
    "sse": (
        b"/bench/v1/stream",
        BODY,
        b"text/event-stream",
        bench.sse_body().encode(),
        b"data: [DONE]\n\n",
        b'"content":"token0 "',
    ),
    "translated": (
        b"/v1/chat/completions",
        anthropic_bodies.CHAT_REQUEST.encode(),
        b"application/json",
        anthropic_bodies.MESSAGE.encode(),
        b"\r\n0\r\n\r\n",
        b'"object":"chat.completion"',
    ),
    "translated-stream": (
        b"/v1/chat/completions",
        anthropic_bodies.CHAT_STREAM_REQUEST.encode(),
        b"text/event-stream",
        anthropic_bodies.stream_body().encode(),
        b"data: [DONE]\n\n\r\n0\r\n\r\n",
        b'"content":"Once"',
    ),
}


async def measure(
    mode: str, extra_headers: int, requests: int, opcodes: bool, cold: bool = False, sse: bool = False
) -> None:
    state, token = make_state(mode, Path(tempfile.mkdtemp(prefix="egress-micro-")))
    exchange = "sse" if sse else mode if mode in _EXCHANGES else "passthrough"
    target, body, content_type, upstream_body, ends, mark = _EXCHANGES[exchange]
    request = (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1:8787\r\nAuthorization: Bearer " % target
        + token
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    response = (
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Mon, 23 Nov 2026 10:00:00 GMT\r\n"
        b"Content-Type: %s\r\nContent-Length: %d\r\nConnection: keep-alive\r\n"
        % (content_type, len(upstream_body))
        + b"".join(b"x-provider-header-%d: 1234567890\r\n" % index for index in range(extra_headers))
        + (RATE_LIMIT_HEADERS if mode == "accounts" else b"")
        + b"\r\n"
        + upstream_body
    )
    if mode in TRANSLATED_MODES:
        origin = state.config.providers["anthropic"].origin  # both Anthropic rows share one pool key
    else:
        origin = state.router.resolve(target).provider.origin
    clients = _connections(state, origin, 1 if cold else CONNECTIONS)

    # A translated stream writes ~90 KB a response: keeping them all would grow the heap by
    # hundreds of MB, and its page faults would be timed too. Only the last write is looked at.
    trim = mode in TRANSLATED_MODES or sse

    async def one_round() -> None:
        for client, _ in clients:
            client.data_received(request)
        await asyncio.sleep(0)  # egress writes the upstream requests
        for client, _ in clients:
            client.active.upstream.data_received(response)
        await asyncio.sleep(0)  # egress writes the responses, then logs
        if trim:
            for _, transport in clients:
                del transport.writes[:-1]

    for _ in range(100):  # warm-up: caches, the verification of a virtual key
        await one_round()
    # The last warm-up response whole, however many writes it took (a translated stream's head goes
    # before its first event): untrimmed for this one round.
    trim, first = False, len(clients[0][1].writes)
    await one_round()
    trim = mode in TRANSLATED_MODES or sse
    last = b"".join(clients[0][1].writes[first:])
    if not (last.startswith(b"HTTP/1.1 200 OK\r\n") and last.endswith(ends) and mark in last):
        raise SystemExit(f"micro: unexpected response {last[:200]!r}")
    if opcodes:
        await count_opcodes(one_round, rounds=10)
        return
    if cold:
        await cold_rounds(mode, one_round)
        return
    best = await timed(one_round, max(1, requests // CONNECTIONS))
    shown = 5 + extra_headers + (6 if mode == "accounts" else 0)
    what = f"{mode}, the 500-event stream" if sse else f"{mode}, {shown} response headers"
    print(f"{what}: best {best[0]:.1f} µs per request, median {best[3]:.1f}")
    if mode == "translated-stream":
        events = anthropic_bodies.STREAM_EVENTS
        print(f"  {best[0] / events:.2f} µs per upstream event, {events / best[0] * 1e6:,.0f} events/s on one core")


def _connections(
    state: ServerState, origin, count: int = CONNECTIONS
) -> list[tuple[ClientConnection, RecordingTransport]]:
    """`count` clients, and as many idle pooled upstream connections to `origin`."""
    clients = []
    for _ in range(count):
        client, transport = ClientConnection(state), RecordingTransport()
        client.connection_made(transport)
        clients.append((client, transport))
    for _ in range(count):
        upstream = UpstreamConnection(state.pool, origin)
        upstream.connection_made(RecordingTransport())
        upstream.reusable = True
        state.pool.release(upstream)
    return clients


# bench/paced/upstream.c's delta event, one HTTP chunk each.
PACED_EVENT = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1795400000,"model":"gpt-bench",'
    b'"choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}]}\n\n'
)


async def measure_paced(events: int, opcodes: bool) -> None:
    """One SSE event per upstream read, relayed to its client: what each paced stream costs per event."""
    state, token = make_state("bare", Path(tempfile.mkdtemp(prefix="egress-micro-")))
    body = b'{"model":"gpt-bench","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    request = (
        b"POST /bench/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8787\r\nAuthorization: Bearer "
        + token
        + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    head = (
        b"HTTP/1.1 200 OK\r\nServer: paced\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (len(PACED_EVENT), PACED_EVENT)
    clients = _connections(state, state.router.resolve(b"/bench/v1/chat/completions").provider.origin)
    for client, _ in clients:
        client.data_received(request)
    await asyncio.sleep(0)  # egress writes the upstream requests
    upstreams = [client.active.upstream for client, _ in clients]
    for upstream in upstreams:
        upstream.data_received(head + chunk)
    await asyncio.sleep(0)

    async def one_round() -> None:
        for upstream in upstreams:
            upstream.data_received(chunk)
        await asyncio.sleep(0)  # egress writes each client its event
        for _, transport in clients:
            del transport.writes[:-1]

    for _ in range(100):
        await one_round()
    last = clients[0][1].writes[-1]
    if PACED_EVENT not in last:
        raise SystemExit(f"micro: unexpected write {last[:200]!r}")
    if opcodes:
        await count_opcodes(one_round, rounds=10)
        return
    best = await timed(one_round, max(1, events // CONNECTIONS))
    print(f"paced: best {best[0]:.2f} µs per event, median {best[3]:.2f} ({1e6 / best[0]:,.0f} events/s on one core)")


async def timed(one_round, rounds: int) -> list[float]:
    """µs per connection and round, for 7 repetitions of `rounds` rounds, best first."""
    best = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(rounds):
            await one_round()
        best.append((time.perf_counter() - started) / (rounds * CONNECTIONS) * 1e6)
    return sorted(best)


# Larger than any last-level cache this runs on: reading it leaves none of egress's code or data cached.
_EVICT_BYTES = 64 << 20


async def cold_rounds(mode: str, one_round, rounds: int = 300) -> None:
    """Median µs of one request with warm caches, with cold ones, and of the loop turns alone, cold."""
    evict = bytearray(_EVICT_BYTES)

    async def loop_turns() -> None:
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    async def median(run, flush: bool) -> float:
        times = []
        for _ in range(rounds):
            if flush:
                evict.find(b"\x01")  # memchr over 64 MiB: every cache line of it is loaded
            started = time.perf_counter()
            await run()
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1e6

    warm = await median(one_round, False)
    cold = await median(one_round, True)
    turns = await median(loop_turns, True)
    print(
        f"{mode}, one request at a time: warm {warm:.1f} µs, cold {cold:.1f} µs "
        f"(the two loop turns alone, cold: {turns:.1f} µs; egress's own cold part {cold - turns:.1f} µs)"
    )


async def count_opcodes(one_round, rounds: int) -> None:
    """Bytecode instructions per request, by function, traced through every callback the loop runs."""
    per_function: collections.Counter[str] = collections.Counter()

    def tracer(frame, event, _):
        frame.f_trace_opcodes = True
        if event == "opcode":
            code = frame.f_code
            per_function[f"{Path(code.co_filename).name}:{code.co_name}"] += 1
        return tracer

    sys.settrace(tracer)
    try:
        for _ in range(rounds):
            await one_round()
    finally:
        sys.settrace(None)
    requests = rounds * CONNECTIONS
    print(f"{sum(per_function.values()) / requests:.0f} opcodes per request")
    for name, count in per_function.most_common(60):
        print(f"{count / requests:8.1f}  {name}")


def best_of(call, number: int, repeat: int = 7) -> float:
    """Seconds per call, the best of `repeat` runs of `number` calls."""
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        for _ in range(number):
            call()
        runs.append((time.perf_counter() - started) / number)
    return min(runs)


CREATED = 1795400000  # bench/run's completion's `created`


def codec_costs() -> None:
    """The translation's in-process cost, without the request path around it."""
    request = anthropic_bodies.TYPICAL_CHAT_REQUEST
    request_bytes = orjson.dumps(request)
    message_bytes = anthropic_bodies.MESSAGE.encode()
    message = orjson.loads(message_bytes)
    events = [event.encode() for event in anthropic_bodies.stream_events()]
    stream = b"".join(events)

    def to_messages() -> None:
        anthropic_codec.chat_to_messages(request, default_max_tokens=4096)

    def to_messages_bytes() -> None:  # what surface._translate does with the body
        body, _ = anthropic_codec.chat_to_messages(orjson.loads(request_bytes), default_max_tokens=4096)
        orjson.dumps(body)

    def to_chat() -> None:
        anthropic_codec.message_to_chat(message, model="claude-json", created=CREATED)

    def to_chat_bytes() -> None:  # what surface.TranslatedChat.finish does with the held body
        orjson.dumps(anthropic_codec.message_to_chat(orjson.loads(message_bytes), model="claude-json", created=CREATED))

    def transcode(pieces: list[bytes]):
        def run() -> None:
            transcoder = anthropic_codec.StreamTranscoder(model="claude-json", created=CREATED, include_usage=True)
            for piece in pieces:
                transcoder.feed(piece)
            transcoder.finish()

        return run

    # The Responses API's form of the typical request, and its response object's request echo.
    responses_request = {
        "model": request["model"],
        "instructions": request["messages"][0]["content"],
        "input": [{"role": "user", "content": request["messages"][1]["content"]}],
        "tools": [{"type": "function", **tool["function"]} for tool in request.get("tools", ())],
        "max_output_tokens": request["max_tokens"],
    }
    shell = responses_codec.response_shell(responses_request, "claude-json", CREATED)

    def responses_to_messages() -> None:  # surface._aim for /v1/responses: to chat, then the chat mapping
        chat, _ = responses_codec.responses_to_chat(responses_request)
        anthropic_codec.chat_to_messages(chat, default_max_tokens=4096)

    def to_response() -> None:
        responses_codec.message_to_response(message, shell)

    def transcode_responses(pieces: list[bytes]):
        def run() -> None:
            transcoder = responses_codec.ResponsesTranscoder(shell)
            for piece in pieces:
                transcoder.feed(piece)
            transcoder.finish()

        return run

    count = len(events)
    rows = [
        (
            f"chat_to_messages, typical request ({len(request['messages'])} messages, a tool)",
            best_of(to_messages, 5000),
        ),
        ("  with orjson loads and dumps of the body, bytes to bytes", best_of(to_messages_bytes, 5000)),
        ("message_to_chat, typical response (one text block)", best_of(to_chat, 10000)),
        ("  with orjson loads and dumps of the body, bytes to bytes", best_of(to_chat_bytes, 10000)),
        ("responses_to_chat + chat_to_messages, the same request as Responses", best_of(responses_to_messages, 5000)),
        ("message_to_response, the same response", best_of(to_response, 10000)),
    ]
    per_event = [
        (f"StreamTranscoder.feed, {count}-event stream one event per feed", best_of(transcode(events), 40) / count),
        (f"StreamTranscoder.feed, {count}-event stream in one feed", best_of(transcode([stream]), 40) / count),
        (
            f"ResponsesTranscoder.feed, {count}-event stream one event per feed",
            best_of(transcode_responses(events), 40) / count,
        ),
        (
            f"ResponsesTranscoder.feed, {count}-event stream in one feed",
            best_of(transcode_responses([stream]), 40) / count,
        ),
    ]
    width = max(len(name) for name, _ in rows + per_event)
    for name, seconds in rows:
        print(f"{name:{width}}  {seconds * 1e6:7.2f} µs")
    for name, seconds in per_event:
        print(f"{name:{width}}  {seconds * 1e6:7.2f} µs per event, {1 / seconds:,.0f} events/s")


def account_costs() -> None:
    """Account selection and quota hints in-process: what `accounts` adds to `key`, split in two."""
    from egress.accounts import Account
    from egress.hints import read_hints
    from egress.secrets import Secret

    headers = [tuple(line.split(b": ", 1)) for line in RATE_LIMIT_HEADERS.splitlines()]
    for count in (1, 4, 16):
        table = _account_table("accounts")
        rows = [
            Account("bench", f"k{index}", (b"authorization", Secret(b"Bearer k", "env:X"))) for index in range(count)
        ]
        table.bind(rows)
        for row in rows:
            table.observe(row, read_hints(headers, 0.0), 100.0, 0.0)

        def select(table=table, rows=rows) -> None:
            table.end(table.take(rows, 100.5))

        print(
            f"select: take + end, {count:2d} accounts with quota, shared lock  {best_of(select, 20_000) * 1e6:6.2f} µs"
        )
    table = _account_table("accounts")
    row = Account("bench", "k", (b"authorization", Secret(b"Bearer k", "env:X")))
    table.bind([row])
    seconds = best_of(lambda: table.observe(row, read_hints(headers, 0.0), 100.0, 0.0), 20_000)
    print(f"hints: read_hints + observe, {len(headers)} rate-limit headers          {seconds * 1e6:6.2f} µs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mode", choices=(*MODES, *TRANSLATED_MODES, "accounts", "account-costs", "codec", "paced"), default="bare"
    )
    parser.add_argument("--headers", type=int, default=0, help="extra upstream response headers")
    parser.add_argument("--requests", type=int, default=None, help="per repetition (default 20000; a stream 400)")
    parser.add_argument("--opcodes", action="store_true", help="bytecode per request, by function")
    parser.add_argument("--cold", action="store_true", help="one request at a time, CPU caches emptied before each")
    parser.add_argument("--sse", action="store_true", help="passthrough of bench/ab --sse's 500-event stream")
    args = parser.parse_args()
    if args.mode == "codec":
        codec_costs()
        return 0
    if args.mode == "account-costs":
        account_costs()
        return 0
    if args.mode == "paced":
        uvloop.run(measure_paced(args.requests or 20_000, args.opcodes))
        return 0
    requests = args.requests or (400 if args.mode == "translated-stream" else 2_000 if args.sse else 20_000)
    uvloop.run(measure(args.mode, args.headers, requests, args.opcodes, args.cold, args.sse))
    return 0


if __name__ == "__main__":
    sys.exit(main())

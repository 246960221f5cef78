"""Anthropic Messages bodies for the translation benchmarks (bench/run.py, bench/micro.py).

The shapes follow the recorded responses in tests/recordings/ (anthropic__json_cache_creation_5m,
anthropic__stream_simple): a `message` with one text block, `stop_reason` and the usage fields
Anthropic sends today (input, output, cache creation and read, the 5m/1h split); a stream of
message_start, content_block_start, ping, text deltas, content_block_stop, message_delta (the
cumulative usage) and message_stop, each as `event:` and `data:` lines.
"""

from __future__ import annotations

import json
import sys

MODEL = "claude-sonnet-4-5-20250929"
# The caller's side: the unified surface routes these names to the bench's Anthropic rows.
JSON_MODEL = "claude-json"
STREAM_MODEL = "claude-stream"
STREAM_EVENTS = 500  # every event of the stream, ping and the framing events included
# The first text delta: the client's first token, found by this JSON string in either dialect.
FIRST_TOKEN = "Once"
FIRST_TOKEN_MARK = json.dumps(FIRST_TOKEN).encode()

_COMPACT = {"separators": (",", ":")}
_INPUT_USAGE = {"input_tokens": 25, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}

MESSAGE = json.dumps(
    {
        "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "Hello! How can I help you today?"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            **_INPUT_USAGE,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 10,
            "service_tier": "standard",
        },
    },
    **_COMPACT,
)

# What the caller sends: bench/run's passthrough request, with a Claude model.
CHAT_REQUEST = json.dumps(
    {"model": JSON_MODEL, "max_tokens": 256, "messages": [{"role": "user", "content": "hi"}]}, **_COMPACT
)
CHAT_STREAM_REQUEST = json.dumps(
    {"model": STREAM_MODEL, "max_tokens": 1024, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    **_COMPACT,
)
# The Responses API's form of it (POST /v1/responses), for the translated Responses row.
RESPONSES_STREAM_REQUEST = json.dumps(
    {"model": STREAM_MODEL, "max_output_tokens": 1024, "stream": True, "input": "hi"}, **_COMPACT
)
# The same request in Anthropic's own shape, for timing the upstream directly.
MESSAGES_STREAM_REQUEST = json.dumps(
    {"model": MODEL, "max_tokens": 1024, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    **_COMPACT,
)

# A typical chat request for the codec's in-process cost: a system prompt, a short history, a tool.
TYPICAL_CHAT_REQUEST = {
    "model": JSON_MODEL,
    "max_tokens": 1024,
    "temperature": 0.7,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. Answer briefly."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature":18,"sky":"cloudy"}'},
        {"role": "user", "content": "And should I take an umbrella?"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The current weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            },
        }
    ],
}


def _event(kind: str, document: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(document, **_COMPACT)}\n\n"


def stream_events(count: int = STREAM_EVENTS) -> list[str]:
    """The `count` events of one streamed message, each whole with its blank line."""
    deltas = count - 6  # message_start, block start, ping, block stop, message_delta, stop
    message = {
        "id": "msg_01Gt5iBVhKBaLEHyeTFt9Lqk",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            **_INPUT_USAGE,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 1,
            "service_tier": "standard",
        },
    }
    events = [
        _event("message_start", {"type": "message_start", "message": message}),
        _event(
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        ),
        _event("ping", {"type": "ping"}),
    ]
    for index in range(deltas):
        text = FIRST_TOKEN if index == 0 else f" token{index}"
        delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
        events.append(_event("content_block_delta", delta))
    events += [
        _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {**_INPUT_USAGE, "output_tokens": deltas},
            },
        ),
        _event("message_stop", {"type": "message_stop"}),
    ]
    return events


def stream_body() -> str:
    return "".join(stream_events())


# -- a paced upstream ----------------------------------------------------------------------------
# nginx sends a whole stream at once, so a proxy's first token waits for the first read's events
# to be transcoded. A provider streams tokens as they are made: this upstream sends each event as
# its own HTTP chunk, with `interval` seconds after each text delta, as bench/sse_timing.py's does.
PACED_EVENTS = 16  # ten text deltas: enough to time the first token, short enough for 300 streams


async def _paced(reader, writer, interval: float) -> None:
    import asyncio

    chunks = [(event.encode(), "content_block_delta" in event) for event in stream_events(PACED_EVENTS)]
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for chunk, delta in chunks:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            if delta:
                await asyncio.sleep(interval)
        writer.write(b"0\r\n\r\n")
        await writer.drain()


def serve_paced(port: int, interval: float) -> None:
    import asyncio

    async def main() -> None:
        server = await asyncio.start_server(lambda r, w: _paced(r, w, interval), "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__":
    # python3 bench/anthropic_bodies.py PORT INTERVAL: the paced upstream (bench/run starts it).
    serve_paced(int(sys.argv[1]), float(sys.argv[2]))

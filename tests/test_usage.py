"""The usage meter: the same numbers however the stream is cut into reads."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress.usage import COMPLETE, MISSING, PARTIAL, UNPARSEABLE, UsageMeter
from tests.fake_provider import _anthropic_events, _anthropic_message, _openai_completion, _openai_events
from tests.support import cut_into

OPENAI_STREAM = b"".join(_openai_events({"model": "gpt-fake", "stream_options": {"include_usage": True}}))
ANTHROPIC_STREAM = b"".join(_anthropic_events({"model": "claude-fake"}))
SSE = b"text/event-stream; charset=utf-8"


def meter(dialect: str, chunks: list[bytes], content_type: bytes = SSE, complete: bool = True, coding: bytes = b""):
    usage_meter = UsageMeter()
    usage_meter.start(dialect, content_type, coding)
    if usage_meter.active:  # as the relay does: an inactive meter is never fed
        for chunk in chunks:
            usage_meter.feed(chunk)
    return usage_meter.result(complete)


def test_openai_stream():
    usage = meter("openai", [OPENAI_STREAM])
    assert (usage.state, usage.model, usage.input_tokens, usage.output_tokens) == (COMPLETE, "gpt-fake", 12, 6)


def test_anthropic_stream_takes_the_last_cumulative_output_never_a_sum():
    usage = meter("anthropic", [ANTHROPIC_STREAM])
    # message_start says output 1, message_delta says 6 (cumulative): 6, not 7.
    assert (usage.state, usage.model, usage.input_tokens, usage.output_tokens) == (COMPLETE, "claude-fake", 12, 6)


@pytest.mark.parametrize(("dialect", "stream"), [("openai", OPENAI_STREAM), ("anthropic", ANTHROPIC_STREAM)])
def test_split_at_every_byte_boundary(dialect, stream):
    expected = meter(dialect, [stream])
    for cut in range(1, len(stream)):
        assert meter(dialect, [stream[:cut], stream[cut:]]) == expected, cut


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["openai", "anthropic"]), st.lists(st.integers(1, 400), min_size=1, max_size=30))
def test_split_into_any_reads(dialect, sizes):
    stream = OPENAI_STREAM if dialect == "openai" else ANTHROPIC_STREAM
    assert meter(dialect, [c for c in cut_into(stream, sizes) if c]) == meter(dialect, [stream])


def test_one_byte_at_a_time():
    assert meter("anthropic", [bytes([b]) for b in ANTHROPIC_STREAM]) == meter("anthropic", [ANTHROPIC_STREAM])


def test_anthropic_cache_tokens_counted_once():
    start = {
        "type": "message_start",
        "message": {
            "model": "claude-fake",
            "usage": {
                "input_tokens": 10,
                "cache_read_input_tokens": 1000,
                "cache_creation_input_tokens": 200,
                "output_tokens": 1,
            },
        },
    }
    delta = {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 40}}
    stream = b"".join(b"event: x\ndata: " + orjson.dumps(event) + b"\n\n" for event in (start, delta, delta))
    usage = meter("anthropic", [stream])
    assert usage.input_tokens == 1210 and usage.cache_read_tokens == 1000 and usage.cache_creation_tokens == 200
    assert usage.output_tokens == 40


def test_openai_usage_beside_non_empty_choices_and_cached_reasoning_details():
    chunk = {
        "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": 50,
            "completion_tokens": 30,
            "prompt_tokens_details": {"cached_tokens": 20},
            "completion_tokens_details": {"reasoning_tokens": 25},
        },
    }
    stream = b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n"
    usage = meter("openai", [stream])
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.reasoning_tokens) == (
        50,
        30,
        20,
        25,
    )


def test_json_bodies():
    usage = meter("openai", [orjson.dumps(_openai_completion({"model": "gpt-x"}, "r"))], b"application/json")
    assert (usage.state, usage.model, usage.input_tokens, usage.output_tokens) == (COMPLETE, "gpt-x", 12, 7)
    body = orjson.dumps(_anthropic_message({"model": "claude-x"}))
    usage = meter("anthropic", [body[:10], body[10:]], b"application/json")
    assert (usage.state, usage.model, usage.input_tokens, usage.output_tokens) == (COMPLETE, "claude-x", 12, 7)


def test_missing_unparseable_and_partial():
    assert meter("openai", [b"data: {}\n\ndata: [DONE]\n\n"]).state == MISSING
    assert meter("openai", [b'{"usage": {"prompt_tokens": 1'], b"application/json").state == UNPARSEABLE
    assert meter("openai", [b"\x00binary"], b"application/octet-stream").state == MISSING
    cut = OPENAI_STREAM[: OPENAI_STREAM.index(b'"finish_reason":"stop"')]
    usage = meter("openai", [cut], complete=False)
    # Six content deltas and the role chunk: every chunk with a delta counts, reasoning and tool calls too.
    assert usage.state == PARTIAL and usage.output_tokens is None and usage.estimated_output_tokens == 7
    anthropic_cut = ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"content_block_stop")]
    usage = meter("anthropic", [anthropic_cut], complete=False)
    # message_start's output_tokens (1) is a placeholder: with no message_delta, output is estimated.
    assert (usage.state, usage.reason, usage.input_tokens, usage.output_tokens) == (PARTIAL, "cut", 12, None)
    assert usage.estimated_output_tokens == ANTHROPIC_STREAM.count(b'"content_block_delta"') == 6


def test_the_word_usage_inside_content_is_not_a_usage_event():
    chunk = {"model": "m", "choices": [{"index": 0, "delta": {"content": 'say "usage": 5'}}]}
    stream = b"data: " + orjson.dumps(chunk) + b"\n\n"
    assert meter("openai", [stream]).state == MISSING


def test_a_json_body_in_one_byte_pieces_is_held_in_memory_of_its_size():
    import tracemalloc

    document = _openai_completion({"model": "gpt-fake", "messages": []}, "chatcmpl-1")
    document["choices"][0]["message"]["content"] = "x" * 200_000
    body = orjson.dumps(document)
    pieces = [body[index : index + 1] for index in range(len(body))]  # made before measuring
    tracemalloc.start()
    try:
        usage_meter = UsageMeter()
        usage_meter.start("openai", b"application/json")
        for piece in pieces:
            usage_meter.feed(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A reference per piece held ~40 bytes per body byte; one buffer holds about one.
    assert peak < 3 * len(body), f"{peak / len(body):.1f} bytes per body byte"
    usage = usage_meter.result(True)
    counts = document["usage"]
    assert (usage.state, usage.input_tokens, usage.output_tokens) == (
        COMPLETE,
        counts["prompt_tokens"],
        counts["completion_tokens"],
    )


def test_a_long_sse_line_in_one_byte_pieces_is_read():
    # The usage event arrives a byte at a time after a long line: the carry grows in place.
    filler = b"data: " + b'{"x":"' + b"a" * 100_000 + b'"}\n\n'
    stream = filler + OPENAI_STREAM
    usage = meter("openai", [stream[index : index + 1] for index in range(len(stream))])
    assert (usage.state, usage.input_tokens, usage.output_tokens) == (COMPLETE, 12, 6)


# -- one reducer for every dialect ----------------------------------------------------------------


def sse(*events: dict, named: bool = False) -> bytes:
    out = b""
    for event in events:
        if named:
            out += b"event: " + event["type"].encode() + b"\n"
        out += b"data: " + orjson.dumps(event) + b"\n\n"
    return out


RESPONSE_USAGE = {
    "input_tokens": 300,
    "input_tokens_details": {"cached_tokens": 256},
    "output_tokens": 90,
    "output_tokens_details": {"reasoning_tokens": 64},
    "total_tokens": 390,
}
RESPONSES_STREAM = sse(
    {"type": "response.created", "response": {"id": "resp_1", "model": "gpt-5", "usage": None}},
    {"type": "response.output_text.delta", "delta": "Hi"},
    {"type": "response.completed", "response": {"id": "resp_1", "model": "gpt-5", "usage": RESPONSE_USAGE}},
    named=True,
)


@pytest.mark.parametrize("pieces", [1, 7, None])
def test_responses_stream_usage_sits_under_response(pieces):
    chunks = (
        [RESPONSES_STREAM] if pieces is None else [RESPONSES_STREAM[i : i + pieces] for i in range(0, 9999, pieces)]
    )
    usage = meter("responses", [c for c in chunks if c])
    assert (usage.state, usage.model, usage.input_tokens, usage.output_tokens) == (COMPLETE, "gpt-5", 300, 90)
    assert (usage.cache_read_tokens, usage.reasoning_tokens) == (256, 64)


def test_responses_incomplete_and_json():
    incomplete = sse({"type": "response.incomplete", "response": {"model": "gpt-5", "usage": RESPONSE_USAGE}})
    assert meter("responses", [incomplete]).output_tokens == 90
    body = orjson.dumps({"id": "resp_1", "object": "response", "model": "gpt-5", "usage": RESPONSE_USAGE})
    usage = meter("responses", [body], b"application/json")
    assert (usage.input_tokens, usage.cache_read_tokens, usage.reasoning_tokens) == (300, 256, 64)


def test_groq_usage_in_x_groq_and_deepseek_cache_hits_and_openrouter_cost():
    groq = sse(
        {"model": "llama", "choices": [{"index": 0, "delta": {"content": "x"}}]},
        {
            "model": "llama",
            "choices": [],
            "x_groq": {"id": "r", "usage": {"prompt_tokens": 40, "completion_tokens": 9}},
        },
    )
    assert (meter("openai", [groq]).input_tokens, meter("openai", [groq]).output_tokens) == (40, 9)
    deepseek = orjson.dumps(
        {
            "model": "deepseek-chat",
            "usage": {
                "prompt_tokens": 100,
                "completion_tokens": 5,
                "prompt_cache_hit_tokens": 64,
                "prompt_cache_miss_tokens": 36,
            },
        }
    )
    usage = meter("openai", [deepseek], b"application/json")
    assert (usage.input_tokens, usage.cache_read_tokens) == (100, 64)
    routed = orjson.dumps({"model": "m", "usage": {"prompt_tokens": 3, "completion_tokens": 2, "cost": 0.00042}})
    assert meter("openai", [routed], b"application/json").provider_cost == 0.00042


def test_anthropic_cache_creation_split_and_message_delta_with_input_side():
    start = {
        "type": "message_start",
        "message": {
            "model": "claude",
            "usage": {
                "input_tokens": 4,
                "cache_creation_input_tokens": 3000,
                "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
                "cache_read_input_tokens": 0,
                "output_tokens": 1,
            },
        },
    }
    # Newer streams repeat the input side, cumulative, in message_delta: the latest value wins.
    delta = {"type": "message_delta", "usage": {"input_tokens": 4, "cache_read_input_tokens": 0, "output_tokens": 50}}
    usage = meter("anthropic", [sse(start, delta, delta, named=True)])
    assert (usage.input_tokens, usage.output_tokens, usage.cache_creation_tokens) == (3004, 50, 3000)
    assert (usage.cache_creation_5m_tokens, usage.cache_creation_1h_tokens) == (1000, 2000)


def test_api_is_decided_by_the_path():
    from egress.usage import api_of

    assert api_of(b"/v1/messages", "anthropic") == "anthropic"
    assert api_of(b"/v1/chat/completions", "anthropic") == "openai"  # Anthropic's OpenAI-compatible API
    assert api_of(b"/v1/responses", "openai") == "responses"
    assert api_of(b"/api/v1/chat/completions", "openai") == "openai"
    assert api_of(b"/v1/embeddings", "openai") == "openai"


# -- compressed bodies ----------------------------------------------------------------------------


def compressed_meter(body: bytes, coding: bytes, content_type: bytes, pieces: int | None = None):
    chunks = [body] if pieces is None else [body[i : i + pieces] for i in range(0, len(body), pieces)]
    return meter("openai", chunks, content_type, coding=coding)


@pytest.mark.parametrize("pieces", [None, 1, 5])
@pytest.mark.parametrize("coding", [b"gzip", b"deflate", b"deflate-raw"])
def test_a_compressed_body_is_metered_from_a_decoded_copy(coding, pieces):
    import zlib

    document = _openai_completion({"model": "gpt-fake", "messages": []}, "chatcmpl-z")
    plain = orjson.dumps(document)
    if coding == b"gzip":
        body = gzip_bytes(plain)
    elif coding == b"deflate":
        body = zlib.compress(plain)
    else:
        squeezer = zlib.compressobj(wbits=-15)
        body, coding = squeezer.compress(plain) + squeezer.flush(), b"deflate"
    usage = compressed_meter(body, coding, b"application/json", pieces)
    counts = document["usage"]
    assert (usage.state, usage.input_tokens, usage.output_tokens) == (
        COMPLETE,
        counts["prompt_tokens"],
        counts["completion_tokens"],
    )
    stream = gzip_bytes(OPENAI_STREAM)
    assert compressed_meter(stream, b"gzip", SSE, pieces) == meter("openai", [OPENAI_STREAM])


def gzip_bytes(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


@pytest.mark.parametrize(
    ("body", "coding", "reason"),
    [
        (b"\x1f\x8b\x08\x00garbage-not-gzip" * 4, b"gzip", "content_encoding"),
        (gzip_bytes(b'{"usage":{"prompt_tokens":1}}')[:-10], b"gzip", "content_encoding"),  # cut short
        (b"\x28\xb5\x2f\xfd" + b"x" * 30, b"zstd", "content_encoding"),
        (gzip_bytes(b"not json at all"), b"gzip", "not_json"),
    ],
    ids=["corrupt", "truncated", "zstd", "not-json"],
)
def test_a_body_the_meter_cannot_read_is_unparseable_with_a_reason(body, coding, reason):
    usage = compressed_meter(body, coding, b"application/json")
    assert (usage.state, usage.reason) == (UNPARSEABLE, reason)


def test_a_compression_bomb_is_not_metered_past_the_bound():
    import zlib

    from egress import usage as usage_module

    bomb = zlib.compress(b"0" * (usage_module._MAX_DECODED + 1024), 9)  # ~64 KiB that inflate to 64 MiB
    usage = compressed_meter(bomb, b"deflate", b"application/json", pieces=4096)
    assert (usage.state, usage.reason) == (UNPARSEABLE, "too_large")


def test_reasoning_counted_beside_completion_is_added_to_output():
    # xAI: total = prompt + completion + reasoning; OpenAI: reasoning is inside completion already.
    xai = {"prompt_tokens": 307, "completion_tokens": 26, "total_tokens": 588}
    xai["completion_tokens_details"] = {"reasoning_tokens": 255}
    openai_style = {"prompt_tokens": 307, "completion_tokens": 281, "total_tokens": 588}
    openai_style["completion_tokens_details"] = {"reasoning_tokens": 255}
    for counts in (xai, openai_style):
        body = orjson.dumps({"model": "m", "usage": counts})
        usage = meter("openai", [body], b"application/json")
        assert (usage.output_tokens, usage.reasoning_tokens) == (281, 255)


def test_compaction_iterations_are_all_billed():
    # The top-level usage covers the final pass; the compaction pass is only in `iterations`.
    usage_counts = {
        "input_tokens": 181,
        "output_tokens": 8,
        "iterations": [
            {"type": "compaction", "input_tokens": 100, "output_tokens": 83, "cache_read_input_tokens": 55096},
            {"type": "message", "input_tokens": 181, "output_tokens": 8, "cache_read_input_tokens": 0},
        ],
    }
    delta = {"type": "message_delta", "usage": usage_counts}
    first = {"input_tokens": 181, "output_tokens": 1}
    start = {"type": "message_start", "message": {"model": "claude", "usage": first}}
    usage = meter("anthropic", [sse(start, delta, named=True)])
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens) == (55377, 91, 55096)


def test_usage_null_chunks_give_the_model_once_and_are_not_parsed_after():
    first = b'data: {"id":"c","model":"gpt-x","choices":[{"delta":{"content":"a"}}],"usage":null}\n\n'
    # Not JSON: parsed, it would make the usage unparseable; once the model is known it is not parsed.
    broken = b'data: {"id":"c",,"choices":[],"usage":null}\n\n'
    last = b'data: {"id":"c","model":"gpt-x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
    whole = first + broken + last
    for pieces in ([whole], cut_into(whole, [7] * (len(whole) // 7)), [first, broken, last]):
        usage = meter("openai", list(pieces))
        assert (usage.state, usage.model, usage.input_tokens, usage.output_tokens) == (COMPLETE, "gpt-x", 3, 1)
    # A stream cut before its usage chunk still names its model, read off the first null one.
    cut = meter("openai", [first, broken], complete=False)
    assert (cut.state, cut.model, cut.estimated_output_tokens) == (PARTIAL, "gpt-x", 1)
    # With no model known yet, a null chunk is parsed: a broken one says so.
    assert meter("openai", [broken, last]).state == UNPARSEABLE


# -- streams that end early, huge events, odd values ---------------------------------------------


ANTHROPIC_ERROR = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'


@pytest.mark.parametrize("pieces", [None, 1, 13])
def test_an_anthropic_stream_ended_by_an_error_event_is_partial_not_complete(pieces):
    """Anthropic's mid-stream `event: error` ends a stream with clean framing but no message_delta:
    message_start's output_tokens is a placeholder, so the output is estimated from the deltas."""
    stream = ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"event: message_delta")] + ANTHROPIC_ERROR
    chunks = [stream] if pieces is None else cut_into(stream, [pieces] * (len(stream) // pieces + 1))
    usage = meter("anthropic", [c for c in chunks if c], complete=True)
    assert (usage.state, usage.reason, usage.input_tokens, usage.output_tokens) == (PARTIAL, "ended_early", 12, None)
    assert usage.estimated_output_tokens == stream.count(b'"content_block_delta"') > 0
    # The whole stream is complete, its message_delta's count the provider's, not estimated.
    whole = meter("anthropic", [ANTHROPIC_STREAM], complete=True)
    assert (whole.state, whole.output_tokens, whole.estimated_output_tokens) == (COMPLETE, 6, None)


def test_an_anthropic_stream_cut_before_any_event_is_partial_with_nothing_known():
    usage = meter("anthropic", [b'event: message_start\ndata: {"ty'], complete=False)
    assert (usage.state, usage.reason, usage.output_tokens, usage.estimated_output_tokens) == (PARTIAL, "cut", None, 0)


def _image_completed(size: int) -> bytes:
    """A Responses stream whose response.completed carries an image_generation_call's base64 result,
    `size` bytes of it: the event is one SSE line that long, its usage after `output` and `tools`."""
    response = {
        "id": "resp_img",
        "object": "response",
        "status": "completed",
        "model": "gpt-5",
        "output": [{"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": "A" * size}],
        "tools": [{"type": "image_generation"}],
        "usage": RESPONSE_USAGE,
        "user": None,
        "metadata": {},
    }
    return sse(
        {"type": "response.created", "response": {"id": "resp_img", "model": "gpt-5", "usage": None}},
        {"type": "response.completed", "response": response},
        named=True,
    )


@pytest.mark.parametrize("pieces", [None, 16 << 10, 64 << 10, 1 << 20, 3 << 20])
def test_a_response_completed_event_over_a_mebibyte_is_metered(pieces):
    stream = _image_completed(3 << 20)
    chunks = [stream] if pieces is None else [stream[i : i + pieces] for i in range(0, len(stream), pieces)]
    usage = meter("responses", chunks)
    assert (usage.state, usage.model, usage.input_tokens, usage.output_tokens) == (COMPLETE, "gpt-5", 300, 90)
    assert (usage.cache_read_tokens, usage.reasoning_tokens) == (256, 64)
    # Without its last newline (the stream ends on the event), and cut inside it: partial, nothing read.
    assert meter("responses", [stream[:-2]]).input_tokens == 300
    cut = meter("responses", [stream[: len(stream) // 2]], complete=False)
    assert (cut.state, cut.input_tokens) == (PARTIAL, None)


def test_a_huge_line_keeps_bounded_memory():
    import tracemalloc

    stream = _image_completed(8 << 20)
    usage_meter = UsageMeter()
    usage_meter.start("responses", SSE)
    tracemalloc.start()
    try:
        for i in range(0, len(stream), 16 << 10):
            usage_meter.feed(stream[i : i + (16 << 10)])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert usage_meter.result(True).input_tokens == 300
    assert peak < 2 << 20, peak  # head and tail of the 8 MiB line, not the line


@pytest.mark.parametrize(
    ("dialect", "events", "at_least"),
    [
        # Reasoning (DeepSeek's reasoning_content, OpenRouter's reasoning) and tool-call arguments.
        ("openai", [{"choices": [{"delta": {"reasoning_content": "r"}}]}] * 5, 5),
        ("openai", [{"choices": [{"delta": {"reasoning": "r"}}]}] * 4, 4),
        ("openai", [{"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}}]}] * 3, 3),
        ("responses", [{"type": "response.reasoning_summary_text.delta", "delta": "r"}] * 5, 5),
        ("responses", [{"type": "response.function_call_arguments.delta", "delta": "{"}] * 3, 3),
        ("responses", [{"type": "response.output_text.delta", "delta": 'a .delta" b'}] * 2, 2),
    ],
)
def test_a_cut_stream_estimates_every_kind_of_output(dialect, events, at_least):
    stream = sse(*events, named=dialect == "responses")
    usage = meter(dialect, [stream], complete=False)
    assert usage.state == PARTIAL and usage.estimated_output_tokens == at_least


@pytest.mark.parametrize("value", [1 << 64, (1 << 64) - 1, 1 << 40, -1, 1.5, True, "12"])
def test_a_token_count_out_of_range_is_refused_and_never_poisons_a_sum(value):
    literal = str(value).encode() if value.__class__ is int else orjson.dumps(value)  # orjson writes no int > 2^64-1
    body = b'{"model":"m","usage":{"prompt_tokens":' + literal + b',"completion_tokens":2}}'
    usage = meter("openai", [body], b"application/json")
    assert (usage.input_tokens, usage.output_tokens) == (None, 2)
    start = {"type": "message_start", "message": {"model": "c", "usage": {"input_tokens": 5, "output_tokens": 1}}}
    delta = {
        "type": "message_delta",
        "usage": {"output_tokens": 4, "cache_read_input_tokens": 7, "cache_creation_input_tokens": 1},
    }
    stream = sse(start, delta).replace(b'"cache_read_input_tokens":7', b'"cache_read_input_tokens":' + literal)
    usage = meter("anthropic", [stream])
    assert (usage.input_tokens, usage.cache_read_tokens, usage.output_tokens) == (6, None, 4)
    orjson.dumps(usage.input_tokens)  # every sum stays a 64-bit integer


def test_raw_deflate_is_read_whatever_the_size_of_its_first_read():
    import zlib

    document = _openai_completion({"model": "gpt-fake", "messages": []}, "chatcmpl-z")
    document["padding"] = "x" * 4000
    squeezer = zlib.compressobj(wbits=-15, level=0)  # stored: the coded body stays > 1 KiB
    body = squeezer.compress(orjson.dumps(document)) + squeezer.flush()
    assert len(body) > 2048
    for pieces in (None, 1024, 1500, 7):
        usage = compressed_meter(body, b"deflate", b"application/json", pieces)
        assert (usage.state, usage.input_tokens) == (COMPLETE, document["usage"]["prompt_tokens"]), pieces


def test_a_json_body_cut_short_is_missing_because_cut_not_unparseable():
    body = orjson.dumps(_openai_completion({"model": "gpt-fake", "messages": []}, "chatcmpl-z"))
    cut = meter("openai", [body[: len(body) // 2]], b"application/json", complete=False)
    assert (cut.state, cut.reason) == (MISSING, "cut")
    broken = meter("openai", [body[: len(body) // 2]], b"application/json", complete=True)
    assert (broken.state, broken.reason) == (UNPARSEABLE, "not_json")


def test_web_searches_are_counted_latest_wins_and_null_where_the_api_is_silent():
    start = {
        "type": "message_start",
        "message": {
            "model": "c",
            "usage": {"input_tokens": 5, "output_tokens": 1, "server_tool_use": {"web_search_requests": 0}},
        },
    }
    deltas = [
        {"type": "message_delta", "usage": {"output_tokens": 9, "server_tool_use": {"web_search_requests": n}}}
        for n in (1, 3)
    ]
    assert meter("anthropic", [sse(start, *deltas)]).web_search_requests == 3  # cumulative, not 0 + 1 + 3
    calls = [{"type": "web_search_call", "id": f"ws_{i}", "status": "completed"} for i in range(2)]
    body = orjson.dumps({"model": "gpt-5", "output": [*calls, {"type": "message"}], "usage": RESPONSE_USAGE})
    assert meter("responses", [body], b"application/json").web_search_requests == 2
    assert meter("responses", [RESPONSES_STREAM]).web_search_requests is None  # no `output` said
    assert meter("openai", [OPENAI_STREAM]).web_search_requests is None


# -- batches ----------------------------------------------------------------------------------------

_RESULT_TEXT = "Hello! How can I help?"


def _result_line(custom_id: str, outcome: str = "succeeded", model: str = "claude-sonnet-4-5", **counts) -> bytes:
    """One line of Anthropic's Message Batch results, in the shape of the API reference's example."""
    if outcome != "succeeded":
        error = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
        result = {"type": outcome, **({"error": error} if outcome == "errored" else {})}
    else:
        usage = {"input_tokens": 10, "output_tokens": 30, **counts}
        message = {"id": f"msg_{custom_id}", "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": _RESULT_TEXT}], "stop_reason": "end_turn",
                   "stop_sequence": None, "usage": usage}  # fmt: skip
        result = {"type": "succeeded", "message": message}
    return orjson.dumps({"custom_id": custom_id, "result": result}) + b"\n"


def batch_results(chunks: list[bytes], complete: bool = True, coding: bytes = b""):
    from egress.usage import ANTHROPIC_BATCH_RESULTS, BatchResultsMeter

    results_meter = BatchResultsMeter("msgbatch_01")
    results_meter.start(ANTHROPIC_BATCH_RESULTS, b"application/binary", coding)
    for chunk in chunks:
        results_meter.feed(chunk)
    return results_meter.result(complete)


RESULTS = b"".join(
    [
        _result_line(
            "a",
            cache_read_input_tokens=100,
            cache_creation_input_tokens=50,
            cache_creation={"ephemeral_5m_input_tokens": 50, "ephemeral_1h_input_tokens": 0},
        ),
        _result_line("b", outcome="errored"),
        _result_line("c", output_tokens=7, server_tool_use={"web_search_requests": 2}),
        _result_line("d", outcome="expired"),
        _result_line("e", outcome="canceled"),
    ]
)


def _summed(usage) -> tuple:
    return (
        usage.state,
        usage.reason,
        usage.model,
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_tokens,
        usage.cache_creation_tokens,
        usage.cache_creation_5m_tokens,
        usage.web_search_requests,
        usage.response_id,
        usage.batch,
    )


def test_a_batchs_results_are_summed_request_by_request_in_any_reads():
    """Each succeeded line's Message is read as any Message is (cache reads and writes count as
    input once), and the lines add up; errored, expired and canceled requests cost nothing."""
    whole = batch_results([RESULTS])
    assert _summed(whole) == (COMPLETE, None, "claude-sonnet-4-5", 170, 37, 100, 50, 50, 2, "msgbatch_01", True)
    for size in (1, 7, 100):
        assert _summed(batch_results([RESULTS[i : i + size] for i in range(0, len(RESULTS), size)])) == _summed(whole)
    # The last line without its newline is read at the end.
    assert _summed(batch_results([RESULTS.rstrip(b"\n")])) == _summed(whole)


@given(st.lists(st.integers(min_value=1, max_value=400), max_size=12))
@settings(max_examples=60, deadline=None)
def test_a_batchs_results_read_the_same_however_they_are_cut(sizes):
    assert _summed(batch_results(cut_into(RESULTS, sizes))) == _summed(batch_results([RESULTS]))


def test_a_batchs_results_cut_short_or_with_an_unreadable_line_say_so():
    cut = batch_results([RESULTS[: len(RESULTS) // 2]], complete=False)
    assert (cut.state, cut.reason, cut.input_tokens) == (PARTIAL, "cut", 160)  # line a only: the rest never came
    garbled = batch_results([_result_line("a"), b'{"custom_id":"x","result":{"usage": \n', _result_line("b")])
    assert (garbled.state, garbled.reason, garbled.input_tokens, garbled.output_tokens) == (PARTIAL, "not_json", 20, 60)
    mixed = batch_results([_result_line("a"), _result_line("b", model="claude-haiku-4-5")])
    assert (mixed.state, mixed.model, mixed.input_tokens) == (COMPLETE, None, 20)  # two models: none named
    failed = batch_results([_result_line("a", outcome="errored")])
    assert (failed.state, failed.input_tokens, failed.output_tokens) == (COMPLETE, 0, 0)  # nothing billed
    empty = batch_results([b""])
    assert (empty.state, empty.reason) == (MISSING, "not_reported")


def test_a_batch_result_line_over_the_bound_is_left_out_with_bounded_memory(monkeypatch):
    import egress.usage as usage_module

    monkeypatch.setattr(usage_module, "_MAX_RESULT_LINE", 4096)
    huge = _result_line("big").replace(_RESULT_TEXT.encode(), b"x" * 10_000)
    body = _result_line("a") + huge + _result_line("b")
    for size in (len(body), 1000, 333):
        usage = batch_results([body[i : i + size] for i in range(0, len(body), size)])
        assert (usage.state, usage.reason, usage.input_tokens) == (PARTIAL, "too_large", 20)


def test_a_gzip_batchs_results_are_read_from_a_decoded_copy():
    usage = batch_results([gzip_bytes(RESULTS)], coding=b"gzip")
    assert _summed(usage) == _summed(batch_results([RESULTS]))


def test_an_openai_batch_object_bills_its_tokens_once_it_is_done():
    """OpenAI's Batch object carries its tokens (`usage`, Responses API names) once the batch is done;
    queued or running, it says why its usage is missing. A list of batches bills nothing."""
    batch = {"id": "batch_1", "object": "batch", "endpoint": "/v1/chat/completions", "model": "gpt-4o-mini"}
    counts = {"input_tokens": 1500, "input_tokens_details": {"cached_tokens": 1024}, "output_tokens": 500,
              "output_tokens_details": {"reasoning_tokens": 300}, "total_tokens": 2000}  # fmt: skip

    def read(document: dict):
        return meter("batch", [orjson.dumps(document)], b"application/json")

    for status in ("validating", "in_progress", "finalizing", "cancelling"):
        usage = read({**batch, "status": status, "usage": counts})
        assert (usage.state, usage.reason, usage.input_tokens, usage.response_id, usage.batch) == (
            MISSING, "batch", None, "batch_1", True,
        )  # fmt: skip
    for status in ("completed", "failed", "expired", "cancelled"):
        usage = read({**batch, "status": status, "usage": counts})
        assert (usage.state, usage.model, usage.input_tokens, usage.output_tokens) == (
            COMPLETE,
            "gpt-4o-mini",
            1500,
            500,
        )
        assert (usage.cache_read_tokens, usage.reasoning_tokens, usage.response_id) == (1024, 300, "batch_1")
    old = read({**batch, "status": "completed"})  # created before batches carried usage
    assert (old.state, old.reason, old.batch) == (MISSING, "not_reported", True)
    listing = read({"object": "list", "data": [{**batch, "status": "completed", "usage": counts}]})
    assert (listing.state, listing.input_tokens, listing.batch) == (MISSING, None, False)
    anthropic = meter(
        "anthropic_batch", [orjson.dumps({"id": "msgbatch_1", "type": "message_batch"})], b"application/json"
    )
    assert (anthropic.state, anthropic.reason, anthropic.response_id, anthropic.batch) == (
        MISSING, "batch", "msgbatch_1", True,
    )  # fmt: skip


def test_batch_paths_name_their_api():
    from egress.usage import api_of, batch_id_of

    assert api_of(b"/v1/batches", "openai") == "batch"
    assert api_of(b"/v1/batches/batch_1/cancel", "openai") == "batch"
    assert api_of(b"/v1/messages/batches", "anthropic") == "anthropic_batch"
    assert api_of(b"/v1/messages/batches/msgbatch_1", "anthropic") == "anthropic_batch"
    assert api_of(b"/v1/messages/batches/msgbatch_1/results", "anthropic") == "anthropic_batch_results"
    assert api_of(b"/v1/messages", "anthropic") == "anthropic"
    assert batch_id_of(b"/v1/messages/batches/msgbatch_1/results") == "msgbatch_1"
    assert batch_id_of(b"/v1/messages/batches//results") is None


def test_a_compressed_batchs_results_are_read_past_a_json_bodys_bound(monkeypatch):
    """A results body is read line by line, never held: a JSON body's decoded bound (_MAX_DECODED,
    64 MiB) cut a real one short. A batch of 100,000 requests runs past it; its gzip read was
    `unparseable`, with no batch id, and the proxy then called it a read back, `not_metered`: never
    billed. Decoded a step at a time, memory bounded however well it compresses."""
    import egress.usage as usage_module

    monkeypatch.setattr(usage_module, "_MAX_DECODED", 4096)
    body = RESULTS * 40  # 29 KiB decoded: past the bound, as 64 MiB is past the real one
    expected = _summed(batch_results([body]))
    assert expected[:2] == (COMPLETE, None) and expected[3] == 170 * 40
    coded = gzip_bytes(body)
    for size in (len(coded), 1000, 7):
        assert _summed(batch_results([coded[i : i + size] for i in range(0, len(coded), size)], coding=b"gzip")) == (
            expected
        )
    monkeypatch.setattr(usage_module, "_RESULTS_STEP", 100)  # a read's output left in zlib's tail, a step at a time
    assert _summed(batch_results([coded], coding=b"gzip")) == expected


def test_a_batchs_results_that_cannot_be_decoded_say_why_and_keep_the_batch_id(monkeypatch):
    """Before, each of these lost the batch id (the fact became `not_metered`, the gap unnamed) and
    the requests read so far."""
    import egress.usage as usage_module

    coded = gzip_bytes(RESULTS)
    unended = batch_results([coded[:-8]], coding=b"gzip")  # the framing ended, the gzip stream did not
    assert _summed(unended) == (PARTIAL, "content_encoding", *_summed(batch_results([RESULTS]))[2:])
    cut = batch_results([coded[:-8]], complete=False, coding=b"gzip")
    assert (cut.state, cut.reason, cut.input_tokens, cut.response_id) == (PARTIAL, "cut", 170, "msgbatch_01")
    garbage = batch_results([b"\x1f\x8b\x08\x00garbage-not-gzip" * 4], coding=b"gzip")
    assert (garbage.state, garbage.reason, garbage.input_tokens, garbage.batch) == (
        UNPARSEABLE, "content_encoding", None, True,
    )  # fmt: skip
    unknown = batch_results([b"\x28\xb5\x2f\xfd" + b"x" * 30], coding=b"zstd")
    assert (unknown.state, unknown.reason, unknown.response_id) == (UNPARSEABLE, "content_encoding", "msgbatch_01")
    raw = batch_results([zlib_raw_deflate(RESULTS)], coding=b"deflate")  # `deflate` sent without its zlib header
    assert _summed(raw) == _summed(batch_results([RESULTS]))
    monkeypatch.setattr(usage_module, "_MAX_RESULTS_DECODED", len(RESULTS))  # a bomb's bound
    monkeypatch.setattr(usage_module, "_RESULTS_STEP", 256)  # passed by one step at most: not a line more
    bomb = batch_results([gzip_bytes(RESULTS * 3)], coding=b"gzip")
    assert (bomb.state, bomb.reason, bomb.input_tokens, bomb.response_id) == (PARTIAL, "too_large", 170, "msgbatch_01")


def zlib_raw_deflate(data: bytes) -> bytes:
    import zlib

    coder = zlib.compressobj(wbits=-15)
    return coder.compress(data) + coder.flush()


def test_a_batchs_results_naming_many_models_hold_none_of_them():
    """`model` is the batch's when every request names one, else null: told by a flag, not a set of
    every model named, which held each of 100,000 lines' model (memory without bound)."""
    import tracemalloc

    body = b"".join(_result_line(str(n), model="m" * 150 + str(n)) for n in range(20_000))
    tracemalloc.start()
    try:
        results_meter = __import__("egress.usage", fromlist=["BatchResultsMeter"]).BatchResultsMeter("msgbatch_01")
        results_meter.start("anthropic_batch_results", b"application/binary")
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, len(body), 65536):
            results_meter.feed(body[start : start + 65536])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 256 << 10, held
    usage = results_meter.result(True)
    assert (usage.state, usage.model, usage.input_tokens) == (COMPLETE, None, 200_000)


def test_a_batch_objects_status_of_any_json_type_never_raises():
    """`status` looked up in a frozenset: a list or an object there raised TypeError (unhashable),
    out of the log phase, and the fact was lost. Not a string, it is no state of a batch: not done."""
    for status in ([], {"done": True}, None, 3):
        body = orjson.dumps({"id": "batch_1", "object": "batch", "status": status, "usage": {"input_tokens": 5}})
        usage = meter("batch", [body], b"application/json")
        assert (usage.state, usage.reason, usage.input_tokens, usage.batch) == (MISSING, "batch", None, True)


@pytest.mark.parametrize(
    ("path", "api", "batch_id"),
    [
        (b"/v1/messages/batches/msgbatch_1/result%73", "anthropic_batch_results", "msgbatch_1"),
        (b"/v1/messages/batches/msgbatch_%31/results", "anthropic_batch_results", "msgbatch_1"),
        (b"/v1/messages/batches/msgbatch_1/results/", "anthropic_batch_results", "msgbatch_1"),
        (b"/v1/%6Dessages/batches/msgbatch_1/results", "anthropic_batch_results", "msgbatch_1"),
        (b"/v1/messages/batches/msgbatch_1/cancel", "anthropic_batch", "msgbatch_1"),
        (b"/v1/batche%73/batch_1", "batch", None),
        (b"/v1/batches/batch_1/", "batch", None),
        (b"/v1/vector_stores/vs_1/file_batches/vsfb_1", "openai", None),  # not a Batch API object
    ],
)
def test_batch_paths_are_read_as_the_provider_routes_them(path, api, batch_id):
    """A server that decodes %-escapes before routing (most do) serves these as the plain paths:
    read otherwise, a batch's results went unmetered, or one batch was billed under two ids."""
    from egress.usage import api_of, batch_id_of

    assert api_of(path, "openai") == api
    if api.startswith("anthropic"):
        assert batch_id_of(path) == batch_id

"""The usage meter: the same numbers however the stream is cut into reads."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress.usage import COMPLETE, MISSING, PARTIAL, UNPARSEABLE, UsageMeter
from tests.fake_provider import _anthropic_events, _anthropic_message, _openai_completion, _openai_events

OPENAI_STREAM = b"".join(_openai_events({"model": "gpt-fake", "stream_options": {"include_usage": True}}))
ANTHROPIC_STREAM = b"".join(_anthropic_events({"model": "claude-fake"}))
SSE = b"text/event-stream; charset=utf-8"


def meter(dialect: str, chunks: list[bytes], content_type: bytes = SSE, complete: bool = True):
    usage_meter = UsageMeter()
    usage_meter.start(dialect, content_type)
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
    chunks, position = [], 0
    for size in sizes:
        chunks.append(stream[position : position + size])
        position += size
    chunks.append(stream[position:])
    assert meter(dialect, [c for c in chunks if c]) == meter(dialect, [stream])


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
    assert usage.state == PARTIAL and usage.output_tokens is None and usage.estimated_output_tokens == 6
    anthropic_cut = ANTHROPIC_STREAM[: ANTHROPIC_STREAM.index(b"content_block_stop")]
    usage = meter("anthropic", [anthropic_cut], complete=False)
    assert usage.state == PARTIAL and usage.input_tokens == 12 and usage.output_tokens == 1


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

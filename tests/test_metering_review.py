"""Metering review: usage read off passthrough streams, and the stream a caller gets when egress asked
for usage on its behalf (stream_usage.InjectedUsageFilter), on real recordings (tests/recordings)."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import orjson
import pytest

from egress.stream_usage import InjectedUsageFilter
from egress.usage import ANTHROPIC, PARTIAL, UsageMeter
from tests.support import wait_until, whole_lines
from tests.test_surface_cuts import _AnthropicStream as _LateEnd

RECORDINGS = Path(__file__).parent / "recordings"


def _recorded(name: str) -> bytes:
    return (RECORDINGS / name / "body").read_bytes()


def _filtered(chunks: list[bytes]) -> bytes:
    usage_filter = InjectedUsageFilter()
    return b"".join(usage_filter.feed(chunk) for chunk in chunks) + usage_filter.finish()


# -- a stream cut inside its last event --------------------------------------------------------------


def test_an_anthropic_stream_cut_inside_message_delta_is_estimated_not_message_starts_placeholder():
    """Cut inside message_delta's usage object: message_start's output_tokens (a placeholder, 5 here)
    was billed as the output, where a cut anywhere else gives the estimate from the deltas seen."""
    body = _recorded("anthropic__stream_thinking_tool_use")
    delta = body.rindex(b'"type":"message_delta"')
    before = body.rindex(b"\n", 0, delta) + 1  # the message_delta data line starts here
    inside = body.index(b'"usage":', delta) + len(b'"usage":{"output')
    readings = []
    for cut in (before, inside):
        meter = UsageMeter()
        meter.start(ANTHROPIC, b"text/event-stream")
        meter.feed(body[:cut])
        usage = meter.result(False)
        readings.append((usage.state, usage.reason, usage.input_tokens, usage.output_tokens))
        assert usage.estimated_output_tokens and usage.estimated_output_tokens > 5, (cut - before, usage)
    assert readings[0] == readings[1] == (PARTIAL, "cut", 424, None)


# -- the injected-usage filter ---------------------------------------------------------------------


def test_the_lines_before_an_over_long_line_are_still_filtered():
    """A read whose last line is over the carry limit: the whole lines before it went out unfiltered,
    their `"usage":null` and the usage-only chunk the caller never asked for included."""
    usage_chunk = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    first = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}\n\n'
    huge = b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"' + b"x" * ((1 << 20) + 4096) + b'"}}]}\n\n'
    stream = first + usage_chunk + huge + b"data: [DONE]\n\n"
    expected = first.replace(b',"usage":null', b"") + huge + b"data: [DONE]\n\n"
    cut = len(first) + len(usage_chunk) + 100 + (1 << 20)  # inside the huge line, over the limit into it
    assert _filtered([stream[:cut], stream[cut:]]) == expected
    assert _filtered([stream]) == expected


def test_a_long_line_in_small_reads_is_filtered_in_linear_time():
    """The filter joined its carry with every read: a line of L bytes in k-byte reads cost L²/2k byte
    copies (the meter was fixed for the same reason): 600 KB in 8-byte reads took 1.3 s, 0.03 s now."""
    line = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"y" * 600_000 + b'"}}],"usage":null}\n\n'
    pieces = [line[at : at + 8] for at in range(0, len(line), 8)]
    started = time.perf_counter()
    out = _filtered(pieces)
    elapsed = time.perf_counter() - started
    assert out == line.replace(b',"usage":null', b"")
    assert elapsed < 0.5, elapsed


# -- the OpenAI SDK closes at [DONE] ---------------------------------------------------------------


@pytest.mark.parametrize("asked", [False, True], ids=["usage-injected", "usage-asked-relayed"])
def test_an_sdk_closing_at_done_is_a_complete_response(start_egress, tmp_path, asked):
    """The OpenAI SDK closes its response at [DONE] (openai/_streaming.py, Stream.__stream__), before
    the provider's terminating chunk arrives. That close was a client_gone with usage partial/cut,
    although the provider's usage chunk had been read whole: with include_usage added by egress
    (filtered for the caller), and on a stream relayed as it came (the caller asked for usage)."""
    recorded = _recorded("openai__chat_stream_tools_small")
    upstream = _LateEnd(recorded, b"0\r\n\r\n", pause=0.5)
    usage_file = tmp_path / "usage.jsonl"
    try:
        config = f'[providers.openai]\nbase_url = "{upstream.base_url}"\n[usage]\njsonl = "{usage_file}"\n'
        egress = start_egress(config)
        client = openai.OpenAI(base_url=egress.url + "/openai/v1", api_key="sk-byo", max_retries=0)
        options = {"stream_options": {"include_usage": True}} if asked else {}
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True, **options
            )
        )
        if asked:
            assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 53  # relayed
        else:
            assert chunks and chunks[-1].choices and chunks[-1].usage is None  # no chunk it didn't ask for
        assert wait_until(lambda: usage_file.exists() and whole_lines(usage_file.read_bytes()), timeout=3)
        (line,) = whole_lines(usage_file.read_bytes())
        fact = orjson.loads(line)
        got = (fact["usage"], fact["outcome"], fact["input_tokens"], fact["output_tokens"])
        assert got == ("complete", "complete", 53, 15), fact
    finally:
        upstream.stop()

"""Usage injection: the request gains include_usage; the caller's stream is what it would have been."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress.stream_usage import InjectedUsageFilter, inject_include_usage
from tests.fake_provider import _openai_events
from tests.support import cut_into

WITHOUT = b"".join(_openai_events({"model": "gpt-fake"}))
WITH = b"".join(_openai_events({"model": "gpt-fake", "stream_options": {"include_usage": True}}))


def test_injection():
    body = orjson.loads(inject_include_usage(b'{"model":"m","stream":true,"messages":[]}'))
    assert body["stream_options"] == {"include_usage": True} and body["messages"] == []
    merged = orjson.loads(inject_include_usage(b'{"stream":true,"stream_options":{"include_obfuscation":false}}'))
    assert merged["stream_options"] == {"include_obfuscation": False, "include_usage": True}


@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"m","messages":[]}',
        b'{"model":"m","stream":false}',
        b'{"stream":true,"stream_options":{"include_usage":true}}',
        b'{"stream": true, "oops"',
        b'{"stream":"true"}',
        b"[1]",
    ],
)
def test_nothing_to_inject(body):
    assert inject_include_usage(body) is None


def filtered(chunks: list[bytes]) -> bytes:
    usage_filter = InjectedUsageFilter()
    return b"".join(usage_filter.feed(chunk) for chunk in chunks) + usage_filter.finish()


def test_the_caller_sees_the_stream_it_would_have_had():
    assert WITH != WITHOUT
    assert filtered([WITH]) == WITHOUT


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=1, max_size=40))
def test_however_the_stream_is_cut(sizes):
    assert filtered([chunk for chunk in cut_into(WITH, sizes) if chunk]) == WITHOUT


def test_every_single_cut():
    for cut in range(1, len(WITH)):
        assert filtered([WITH[:cut], WITH[cut:]]) == WITHOUT, cut


def test_usage_beside_content_is_kept():
    line = b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":{"prompt_tokens":1}}\n\n'
    assert filtered([line]) == line

"""A translated answer cut short is a cut for the caller too, never a clean 200 without a completion."""

from __future__ import annotations

import openai
import orjson
import pytest

from tests import test_surface
from tests.support import RawClient, request_bytes

surface = test_surface.surface


def post(egress, body: dict, scenario: str, extra: dict | None = None):
    with RawClient(egress.port) as client:
        headers = {"Content-Type": "application/json", "x-fake-scenario": scenario, **(extra or {})}
        client.send(request_bytes("POST", "/v1/chat/completions", headers, orjson.dumps(body)))
        response = client.read_response("POST")
        return response, client.server_closed()


def test_a_json_answer_cut_mid_body_cuts_the_caller(surface):
    response, closed = post(
        surface, {"model": "claude-fake", "messages": [{"role": "user", "content": "hi"}]}, "stream-cut"
    )
    assert not response.complete  # chunked without its terminator: a cut
    assert closed
    assert b'"choices"' not in response.body


def test_a_json_answer_cut_mid_body_is_an_error_in_the_sdk(surface):
    client = openai.OpenAI(base_url=surface.url + "/v1", api_key="sk-byo-surface", max_retries=0)
    with pytest.raises(openai.APIError):
        client.chat.completions.create(
            model="claude-fake",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-scenario": "stream-cut"},
        )


def test_a_stream_that_ends_without_message_stop_cuts_the_caller(surface):
    body = {"model": "claude-fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    response, closed = post(surface, body, "long-stream", {"x-fake-events": "3", "x-fake-interval": "0"})
    assert response.status == 200
    assert not response.complete
    assert closed
    assert b"[DONE]" not in response.body

"""Review probes: the openai npm package (tests/node/review.mjs) against the real egress."""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest

from tests import test_surface
from tests.support import ScriptedUpstream, run_node_script, wait_until, whole_lines
from tests.test_surface_cuts import _AnthropicStream

surface = test_surface.surface

pytestmark = pytest.mark.timeout(60)

NODE_DIR = Path(__file__).parent / "node"
SCRIPT = NODE_DIR / "review.mjs"
KEY = "byo-node-review"  # of no provider's key form: it goes to openai and anthropic alike


def run_node(egress, scenario: str, base: str = "/v1", **env_extra: str) -> dict:
    env = {name: value for name, value in os.environ.items() if not name.startswith("OPENAI_")}
    env["EGRESS_API_KEY"] = KEY
    env.update(env_extra)
    return run_node_script(SCRIPT, [egress.url + base, scenario], env)


def test_the_sdks_request_id_is_the_providers_on_a_translated_answer(surface, fake_provider):
    """openai-node reads `request_id` (and an error's `requestID`) off `x-request-id` alone; Anthropic
    names its id `request-id`. Before, every translated answer gave the SDK none."""
    chat = run_node(surface, "request-id")
    responses = run_node(surface, "request-id-responses")
    limited = run_node(surface, "rate-limited")
    first, second, third = fake_provider.requests
    assert chat["requestID"] == chat["dataRequestID"] == first.response_id
    assert chat["headers"]["request-id"] == first.response_id  # the provider's own header still relayed
    assert responses["requestID"] == second.response_id
    assert limited["error"]["status"] == 429 and limited["error"]["requestID"] == third.response_id


def _sse(event: dict) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (event["type"].encode(), orjson.dumps(event))


START = {
    "type": "message_start",
    "message": {
        "id": "msg_abort",
        "type": "message",
        "role": "assistant",
        "model": "claude-fake",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 20, "output_tokens": 1},
    },
}
OPEN_STREAM = b"".join(
    [
        _sse(START),
        _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        *(
            _sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f"word{i} "}})
            for i in range(5)
        ),
    ]
)


@pytest.mark.parametrize("scenario", ["abort-chat", "abort-chat-break", "abort-responses"])
def test_a_stream_the_sdk_aborts_is_client_gone_with_its_input_billed(start_egress, tmp_path, scenario):
    """AbortController (or a `break` out of the iterator) mid-stream: the fact says client_gone,
    with the provider's input tokens and the output estimated from the text relayed."""
    upstream = _AnthropicStream(OPEN_STREAM, b"", pause=8)  # the stream stays open: only the caller ends it
    try:
        usage_file = tmp_path / "usage.jsonl"
        egress = start_egress(
            f'[providers.anthropic]\nbase_url = "{upstream.base_url}"\n[usage]\njsonl = "{usage_file}"\n'
        )
        observed = run_node(egress, scenario)
        if scenario != "abort-chat-break":
            assert observed["error"]["class"] == "APIUserAbortError", observed
        assert wait_until(lambda: usage_file.exists() and whole_lines(usage_file.read_bytes()), timeout=5)
        (line,) = whole_lines(usage_file.read_bytes())
        fact = orjson.loads(line)
        assert (fact["outcome"], fact["usage"], fact["usage_reason"]) == ("client_gone", "partial", "cut"), fact
        assert fact["input_tokens"] == 20 and fact["estimated_output_tokens"] > 0, fact
    finally:
        upstream.stop()


def _anthropic_error(status: int, kind: str, message: str) -> bytes:
    body = orjson.dumps({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_long"})
    head = f"HTTP/1.1 {status} Bad Request\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"request-id: req_long\r\n\r\n" + body


@pytest.mark.parametrize("stream", ["false", "true"])
def test_a_prompt_too_long_on_the_responses_api_names_input_not_messages(start_egress, stream):
    """Anthropic's "prompt is too long" is OpenAI's context_length_exceeded; on /v1/responses its
    param is the field the caller sent, `input` (responses_codec.responses_param), never chat's
    `messages`, which a Responses caller has no such field named."""
    upstream = ScriptedUpstream(
        [_anthropic_error(400, "invalid_request_error", "prompt is too long: 208656 tokens > 200000 maximum")]
    )
    try:
        egress = start_egress(f'[providers.anthropic]\nbase_url = "{upstream.base_url}"\n')
        body = orjson.dumps({"model": "claude-fake", "input": "hi", "stream": stream == "true"}).decode()
        observed = run_node(egress, "responses-raw", BODY=body)
        error = observed["error"]
        assert (error["status"], error["code"], error["type"]) == (
            400,
            "context_length_exceeded",
            "invalid_request_error",
        )
        assert error["param"] == "input", error
        assert error["requestID"] == "req_long"
    finally:
        upstream.stop()

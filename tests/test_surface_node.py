"""The unified surface through the openai npm package under node, against the strict fake Anthropic.

tests/node/surface.mjs runs one scenario with the SDK unchanged and prints what it observed as one JSON
document; each test here compares that with what the fake provider received and sent. node and the
pinned package come from `.ci/run` (apt-get install nodejs npm when node is missing, then
`npm ci --prefix tests/node`): without them these tests fail, they never skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest

from tests import test_surface
from tests.fake_provider import TINY_PNG_BASE64

surface = test_surface.surface  # the same fixture: egress routing claude-* to the fake Anthropic

pytestmark = pytest.mark.timeout(60)  # egress start plus one node run (itself capped at NODE_TIMEOUT)

NODE_DIR = Path(__file__).parent / "node"
SCRIPT = NODE_DIR / "surface.mjs"
NODE_TIMEOUT = 30
KEY = "byo-node-surface"  # of no provider's key form: it goes to openai and anthropic alike
SYSTEM = ["You are terse.", "Answer in English."]  # surface.mjs sends these as system, then developer


def run_node(egress, scenario: str) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: `.ci/run` installs it (apt-get install nodejs npm)")
    if not (NODE_DIR / "node_modules" / "openai" / "package.json").exists():
        pytest.fail("tests/node/node_modules/openai is missing: `.ci/run` installs it (npm ci --prefix tests/node)")
    # A copy for the child alone; OPENAI_* variables left out so none overrides what the script passes.
    env = {name: value for name, value in os.environ.items() if not name.startswith("OPENAI_")}
    env["EGRESS_API_KEY"] = KEY
    command = [node, str(SCRIPT), egress.url + "/v1", scenario]
    try:
        done = subprocess.run(
            command, cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=NODE_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"node {scenario} ran over {NODE_TIMEOUT}s\nstdout:\n{expired.stdout}\nstderr:\n{expired.stderr}")
    shown = f"node {scenario} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    print(shown)  # captured by pytest, shown with any failure of the test that ran it
    if done.returncode != 0 or not done.stdout.strip():
        pytest.fail(shown)
    try:
        observed = orjson.loads(done.stdout.strip().splitlines()[-1])
    except orjson.JSONDecodeError:
        pytest.fail(shown)
    assert observed["scenario"] == scenario and observed["sdkVersion"] == pinned_version(), shown
    return observed


def pinned_version() -> str:
    return orjson.loads((NODE_DIR / "package.json").read_bytes())["dependencies"]["openai"]


def sent_events(fake_provider, request) -> list[dict]:
    """The Anthropic SSE events the fake sent in answer to `request`, in order."""
    body = fake_provider.sent_bodies[request.response_id]
    events = []
    for block in body.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                events.append(orjson.loads(line[6:]))
    return events


def streamed_text(events: list[dict]) -> str:
    return "".join(
        event["delta"]["text"]
        for event in events
        if event["type"] == "content_block_delta" and event["delta"]["type"] == "text_delta"
    )


def test_a_plain_completion_with_system_and_developer_messages(surface, fake_provider):
    observed = run_node(surface, "plain")
    completion = observed["completion"]
    [request] = fake_provider.requests
    body, sent = request.json(), orjson.loads(fake_provider.sent_bodies[request.response_id])
    assert request.target.startswith("/v1/messages") and body["model"] == "claude-fake"
    # Every system and developer message reached Anthropic's system, in order; the user turn alone in messages.
    assert [block["text"] for block in body["system"]] == SYSTEM
    assert [message["role"] for message in body["messages"]] == ["user"]
    assert request.header("x-api-key") == KEY and request.header("authorization") is None
    assert observed["contentType"].startswith("application/json")
    assert (completion["object"], completion["model"]) == ("chat.completion", "claude-fake")
    assert completion["choices"][0]["message"]["content"] == sent["content"][0]["text"]
    assert completion["choices"][0]["finish_reason"] == "stop"
    usage = completion["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        sent["usage"]["input_tokens"],
        sent["usage"]["output_tokens"],
    )
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_stream_accumulates_in_the_sdk_helper(surface, fake_provider):
    observed = run_node(surface, "stream")
    assert "error" not in observed, observed.get("error")
    [request] = fake_provider.requests
    body, events = request.json(), sent_events(fake_provider, request)
    assert body["stream"] is True and "stream_options" not in body
    assert [block["text"] for block in body["system"]] == SYSTEM
    final = observed["final"]
    text = streamed_text(events)
    assert text and final["choices"][0]["message"]["content"] == text
    assert "".join(observed["content"]) == text  # the helper's content.delta events, piece by piece
    assert final["choices"][0]["finish_reason"] == "stop"
    # include_usage: one last chunk with no choices carries the usage, equal to the provider's.
    last = observed["chunks"][-1]
    assert last["choices"] == [] and last["usage"] == final["usage"]
    assert all(chunk.get("usage") is None for chunk in observed["chunks"][:-1])
    start = next(event for event in events if event["type"] == "message_start")
    delta = next(event for event in events if event["type"] == "message_delta")
    assert (final["usage"]["prompt_tokens"], final["usage"]["completion_tokens"]) == (
        start["message"]["usage"]["input_tokens"],
        delta["usage"]["output_tokens"],
    )


def test_parallel_tool_calls_stream_with_their_own_ids_names_and_arguments(surface, fake_provider):
    observed = run_node(surface, "parallel-tools")
    streamed = observed["streamed"]
    assert "error" not in streamed, streamed.get("error")
    first, second = fake_provider.requests
    assert [tool["name"] for tool in first.json()["tools"]] == ["get_weather", "get_time"]
    events = sent_events(fake_provider, first)
    uses = [
        event["content_block"]
        for event in events
        if event["type"] == "content_block_start" and event["content_block"]["type"] == "tool_use"
    ]
    inputs = [
        "".join(
            event["delta"]["partial_json"]
            for event in events
            if event["type"] == "content_block_delta" and event["index"] == index
        )
        for index in (1, 2)
    ]
    message = streamed["final"]["choices"][0]["message"]
    calls = message["tool_calls"]
    assert len(calls) == 2 and len({call["id"] for call in calls}) == 2
    assert [call["id"] for call in calls] == [use["id"] for use in uses]
    assert [call["function"]["name"] for call in calls] == ["get_weather", "get_time"]
    assert [orjson.loads(call["function"]["arguments"]) for call in calls] == [orjson.loads(i) for i in inputs]
    assert [orjson.loads(call["function"]["arguments"]) for call in calls] == [{"city": "fake"}, {"tz": "fake"}]
    assert message["content"] == streamed_text(events)
    assert streamed["final"]["choices"][0]["finish_reason"] == "tool_calls"
    # The helper's per-call events saw each call finish whole, under its own name.
    done = sorted((event["index"], event["name"], event["arguments"]) for event in streamed["toolArguments"])
    expected = [(index, call["function"]["name"], call["function"]["arguments"]) for index, call in enumerate(calls)]
    assert done == expected
    # The SDK's own assistant message and tool results went back as tool_use / tool_result pairs.
    assert "error" not in observed["answer"], observed["answer"].get("error")
    followup = second.json()["messages"]
    assistant = followup[1]["content"]
    assert [(block["id"], block["name"]) for block in assistant if block["type"] == "tool_use"] == [
        (call["id"], call["function"]["name"]) for call in calls
    ]
    results = followup[-1]["content"]
    expected = [("tool_result", call["id"]) for call in calls]
    assert [(block["type"], block["tool_use_id"]) for block in results] == expected
    assert observed["answer"]["completion"]["choices"][0]["message"]["content"]


def test_an_image_as_a_data_uri_arrives_as_a_base64_source(surface, fake_provider):
    observed = run_node(surface, "image")
    assert "error" not in observed, observed.get("error")
    [request] = fake_provider.requests
    [message] = request.json()["messages"]
    images = [block for block in message["content"] if block["type"] == "image"]
    source = {"type": "base64", "media_type": "image/png", "data": TINY_PNG_BASE64}
    assert images == [{"type": "image", "source": source}]
    content = observed["completion"]["choices"][0]["message"]["content"]
    assert content == "images=1 base64=1 url=0 media_types=image/png"


def test_response_format_json_schema(surface, fake_provider):
    observed = run_node(surface, "json-schema")
    assert "error" not in observed, observed.get("error")
    [request] = fake_provider.requests
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    # Closed, as Anthropic's constrained decoding requires (egress/schemas.py).
    closed = {**schema, "additionalProperties": False}
    assert request.json()["output_config"]["format"] == {"type": "json_schema", "schema": closed}
    sent = orjson.loads(fake_provider.sent_bodies[request.response_id])
    assert observed["completion"]["choices"][0]["message"]["content"] == sent["content"][0]["text"]


def test_a_rate_limit_before_the_stream_is_the_sdks_rate_limit_error(surface, fake_provider):
    observed = run_node(surface, "rate-limited")
    assert "completion" not in observed
    [request] = fake_provider.requests
    sent = orjson.loads(fake_provider.sent_bodies[request.response_id])
    error = observed["error"]
    assert (error["class"], error["isRateLimitError"], error["status"]) == ("RateLimitError", True, 429)
    assert (error["code"], error["type"]) == ("rate_limit_error", "rate_limit_error")
    assert error["error"]["message"] == sent["error"]["message"]
    assert error["retryAfter"] == "1"


def test_an_error_during_the_stream_is_raised_after_the_text_before_it(surface, fake_provider):
    observed = run_node(surface, "stream-error")
    assert "final" not in observed
    [request] = fake_provider.requests
    events = sent_events(fake_provider, request)
    assert events[-1]["type"] == "error"
    error = observed["error"]
    assert error["isAPIError"] and not error["isConnectionError"]
    assert (error["code"], error["type"]) == ("overloaded_error", "server_error")
    assert error["error"]["message"] == events[-1]["error"]["message"] == "Overloaded"
    # What arrived before the error reached the application first.
    assert "".join(observed["content"]) == streamed_text(events) != ""


def test_a_cut_stream_is_an_error_never_a_clean_end(surface, fake_provider):
    observed = run_node(surface, "stream-cut")
    assert "final" not in observed, observed.get("final")
    [request] = fake_provider.requests
    assert "".join(observed["content"]) == streamed_text(sent_events(fake_provider, request)) != ""
    # node's fetch reports a body cut mid-chunk as "terminated"; a clean end without a finish_reason would fail
    # in the helper with another message, and an error event would carry a code.
    error = observed["error"]
    assert (error["message"], error["status"], error["code"]) == ("terminated", None, None), error


# -- the Responses API, through the same package -----------------------------------------------


def test_responses_create_translated(surface, fake_provider):
    observed = run_node(surface, "responses-text")
    response = observed["response"]
    assert response["object"] == "response" and response["status"] == "completed"
    assert response["output_text"] == "Hello from the fake provider."  # the SDK's own convenience field
    assert response["store"] is False and response["id"].startswith("resp_")
    body = orjson.loads(fake_provider.requests[-1].body)
    assert body["system"] == [{"type": "text", "text": "You are terse."}]


def test_responses_stream_in_the_sdk_helper(surface, fake_provider):
    observed = run_node(surface, "responses-stream")
    assert "error" not in observed, observed
    types = observed["types"]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert observed["sequence"] == list(range(observed["sequence"][0], observed["sequence"][0] + len(types)))
    final = observed["final"]
    assert (
        "".join(observed["deltas"])
        == final["output_text"]
        == streamed_text(sent_events(fake_provider, fake_provider.requests[-1]))
    )
    assert final["usage"]["output_tokens"] > 0


def test_responses_parallel_function_calls_round_trip(surface, fake_provider):
    observed = run_node(surface, "responses-tools")
    calls = [item for item in observed["streamed"]["final"]["output"] if item["type"] == "function_call"]
    assert [call["name"] for call in calls] == ["get_weather", "get_time"]
    assert observed["answer"]["response"]["output_text"]
    results = orjson.loads(fake_provider.requests[-1].body)["messages"][2]["content"]
    assert [block["tool_use_id"] for block in results] == [call["call_id"] for call in calls]


def test_responses_refuse_what_needs_stored_state(surface, fake_provider):
    error = run_node(surface, "responses-stateful")["error"]
    assert error["status"] == 400 and error["isAPIError"]
    assert error["error"]["param"] == "previous_response_id"
    assert fake_provider.requests == []

"""The OpenAI-compatible surface on Claude models as a user of the official openai SDK drives it, through the
real process and the strict fake Anthropic provider (tests/fake_provider.py): what the SDK sends back of
Claude's own answers is taken, and what it reads is valid for its types."""

from __future__ import annotations

import time

import openai
import orjson
import pytest

from tests.support import ScriptedUpstream
from tests.test_responses import WEATHER, gateway, last_anthropic_body, sdk  # noqa: F401  (gateway: the fixture)

CHAT_WEATHER = {
    "type": "function",
    "function": {"name": WEATHER["name"], "description": WEATHER["description"], "parameters": WEATHER["parameters"]},
}


@pytest.mark.parametrize("blank", ["\n\n", " ", "\t\n"], ids=["newlines", "space", "tab"])
def test_claudes_whitespace_text_before_a_call_goes_back_without_breaking_the_tool_loop(gateway, fake_provider, blank):  # noqa: F811
    # Claude may open a turn with a text block of whitespace alone before its tool_use ("\n\n"): the SDK's
    # stream accumulator makes it the assistant message's content, and the loop sends it back. Anthropic
    # refuses a whitespace-only text block ("text content blocks must contain non-whitespace text"), so
    # it went back as one and the next turn was a 400; it carries nothing, and is left out.
    client = sdk(gateway)
    call = {"id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be terse."}, {"type": "text", "text": blank}]},
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": blank, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "sunny"},
    ]
    answer = client.chat.completions.create(model="claude-fake", messages=messages, tools=[CHAT_WEATHER])
    assert answer.choices[0].message.content == "Hello from the fake provider."
    sent = last_anthropic_body(fake_provider)
    assert sent["system"] == [{"type": "text", "text": "Be terse."}]
    assert [block["type"] for block in sent["messages"][1]["content"]] == ["tool_use"]
    # The same history on the Responses API: an output_text item of whitespace before the call.
    items = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": blank, "annotations": []}],
        },
        {"type": "function_call", "call_id": "toolu_01", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "toolu_01", "output": "sunny"},
    ]
    response = client.responses.create(model="claude-fake", instructions=blank, input=items, tools=[WEATHER])
    assert response.output_text == "Hello from the fake provider."
    sent = last_anthropic_body(fake_provider)
    assert "system" not in sent
    assert [block["type"] for block in sent["messages"][1]["content"]] == ["tool_use"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_parameters_sent_as_null_are_echoed_as_their_defaults_valid_for_the_sdks_types(gateway, fake_provider, stream):  # noqa: F811
    # The SDK sends a None it is given as null (parallel_tool_calls is Optional[bool] in its params), which
    # the API takes as "not given". The response echoed the null, where the SDK's Response types a bool
    # (`parallel_tool_calls`) and a tool choice (`tool_choice`): an answer its strict validation refuses.
    from openai.types.responses import Response

    client = sdk(gateway)
    nulls = {"parallel_tool_calls": None, "temperature": None, "top_p": None}
    extra = {"tool_choice": None}  # not Optional in the SDK's params; sent as null by wrappers all the same
    if stream:
        with client.responses.with_streaming_response.create(
            model="claude-fake", input="hi", tools=[WEATHER], stream=True, extra_body=extra, **nulls
        ) as raw:
            lifecycle = [
                orjson.loads(line[6:])["response"]
                for line in raw.iter_lines()
                if line.startswith("data: ") and '"response":' in line
            ]
        assert len(lifecycle) == 3  # created, in_progress, completed
    else:
        raw = client.responses.with_raw_response.create(
            model="claude-fake", input="hi", tools=[WEATHER], extra_body=extra, **nulls
        )
        lifecycle = [orjson.loads(raw.text)]
    for echoed in lifecycle:
        validated = Response.model_validate(echoed)
        assert (validated.parallel_tool_calls, validated.tool_choice) == (True, "auto")
        assert (validated.temperature, validated.top_p) == (1.0, 1.0)


def test_cache_control_marks_on_responses_input_are_kept_as_on_chat(gateway, fake_provider):  # noqa: F811
    # The chat translation keeps a `cache_control` mark on a part or a message, the Responses one on a
    # function tool; on an input part, message or tool output it was dropped without a word, and the
    # prompt was never cached: every turn of a long session billed in full.
    mark = {"type": "ephemeral"}
    items = [
        {"role": "developer", "content": "Be terse.", "cache_control": mark},
        {"role": "user", "content": [{"type": "input_text", "text": "weather in Paris?", "cache_control": mark}]},
        {"type": "function_call", "call_id": "toolu_01", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "toolu_01", "output": "sunny", "cache_control": mark},
    ]
    client = sdk(gateway)
    first = client.responses.create(model="claude-fake", input=items, tools=[WEATHER])
    sent = last_anthropic_body(fake_provider)
    assert sent["system"] == [{"type": "text", "text": "Be terse.", "cache_control": mark}]
    assert sent["messages"][0]["content"] == [{"type": "text", "text": "weather in Paris?", "cache_control": mark}]
    assert sent["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_01", "content": "sunny", "cache_control": mark}
    ]
    # The caller sees the cache work: written on the first call, read on the second.
    assert first.usage.input_tokens_details.cache_write_tokens > 0
    second = client.responses.create(model="claude-fake", input=items, tools=[WEATHER])
    assert second.usage.input_tokens_details.cached_tokens == first.usage.input_tokens_details.cache_write_tokens


# -- a provider's answer of the wrong shape -------------------------------------------------------------

OPENING = {
    "type": "message_start",
    "message": {"id": "msg_odd", "type": "message", "role": "assistant", "content": [], "model": "claude-x",
                "stop_reason": None, "usage": {"input_tokens": 5, "output_tokens": 1}},
}  # fmt: skip


def _json_reply(document: dict) -> bytes:
    body = orjson.dumps(document)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\nrequest-id: req_odd\r\n\r\n"
    return head % len(body) + body


def _sse_reply(events: list[dict]) -> bytes:
    body = b"".join(b"event: %s\ndata: %s\n\n" % (event["type"].encode(), orjson.dumps(event)) for event in events)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\nrequest-id: req_odd\r\n\r\n"
    return head % len(body) + body


@pytest.fixture
def scripted(start_egress):
    """An egress whose anthropic row goes to a ScriptedUpstream: an Anthropic-compatible server's answers."""
    upstream = ScriptedUpstream([])
    egress = start_egress(
        f"""
[providers.anthropic]
base_url = "{upstream.base_url}"

[[routes]]
match = "claude-*"
provider = "anthropic"
"""
    )
    yield egress, upstream
    upstream.stop()


ODD_MESSAGES = {
    "content-a-number": {"content": 7, "stop_reason": "end_turn"},
    "stop-reason-a-list": {"content": [{"type": "text", "text": "hi"}], "stop_reason": ["end_turn"]},
}


@pytest.mark.parametrize("case", list(ODD_MESSAGES))
@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_message_of_the_wrong_shape_fails_the_call_at_once_never_hangs_it(scripted, api, case):
    # A field of the wrong type in an Anthropic-compatible server's message raised a TypeError in the
    # translation, out of the protocol callback: the exchange never ended, and the caller waited for its
    # own timeout. It is the provider's broken answer: the call fails at once, as for a cut one.
    egress, upstream = scripted
    upstream.replies.append(_json_reply({**OPENING["message"], **ODD_MESSAGES[case]}))
    client = openai.OpenAI(base_url=egress.url + "/v1", api_key="sk-ant-odd", max_retries=0, timeout=20)
    started = time.monotonic()
    with pytest.raises(openai.APIError) as raised:
        if api == "chat":
            client.chat.completions.create(model="claude-x", messages=[{"role": "user", "content": "hi"}])
        else:
            client.responses.create(model="claude-x", input="hi")
    assert not isinstance(raised.value, openai.APITimeoutError)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_text_of_the_wrong_type_is_no_content_in_an_answer_as_in_a_stream(scripted, api):
    # The chat stream already read a text that is not a string as no content; a JSON answer raised on it
    # (and a thinking text of the wrong type became a summary of the wrong type on the Responses API).
    egress, upstream = scripted
    thinking = {"type": "thinking", "thinking": ["x"], "signature": "sig"}
    content = [thinking, {"type": "text", "text": 7}, {"type": "text", "text": "Hello."}]
    upstream.replies.append(_json_reply({**OPENING["message"], "content": content, "stop_reason": "end_turn"}))
    client = openai.OpenAI(base_url=egress.url + "/v1", api_key="sk-ant-odd", max_retries=0, timeout=20)
    if api == "chat":
        answer = client.chat.completions.create(model="claude-x", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content == "Hello."
        assert answer.choices[0].message.reasoning_content == ""
    else:
        response = client.responses.create(model="claude-x", input="hi")
        assert response.output_text == "Hello." and response.output[0].summary == []


ODD_EVENTS = {
    "index-an-object": {"type": "content_block_delta", "index": {}, "delta": {"type": "text_delta", "text": "x"}},
    "stop-reason-a-list": {"type": "message_delta", "delta": {"stop_reason": ["end_turn"]}, "usage": {}},
}


@pytest.mark.parametrize("odd", list(ODD_EVENTS.values()), ids=list(ODD_EVENTS))
@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_stream_event_of_the_wrong_shape_is_an_error_event_the_sdk_sees(scripted, api, odd):
    # As an event that is not JSON already was: the stream ends with the error the SDK reads (chat raises
    # APIError, the Responses stream ends in response.failed), never a TypeError that left the caller
    # waiting on a stream that no longer moved.
    egress, upstream = scripted
    text = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    piece = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": {"a": 1}}}  # no content
    thinking = {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "thinking", "thinking": "", "signature": "s"},
    }
    upstream.replies.append(_sse_reply([OPENING, text, piece, thinking, odd, {"type": "message_stop"}]))
    client = openai.OpenAI(base_url=egress.url + "/v1", api_key="sk-ant-odd", max_retries=0, timeout=20)
    started = time.monotonic()
    if api == "chat":
        with pytest.raises(openai.APIError) as raised:
            for _ in client.chat.completions.create(
                model="claude-x", messages=[{"role": "user", "content": "hi"}], stream=True
            ):
                pass
        assert raised.value.body["code"] == "api_error"
        assert "could not read an event" in raised.value.message
    else:
        events = list(client.responses.create(model="claude-x", input="hi", stream=True))
        assert events[-1].type == "response.failed"
        assert events[-1].response.error.code == "server_error"
        assert "could not read an event" in events[-1].response.error.message
    assert time.monotonic() - started < 10

"""The Responses API translated to Anthropic, through the real process and the official openai SDK: a
malformed request is a 400 naming the field as the caller sent it (never a 500, never a field of the
chat translation the caller did not send), and structured outputs parse in the SDK's helpers."""

from __future__ import annotations

import openai
import orjson
import pytest
from pydantic import BaseModel

from tests.support import RawClient, request_bytes
from tests.test_responses import WEATHER, gateway, last_anthropic_body, sdk  # noqa: F401  (gateway: the fixture)


def post(egress, body: dict) -> tuple[int, dict]:
    headers = {"Authorization": "Bearer sk-ant-byo-review", "Content-Type": "application/json"}
    with RawClient(egress.port) as raw:
        raw.send(request_bytes("POST", "/v1/responses", headers, orjson.dumps(body)))
        answer = raw.read_response("POST")
    return answer.status, orjson.loads(answer.body)


@pytest.mark.parametrize("tools", [5, True, "get_weather"], ids=["int", "bool", "string"])
def test_tools_that_are_not_a_list_are_a_400_not_an_internal_error(gateway, fake_provider, tools):  # noqa: F811
    # The surface read `tools` for namespace names before the translation checked it: a TypeError, 500.
    status, body = post(gateway, {"model": "claude-fake", "input": "hi", "tools": tools})
    assert status == 400, body
    assert (body["error"]["code"], body["error"]["param"]) == ("invalid_request", "tools")
    assert fake_provider.requests == []


@pytest.mark.parametrize("effort", [["high"], {"level": "high"}, "max", 3], ids=["list", "object", "unknown", "int"])
def test_a_reasoning_effort_anthropic_cannot_map_is_a_400_naming_it(gateway, fake_provider, effort):  # noqa: F811
    # A list or object was looked up in the effort table (unhashable: TypeError, 500); a string
    # outside it was refused as `reasoning_effort`, a field of the chat translation.
    status, body = post(gateway, {"model": "claude-fake", "input": "hi", "reasoning": {"effort": effort}})
    assert status == 400, body
    assert (body["error"]["code"], body["error"]["param"]) == ("invalid_request", "reasoning.effort")
    assert body["error"]["message"].startswith("reasoning.effort must be one of none, minimal, low")
    assert fake_provider.requests == []


CALL = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": "100"}, "max_output_tokens"),
        ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
        (
            {"input": [{"role": "developer", "content": [{"type": "input_text", "text": 5}]}]},
            "input[0].content[0].text",
        ),
        (
            {"input": [{"role": "user", "content": "hi"}, {**CALL, "arguments": "[1]"}]},
            "input[1].arguments",
        ),
        (
            {"input": [{"role": "user", "content": "hi"}, {**CALL, "arguments": "{not json"}]},
            "input[1].arguments",
        ),
        (
            {
                "input": [
                    {"role": "user", "content": "hi"},
                    CALL,
                    {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_text"}]},
                ]
            },
            "input[2].output[0].text",
        ),
        ({"tools": [{"type": "function", "parameters": {"type": "object"}}]}, "tools[0].name"),
        ({"tools": [{**WEATHER, "parameters": "city"}]}, "tools[0].parameters"),
        (
            {"tools": [{"type": "namespace", "name": "ns", "tools": [{"type": "function", "name": 7}]}]},
            "tools[0].tools[0].name",
        ),
    ],
)
def test_a_malformed_mapped_field_is_named_as_the_responses_request_names_it(
    gateway,  # noqa: F811
    fake_provider,
    extra,
    param,
):
    # These were refused by the chat translation in its own words: "max_completion_tokens /
    # max_tokens must be a positive integer", "messages[0].content[0].text must be a string" (param
    # "input": the whole field), about fields and positions the caller never sent.
    status, body = post(gateway, {"model": "claude-fake", "input": "hi", **extra})
    assert status == 400, body
    error = body["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_request", param)
    assert error["message"].startswith(param), error["message"]
    assert fake_provider.requests == []


def test_the_checks_let_what_is_well_formed_through(gateway, fake_provider):  # noqa: F811
    # A call without arguments (""), a namespace member and an output of text parts still translate.
    group = {"type": "namespace", "name": "ns", "tools": [{"type": "function", "name": "lookup"}]}
    history = [
        {"role": "user", "content": "hi"},
        {**CALL, "arguments": ""},
        {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "input_text", "text": "sunny"}]},
    ]
    response = sdk(gateway).responses.create(
        model="claude-fake", input=history, tools=[WEATHER, group], max_output_tokens=64, reasoning={"effort": "none"}
    )
    assert response.status == "completed" and response.output_text
    body = last_anthropic_body(fake_provider)
    assert [tool["name"] for tool in body["tools"]] == ["get_weather", "ns__lookup"]
    assert body["max_tokens"] == 64 and "thinking" not in body
    assert body["messages"][1]["content"] == [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}]
    assert body["messages"][2]["content"][0]["content"] == [{"type": "text", "text": "sunny"}]


class City(BaseModel):
    city: str


def test_structured_output_parses_in_the_sdk_helpers(gateway, fake_provider):  # noqa: F811
    client = sdk(gateway)
    parsed = client.responses.parse(model="claude-fake", input="a city", text_format=City)
    assert parsed.output_parsed == City(city="fake")
    sent = last_anthropic_body(fake_provider)["output_config"]["format"]
    assert sent["type"] == "json_schema" and sent["schema"]["required"] == ["city"]
    with client.responses.stream(
        model="claude-fake",
        input="a city",
        text_format=City,
        reasoning={"effort": "low", "summary": "auto"},
        extra_headers={"x-fake-scenario": "thinking"},
    ) as stream:
        done = [event.parsed for event in stream if event.type == "response.output_text.done"]
        final = stream.get_final_response()
    assert done == [City(city="fake")] and final.output_parsed == City(city="fake")
    assert [item.type for item in final.output] == ["reasoning", "message"]


def test_a_stateless_gateway_answers_a_previous_response_id_with_a_400(gateway, fake_provider):  # noqa: F811
    # The SDK's usual continuation: egress keeps nothing, so it says so, naming the parameter.
    client = sdk(gateway)
    first = client.responses.create(model="claude-fake", input="hi", store=True)
    assert first.store is False
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model="claude-fake", input="again", previous_response_id=first.id)
    assert raised.value.body["param"] == "previous_response_id"
    assert "send the whole conversation" in raised.value.body["message"]
    assert len(fake_provider.requests) == 1

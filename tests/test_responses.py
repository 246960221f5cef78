"""The Responses API on the unified surface, through the real process and the official openai SDK:
passed through to a provider that serves it, translated to Anthropic Messages for a Claude model
(stateless), refused for a provider that serves neither."""

from __future__ import annotations

from pathlib import Path

import openai
import orjson
import pytest

from tests.support import RawClient, request_bytes
from tests.test_surface import facts

POOL = "sk-pool-responses-0123456789"

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME = {
    "type": "function",
    "name": "get_time",
    "description": "Time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture
def gateway(start_egress, fake_provider, ca_file, tmp_path: Path):
    usage_file = tmp_path / "usage.jsonl"
    config = f"""
[upstream]
ca_file = "{ca_file}"

[providers.openai]
base_url = "{fake_provider.base_url}"

[providers.anthropic]
base_url = "{fake_provider.base_url}"

[providers.mistral]
base_url = "{fake_provider.base_url}"

[usage]
jsonl = "{usage_file}"

[[routes]]
match = "claude-*"
provider = "anthropic"

[[routes]]
match = "mistral-*"
provider = "mistral"

[[routes]]
match = "*"
provider = "openai"
"""
    egress = start_egress(config)
    egress.usage_file = usage_file
    return egress


def sdk(egress, key: str = "sk-ant-byo-responses") -> openai.OpenAI:
    return openai.OpenAI(base_url=egress.url + "/v1", api_key=key, max_retries=0)


def last_anthropic_body(fake_provider) -> dict:
    seen = fake_provider.requests[-1]
    assert seen.target.startswith("/v1/messages"), seen.target
    return orjson.loads(seen.body)


def test_text_through_create_and_stream(gateway, fake_provider):
    client = sdk(gateway)
    response = client.responses.create(model="claude-fake", instructions="Be terse.", input="hi")
    assert response.output_text == "Hello from the fake provider."
    assert response.status == "completed" and response.store is False and response.model == "claude-fake"
    assert response.id.startswith("resp_") and response.output[0].id.startswith("msg_")
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    body = last_anthropic_body(fake_provider)
    assert body["system"] == [{"type": "text", "text": "Be terse."}]
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with client.responses.stream(model="claude-fake", input="hi") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Hello from the fake provider."
    assert final.usage.output_tokens > 0
    fact = facts(gateway, 2)[-1]
    assert (fact["surface"], fact["provider"], fact["usage"]) == ("responses", "anthropic", "complete")
    assert fact["output_tokens"] == final.usage.output_tokens


def test_the_event_stream_follows_the_schedule(gateway, fake_provider):
    from tests.responses_events import parse_sse, validate_stream

    body = orjson.dumps(
        {"model": "claude-fake", "input": "weather and time?", "tools": [WEATHER, TIME], "stream": True}
    )
    headers = {"Authorization": "Bearer sk-ant-byo", "x-fake-scenario": "parallel-tools"}
    with RawClient(gateway.port) as raw:
        raw.send(request_bytes("POST", "/v1/responses", headers, body))
        answer = raw.read_response("POST")
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/event-stream")
    response = validate_stream(parse_sse(answer.body))
    kinds = [item["type"] for item in response["output"]]
    assert kinds == ["message", "function_call", "function_call"]
    calls = response["output"][1:]
    assert [call["name"] for call in calls] == ["get_weather", "get_time"]
    assert calls[0]["call_id"] != calls[1]["call_id"] and all(call["id"].startswith("fc_") for call in calls)


def test_parallel_function_calls_round_trip(gateway, fake_provider):
    client = sdk(gateway)
    first = client.responses.create(
        model="claude-fake",
        input="weather and time?",
        tools=[WEATHER, TIME],
        extra_headers={"x-fake-scenario": "parallel-tools"},
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert [call.name for call in calls] == ["get_weather", "get_time"]
    history = [{"role": "user", "content": "weather and time?"}, *[item.model_dump() for item in first.output]]
    history += [{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"} for call in calls]
    second = client.responses.create(model="claude-fake", input=history, tools=[WEATHER, TIME])
    assert second.output_text
    body = last_anthropic_body(fake_provider)
    assert [block["type"] for block in body["messages"][1]["content"]] == ["text", "tool_use", "tool_use"]
    results = body["messages"][2]["content"]
    assert [block["type"] for block in results] == ["tool_result", "tool_result"]
    assert [block["tool_use_id"] for block in results] == [call.call_id for call in calls]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_reasoning_round_trips_with_its_signature(gateway, fake_provider, stream):
    client = sdk(gateway)
    ask = {
        "model": "claude-fake",
        "tools": [WEATHER],
        "reasoning": {"effort": "low"},
        "extra_headers": {"x-fake-scenario": "thinking-tool-call"},
    }
    history: list = [{"role": "user", "content": "weather in Paris?"}]
    if stream:
        with client.responses.stream(input=history, **ask) as events:
            first = events.get_final_response()
    else:
        first = client.responses.create(input=history, **ask)
    kinds = [item.type for item in first.output]
    assert kinds == ["reasoning", "reasoning", "function_call"]
    assert first.output[0].summary[0].text.startswith("The user needs get_weather")
    assert all(item.encrypted_content for item in first.output[:2])
    history += [item.model_dump(exclude_none=True) for item in first.output]
    history.append({"type": "function_call_output", "call_id": first.output[2].call_id, "output": "sunny"})
    answer = client.responses.create(input=history, **ask)
    assert answer.output_text == "Hello from the fake provider."
    body = last_anthropic_body(fake_provider)
    handed_back = body["messages"][1]["content"]
    # The exact blocks the provider sent: the strict fake checked the signature and the data.
    assert [block["type"] for block in handed_back] == ["thinking", "redacted_thinking", "tool_use"]
    assert body["thinking"]["type"] == "enabled"


def test_json_schema_output(gateway, fake_provider):
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    response = sdk(gateway).responses.create(
        model="claude-fake",
        input="a city",
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
    )
    assert response.output_text
    body = last_anthropic_body(fake_provider)
    # Closed, as Anthropic's constrained decoding requires (schemas.py); the fake refuses it open.
    assert body["output_config"] == {
        "format": {"type": "json_schema", "schema": {**schema, "additionalProperties": False}}
    }


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0].type"),
        ({"conversation": "conv_1"}, "conversation"),
    ],
)
def test_what_a_stateless_translation_refuses_names_its_param(gateway, fake_provider, extra, param):
    client = sdk(gateway)
    request = {"model": "claude-fake", "input": "hi", **extra}
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(**request)
    assert raised.value.status_code == 400
    assert raised.value.body["param"] == param
    assert raised.value.body["type"] == "invalid_request_error"
    assert fake_provider.requests == []


def test_store_true_is_answered_statelessly(gateway, fake_provider):
    response = sdk(gateway).responses.create(model="claude-fake", input="hi", store=True)
    assert response.store is False and response.output_text


def test_an_upstream_error_before_the_first_event_keeps_its_status(gateway, fake_provider):
    with pytest.raises(openai.RateLimitError) as raised:
        sdk(gateway).responses.create(
            model="claude-fake", input="hi", stream=True, extra_headers={"x-fake-scenario": "rate-limited"}
        )
    assert raised.value.status_code == 429 and raised.value.response.headers.get("retry-after")


def test_an_openai_model_is_passed_through_verbatim(gateway, fake_provider):
    body = b'{"model":"gpt-fake","input":"hi",  "store":true}'
    with RawClient(gateway.port) as raw:
        raw.send(
            request_bytes(
                "POST",
                "/v1/responses",
                {"Authorization": "Bearer sk-openai-byo", "Content-Type": "application/json"},
                body,
            )
        )
        raw.read_response("POST")
    seen = fake_provider.requests[-1]
    assert seen.target == "/v1/responses" and seen.body == body  # byte for byte


def test_a_provider_without_the_responses_api_is_refused(gateway, fake_provider):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk(gateway).responses.create(model="mistral-small", input="hi")
    assert raised.value.code == "responses_not_supported_for_provider"
    assert fake_provider.requests == []


def test_a_reasoning_item_egress_did_not_mint_is_dropped_with_a_warning(gateway, fake_provider):
    history = [
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "id": "rs_foreign", "summary": [], "encrypted_content": "gAAAAABforeign"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "and again"},
    ]
    raw = sdk(gateway).responses.with_raw_response.create(model="claude-fake", input=history)
    assert raw.parse().output_text
    assert raw.headers["warning"] == '299 egress "input[1]: a reasoning item egress did not mint was dropped"'
    body = last_anthropic_body(fake_provider)
    assert [turn["role"] for turn in body["messages"]] == ["user", "assistant", "user"]
    assert "gAAAAABforeign" not in fake_provider.requests[-1].body.decode()

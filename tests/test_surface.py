"""The unified surface through the real process: one base URL, any model, the OpenAI SDK unchanged."""

from __future__ import annotations

from pathlib import Path

import openai
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.vkeys import mint, public_key_text
from tests.support import RawClient, request_bytes, wait_until

ISSUER = Ed25519PrivateKey.generate()
POOL = "sk-pool-surface-0123456789"

ROUTES = """
[[routes]]
match = "claude-lenient-*"
provider = "anthropic"
drop_params = true

[[routes]]
match = "claude-*"
provider = "anthropic"

[[routes]]
match = "gpt-*"
provider = "openai"
"""


@pytest.fixture
def surface(start_egress, fake_provider, ca_file, tmp_path: Path):
    pool = tmp_path / "pool.keys"
    pool.write_text(POOL + "\n")
    usage_file = tmp_path / "usage.jsonl"
    config = f"""
[upstream]
ca_file = "{ca_file}"

[providers.openai]
base_url = "{fake_provider.base_url}"
pool_keys = ["file:{pool}"]
models = ["gpt-fake", "gpt-denied", "gpt-4o"]
deny_models = ["gpt-denied"]

[providers.anthropic]
base_url = "{fake_provider.base_url}"
pool_keys = ["file:{pool}"]
models = ["claude-fake"]

[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]

[usage]
jsonl = "{usage_file}"
{ROUTES}
"""
    egress = start_egress(config)
    egress.usage_file = usage_file
    return egress


# The caller's own key, of no provider's known form: it may go to OpenAI and to Anthropic alike
# (an `sk-` key is refused for a claude model: tests/test_byo_keys.py).
def client(egress, key: str = "byo-surface") -> openai.OpenAI:
    return openai.OpenAI(base_url=egress.url + "/v1", api_key=key, max_retries=0)


def facts(egress, count: int) -> list[dict]:
    def read():
        if not egress.usage_file.exists():
            return []
        return [orjson.loads(line) for line in egress.usage_file.read_bytes().splitlines()]

    assert wait_until(lambda: len(read()) >= count, timeout=3)
    return read()


def test_a_gpt_model_is_routed_to_openai_and_the_model_stays_the_callers(surface, fake_provider):
    completion = client(surface).chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content
    seen = fake_provider.requests[-1]
    assert seen.target == "/v1/chat/completions" and orjson.loads(seen.body)["model"] == "gpt-fake"
    assert seen.header("authorization") == "Bearer byo-surface"
    fact = facts(surface, 1)[0]
    assert (fact["surface"], fact["provider"], fact["requested_model"]) == ("chat", "openai", "gpt-fake")


def test_provider_colon_model_sends_the_providers_own_name(surface, fake_provider):
    client(surface).chat.completions.create(model="openai:gpt-fake", messages=[{"role": "user", "content": "hi"}])
    assert orjson.loads(fake_provider.requests[-1].body)["model"] == "gpt-fake"
    # The fact keeps what the caller asked for; `model` is what the provider says it ran.
    fact = facts(surface, 1)[0]
    assert (fact["requested_model"], fact["provider"]) == ("openai:gpt-fake", "openai")


def test_errors_of_the_surface(surface, fake_provider):
    sdk = client(surface)
    cases = [
        ({"messages": []}, 400, "model_required"),
        ({"model": "llama-3", "messages": []}, 404, "model_not_found"),
        ({"model": "gpt-denied", "messages": []}, 403, "model_not_permitted"),
        ({"model": "openai:gpt-denied", "messages": []}, 403, "model_not_permitted"),
    ]
    for body, status, code in cases:
        with pytest.raises(openai.APIStatusError) as raised:
            sdk.post("/chat/completions", body=body, cast_to=object)
        assert (raised.value.status_code, raised.value.code) == (status, code), body
    with RawClient(surface.port) as raw:
        raw.send(request_bytes("POST", "/v1/chat/completions", {"Content-Type": "application/json"}, b"{not json"))
        response = raw.read_response("POST")
        assert (response.status, response.error_code) == (400, "invalid_request")
        assert raw.keeps_alive()
    assert fake_provider.requests == []


def test_a_denied_model_is_refused_on_the_passthrough_too(surface, fake_provider):
    passthrough = openai.OpenAI(base_url=surface.url + "/openai/v1", api_key="sk-byo", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as raised:
        passthrough.chat.completions.create(model="gpt-denied", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.code == "model_not_permitted"
    passthrough.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    assert len(fake_provider.requests) == 1


FILLER = [{"role": "user", "content": "x" * 70_000}]


@pytest.mark.parametrize(
    ("target", "content_type", "body"),
    [
        # The provider reads the last of a repeated key, as orjson does; the first was permitted.
        ("/openai/v1/chat/completions", "application/json", b'{"model":"gpt-fake","model":"gpt-denied"}'),
        ("/openai/v1/chat/completions", "application/json", b'{"metadata":{"model":"gpt-fake"},"model":"gpt-denied"}'),
        # Past 64 KiB of messages, and spelled with a JSON escape.
        ("/openai/v1/chat/completions", "application/json", orjson.dumps({"messages": FILLER, "model": "gpt-denied"})),
        ("/openai/v1/chat/completions", "application/json", b'{"model":"gpt-d\\u0065nied"}'),
        # A multipart form's model field, and a batch whose second request names another model.
        (
            "/openai/v1/audio/transcriptions",
            "multipart/form-data; boundary=XyZ",
            b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-denied\r\n--XyZ--\r\n',
        ),
        (
            "/openai/v1/messages/batches",
            "application/json",
            orjson.dumps({"requests": [{"params": {"model": "gpt-fake"}}, {"params": {"model": "gpt-denied"}}]}),
        ),
        # A body whose model can't be read is not taken for one without a model.
        ("/openai/v1/chat/completions", "application/x-www-form-urlencoded", b"model=gpt-denied"),
    ],
    ids=["repeated", "nested-first", "past-64k", "escaped", "multipart", "batch", "unreadable"],
)
def test_the_passthrough_reads_the_model_as_the_provider_does(surface, fake_provider, target, content_type, body):
    with RawClient(surface.port) as raw:
        raw.send(request_bytes("POST", target, {"Authorization": "Bearer sk-byo", "Content-Type": content_type}, body))
        response = raw.read_response("POST")
    assert (response.status, response.error_code) == (403, "model_not_permitted"), response.body
    assert fake_provider.requests == []
    # The same shapes naming a permitted model pass.
    allowed = body.replace(b"gpt-d\\u0065nied", b"gpt-fake").replace(b"gpt-denied", b"gpt-fake")
    if content_type != "application/x-www-form-urlencoded":
        with RawClient(surface.port) as raw:
            headers = {"Authorization": "Bearer sk-byo", "Content-Type": content_type}
            raw.send(request_bytes("POST", target, headers, allowed))
            assert raw.read_response("POST").status != 403


def test_models_lists_what_the_call_path_serves(surface, fake_provider):
    listed = sorted(model.id for model in client(surface).models.list())
    assert listed == ["claude-fake", "gpt-4o", "gpt-fake"]  # gpt-denied is denied, so never listed
    key, _ = mint(ISSUER, "narrow", models=["gpt-4o*"])
    assert [model.id for model in client(surface, key).models.list()] == ["gpt-4o"]
    # The key's list is enforced on the call path as it is in the listing, on every path.
    with pytest.raises(openai.PermissionDeniedError):
        client(surface, key).chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "x"}])
    passthrough = openai.OpenAI(base_url=surface.url + "/openai/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        passthrough.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "x"}])
    assert fake_provider.requests == []  # the list was egress's own answer, never the provider's
    with RawClient(surface.port) as raw:
        raw.send(request_bytes("GET", "/v1/models", credential=False))
        response = raw.read_response()
    assert (response.status, response.error_code) == (401, "missing_key")


# -- Chat Completions to Anthropic Messages, against the strict fake Anthropic ---------------------

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "developer", "content": "Answer in English."},
    {"role": "user", "content": "hi"},
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}},
}


def anthropic_request(fake_provider) -> tuple[dict, dict]:
    seen = fake_provider.requests[-1]
    assert seen.target.startswith("/v1/messages")
    return orjson.loads(seen.body), {name: value for name, value in seen.headers}


def test_a_claude_model_through_the_openai_sdk_is_translated(surface, fake_provider):
    completion = client(surface).chat.completions.create(model="claude-fake", messages=MESSAGES)
    assert completion.model == "claude-fake" and completion.object == "chat.completion"
    assert completion.choices[0].message.content == "Hello from the fake provider."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    body, headers = anthropic_request(fake_provider)
    # Every system and developer message, in order; the BYO key moved to Anthropic's scheme.
    assert [block["text"] for block in body["system"]] == ["You are terse.", "Answer in English."]
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}] or body["messages"] == [
        {"role": "user", "content": "hi"}
    ]
    assert body["max_tokens"] == 4096 and body["model"] == "claude-fake"
    assert headers["x-api-key"] == "byo-surface" and "authorization" not in headers
    assert headers["anthropic-version"]
    fact = facts(surface, 1)[0]
    assert (fact["surface"], fact["provider"], fact["usage"]) == ("chat", "anthropic", "complete")
    assert fact["input_tokens"] == completion.usage.prompt_tokens


def test_a_translated_stream_accumulates_in_the_sdk(surface, fake_provider):
    with client(surface).chat.completions.stream(
        model="claude-fake", messages=MESSAGES, stream_options={"include_usage": True}
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "Hello from the fake provider."
    assert final.usage is not None and final.usage.completion_tokens > 0
    body, _ = anthropic_request(fake_provider)
    assert body["stream"] is True and "stream_options" not in body


def test_parallel_tool_calls_stream_with_their_own_indexes(surface, fake_provider):
    with client(surface).chat.completions.stream(
        model="claude-fake",
        messages=[{"role": "user", "content": "weather and time?"}],
        tools=[WEATHER, TIME],
        extra_headers={"x-fake-scenario": "parallel-tools"},
    ) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [call.function.name for call in calls] == ["get_weather", "get_time"]
    assert all(orjson.loads(call.function.arguments) is not None for call in calls)
    assert final.choices[0].finish_reason == "tool_calls"
    body, _ = anthropic_request(fake_provider)
    assert [tool["name"] for tool in body["tools"]] == ["get_weather", "get_time"]
    # The tool results go back as one user message the strict fake accepts.
    followup = [
        {"role": "user", "content": "weather and time?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump() for call in calls]},
        *({"role": "tool", "tool_call_id": call.id, "content": "sunny"} for call in calls),
    ]
    answer = client(surface).chat.completions.create(model="claude-fake", messages=followup, tools=[WEATHER, TIME])
    assert answer.choices[0].message.content
    body, _ = anthropic_request(fake_provider)
    assert [block["type"] for block in body["messages"][-1]["content"]] == ["tool_result", "tool_result"]


def test_images_as_data_uri_and_url(surface, fake_provider):
    pixel = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    content = [
        {"type": "text", "text": "what are these?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{pixel}"}},
        {"type": "image_url", "image_url": {"url": "https://example.test/cat.png"}},
    ]
    completion = client(surface).chat.completions.create(
        model="claude-fake",
        messages=[{"role": "user", "content": content}],
        extra_headers={"x-fake-scenario": "echo-images"},
    )
    assert completion.choices[0].message.content.startswith("images=2 base64=1 url=1")


def test_response_format_json_schema(surface, fake_provider):
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    client(surface).chat.completions.create(
        model="claude-fake",
        messages=[{"role": "user", "content": "json please"}],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    body, _ = anthropic_request(fake_provider)
    assert body["output_config"]["format"]["schema"] == {**schema, "additionalProperties": False}  # closed


def test_errors_before_and_during_a_translated_stream(surface, fake_provider):
    sdk = client(surface)
    with pytest.raises(openai.RateLimitError) as raised:
        sdk.chat.completions.create(
            model="claude-fake", messages=MESSAGES, extra_headers={"x-fake-scenario": "rate-limited"}
        )
    assert raised.value.status_code == 429 and raised.value.response.headers.get("retry-after")
    assert raised.value.body["type"] == "rate_limit_error"  # the OpenAI error shape
    with (
        pytest.raises(openai.APIError),
        sdk.chat.completions.stream(
            model="claude-fake", messages=MESSAGES, extra_headers={"x-fake-scenario": "stream-error"}
        ) as stream,
    ):
        stream.get_final_completion()
    with (
        pytest.raises(openai.APIConnectionError),  # a cut upstream cuts the client: never a clean end
        sdk.chat.completions.stream(
            model="claude-fake", messages=MESSAGES, extra_headers={"x-fake-scenario": "stream-cut"}
        ) as stream,
    ):
        stream.get_final_completion()


def test_an_unsupported_parameter_is_named_and_drop_params_lists_what_it_dropped(surface, fake_provider):
    with pytest.raises(openai.BadRequestError) as raised:
        client(surface).chat.completions.create(model="claude-fake", messages=MESSAGES, seed=7)
    assert raised.value.code == "unsupported_parameter" and "seed" in raised.value.message
    assert raised.value.param == "seed"
    assert fake_provider.requests == []
    neutral = client(surface).chat.completions.create(model="claude-fake", messages=MESSAGES, n=1, presence_penalty=0)
    assert neutral.choices[0].message.content
    # A route with drop_params drops what Anthropic can't honour, and says so: nothing silently.
    raw = client(surface).chat.completions.with_raw_response.create(
        model="claude-lenient-1", messages=MESSAGES, seed=7, logit_bias={"50256": -100}, stop=["END", "\n"]
    )
    assert sorted(raw.headers["x-egress-dropped-params"].split(", ")) == ["logit_bias", "seed", "stop"]
    body, _ = anthropic_request(fake_provider)
    assert "seed" not in body and "logit_bias" not in body and body["model"] == "claude-lenient-1"
    assert body["stop_sequences"] == ["END"]


def test_drop_params_applies_to_the_responses_api_too(surface, fake_provider):
    ask = {"input": "hi", "truncation": "auto", "top_logprobs": 2, "include": ["message.output_text.logprobs"]}
    with pytest.raises(openai.BadRequestError) as raised:
        client(surface).responses.create(model="claude-fake", **ask)
    assert raised.value.code == "unsupported_parameter" and raised.value.param in (
        "truncation",
        "top_logprobs",
        "include",
    )
    assert fake_provider.requests == []
    # The Responses translation's own refusals and the chat codec's (temperature) are dropped and
    # listed together, by the names the client sent.
    raw = client(surface).responses.with_raw_response.create(model="claude-lenient-1", temperature=1.5, **ask)
    dropped = raw.headers["x-egress-dropped-params"].split(", ")
    assert sorted(dropped) == ["include", "temperature", "top_logprobs", "truncation"]
    assert raw.parse().output_text
    body, _ = anthropic_request(fake_provider)
    assert "temperature" not in body and body["model"] == "claude-lenient-1"
    # A chat codec refusal of a Responses request names the Responses field.
    with pytest.raises(openai.BadRequestError) as raised:
        client(surface).responses.create(
            model="claude-fake", input="hi", reasoning={"effort": "low"}, text={"format": {"type": "json_object"}}
        )
    assert (raised.value.code, raised.value.param) == ("unsupported_parameter", "text.format")


def test_a_virtual_key_gets_the_anthropic_pool_key(surface, fake_provider):
    key, _ = mint(ISSUER, "translator")
    client(surface, key).chat.completions.create(model="claude-fake", messages=MESSAGES)
    _, headers = anthropic_request(fake_provider)
    assert headers["x-api-key"] == POOL and key not in str(headers)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_thinking_tool_loop_hands_its_thinking_blocks_back(surface, fake_provider, stream):
    # The app appends the SDK's message object as it came (the SDK sends its extra fields, so
    # `thinking_blocks` goes back with it), then the tool's result.
    sdk = client(surface)
    ask = {
        "model": "claude-fake",
        "tools": [WEATHER],
        "reasoning_effort": "low",
        "extra_headers": {"x-fake-scenario": "thinking-tool-call"},
    }
    messages: list = [{"role": "user", "content": "weather in Paris?"}]
    if stream:
        with sdk.chat.completions.stream(messages=messages, **ask) as events:
            first = events.get_final_completion()
    else:
        first = sdk.chat.completions.create(messages=messages, **ask)
    message = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and message.tool_calls
    assert [block["type"] for block in message.thinking_blocks] == ["thinking", "redacted_thinking"]
    assert message.reasoning_content == message.thinking_blocks[0]["thinking"]
    sent = fake_provider.sent_bodies[fake_provider.requests[-1].response_id]
    messages.append(message)
    messages.append({"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "sunny"})

    answer = sdk.chat.completions.create(messages=messages, **ask)
    assert answer.choices[0].message.content and answer.choices[0].finish_reason == "stop"
    body, _ = anthropic_request(fake_provider)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    handed_back = body["messages"][1]["content"]
    assert [block["type"] for block in handed_back] == ["thinking", "redacted_thinking", "tool_use"]
    # Exactly the blocks the provider sent (the strict fake checked their signature and data too).
    kept = [{key: value for key, value in block.items() if key != "index"} for block in message.thinking_blocks]
    assert handed_back[:2] == kept
    if not stream:
        assert handed_back == orjson.loads(sent)["content"]

    # Without its thinking blocks the same loop is refused, as Anthropic refuses it.
    messages[1] = {**message.model_dump(exclude_none=True), "thinking_blocks": None}
    with pytest.raises(openai.BadRequestError, match="Expected `thinking` or `redacted_thinking`"):
        sdk.chat.completions.create(messages=messages, **ask)

"""The fake Anthropic side on its own: raw JSON posted to it, no egress in the loop.

Acceptance tests of the OpenAI -> Anthropic translation mean something only if the fake refuses what
the real Messages API refuses and answers in its real wire format; these tests hold it to that.
"""

from __future__ import annotations

import copy
import ssl

import httpx2 as httpx
import orjson
import pytest

from tests.fake_provider import TINY_PNG_BASE64, minimal_instance, redacted_data, sign_thinking

HEADERS = {"anthropic-version": "2023-06-01", "content-type": "application/json", "x-api-key": "sk-ant-test"}
WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
        "required": ["city", "unit"],
    },
}
TIME = {"name": "get_time", "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}}}
BASE = {"model": "claude-fake", "max_tokens": 2048, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def client(fake_provider, certificate_authority):
    context = ssl.create_default_context()
    certificate_authority.configure_trust(context)
    with httpx.Client(base_url=fake_provider.base_url, verify=context, timeout=10) as http:
        yield http


def post(client, body, scenario: str | None = None, headers: dict | None = None) -> httpx.Response:
    extra = {"x-fake-scenario": scenario} if scenario else {}
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post("/v1/messages", content=content, headers={**HEADERS, **extra, **(headers or {})})


def request(**changes) -> dict:
    body = copy.deepcopy(BASE)
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


def events(response: httpx.Response) -> list[tuple[str, dict]]:
    """(event name, data) of an SSE body; checks every event names its data's type."""
    parsed = []
    for chunk in response.text.split("\n\n"):
        if not chunk.strip():
            continue
        lines = dict(line.split(": ", 1) for line in chunk.split("\n"))
        data = orjson.loads(lines["data"])
        assert lines["event"] == data["type"]
        parsed.append((lines["event"], data))
    return parsed


def assemble(stream: list[tuple[str, dict]]) -> dict:
    """Rebuild the message a stream describes, as a client SDK would."""
    stream = copy.deepcopy(stream)
    message = None
    partial: dict[int, str] = {}
    for name, data in stream:
        if name == "message_start":
            message = data["message"]
        elif name == "content_block_start":
            assert data["index"] == len(message["content"])
            message["content"].append(dict(data["content_block"]))
        elif name == "content_block_delta":
            block, delta = message["content"][data["index"]], data["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            else:
                assert delta["type"] == "input_json_delta"
                partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
        elif name == "content_block_stop":
            if data["index"] in partial:
                message["content"][data["index"]]["input"] = orjson.loads(partial[data["index"]])
        elif name == "message_delta":
            message.update(data["delta"])
            message["usage"].update(data["usage"])
    return message


def tool_conversation(uses: list[dict], results: list[dict], after: list[dict] | None = None) -> list[dict]:
    return [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, *uses]},
        {"role": "user", "content": [*results, *(after or [])]},
    ]


def use(tool_id: str, name: str = "get_weather") -> dict:
    return {"type": "tool_use", "id": tool_id, "name": name, "input": {"city": "Paris", "unit": "c"}}


def result(tool_id: str) -> dict:
    return {"type": "tool_result", "tool_use_id": tool_id, "content": "21C"}


def image(source: dict) -> dict:
    return {"role": "user", "content": [{"type": "image", "source": source}, {"type": "text", "text": "what?"}]}


THINKING_ON = {"type": "enabled", "budget_tokens": 1024}
THOUGHT = {
    "type": "thinking",
    "thinking": "Paris weather: call the tool.",
    "signature": sign_thinking("Paris weather: call the tool."),
}
SEALED = {"type": "redacted_thinking", "data": redacted_data("seed")}


def thinking_loop(*assistant: dict, thinking: dict | None = THINKING_ON, after: list | None = None) -> dict:
    """A tool loop whose assistant turn is `assistant`, its tool result following."""
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": list(assistant)},
        {"role": "user", "content": [result("t1")]},
        *(after or []),
    ]
    return request(max_tokens=4096, thinking=thinking, tools=[WEATHER], messages=messages)


def changed(block: dict, **fields) -> dict:
    return {**block, **fields}


# -- refusals -------------------------------------------------------------------------------------

REFUSED = [
    ("max_tokens missing", request(max_tokens=None), "max_tokens: Field required"),
    ("max_tokens zero", request(max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
    ("max_tokens negative", request(max_tokens=-5), "greater than or equal to 1"),
    ("max_tokens string", request(max_tokens="16"), "max_tokens: Input should be a valid integer"),
    ("max_tokens float", request(max_tokens=16.5), "max_tokens: Input should be a valid integer"),
    ("max_tokens bool", request(max_tokens=True), "max_tokens: Input should be a valid integer"),
    ("model missing", request(model=None), "model: Field required"),
    ("unknown field", request(n=2), "n: Extra inputs are not permitted"),
    ("openai field", request(response_format={"type": "json_object"}), "response_format: Extra inputs"),
    ("messages missing", request(messages=None), "messages: Field required"),
    ("messages empty", request(messages=[]), "messages: at least one message is required"),
    ("messages not a list", request(messages="hi"), "messages: Input should be a valid list"),
    ("system role", request(messages=[{"role": "system", "content": "be terse"}]), "messages.0.role"),
    ("tool role", request(messages=[{"role": "tool", "content": "21C"}]), "messages.0.role"),
    ("extra message key", request(messages=[{"role": "user", "content": "hi", "name": "bob"}]), "messages.0.name"),
    ("content missing", request(messages=[{"role": "user"}]), "messages.0.content: Field required"),
    (
        "empty content",
        request(messages=[{"role": "user", "content": ""}]),
        "messages.0: all messages must have non-empty content except for the optional final assistant message",
    ),
    (
        "empty assistant in the middle",
        request(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": []}, BASE["messages"][0]]),
        "messages.1: all messages must have non-empty content",
    ),
    ("null content", request(messages=[{"role": "assistant", "content": None}]), "valid string or list"),
    ("text without text", request(messages=[{"role": "user", "content": [{"type": "text"}]}]), "Field required"),
    (
        "empty text block",
        request(messages=[{"role": "user", "content": [{"type": "text", "text": ""}]}]),
        "text content blocks must be non-empty",
    ),
    (
        "unknown block type",
        request(messages=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}]),
        "messages.0.content.0: Input tag 'input_text'",
    ),
    (
        "openai image_url block",
        request(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://a/b"}}]}]),
        "Input tag 'image_url'",
    ),
    (
        "extra field in a block",
        request(messages=[{"role": "user", "content": [{"type": "text", "text": "hi", "name": "x"}]}]),
        "messages.0.content.0.text.name: Extra inputs are not permitted",
    ),
    ("image without source", request(messages=[{"role": "user", "content": [{"type": "image"}]}]), "source"),
    (
        "image base64 without media_type",
        request(messages=[image({"type": "base64", "data": TINY_PNG_BASE64})]),
        "media_type",
    ),
    (
        "image base64 data URL left in",
        request(messages=[image({"type": "base64", "media_type": "image/png", "data": "data:image/png;base64,AAAA"})]),
        "not valid base64",
    ),
    (
        "image media type mismatch",
        request(messages=[image({"type": "base64", "media_type": "image/jpeg", "data": TINY_PNG_BASE64})]),
        "image/jpeg media type",
    ),
    ("image url missing url", request(messages=[image({"type": "url"})]), "url"),
    ("image openai-style source", request(messages=[image({"url": "https://a/b.png"})]), "source"),
    (
        "tool_use without id",
        request(messages=tool_conversation([{"type": "tool_use", "name": "get_weather", "input": {}}], [])),
        "messages.1.content.1.tool_use.id: Field required",
    ),
    (
        "tool_use without input",
        request(messages=tool_conversation([{"type": "tool_use", "id": "t1", "name": "get_weather"}], [result("t1")])),
        "tool_use.input: Field required",
    ),
    (
        "tool_use input as a JSON string",
        request(
            messages=tool_conversation(
                [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": '{"city":"Paris"}'}], [result("t1")]
            )
        ),
        "tool_use.input: Input should be a valid dictionary",
    ),
    (
        "tool_use id with a dot",
        request(messages=tool_conversation([use("call.1")], [result("call.1")])),
        "String should match pattern",
    ),
    (
        "tool_use in a user message",
        request(messages=[{"role": "user", "content": [use("t1")]}]),
        "tool_use blocks may only appear in assistant messages",
    ),
    (
        "tool_result without tool_use_id",
        request(messages=tool_conversation([use("t1")], [{"type": "tool_result", "content": "21C"}])),
        "tool_result.tool_use_id: Field required",
    ),
    (
        "tool_use left unanswered",
        request(messages=tool_conversation([use("t1")], [], [{"type": "text", "text": "go on"}])),
        "messages.2: `tool_use` ids were found without `tool_result` blocks immediately after: t1.",
    ),
    (
        "tool_use as the last message",
        request(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": [use("t1")]}]),
        "`tool_use` ids were found without `tool_result` blocks immediately after: t1",
    ),
    (
        "one of two parallel uses answered",
        request(messages=tool_conversation([use("t1"), use("t2")], [result("t1")])),
        "immediately after: t2.",
    ),
    (
        "text before the tool results",
        request(messages=tool_conversation([use("t1")], [{"type": "text", "text": "here:"}, result("t1")])),
        "`tool_use` ids were found without `tool_result` blocks immediately after: t1",
    ),
    (
        "results in a later user message",
        request(
            messages=[
                *tool_conversation([use("t1")], [{"type": "text", "text": "wait"}])[:2],
                {"role": "assistant", "content": "still here"},
                {"role": "user", "content": [result("t1")]},
            ]
        ),
        "immediately after: t1",
    ),
    (
        "text after a tool use",
        request(
            messages=[
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [use("t1"), {"type": "text", "text": "I will check."}]},
                {"role": "user", "content": [result("t1")]},
            ]
        ),
        "messages.2: `tool_use` ids were found without `tool_result` blocks immediately after: t1",
    ),
    (
        "tool_result answering nothing",
        request(messages=[{"role": "user", "content": [result("t9")]}]),
        "messages.0.content.0: unexpected `tool_use_id` found in `tool_result` blocks: t9. Each `tool_result` block "
        "must have a corresponding `tool_use` block in the previous message.",
    ),
    (
        "tool_result with the wrong id",
        request(messages=tool_conversation([use("t1")], [result("t1"), result("t2")])),
        "messages.2.content.1: unexpected `tool_use_id` found in `tool_result` blocks: t2",
    ),
    (
        "tool_result in an assistant message",
        request(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": [result("t1")]}]),
        "tool_result blocks may only appear in user messages",
    ),
    (
        "duplicate tool_use ids",
        request(
            messages=[
                *tool_conversation([use("t1")], [result("t1")]),
                {"role": "assistant", "content": [use("t1")]},
                {"role": "user", "content": [result("t1")]},
            ]
        ),
        "`tool_use` ids must be unique",
    ),
    ("tool without input_schema", request(tools=[{"name": "f"}]), "tools.0.custom.input_schema: Field required"),
    ("tool without name", request(tools=[{"input_schema": {"type": "object"}}]), "tools.0.custom.name: Field required"),
    (
        "openai-style tool",
        request(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
        "tools.0",
    ),
    ("tool schema not an object", request(tools=[{"name": "f", "input_schema": {"type": "string"}}]), "'object'"),
    ("tool with parameters", request(tools=[{**TIME, "parameters": {}}]), "tools.0.custom.parameters: Extra inputs"),
    ("tool name with a dot", request(tools=[{**TIME, "name": "a.b"}]), "tools.0.custom.name: String should match"),
    ("duplicate tool names", request(tools=[TIME, TIME]), "tools: Tool names must be unique."),
    ("tool_choice required", request(tools=[TIME], tool_choice={"type": "required"}), "Input tag 'required'"),
    ("tool_choice string", request(tools=[TIME], tool_choice="auto"), "tool_choice: Input tag"),
    ("tool_choice tool without name", request(tools=[TIME], tool_choice={"type": "tool"}), "tool_choice.tool.name"),
    ("tool_choice unknown tool", request(tools=[TIME], tool_choice={"type": "tool", "name": "nope"}), "'nope'"),
    ("tool_choice without tools", request(tool_choice={"type": "any"}), "tool_choice may only be specified"),
    ("tool_choice extra field", request(tools=[TIME], tool_choice={"type": "auto", "x": 1}), "tool_choice.auto.x"),
    ("system an object", request(system={"text": "be terse"}), "system: Input should be a valid string or list"),
    ("system an image", request(system=[{"type": "image", "source": {}}]), "system.0.type: Input should be 'text'"),
    ("system text missing", request(system=[{"type": "text"}]), "Field required"),
    ("stop_sequences a string", request(stop_sequences="END"), "stop_sequences"),
    ("stop_sequences numbers", request(stop_sequences=[1]), "stop_sequences"),
    ("temperature above 1", request(temperature=1.5), "temperature: Input should be less than or equal to 1"),
    ("temperature negative", request(temperature=-0.1), "temperature: Input should be greater than or equal to 0"),
    ("temperature a string", request(temperature="hot"), "temperature: Input should be a valid number"),
    ("top_p above 1", request(top_p=2), "top_p"),
    ("thinking budget too small", request(thinking={"type": "enabled", "budget_tokens": 512}), "1024"),
    ("thinking budget missing", request(thinking={"type": "enabled"}), "budget_tokens"),
    (
        "thinking budget above max_tokens",
        request(max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 2048}),
        "`max_tokens` must be greater than `thinking.budget_tokens`",
    ),
    ("thinking type unknown", request(thinking={"type": "on"}), "thinking: Input tag 'on'"),
    (
        "thinking with temperature",
        request(temperature=0.2, thinking={"type": "enabled", "budget_tokens": 1024}),
        "`temperature` may only be set to 1 when thinking is enabled",
    ),
    (
        "thinking with forced tool use",
        request(tools=[TIME], tool_choice={"type": "any"}, thinking={"type": "enabled", "budget_tokens": 1024}),
        "Thinking may not be enabled when tool_choice forces tool use.",
    ),
    (
        "thinking on, tool loop without its thinking blocks",
        thinking_loop(use("t1")),
        "messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found `tool_use`. When "
        "`thinking` is enabled, a final `assistant` message must start with a thinking block",
    ),
    (
        "thinking on, tool loop opening with text",
        thinking_loop({"type": "text", "text": "Checking."}, THOUGHT, use("t1")),
        "messages.1.content.0.type: Expected `thinking` or `redacted_thinking`, but found `text`.",
    ),
    (
        "thinking signature mangled",
        thinking_loop(changed(THOUGHT, signature=THOUGHT["signature"][:-2] + "x="), use("t1")),
        "messages.1.content.0: Invalid `signature` in `thinking` block",
    ),
    (
        "thinking text changed under its signature",
        thinking_loop(changed(THOUGHT, thinking=THOUGHT["thinking"] + " "), use("t1")),
        "messages.1.content.0: Invalid `signature` in `thinking` block",
    ),
    ("thinking signature empty", thinking_loop(changed(THOUGHT, signature=""), use("t1")), "Invalid `signature`"),
    (
        "thinking signature missing",
        thinking_loop({"type": "thinking", "thinking": "x"}, use("t1")),
        "messages.1.content.0.thinking.signature: Field required",
    ),
    (
        "thinking signature in an earlier turn mangled",
        thinking_loop(
            THOUGHT,
            use("t1"),
            thinking=None,
            after=[
                {
                    "role": "assistant",
                    "content": [changed(THOUGHT, signature="EqQBforged"), {"type": "text", "text": "21C."}],
                }
            ],
        ),
        "messages.3.content.0: Invalid `signature` in `thinking` block",
    ),
    (
        "redacted data mangled",
        thinking_loop(THOUGHT, changed(SEALED, data=SEALED["data"][:-4] + "AAA="), use("t1")),
        "messages.1.content.1: Invalid `data` in `redacted_thinking` block",
    ),
    ("redacted data empty", thinking_loop(changed(SEALED, data=""), use("t1")), "Invalid `data`"),
    (
        "redacted data missing",
        thinking_loop({"type": "redacted_thinking"}, use("t1")),
        "messages.1.content.0.redacted_thinking.data: Field required",
    ),
    ("metadata extra key", request(metadata={"user_id": "u1", "session": "s"}), "metadata.session: Extra inputs"),
    ("metadata user", request(metadata={"user": "u1"}), "metadata.user: Extra inputs are not permitted"),
    (
        "cache_control unknown type",
        request(system=[{"type": "text", "text": "s", "cache_control": {"type": "persistent"}}]),
        "system.0.cache_control.type: Input should be 'ephemeral'",
    ),
    ("stream not a boolean", request(stream="yes"), "stream: Input should be a valid boolean"),
]


@pytest.mark.parametrize(("body", "message"), [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_refuses_what_the_real_api_refuses(client, fake_provider, body, message):
    for stream in (False, True):
        response = post(client, {**body, "stream": stream} if "stream" not in body else body)
        assert response.status_code == 400, response.text
        document = response.json()
        assert document["type"] == "error" and document["error"]["type"] == "invalid_request_error"
        assert message in document["error"]["message"]
        assert document["request_id"] == response.headers["request-id"]
        assert response.headers["content-type"] == "application/json"


def test_refuses_a_missing_version_header_and_a_body_that_is_not_json(client):
    response = client.post("/v1/messages", content=orjson.dumps(BASE), headers={"content-type": "application/json"})
    assert (
        response.status_code == 400 and response.json()["error"]["message"] == "anthropic-version: header is required"
    )
    response = post(client, b'{"model": "claude-fake", "max_tokens": ')
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"


def test_refusal_comes_before_any_scenario(client):
    body = request(max_tokens=None, tools=[WEATHER])
    for scenario in ("tool-call", "rate-limited", "overloaded", "stream-error", "stream-cut"):
        assert post(client, body, scenario).status_code == 400


ACCEPTED = [
    ("minimal", BASE),
    ("consecutive user turns", request(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])),
    ("assistant first", request(messages=[{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "b"}])),
    ("prefill", request(messages=[BASE["messages"][0], {"role": "assistant", "content": "The answer is"}])),
    ("empty final prefill", request(messages=[BASE["messages"][0], {"role": "assistant", "content": ""}])),
    ("tool round trip", request(tools=[WEATHER], messages=tool_conversation([use("t1")], [result("t1")]))),
    (
        "parallel results, then text",
        request(
            tools=[WEATHER],
            messages=tool_conversation(
                [use("t1"), use("t2")], [result("t2"), result("t1")], [{"type": "text", "text": "and?"}]
            ),
        ),
    ),
    (
        "results then a user turn",
        request(messages=[*tool_conversation([use("t1")], [result("t1")]), BASE["messages"][0]]),
    ),
    (
        "rich tool result",
        request(
            messages=tool_conversation(
                [use("t1")],
                [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "is_error": True,
                        "content": [
                            {"type": "text", "text": "failed"},
                            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                        ],
                    }
                ],
            )
        ),
    ),
    ("base64 image", request(messages=[image({"type": "base64", "media_type": "image/png", "data": TINY_PNG_BASE64})])),
    ("url image", request(messages=[image({"type": "url", "url": "https://example.com/cat.jpg"})])),
    ("system string", request(system="Be terse.")),
    ("system blocks", request(system=[{"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}])),
    ("sampling", request(temperature=0, top_p=0.9, top_k=5, stop_sequences=["END"], metadata={"user_id": "u-1"})),
    ("thinking", request(max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 1024})),
    ("thinking off", request(temperature=0.5, thinking={"type": "disabled"})),
    (
        "thinking tool loop with its blocks",
        thinking_loop(THOUGHT, SEALED, {"type": "text", "text": "On it."}, use("t1")),
    ),
    ("thinking tool loop opening with redacted", thinking_loop(SEALED, use("t1"))),
    (
        "thinking with empty text, signed",
        thinking_loop(changed(THOUGHT, thinking="", signature=sign_thinking("")), use("t1")),
    ),
    ("tool loop without thinking blocks, thinking off", thinking_loop(use("t1"), thinking=None)),
    (
        "thinking on, an earlier loop without its blocks",
        thinking_loop(
            use("t1"),
            after=[{"role": "assistant", "content": "Sunny, 21C."}, {"role": "user", "content": "thanks"}],
        ),
    ),
    (
        "tool choices",
        request(
            tools=[WEATHER, TIME], tool_choice={"type": "tool", "name": "get_time", "disable_parallel_tool_use": True}
        ),
    ),
    ("tool_choice none without tools", request(tool_choice={"type": "none"})),
    ("server tool", request(tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}])),
    ("stream flag", request(stream=False)),
]


@pytest.mark.parametrize("body", [case[1] for case in ACCEPTED], ids=[case[0] for case in ACCEPTED])
def test_accepts_what_the_real_api_accepts(client, fake_provider, body):
    response = post(client, body)
    assert response.status_code == 200, response.text
    assert fake_provider.requests[-1].json() == body  # what a test can assert the translation against


# -- answers --------------------------------------------------------------------------------------


def test_default_answer_is_unchanged(client):
    message = post(client, BASE).json()
    assert message["id"] == "msg_fake1" and message["content"] == [
        {"type": "text", "text": "Hello from the fake provider."}
    ]
    assert message["usage"] == {
        "input_tokens": 12,
        "output_tokens": 7,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }
    stream = events(post(client, {**BASE, "stream": True}))
    assert [name for name, _ in stream[:3]] == ["message_start", "content_block_start", "ping"]
    assert stream[-2][1]["usage"] == {"output_tokens": 6} and stream[-1][0] == "message_stop"


def test_tool_call_answers_the_first_tool_with_a_valid_input(client, fake_provider):
    body = request(tools=[WEATHER, TIME])
    message = post(client, body, "tool-call").json()
    assert message["stop_reason"] == "tool_use"
    [call] = message["content"]
    assert call["type"] == "tool_use" and call["name"] == "get_weather" and call["id"].startswith("toolu_")
    assert call["input"] == {"city": "fake", "unit": "c"}
    # Fed back as the real API expects, the conversation is accepted, and a second call gets a new id.
    follow_up = request(
        tools=[WEATHER, TIME],
        messages=[
            *body["messages"],
            {"role": "assistant", "content": message["content"]},
            {"role": "user", "content": [result(call["id"])]},
        ],
    )
    second = post(client, follow_up, "tool-call").json()
    assert second["content"][0]["id"] != call["id"]
    third = request(
        tools=[WEATHER, TIME],
        messages=[
            *follow_up["messages"],
            {"role": "assistant", "content": second["content"]},
            {"role": "user", "content": [result(second["content"][0]["id"])]},
        ],
    )
    assert post(client, third).status_code == 200
    # Under tool_choice none there is nothing to call.
    assert post(client, {**body, "tool_choice": {"type": "none"}}, "tool-call").json()["stop_reason"] == "end_turn"


def test_tool_call_stream_is_the_real_event_sequence(client):
    body = request(tools=[WEATHER])
    plain = post(client, body, "tool-call").json()
    streamed = events(post(client, {**body, "stream": True}, "tool-call"))
    names = [name for name, _ in streamed]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = streamed[1][1]["content_block"]
    assert start == {"type": "tool_use", "id": start["id"], "name": "get_weather", "input": {}}
    pieces = [data["delta"]["partial_json"] for name, data in streamed if name == "content_block_delta"]
    assert len(pieces) >= 3 and pieces[0] == ""  # split over several deltas, as the real API does
    message = assemble(streamed)
    assert message["content"][0]["input"] == plain["content"][0]["input"]
    assert message["stop_reason"] == "tool_use" and message["stop_sequence"] is None
    assert message["usage"]["output_tokens"] == plain["usage"]["output_tokens"]
    assert streamed[0][1]["message"]["usage"]["output_tokens"] == 1
    assert streamed[-2][1]["usage"]["input_tokens"] == plain["usage"]["input_tokens"]


def test_parallel_tools(client):
    body = request(tools=[WEATHER, TIME])
    message = post(client, body, "parallel-tools").json()
    kinds = [block["type"] for block in message["content"]]
    assert kinds == ["text", "tool_use", "tool_use"] and message["stop_reason"] == "tool_use"
    first, second = message["content"][1:]
    assert (first["name"], second["name"]) == ("get_weather", "get_time") and first["id"] != second["id"]
    assert second["input"] == {}
    streamed = assemble(events(post(client, {**body, "stream": True}, "parallel-tools")))
    assert [block["type"] for block in streamed["content"]] == kinds
    assert [block["input"] for block in streamed["content"][1:]] == [first["input"], second["input"]]
    same_tool = post(client, request(tools=[WEATHER]), "parallel-tools").json()
    assert [block.get("name") for block in same_tool["content"]] == [None, "get_weather", "get_weather"]
    single = request(tools=[WEATHER, TIME], tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert len(post(client, single, "parallel-tools").json()["content"]) == 2


def test_thinking(client):
    body = request(max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 1024})
    message = post(client, body, "thinking").json()
    reasoning, text = message["content"]
    assert reasoning["type"] == "thinking" and reasoning["thinking"] and reasoning["signature"]
    assert text["type"] == "text"
    streamed = events(post(client, {**body, "stream": True}, "thinking"))
    deltas = [data["delta"]["type"] for name, data in streamed if name == "content_block_delta"]
    assert deltas[:3] == ["thinking_delta", "thinking_delta", "signature_delta"] and "text_delta" in deltas
    assert streamed[1][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    rebuilt = assemble(streamed)["content"]
    assert rebuilt[0] == reasoning and reasoning["signature"] == sign_thinking(reasoning["thinking"])
    assert reasoning["signature"].startswith("EqQB")
    assert rebuilt[1] == text
    # Without thinking enabled, no thinking block.
    assert [block["type"] for block in post(client, BASE, "thinking").json()["content"]] == ["text"]


def test_thinking_tool_call_loop(client, fake_provider):
    body = request(max_tokens=4096, thinking=THINKING_ON, tools=[WEATHER], messages=[{"role": "user", "content": "hi"}])
    for stream in (False, True):
        response = post(client, {**body, "stream": stream}, "thinking-tool-call")
        message = assemble(events(response)) if stream else response.json()
        thought, sealed, call = message["content"]
        assert message["stop_reason"] == "tool_use"
        assert thought["signature"] == sign_thinking(thought["thinking"]) and sealed["type"] == "redacted_thinking"
        assert call["type"] == "tool_use" and call["name"] == "get_weather"
        if stream:
            starts = [data["content_block"] for name, data in events(response) if name == "content_block_start"]
            assert starts[1] == sealed  # redacted thinking comes whole in its start event
        # The turn handed back as it came, with its result: accepted, and the loop ends in text.
        loop = [*body["messages"], {"role": "assistant", "content": message["content"]}]
        loop.append({"role": "user", "content": [result(call["id"])]})
        answer = post(client, {**body, "messages": loop}, "thinking-tool-call")
        assert answer.status_code == 200, answer.text
        assert [block["type"] for block in answer.json()["content"]] == ["thinking", "text"]
        # The same turn without its thinking blocks: refused, as the real service does.
        loop[1] = {"role": "assistant", "content": [call]}
        refused = post(client, {**body, "messages": loop}, "thinking-tool-call")
        assert refused.status_code == 400 and "Expected `thinking` or `redacted_thinking`" in refused.text
    # Without thinking, the plain tool call.
    plain = post(client, {**body, "thinking": {"type": "disabled"}}, "thinking-tool-call").json()
    assert [block["type"] for block in plain["content"]] == ["tool_use"]


def test_echo_images(client):
    png = {"type": "base64", "media_type": "image/png", "data": TINY_PNG_BASE64}
    body = request(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": png},
                    {"type": "image", "source": {"type": "url", "url": "https://e.com/a.jpg"}},
                ],
            },
            {"role": "assistant", "content": "Two images."},
            image(png),
        ]
    )
    message = post(client, body, "echo-images").json()
    assert message["content"][0]["text"] == "images=3 base64=2 url=1 media_types=image/png"
    assert post(client, BASE, "echo-images").json()["content"][0]["text"].startswith("images=0 ")


def test_json_tool_answers_the_forced_tool(client):
    forced = request(tools=[WEATHER, TIME], tool_choice={"type": "tool", "name": "get_weather"})
    message = post(client, forced, "json-tool").json()
    assert [block["type"] for block in message["content"]] == ["tool_use"]
    assert message["content"][0]["name"] == "get_weather" and message["content"][0]["input"] == {
        "city": "fake",
        "unit": "c",
    }
    any_tool = post(client, {**forced, "tool_choice": {"type": "any"}}, "json-tool").json()
    assert any_tool["content"][0]["name"] == "get_weather"
    streamed = assemble(events(post(client, {**forced, "stream": True}, "json-tool")))
    assert [{**block, "id": ""} for block in streamed["content"]] == [{**message["content"][0], "id": ""}]
    assert post(client, request(tools=[WEATHER]), "json-tool").json()["stop_reason"] == "end_turn"


def test_minimal_instance_satisfies_required_fields():
    schema = {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
            "count": {"type": "integer", "minimum": 3},
            "nested": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
            "maybe": {"type": ["null", "number"]},
            "optional": {"type": "string"},
        },
        "required": ["tags", "count", "nested", "maybe"],
    }
    assert minimal_instance(schema) == {"tags": ["fake"], "count": 3, "nested": {"ok": True}, "maybe": 1.5}


def test_rate_limited_and_overloaded(client):
    response = post(client, BASE, "rate-limited")
    assert response.status_code == 429
    assert response.json()["type"] == "error" and response.json()["error"]["type"] == "rate_limit_error"
    assert response.headers["retry-after"] == "1"
    assert response.headers.get_list("anthropic-ratelimit-requests-remaining") == ["0"]
    assert response.headers["anthropic-ratelimit-tokens-remaining"] == "0"
    response = post(client, {**BASE, "stream": True}, "overloaded")
    assert response.status_code == 529
    assert response.json()["error"] == {"type": "overloaded_error", "message": "Overloaded"}


def test_stream_error(client, fake_provider):
    response = post(client, {**BASE, "stream": True}, "stream-error")
    assert response.status_code == 200
    streamed = events(response)
    names = [name for name, _ in streamed]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta", "error"]
    assert streamed[-1][1] == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    assert fake_provider.streams[response.headers["request-id"]].finished
    assert post(client, BASE, "stream-error").status_code == 529


def test_stream_cut(client, fake_provider):
    with pytest.raises(httpx.RemoteProtocolError):
        post(client, {**BASE, "stream": True}, "stream-cut")
    response_id = fake_provider.requests[-1].response_id
    sent = fake_provider.sent_bodies[response_id]
    assert sent.count(b"event: content_block_delta") == 2 and b"message_stop" not in sent
    assert not fake_provider.streams[response_id].finished
    with pytest.raises(httpx.RemoteProtocolError):
        post(client, BASE, "stream-cut")


def test_cache_control_is_reported(client):
    body = request(system=[{"type": "text", "text": "Long instructions.", "cache_control": {"type": "ephemeral"}}])
    first = post(client, body).json()["usage"]
    assert first["cache_creation_input_tokens"] > 0 and first["cache_read_input_tokens"] == 0
    second = post(client, body).json()["usage"]
    assert second["cache_read_input_tokens"] == first["cache_creation_input_tokens"]
    assert second["cache_creation_input_tokens"] == 0
    other = request(tools=[WEATHER], cache_control={"type": "ephemeral"}, stream=True)
    streamed = events(post(client, other, "tool-call"))
    assert streamed[0][1]["message"]["usage"]["cache_creation_input_tokens"] > 0
    assert streamed[-2][1]["usage"]["cache_creation_input_tokens"] > 0


def test_transport_scenarios_and_lenient_mode_skip_the_check(client, fake_provider):
    loose = {"model": "claude-fake", "messages": [], "stream": True}
    response = post(client, loose, "long-stream", {"x-fake-events": "3", "x-fake-interval": "0"})
    assert response.status_code == 200 and response.text.count("event: content_block_delta") == 3
    assert post(client, {}).status_code == 400
    fake_provider.strict_anthropic = False
    assert post(client, {}).status_code == 200

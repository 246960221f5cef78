"""Chat Completions -> Anthropic Messages, as apps really call it: the openai SDK against the real
egress process and the strict fake Anthropic (tests/fake_provider.py), which refuses what the real
Messages API refuses. Each case here is a request shape an app sends unchanged to OpenAI that a
translation must carry to Anthropic without a 400 or a lost fact.
"""

from __future__ import annotations

import re
from pathlib import Path

import openai
import orjson
import pytest

from egress.anthropic_codec import chat_to_messages, error_to_openai
from tests.support import ScriptedUpstream

ROUTES = """
[[routes]]
match = "claude-*"
provider = "anthropic"
"""


@pytest.fixture
def surface(start_egress, fake_provider, ca_file, tmp_path: Path):
    config = f"""
[upstream]
ca_file = "{ca_file}"

[providers.anthropic]
base_url = "{fake_provider.base_url}"
{ROUTES}
"""
    return start_egress(config)


def client(egress) -> openai.OpenAI:
    return openai.OpenAI(base_url=egress.url + "/v1", api_key="byo-review", max_retries=0)


def sent(fake_provider) -> dict:
    seen = fake_provider.requests[-1]
    assert seen.target.startswith("/v1/messages")
    return orjson.loads(seen.body)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


# -- tool call ids from elsewhere ---------------------------------------------------------------

# Ids other providers and clients mint, that Anthropic refuses ("String should match pattern
# '^[a-zA-Z0-9_-]+$'"): Kimi/Moonshot's "functions.name:index", MCP-style "server/tool:1", ids with a
# pipe, a dot. An app that switches a conversation to a Claude model (or a route that falls back
# to one) sends them back in its history.
FOREIGN_IDS = ["functions.get_weather:0", "functions.get_weather:1", "call|abc.1", "mcp/server tool#2"]
_ANTHROPIC_ID = re.compile(r"^[a-zA-Z0-9_-]+$")


def history(ids: list[str]) -> list[dict]:
    calls = [
        {"id": tool_id, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        for tool_id in ids
    ]
    return [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        *({"role": "tool", "tool_call_id": tool_id, "content": "sunny"} for tool_id in ids),
    ]


def test_a_history_with_foreign_tool_call_ids_is_accepted(surface, fake_provider):
    answer = client(surface).chat.completions.create(
        model="claude-fake", messages=history(FOREIGN_IDS), tools=[WEATHER]
    )
    assert answer.choices[0].message.content
    body = sent(fake_provider)
    uses = [block["id"] for block in body["messages"][1]["content"]]
    results = [block["tool_use_id"] for block in body["messages"][2]["content"]]
    assert all(_ANTHROPIC_ID.match(tool_id) for tool_id in uses)
    assert uses == results and len(set(uses)) == len(FOREIGN_IDS)  # paired, and still distinct


def test_foreign_tool_call_ids_map_the_same_way_every_time_and_valid_ones_are_kept():
    def ids(messages):
        body, _ = chat_to_messages({"messages": messages}, default_max_tokens=100)
        return [block["id"] for block in body["messages"][1]["content"]]

    # Ids that differ only in the characters Anthropic refuses stay apart.
    first = ids(history(["a.b", "a:b", "a_b", "toolu_01A-b"]))
    assert all(_ANTHROPIC_ID.match(tool_id) for tool_id in first)
    assert len(set(first)) == 4 and first[2:] == ["a_b", "toolu_01A-b"]
    # The history goes back with every turn: the same id maps to the same id each time.
    assert ids(history(["a.b", "a:b", "a_b", "toolu_01A-b"])) == first
    assert ids(history(["a:b"])) == [first[1]]


# -- temperature and top_p together -------------------------------------------------------------


def test_the_playgrounds_neutral_top_p_beside_a_temperature_is_not_sent(surface, fake_provider):
    # OpenAI's playground exports temperature=..., top_p=1; Claude Sonnet 4.5, Haiku 4.5 and Opus 4.1
    # and later answer a request with both "`temperature` and `top_p` cannot both be specified for
    # this model" (BerriAI/litellm#15097). top_p=1 samples from the whole distribution, which is what
    # no top_p does: not sending it changes nothing.
    client(surface).chat.completions.create(
        model="claude-fake", messages=[{"role": "user", "content": "hi"}], temperature=0.3, top_p=1
    )
    body = sent(fake_provider)
    assert body["temperature"] == 0.3 and "top_p" not in body
    # temperature=1 is both APIs' default: beside a real top_p it is the one left out.
    client(surface).chat.completions.create(
        model="claude-fake", messages=[{"role": "user", "content": "hi"}], temperature=1, top_p=0.8
    )
    body = sent(fake_provider)
    assert body["top_p"] == 0.8 and "temperature" not in body


@pytest.mark.parametrize(
    ("fields", "want"),
    [
        ({"temperature": 0.3, "top_p": 1}, {"temperature": 0.3}),
        ({"temperature": 1, "top_p": 0.8}, {"top_p": 0.8}),
        ({"temperature": 1.0, "top_p": 1.0}, {"temperature": 1.0}),
        ({"top_p": 1}, {"top_p": 1}),  # alone, sent as given
        ({"temperature": 1}, {"temperature": 1}),
        ({"temperature": 0.2, "top_p": 0.9}, {"temperature": 0.2, "top_p": 0.9}),  # both chosen: the model decides
    ],
)
def test_sampling_pairs(fields, want):
    body, _ = chat_to_messages({"messages": [{"role": "user", "content": "hi"}], **fields}, default_max_tokens=100)
    assert {name: body[name] for name in ("temperature", "top_p") if name in body} == want


# -- the context window -------------------------------------------------------------------------

# What Anthropic answers a request that does not fit (quoted from the API in
# anthropics/claude-code#12186 and docker/docker-agent#569).
TOO_LONG = [
    "prompt is too long: 208656 tokens > 200000 maximum",
    "input length and `max_tokens` exceed context limit: 178959 + 64000 > 200000, decrease input length or "
    "`max_tokens` and try again",
]


def anthropic_error(status: int, kind: str, message: str) -> bytes:
    body = orjson.dumps({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_1"})
    head = f"HTTP/1.1 {status} Bad Request\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + b"request-id: req_1\r\n\r\n" + body


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_prompt_too_long_for_the_model_is_openais_context_length_exceeded(start_egress, stream):
    # Agents (and LangChain, the Agents SDK) trim or compact their history when the error's code is
    # "context_length_exceeded", as OpenAI names a request past the model's window.
    upstream = ScriptedUpstream([anthropic_error(400, "invalid_request_error", message) for message in TOO_LONG])
    try:
        egress = start_egress(f'[providers.anthropic]\nbase_url = "{upstream.base_url}"\n{ROUTES}')
        for message in TOO_LONG:
            with pytest.raises(openai.BadRequestError) as raised:
                client(egress).chat.completions.create(
                    model="claude-x", messages=[{"role": "user", "content": "hi"}], stream=stream
                )
            error = raised.value
            assert (error.code, error.type, error.param) == (
                "context_length_exceeded",
                "invalid_request_error",
                "messages",
            )
            assert error.body["message"] == message
    finally:
        upstream.stop()


def test_other_invalid_requests_keep_anthropics_type_as_their_code():
    for message in ("max_tokens: Field required", "messages: prompt is too long"):
        error = orjson.loads(
            error_to_openai(400, anthropic_error(400, "invalid_request_error", message).split(b"\r\n\r\n")[1])
        )
        assert error["error"]["code"] == "invalid_request_error" and error["error"]["param"] is None


# -- images ----------------------------------------------------------------------------------------

JPEG = "/9j/4AAQSkZJRgAB"  # a JPEG's first bytes (FF D8 FF E0, JFIF): what the strict fake checks


def test_a_jpeg_labelled_image_jpg_is_sent_as_image_jpeg(surface, fake_provider):
    # Browsers and file-extension code label JPEGs "image/jpg"; Anthropic takes only image/jpeg, png,
    # gif and webp ("media_type: Input should be 'image/jpeg', ...", base64_image_source_param.py).
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/jpg;base64,{JPEG}"}},
    ]
    answer = client(surface).chat.completions.create(
        model="claude-fake", messages=[{"role": "user", "content": content}]
    )
    assert answer.choices[0].message.content
    source = sent(fake_provider)["messages"][0]["content"][1]["source"]
    assert source == {"type": "base64", "media_type": "image/jpeg", "data": JPEG}


@pytest.mark.parametrize(
    "parameters",
    [{}, {"properties": {"path": {"type": "string"}}, "required": ["path"]}],
    ids=["empty", "untyped"],
)
def test_a_tool_schema_without_a_type_is_an_object_s(surface, fake_provider, parameters):
    # MCP tools with no arguments send `{}`; OpenAI takes a schema without `type` as an object's,
    # Anthropic refuses it ("input_schema.type: Field required").
    tool = {"type": "function", "function": {"name": "list_files", "parameters": parameters}}
    completion = client(surface).chat.completions.create(
        model="claude-fake", messages=[{"role": "user", "content": "hi"}], tools=[tool]
    )
    assert completion.choices[0].message is not None
    (schema,) = [tool["input_schema"] for tool in sent(fake_provider)["tools"]]
    assert schema == {"type": "object", **parameters}

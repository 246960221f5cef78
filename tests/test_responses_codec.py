"""responses_codec, values in and values out: the request mapping, and every recorded Anthropic
stream and message translated to the Responses API, fed whole and byte by byte, each event stream
checked against the Responses streaming schedule (tests/responses_events.py)."""

from __future__ import annotations

import orjson
import pytest
from openai.types.responses import ResponseFailedEvent

from egress.anthropic_codec import chat_to_messages, message_to_chat
from egress.errors import EgressError
from egress.responses_codec import (
    ResponsesTranscoder,
    envelope,
    message_to_response,
    mint_id,
    namespaced,
    response_shell,
    responses_param,
    responses_to_chat,
)
from egress.usage import ANTHROPIC, Usage, reduce_usage
from tests.responses_events import parse_sse, validate_stream
from tests.test_anthropic_codec import (
    JSON_CASES,
    MESSAGE_STOP,
    RECORDINGS,
    STREAMS,
    THINKING_TOOLS,
    args,
    end,
    recorded,
    recorded_json,
    sse,
    start,
    stop,
    text,
    tool,
)

SHELL = response_shell({"model": "claude-x", "input": "hi"}, "claude-x", 1_700_000_000)


def translate(body: dict) -> tuple[dict, list[str]]:
    chat, warnings = responses_to_chat(body)
    messages, _ = chat_to_messages(chat, default_max_tokens=4096)
    return messages, warnings


# -- request ------------------------------------------------------------------------------------


def test_instructions_and_a_string_input():
    body, warnings = translate({"model": "m", "instructions": "Be brief.", "input": "hi", "max_output_tokens": 50})
    assert body == {
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        "max_tokens": 50,
    }
    assert warnings == []


def test_a_history_of_calls_and_outputs_groups_every_result_after_its_call():
    history = [
        {"role": "developer", "content": [{"type": "input_text", "text": "Use tools."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather and time?"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "toolu_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "toolu_2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "toolu_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "toolu_2", "output": [{"type": "input_text", "text": "noon"}]},
    ]
    body, _ = translate({"model": "m", "input": history})
    assert body["system"] == [{"type": "text", "text": "Use tools."}]
    assert [turn["role"] for turn in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
    ]
    assert body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
        {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "noon"}]},
    ]


def test_a_tool_output_with_an_image_is_a_tool_result_with_the_image():
    # Codex's view_image and MCP tools return images in a function_call_output; a tool_result takes
    # text, image and document blocks.
    pixel = "iVBORw0KGgo="
    body = {
        "model": "claude-x",
        "input": [
            {"role": "user", "content": "look"},
            {"type": "function_call", "call_id": "call_1", "name": "view_image", "arguments": '{"path":"a.png"}'},
            {
                "type": "function_call_output",
                "call_id": "call_1",
                "output": [
                    {"type": "input_text", "text": "a.png:"},
                    {"type": "input_image", "image_url": f"data:image/png;base64,{pixel}"},
                ],
            },
        ],
    }
    messages, _ = translate(body)
    (result,) = messages["messages"][-1]["content"]
    assert result["type"] == "tool_result" and result["tool_use_id"] == "call_1"
    assert result["content"] == [
        {"type": "text", "text": "a.png:"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": pixel}},
    ]


def test_allowed_tools_in_the_responses_shape():
    tools = [
        {"type": "function", "name": name, "parameters": {"type": "object", "properties": {}}}
        for name in ("shell", "apply_patch")
    ]
    choice = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "shell"}]}
    messages, _ = translate({"model": "claude-x", "input": "hi", "tools": tools, "tool_choice": choice})
    assert [tool["name"] for tool in messages["tools"]] == ["shell"]
    assert messages["tool_choice"] == {"type": "any"}


def test_reasoning_items_carry_the_exact_blocks_back_and_others_are_dropped_with_a_warning():
    thinking = {"type": "thinking", "thinking": "Call it.", "signature": "EqQBsig=="}
    redacted = {"type": "redacted_thinking", "data": "EmwKAhgBEgy3"}
    history = [
        {"role": "user", "content": "weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": envelope(thinking)},
        {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": envelope(redacted)},
        {"type": "reasoning", "id": "rs_openai", "summary": [], "encrypted_content": "gAAAAABopenai"},
        {"type": "function_call", "call_id": "toolu_1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "toolu_1", "output": "sunny"},
    ]
    body, warnings = translate({"model": "m", "input": history, "reasoning": {"effort": "low"}})
    assert body["messages"][1]["content"] == [
        thinking,
        redacted,
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}},
    ]
    assert warnings == ["input[3]: a reasoning item egress did not mint was dropped"]
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}


def test_calls_sent_back_each_followed_by_its_output_stay_one_turn_with_their_thinking():
    """An agent appends each result right after its call: [thinking, call A, output A, call B,
    output B]. Split at each output, call B opened a turn with no thinking, which Anthropic refuses
    ("Expected 'thinking' or 'redacted_thinking', but found 'tool_use'")."""
    thinking = {"type": "thinking", "thinking": "Both.", "signature": "EqQBsig=="}
    history = [
        {"role": "user", "content": "weather and time?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": envelope(thinking)},
        {"type": "function_call", "call_id": "toolu_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "toolu_1", "output": "sunny"},
        {"type": "function_call", "call_id": "toolu_2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "toolu_2", "output": "noon"},
        # The model's next turn: its reasoning opens a turn of its own, after the results.
        {"type": "reasoning", "id": "rs_2", "summary": [], "encrypted_content": envelope(thinking)},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny, noon."}]},
    ]
    body, _ = translate({"model": "m", "input": history, "reasoning": {"effort": "low"}})
    assert [turn["role"] for turn in body["messages"]] == ["user", "assistant", "user", "assistant"]
    assert body["messages"][1]["content"] == [
        thinking,
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
    ]
    assert [block["tool_use_id"] for block in body["messages"][2]["content"]] == ["toolu_1", "toolu_2"]
    assert body["messages"][3]["content"] == [thinking, {"type": "text", "text": "Sunny, noon."}]


def test_assistant_message_items_sent_back_stay_apart():
    history = [
        {"role": "user", "content": "two paragraphs"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "First."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Second."}]},
        {"role": "user", "content": "thanks"},
    ]
    body, _ = translate({"model": "m", "input": history})
    assert body["messages"][1]["content"] == [{"type": "text", "text": "First."}, {"type": "text", "text": "Second."}]


def test_tools_tool_choice_and_json_schema():
    tool = {"type": "function", "name": "f", "description": "d", "parameters": {"type": "object"}, "strict": True}
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    body, _ = translate(
        {
            "model": "m",
            "input": "x",
            "tools": [tool],
            "tool_choice": {"type": "function", "name": "f"},
            "parallel_tool_calls": False,
            "temperature": 0.2,
            "text": {"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}},
        }
    )
    closed = {"type": "object", "additionalProperties": False}  # as constrained decoding takes it (schemas.py)
    assert body["tools"] == [{"name": "f", "description": "d", "input_schema": closed, "strict": True}]
    assert body["tool_choice"] == {"type": "tool", "name": "f", "disable_parallel_tool_use": True}
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": {**schema, **closed}}}
    assert body["temperature"] == 0.2


def test_store_and_include_are_accepted_verbosity_is_reported():
    _, warnings = translate(
        {
            "model": "m",
            "input": "x",
            "store": True,
            "include": ["reasoning.encrypted_content", "web_search_call.action.sources"],
            "text": {"verbosity": "low"},
        }
    )
    assert warnings == ["text.verbosity has no Anthropic equivalent and was not applied"]


def test_codexs_cached_web_search_is_left_out_with_a_warning():
    """Codex sends `{"type": "web_search", "external_web_access": false}` by default (its cached
    search): refused, it made every Codex on a Claude model fail until its config changed. No
    external access was asked for, so leaving it out does nothing the caller turned off."""
    function = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    cached = {"type": "web_search", "external_web_access": False}
    chat, warnings = translate({"model": "m", "input": "x", "tools": [function, cached], "tool_choice": "auto"})
    assert [tool["name"] for tool in chat["tools"]] == ["f"]
    assert warnings == [
        "tools[1]: a web_search without external web access (a cached search) has no Anthropic equivalent "
        "and was left out"
    ]
    alone, _ = translate({"model": "m", "input": "x", "tools": [cached]})
    assert "tools" not in alone


@pytest.mark.parametrize("kind", ["web_search", "web_search_preview", "web_search_2025_08_26"])
def test_a_live_web_search_is_anthropics_web_search_tool(kind):
    """The search runs at Anthropic (https://docs.anthropic.com/en/docs/agents-and-tools/tool-use/
    web-search-tool): its allowed domains, the caller's approximate location, and the context size
    as a number of searches (LiteLLM's mapping)."""
    function = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    live = {
        "type": kind,
        "search_context_size": "low",
        "user_location": {"type": "approximate", "city": "Paris", "country": "FR", "timezone": "Europe/Paris"},
        "filters": {"allowed_domains": ["example.com"]},
    }
    if kind == "web_search":
        live["external_web_access"] = True
    body, warnings = translate({"model": "m", "input": "x", "tools": [function, live]})
    assert body["tools"][1] == {
        "type": "web_search_20250305",
        "name": "web_search",
        "max_uses": 1,
        "user_location": {"type": "approximate", "city": "Paris", "country": "FR", "timezone": "Europe/Paris"},
        "allowed_domains": ["example.com"],
    }
    assert warnings == []
    plain, _ = translate({"model": "m", "input": "x", "tools": [{"type": kind}]})
    assert plain["tools"] == [{"type": "web_search_20250305", "name": "web_search"}]
    with pytest.raises(EgressError) as raised:
        responses_to_chat({"model": "m", "input": "x", "tools": [{"type": kind, "search_content_types": ["image"]}]})
    assert (raised.value.code, raised.value.param) == ("unsupported_parameter", "tools[0].search_content_types")
    with pytest.raises(EgressError) as raised:
        translate({"model": "m", "input": "x", "tools": [{"type": kind, "search_context_size": "huge"}]})
    assert raised.value.code == "invalid_request"
    with pytest.raises(EgressError) as raised:
        responses_to_chat({"model": "m", "input": "x", "tools": [{"type": kind}, {"type": kind}]})
    assert raised.value.param == "tools[1]"


def test_a_web_search_call_sent_back_is_left_out_with_a_warning():
    """Codex sends the whole conversation back: a search run on an earlier turn comes back as a
    web_search_call item, whose results Anthropic can't take back (they are its encrypted content,
    which the item doesn't carry). The answer built on it stays."""
    items = [
        {"role": "user", "content": "news?"},
        {"type": "web_search_call", "id": "ws_1", "status": "completed", "action": {"type": "search", "query": "news"}},
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Here.", "annotations": []}],
        },
        {"role": "user", "content": "more"},
    ]
    body, warnings = translate({"model": "m", "input": items})
    assert [message["role"] for message in body["messages"]] == ["user", "assistant", "user"]
    assert warnings == ["input[1]: a web_search_call can't be sent back to Anthropic and was left out"]


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("user_location", {"type": "approximate", "city": 7}, "tools[1].user_location.city"),
        ("user_location", "Paris", "tools[1].user_location"),
        ("search_context_size", "max", "tools[1].search_context_size"),
        ("filters", {"allowed_domains": "example.com"}, "tools[1].filters"),
        ("filters", ["example.com"], "tools[1].filters"),
    ],
)
def test_a_malformed_web_search_tool_is_named_as_the_caller_sent_it(field, value, param):
    """Checked under the Responses names (the module contract): chat's `web_search_options` (and
    its `user_location.approximate`, a nesting the Responses tool doesn't have) was never sent."""
    function = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    with pytest.raises(EgressError) as raised:
        translate({"model": "m", "input": "x", "tools": [function, {"type": "web_search", field: value}]})
    assert (raised.value.code, raised.value.param) == ("invalid_request", param)
    assert raised.value.message.startswith(param) and "web_search_options" not in raised.value.message


def test_a_web_search_tools_filters_as_openai_types_them():
    """openai-python's Filters: `allowed_domains` Optional, null (or none at all) meaning no filter;
    a key it doesn't have is refused by name, or dropped and named with drop_params."""
    for filters in ({"allowed_domains": None}, {}):
        body, _ = translate({"model": "m", "input": "x", "tools": [{"type": "web_search", "filters": filters}]})
        assert body["tools"] == [{"type": "web_search_20250305", "name": "web_search"}]
    tool = {"type": "web_search", "filters": {"allowed_domains": ["a.com"], "blocked_domains": ["b.com"]}}
    with pytest.raises(EgressError) as raised:
        responses_to_chat({"model": "m", "input": "x", "tools": [tool]})
    assert (raised.value.code, raised.value.param) == ("unsupported_parameter", "tools[0].filters.blocked_domains")
    dropped: list[str] = []
    chat, _ = responses_to_chat({"model": "m", "input": "x", "tools": [tool]}, dropped=dropped)
    body, chat_dropped = chat_to_messages(chat, default_max_tokens=4096, drop_params=True)
    assert body["tools"] == [{"type": "web_search_20250305", "name": "web_search", "allowed_domains": ["a.com"]}]
    assert (dropped, chat_dropped) == (["tools[0].filters.blocked_domains"], [])


def test_items_left_out_are_one_warning_of_each_kind_however_many():
    """Codex sends its whole history each turn: a Warning header per item left out (a search on
    every turn) outgrew what clients take (hyper, under Codex's reqwest: 100 headers)."""
    search = {"type": "web_search_call", "status": "completed", "action": {"type": "search", "query": "q"}}
    foreign = {"type": "reasoning", "summary": [], "encrypted_content": "gAAAAABforeign"}
    items: list = [{"role": "user", "content": "news?"}]
    for turn in range(150):
        items += [foreign, search, {"type": "message", "role": "assistant", "content": f"Answer {turn}."}]
        items.append({"role": "user", "content": "more"})
    body, warnings = translate({"model": "m", "input": items})
    assert len(body["messages"]) == 301
    assert warnings == [
        "input[1], input[5], input[9] and 147 more: 150 reasoning items egress did not mint were dropped",
        "input[2], input[6], input[10] and 147 more: 150 web_search_call items can't be sent back to Anthropic and "
        "were left out",
    ]
    _, two = translate({"model": "m", "input": items[:9]})
    assert two == [
        "input[1], input[5]: 2 reasoning items egress did not mint were dropped",
        "input[2], input[6]: 2 web_search_call items can't be sent back to Anthropic and were left out",
    ]


def test_drop_params_drops_what_cannot_be_honoured_and_names_it():
    web = {"type": "file_search", "vector_store_ids": ["vs_1"]}
    function = {"type": "function", "name": "f", "parameters": {"type": "object"}}
    group = {"type": "namespace", "name": "ns", "tools": [{"type": "custom", "name": "c"}, function]}
    body = {
        "model": "m",
        "input": "x",
        "truncation": "auto",
        "max_tool_calls": 3,
        "top_logprobs": 2,
        "include": ["message.output_text.logprobs"],
        "tools": [web, function, group],
        "tool_choice": {"type": "web_search_preview"},
    }
    dropped: list[str] = []
    chat, _ = responses_to_chat(body, dropped=dropped)
    assert dropped == [
        "truncation",
        "max_tool_calls",
        "top_logprobs",
        "include",
        "tools[0]",
        "tools[2].tools[0]",
        "tool_choice",
    ]
    assert [tool["function"]["name"] for tool in chat["tools"]] == ["f", "ns__f"]
    assert not {"truncation", "max_tool_calls", "top_logprobs", "include", "tool_choice"} & chat.keys()
    chat_to_messages(chat, default_max_tokens=4096)  # what is left translates
    with pytest.raises(EgressError) as raised:
        responses_to_chat(body)  # without drop_params the first is refused
    assert (raised.value.code, raised.value.param) == ("unsupported_parameter", "truncation")
    # Never dropped: what would change the conversation itself.
    for refused in ({"previous_response_id": "resp_1"}, {"input": [{"type": "file_search_call", "id": "fs_1"}]}):
        with pytest.raises(EgressError):
            responses_to_chat({"model": "m", "input": "x", **refused}, dropped=[])


@pytest.mark.parametrize(
    ("chat_param", "param"),
    [
        ("temperature", "temperature"),
        ("tool_choice", "tool_choice"),
        ("max_completion_tokens", "max_output_tokens"),
        ("reasoning_effort", "reasoning.effort"),
        ("response_format", "text.format"),
        ("messages[2].content[0].image_url.url", "input"),
        ("tools[0].function.name", "tools"),
    ],
)
def test_chat_refusals_are_named_as_the_responses_request_named_them(chat_param, param):
    assert responses_param(chat_param) == param


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"previous_response_id": "resp_1"}, "invalid_request", "previous_response_id"),
        ({"conversation": {"id": "conv_1"}}, "invalid_request", "conversation"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "invalid_request", "input[0]"),
        ({"input": [{"type": "file_search_call", "id": "fs_1"}]}, "unsupported_parameter", "input[0].type"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "unsupported_parameter", "tools[0].type"),
        ({"tools": [{"type": "computer_use_preview"}]}, "unsupported_parameter", "tools[0].type"),
        ({"tool_choice": {"type": "web_search_preview"}}, "unsupported_parameter", "tool_choice"),
        ({"background": True}, "unsupported_parameter", "background"),
        ({"max_tool_calls": 3}, "unsupported_parameter", "max_tool_calls"),
        ({"truncation": "auto"}, "unsupported_parameter", "truncation"),
        ({"top_logprobs": 2}, "unsupported_parameter", "top_logprobs"),
        # Logprobs are refused however they are asked for (Anthropic returns none).
        (
            {"include": ["reasoning.encrypted_content", "message.output_text.logprobs"]},
            "unsupported_parameter",
            "include",
        ),
        # Refused by the chat translation, under the same name.
        ({"temperature": 1.5}, "unsupported_parameter", "temperature"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]}, None, None),
        ({"input": []}, "invalid_request", "input"),
        ({"input": [{"type": "reasoning", "encrypted_content": "egress.v1.%%%"}]}, "invalid_request", None),
        ({"text": {"format": {"type": "grammar"}}}, "invalid_request", "text.format.type"),
    ],
)
def test_refusals_name_their_param(body, code, param):
    with pytest.raises(EgressError) as raised:
        translate({"model": "m", "input": "x", **body})
    if code is not None:
        assert raised.value.code == code
    if param is not None:
        assert raised.value.param == param


# -- response -----------------------------------------------------------------------------------


def run(pieces: list[bytes]) -> tuple[bytes, ResponsesTranscoder]:
    transcoder = ResponsesTranscoder(SHELL)
    out = b"".join(transcoder.feed(piece) for piece in pieces)
    return out + transcoder.finish(), transcoder


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_every_recorded_stream_whole_and_byte_by_byte(name):
    stream = STREAMS[name]
    whole, transcoder = run([stream])
    assert transcoder.ended
    bytewise, _ = run([stream[i : i + 1] for i in range(len(stream))])
    assert bytewise == whole
    response = validate_stream(parse_sse(whole))
    want = recorded(stream)
    output = response["output"]
    texts = [part["text"] for item in output if item["type"] == "message" for part in item["content"]]
    calls = [(item["call_id"], item["name"], item["arguments"]) for item in output if item["type"] == "function_call"]
    if name == "synthetic_json_mode":
        assert orjson.loads("".join(texts)) == {"answer": 42} and calls == []
    else:
        assert "".join(texts) == want["text"]
        assert calls == [(call["id"], call["name"], call["arguments"] or "{}") for call in want["calls"]]
    reasoning = [item for item in output if item["type"] == "reasoning"]
    assert len(reasoning) == len(want["thinking_blocks"])
    for item, block in zip(reasoning, want["thinking_blocks"], strict=True):
        # The envelope opens to the very block, and the summary is its thinking text.
        opened, _ = responses_to_chat({"input": [{"role": "user", "content": "x"}, item]})
        assert opened["messages"][1]["thinking_blocks"] == [block]
        if block["type"] == "thinking" and block["thinking"]:
            assert item["summary"] == [{"type": "summary_text", "text": block["thinking"]}]
    status = "incomplete" if want["stop"] == "max_tokens" else "completed"
    assert response["status"] == status
    # Only the item generation ended in is incomplete, when the response is.
    statuses = [item["status"] for item in output if item["type"] in ("message", "function_call")]
    if statuses and output[-1]["type"] in ("message", "function_call"):
        assert statuses[-1] == status
        statuses.pop()
    assert set(statuses) <= {"completed"}
    if name in RECORDINGS:
        expected = RECORDINGS[name].meta["expected"]
        assert response["usage"]["input_tokens"] == expected["input_tokens"]
        assert response["usage"]["output_tokens"] == expected["output_tokens"]
        assert response["usage"]["input_tokens_details"]["cached_tokens"] == (expected["cache_read_tokens"] or 0)


def test_ids_are_minted_once_from_the_upstream_message():
    whole, _ = run([THINKING_TOOLS])
    again, _ = run([THINKING_TOOLS])
    assert whole == again  # the same upstream message: the same ids, in any worker
    events = parse_sse(whole)
    response = validate_stream(events)
    assert response["id"] == mint_id("resp", "msg_think")
    assert [item["id"][:3] for item in response["output"]] == ["rs_", "rs_", "rs_", "msg", "fc_"]
    assert response["output"][4]["id"] == mint_id("fc", "msg_think", 4)


@pytest.mark.parametrize("name", JSON_CASES)
def test_every_recorded_message(name):
    message = recorded_json(RECORDINGS[name])
    response = message_to_response(message, SHELL)
    assert response["id"] == mint_id("resp", message["id"]) and response["object"] == "response"
    texts = [block["text"] for block in message["content"] if block["type"] == "text"]
    output_texts = [
        part["text"] for item in response["output"] if item["type"] == "message" for part in item["content"]
    ]
    assert output_texts == texts
    usage = Usage()
    reduce_usage(usage, {}, message, ANTHROPIC)
    assert response["usage"]["input_tokens"] == usage.input_tokens
    assert response["usage"]["output_tokens"] == usage.output_tokens
    assert response["usage"]["total_tokens"] == usage.input_tokens + usage.output_tokens
    assert response["store"] is False


def test_a_message_without_an_id_gets_ids_of_its_own():
    # An Anthropic-compatible server may leave the id out: each response its own ids, never shared.
    message = {"type": "message", "role": "assistant", "content": [{"type": "text", "text": "hi"}],
               "stop_reason": "end_turn", "usage": {"input_tokens": 1, "output_tokens": 1}}  # fmt: skip
    first, second = (message_to_response(message, SHELL) for _ in range(2))
    assert first["id"] != second["id"] and first["output"][0]["id"] != second["output"][0]["id"]
    chats = {message_to_chat(message, model="m", created=1)["id"] for _ in range(2)}
    assert len(chats) == 2 and all(chat.startswith("chatcmpl-gen_") for chat in chats)
    stream = sse(
        start(None),
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        text(0, "hi"),
        stop(0),
        end("end_turn", 1),
        MESSAGE_STOP,
    )
    ids = {validate_stream(parse_sse(run([stream])[0]))["id"] for _ in range(2)}
    assert len(ids) == 2
    named = {**message, "id": "msg_named"}
    assert message_to_response(named, SHELL)["id"] == message_to_response(named, SHELL)["id"]


def test_a_message_and_its_stream_give_the_same_ids():
    message = {
        "id": "msg_same",
        "type": "message",
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }
    stream = b"".join(
        b"event: %s\ndata: %s\n\n" % (event["type"].encode(), orjson.dumps(event))
        for event in (
            {"type": "message_start", "message": {**message, "content": [], "stop_reason": None}},
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me check."}},
            {"type": "content_block_stop", "index": 0},
            {"type": "content_block_start", "index": 1, "content_block": {**message["content"][1], "input": {}}},
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": '{"city":"Paris"}'},
            },
            {"type": "content_block_stop", "index": 1},
            {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 5}},
            {"type": "message_stop"},
        )
    )
    streamed = validate_stream(parse_sse(run([stream])[0]))
    whole = message_to_response(message, SHELL)
    assert [item["id"] for item in streamed["output"]] == [item["id"] for item in whole["output"]]
    assert streamed["id"] == whole["id"]
    assert orjson.loads(streamed["output"][1]["arguments"]) == orjson.loads(whole["output"][1]["arguments"])


def _cut_calls() -> bytes:
    """Two parallel calls, the second cut by max_tokens inside its arguments: Anthropic stops the
    block as usual, and only message_delta's stop reason says it was cut."""
    return sse(
        start("msg_cut_call"),
        tool(0, "toolu_1", "get_weather"),
        args(0, '{"city": "Paris"}'),
        stop(0),
        tool(1, "toolu_2", "get_weather"),
        args(1, '{"city": "Lon'),
        stop(1),
        end("max_tokens", 40),
        MESSAGE_STOP,
    )


def test_a_call_cut_by_max_tokens_is_incomplete_and_the_calls_before_it_complete():
    stream = _cut_calls()
    whole, transcoder = run([stream])
    assert transcoder.ended
    assert run([stream[i : i + 1] for i in range(len(stream))])[0] == whole
    events = parse_sse(whole)
    response = validate_stream(events)  # the openai SDK's event models, and the schedule
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert [(item["call_id"], item["status"]) for item in response["output"]] == [
        ("toolu_1", "completed"),
        ("toolu_2", "incomplete"),
    ]
    done = [body["item"] for _, body in events if body["type"] == "response.output_item.done"]
    assert [item["status"] for item in done] == ["completed", "incomplete"]
    # The first call's done went out when the second began, not held to the end.
    kinds = [(body["type"], body.get("output_index")) for _, body in events]
    assert kinds.index(("response.output_item.done", 0)) < kinds.index(("response.output_item.added", 1))


def test_a_message_cut_by_max_tokens_is_incomplete_and_one_ended_by_the_model_completed():
    for reason, status in (("max_tokens", "incomplete"), ("end_turn", "completed"), ("refusal", "incomplete")):
        stream = sse(
            start("msg_text"),
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            text(0, "Once upon"),
            stop(0),
            end(reason, 3),
            MESSAGE_STOP,
        )
        response = validate_stream(parse_sse(run([stream])[0]))
        assert [item["status"] for item in response["output"]] == [status], reason


def test_a_whole_message_cut_by_max_tokens_marks_its_last_item_incomplete():
    message = {
        "id": "msg_whole_cut",
        "type": "message",
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Checking both."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}},
        ],
        "stop_reason": "max_tokens",
        "usage": {"input_tokens": 10, "output_tokens": 40},
    }
    response = message_to_response(message, SHELL)
    assert response["status"] == "incomplete"
    assert [item["status"] for item in response["output"]] == ["completed", "completed", "incomplete"]
    message["stop_reason"] = "tool_use"
    assert {item["status"] for item in message_to_response(message, SHELL)["output"]} == {"completed"}


ERROR = b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'


def failed(output: bytes) -> tuple[list, dict]:
    """The events of a failed stream, checked by the validator and by the SDK's own event model."""
    events = parse_sse(output)
    response = validate_stream(events)
    assert response["status"] == "failed"
    ResponseFailedEvent.model_validate(events[-1][1])  # error.code is a value the SDK's Literal allows
    return events, response


def test_an_error_after_the_first_event_fails_the_response_with_what_came():
    stream = THINKING_TOOLS.split(b"event: content_block_start", 1)[0]
    output, transcoder = run([stream + ERROR])
    assert transcoder.ended
    events, response = failed(output)
    assert [body["type"] for _, body in events] == ["response.created", "response.in_progress", "response.failed"]
    # Anthropic's type is not one of ResponseError.code's values: the nearest is, the type beside it.
    assert response["error"] == {"code": "server_error", "message": "Overloaded", "type": "overloaded_error"}


@pytest.mark.parametrize(
    ("anthropic_type", "code"),
    [
        ("overloaded_error", "server_error"),
        ("api_error", "server_error"),
        ("timeout_error", "server_error"),
        ("rate_limit_error", "rate_limit_exceeded"),
        ("invalid_request_error", "invalid_prompt"),
        ("request_too_large", "invalid_prompt"),
        ("authentication_error", "server_error"),
        ("billing_error", "server_error"),
        ("a_type_from_the_future", "server_error"),
        (None, "server_error"),
    ],
)
def test_an_anthropic_error_type_becomes_a_response_error_code(anthropic_type, code):
    error = {"type": "error", "error": {"message": "m", **({"type": anthropic_type} if anthropic_type else {})}}
    output, _ = run([sse(start(), error)])
    assert failed(output)[1]["error"]["code"] == code


def test_an_error_before_message_start_gets_a_response_id_of_its_own():
    outputs = [run([ERROR])[0] for _ in range(2)]
    ids = []
    for output in outputs:
        events, response = failed(output)
        assert [body["type"] for _, body in events] == ["response.created", "response.in_progress", "response.failed"]
        assert response["id"].startswith("resp_")
        ids.append(response["id"])
    assert ids[0] != ids[1]  # two failed requests, two responses
    garbage, _ = run([b"data: {oops\n\n"])  # an event egress can't read fails the same way
    assert failed(garbage)[1]["error"]["code"] == "server_error"


def test_an_error_mid_message_closes_it_with_the_text_that_came():
    # Whole and byte by byte: the message closes (incomplete) with its text, which response.failed
    # carries; the call whose arguments were cut stays open and out of the output.
    stream = sse(
        start("msg_cut"),
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        text(0, "Hel"),
        text(0, "lo"),
        tool(1, "toolu_1", "get_weather"),
        args(1, '{"ci'),
    )
    whole, transcoder = run([stream + ERROR])
    assert transcoder.ended
    assert run([(stream + ERROR)[i : i + 1] for i in range(len(stream + ERROR))])[0] == whole
    events, response = failed(whole)
    kinds = [body["type"] for _, body in events]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.failed",
    ]
    assert "response.function_call_arguments.done" not in kinds
    message = mint_id("msg", "msg_cut", 0)
    assert response["output"] == [
        {
            "id": message,
            "type": "message",
            "status": "incomplete",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}],
        }
    ]


def test_a_stream_cut_before_message_stop_never_ends():
    output, transcoder = run([THINKING_TOOLS[: len(THINKING_TOOLS) // 2]])
    assert not transcoder.ended
    assert b"response.completed" not in output


def test_namespace_tools_are_flattened_and_their_calls_answered_with_their_namespace():
    # Codex sends its sub-agent tools as a namespace (openai-python: types/responses/namespace_tool.py).
    spawn = {"type": "function", "name": "spawn_agent", "parameters": {"type": "object", "properties": {}}}
    body = {
        "model": "m",
        "tools": [{"type": "namespace", "name": "multi_agent_v1", "description": "Agents.", "tools": [spawn]}],
        "input": [
            {"role": "user", "content": "go"},
            {
                "type": "function_call",
                "call_id": "toolu_1",
                "namespace": "multi_agent_v1",
                "name": "spawn_agent",
                "arguments": "{}",
            },
            {"type": "function_call_output", "call_id": "toolu_1", "output": "ok"},
        ],
    }
    translated, _ = translate(body)
    assert [tool["name"] for tool in translated["tools"]] == ["multi_agent_v1__spawn_agent"]
    assert translated["messages"][1]["content"][0]["name"] == "multi_agent_v1__spawn_agent"
    names = namespaced(body)
    message = {
        "id": "msg_ns",
        "content": [{"type": "tool_use", "id": "toolu_2", "name": "multi_agent_v1__spawn_agent", "input": {}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    call = message_to_response(message, SHELL, names)["output"][0]
    assert (call["namespace"], call["name"], call["call_id"]) == ("multi_agent_v1", "spawn_agent", "toolu_2")
    # Streamed, every event that names the call names it so, function_call_arguments.done included.
    stream = sse(
        start("msg_ns"),
        tool(0, "toolu_2", "multi_agent_v1__spawn_agent"),
        args(0, '{"task": "x"}'),
        stop(0),
        end("tool_use", 3),
        MESSAGE_STOP,
    )
    transcoder = ResponsesTranscoder(SHELL, names)
    streamed = parse_sse(b"".join(transcoder.feed(stream[i : i + 1]) for i in range(len(stream))))
    validate_stream(streamed)
    named = [
        (body.get("item", body).get("namespace"), body.get("item", body)["name"])
        for _, body in streamed
        if body["type"].startswith(("response.output_item.", "response.function_call_arguments.done"))
    ]
    assert named == [("multi_agent_v1", "spawn_agent")] * 3
    inner = {**body, "tools": [{"type": "namespace", "name": "n", "tools": [{"type": "custom", "name": "x"}]}]}
    with pytest.raises(EgressError) as raised:
        translate(inner)
    assert raised.value.param == "tools[0].tools[0].type"


# -- web search ------------------------------------------------------------------------------------

WEB_SEARCH = "anthropic__stream_web_search_server_tool"  # pydantic-ai's recording (SOURCES.md)


def _assembled(stream: bytes) -> dict:
    """The Message a recorded stream builds, block by block (text, tool input JSON, citations), as
    the Anthropic SDK's stream helper assembles it: what the JSON answer of the same request is."""
    message: dict = {}
    for line in stream.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        event = orjson.loads(line[5:])
        kind = event["type"]
        if kind == "message_start":
            message = dict(event["message"], content=[])
        elif kind == "content_block_start":
            block = dict(event["content_block"])
            if block["type"] == "server_tool_use":
                block["input"], block["_json"] = {}, ""
            message["content"].append(block)
        elif kind == "content_block_delta":
            block, delta = message["content"][event["index"]], event["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "input_json_delta":
                block["_json"] += delta["partial_json"]
            elif delta["type"] == "citations_delta":
                block.setdefault("citations", []).append(delta["citation"])
        elif kind == "content_block_stop":
            block = message["content"][event["index"]]
            if "_json" in block:
                block["input"] = orjson.loads(block.pop("_json") or "{}")
        elif kind == "message_delta":
            message.update(event["delta"])
            message["usage"] = {**message["usage"], **event["usage"]}
    return message


@pytest.mark.parametrize("piece", [0, 7, 1])
def test_a_recorded_web_search_streams_as_web_search_calls_and_url_citations(piece):
    """Anthropic's web search (server_tool_use, then web_search_tool_result, then text blocks that
    cite pages) as the Responses API streams OpenAI's: a web_search_call item per search (its query,
    the pages found as sources; in_progress, searching, completed), and each cited text's
    url_citation annotations (output_text.annotation.added, then in the part and the item)."""
    stream = STREAMS[WEB_SEARCH]
    pieces = [stream] if not piece else [stream[i : i + piece] for i in range(0, len(stream), piece)]
    whole, _ = run(pieces)
    parsed = parse_sse(whole)
    response = validate_stream(parsed)
    events = [body for _, body in parsed]
    message = _assembled(stream)
    searches = [block for block in message["content"] if block["type"] == "server_tool_use"]
    found = {
        block["tool_use_id"]: block["content"]
        for block in message["content"]
        if block["type"] == "web_search_tool_result"
    }
    calls = [item for item in response["output"] if item["type"] == "web_search_call"]
    assert len(calls) == len(searches) == 2
    for call, search in zip(calls, searches, strict=True):
        assert call["status"] == "completed" and call["id"].startswith("ws_")
        assert call["action"]["query"] == search["input"]["query"]
        assert call["action"]["sources"] == [{"type": "url", "url": page["url"]} for page in found[search["id"]]]
        kinds = [event["type"] for event in events if event.get("item_id") == call["id"]]
        assert kinds == [
            "response.web_search_call.in_progress",
            "response.web_search_call.searching",
            "response.web_search_call.completed",
        ]
    texts = [block for block in message["content"] if block["type"] == "text"]
    items = [item for item in response["output"] if item["type"] == "message"]
    assert len(items) == len(texts)
    cited = 0
    for item, block in zip(items, texts, strict=True):
        part = item["content"][0]
        assert part["text"] == block["text"]
        want = [(c["url"], c["title"]) for c in block.get("citations", [])]
        assert [(a["url"], a["title"]) for a in part["annotations"]] == want
        assert all((a["start_index"], a["end_index"]) == (0, len(block["text"])) for a in part["annotations"])
        cited += len(want)
    added = [event for event in events if event["type"] == "response.output_text.annotation.added"]
    assert len(added) == cited == 9
    # The JSON answer of the same request gives the very same output (one minter, one mapping).
    assert message_to_response(message, SHELL)["output"] == response["output"]


def test_a_web_search_that_failed_or_never_finished_says_so():
    search = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}}
    failed = {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
              "content": {"type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"}}  # fmt: skip
    base = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "usage": {"input_tokens": 1}}
    output = message_to_response({**base, "content": [search, failed], "stop_reason": "end_turn"}, SHELL)["output"]
    assert [(item["type"], item["status"], item["action"]) for item in output] == [
        ("web_search_call", "failed", {"type": "search", "query": "q"})
    ]
    cut = message_to_response({**base, "content": [search], "stop_reason": "max_tokens"}, SHELL)["output"]
    assert [(item["type"], item["status"]) for item in cut] == [("web_search_call", "incomplete")]


def _search(index: int, search_id: str, query: str) -> list[dict]:
    block = {"type": "server_tool_use", "id": search_id, "name": "web_search", "input": {}}
    return [
        {"type": "content_block_start", "index": index, "content_block": block},
        args(index, orjson.dumps({"query": query}).decode()),
        stop(index),
    ]


def _found(index: int, search_id: str, url: str) -> list[dict]:
    page = {"type": "web_search_result", "url": url, "title": "T", "encrypted_content": "e"}
    block = {"type": "web_search_tool_result", "tool_use_id": search_id, "content": [page]}
    return [{"type": "content_block_start", "index": index, "content_block": block}, stop(index)]


def test_searches_answered_out_of_order_keep_the_output_in_index_order():
    """Two searches run before either's result, the second answered first: each item is done when
    its result comes, and `output` (the terminal event's, as the JSON answer's) stays in output_index
    order, not in the order the items finished."""
    answer = [{"type": "content_block_start", "index": 4, "content_block": {"type": "text", "text": ""}}]
    stream = sse(
        start("msg_two"),
        *_search(0, "srvtoolu_a", "first"),
        *_search(1, "srvtoolu_b", "second"),
        *_found(2, "srvtoolu_b", "https://b.example/"),
        *_found(3, "srvtoolu_a", "https://a.example/"),
        *answer,
        text(4, "Both."),
        stop(4),
        end("end_turn", 9),
        MESSAGE_STOP,
    )
    whole, _ = run([stream])
    assert run([stream[i : i + 1] for i in range(len(stream))])[0] == whole
    response = validate_stream(parse_sse(whole))
    assert [(item["type"], item.get("action", {}).get("query")) for item in response["output"]] == [
        ("web_search_call", "first"),
        ("web_search_call", "second"),
        ("message", None),
    ]
    assert response["output"][0]["action"]["sources"] == [{"type": "url", "url": "https://a.example/"}]
    search = {"type": "server_tool_use", "name": "web_search"}
    page = {"type": "web_search_result", "title": "T", "encrypted_content": "e"}
    message = {
        "id": "msg_two",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {**search, "id": "srvtoolu_a", "input": {"query": "first"}},
            {**search, "id": "srvtoolu_b", "input": {"query": "second"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_b",
             "content": [{**page, "url": "https://b.example/"}]},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_a",
             "content": [{**page, "url": "https://a.example/"}]},
            {"type": "text", "text": "Both."},
        ],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 25, "output_tokens": 9},
    }  # fmt: skip
    assert message_to_response(message, SHELL)["output"] == response["output"]


@pytest.mark.parametrize("citations", [5, True, "x", {"url": "u"}])
def test_a_responses_answers_citations_of_the_wrong_type_cite_nothing_and_never_raise(citations):
    # The chat path was guarded against these; the Responses JSON answer read them through the same
    # web_citations and raised (TypeError), losing the answer. The guard is in web_citations now.
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "stop_reason": "end_turn",
               "usage": {"input_tokens": 1, "output_tokens": 1},
               "content": [{"type": "text", "text": "hi", "citations": citations}]}  # fmt: skip
    (item,) = message_to_response(message, SHELL)["output"]
    assert item["content"][0]["text"] == "hi" and item["content"][0]["annotations"] == []

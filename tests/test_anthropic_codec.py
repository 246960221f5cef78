"""The OpenAI <-> Anthropic codec: request and response tables, recorded streams, any cut.

Streams are the recorded Anthropic responses in tests/recordings/anthropic__stream_* (sources in
SOURCES.md) plus a few synthetic ones for what no recording has (client tool calls, parallel tool
calls, JSON mode, a mid-stream error). Each runs whole, byte by byte and with trailing data; the
output is read back with the openai SDK's own stream accumulator and checked against the
recording: its text, its tool calls, and its usage (`expected` in meta.json).
"""

from __future__ import annotations

import gzip

import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat._completions import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from egress.anthropic_codec import (
    JSON_TOOL,
    THINKING_BUDGETS,
    StreamTranscoder,
    chat_to_messages,
    error_to_openai,
    message_to_chat,
)
from egress.errors import EgressError
from tests.replay import load_recordings
from tests.support import cut_into

RECORDINGS = load_recordings()
MODEL = "gpt-4o-via-claude"
CREATED = 1_700_000_000

# -- request ------------------------------------------------------------------------------------

HI = {"role": "user", "content": "hi"}
HI_OUT = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
CACHE = {"type": "ephemeral"}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOL_OUT = {
    "name": "get_weather",
    "description": "Weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
PNG = "iVBORw0KGgo="
# An object's schema as Anthropic's constrained decoding takes it: closed (schemas.py).
CLOSED = {"type": "object", "additionalProperties": False}


def request(**fields) -> dict:
    return {"model": "claude-x", "messages": [HI], **fields}


def expected(**fields) -> dict:
    return {"messages": [HI_OUT], "max_tokens": 1000, **fields}


# (id, OpenAI request, Anthropic request)
REQUESTS = [
    ("minimal", request(), expected()),
    (
        "system_and_developer_in_order_with_cache_control",
        {
            "messages": [
                {"role": "system", "content": "rule one"},
                HI,
                {"role": "developer", "content": [{"type": "text", "text": "rule two", "cache_control": CACHE}]},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "more"},
            ]
        },
        {
            "system": [
                {"type": "text", "text": "rule one"},
                {"type": "text", "text": "rule two", "cache_control": CACHE},
            ],
            "messages": [
                HI_OUT,
                {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
                {"role": "user", "content": [{"type": "text", "text": "more"}]},
            ],
            "max_tokens": 1000,
        },
    ),
    (
        "message_level_cache_control_marks_the_last_block",
        {"messages": [{"role": "system", "content": "big", "cache_control": CACHE}, HI]},
        expected(system=[{"type": "text", "text": "big", "cache_control": CACHE}]),
    ),
    (
        "images_data_uri_and_url",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this"},
                        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}},
                        {
                            "type": "image_url",
                            "image_url": {"url": "https://example.com/cat.jpg"},
                            "cache_control": CACHE,
                        },
                    ],
                }
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                        {
                            "type": "image",
                            "source": {"type": "url", "url": "https://example.com/cat.jpg"},
                            "cache_control": CACHE,
                        },
                    ],
                }
            ],
            "max_tokens": 1000,
        },
    ),
    (
        "pdf_file_data",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE"}}],
                }
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "document",
                            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
                        }
                    ],
                }
            ],
            "max_tokens": 1000,
        },
    ),
    ("tools_no_choice", request(tools=[TOOL]), expected(tools=[TOOL_OUT])),
    (
        "tool_choice_auto",
        request(tools=[TOOL], tool_choice="auto"),
        expected(tools=[TOOL_OUT], tool_choice={"type": "auto"}),
    ),
    (
        "tool_choice_required",
        request(tools=[TOOL], tool_choice="required"),
        expected(tools=[TOOL_OUT], tool_choice={"type": "any"}),
    ),
    (
        "tool_choice_none",
        request(tools=[TOOL], tool_choice="none"),
        expected(tools=[TOOL_OUT], tool_choice={"type": "none"}),
    ),
    (
        "tool_choice_named",
        request(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "get_weather"}}),
        expected(tools=[TOOL_OUT], tool_choice={"type": "tool", "name": "get_weather"}),
    ),
    (
        "parallel_false_alone",
        request(tools=[TOOL], parallel_tool_calls=False),
        expected(tools=[TOOL_OUT], tool_choice={"type": "auto", "disable_parallel_tool_use": True}),
    ),
    (
        "parallel_false_inside_required",
        request(tools=[TOOL], tool_choice="required", parallel_tool_calls=False),
        expected(tools=[TOOL_OUT], tool_choice={"type": "any", "disable_parallel_tool_use": True}),
    ),
    (
        "parallel_false_with_none",
        request(tools=[TOOL], tool_choice="none", parallel_tool_calls=False),
        expected(tools=[TOOL_OUT], tool_choice={"type": "none"}),
    ),
    ("parallel_true_is_the_default", request(tools=[TOOL], parallel_tool_calls=True), expected(tools=[TOOL_OUT])),
    ("tool_choice_without_tools", request(tool_choice="auto", parallel_tool_calls=False), expected()),
    (
        "tool_cache_control_and_strict",
        request(tools=[{**TOOL, "cache_control": CACHE, "function": {**TOOL["function"], "strict": True}}]),
        # Strict: its schema as constrained decoding takes it (every object closed, schemas.py).
        expected(
            tools=[
                {
                    **TOOL_OUT,
                    "input_schema": {**TOOL_OUT["input_schema"], "additionalProperties": False},
                    "strict": True,
                    "cache_control": CACHE,
                }
            ]
        ),
    ),
    (
        "tool_without_parameters",
        request(tools=[{"type": "function", "function": {"name": "now"}}]),
        expected(tools=[{"name": "now", "input_schema": {"type": "object", "properties": {}}}]),
    ),
    (
        "tool_calls_and_results_merged",
        {
            "messages": [
                HI,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}},
                        {"id": "call_2", "type": "function", "function": {"name": "b", "arguments": ""}},
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "one"},
                {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "two"}]},
                {"role": "user", "content": "and?"},
            ]
        },
        {
            "messages": [
                HI_OUT,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "call_1", "name": "a", "input": {"x": 1}},
                        {"type": "tool_use", "id": "call_2", "name": "b", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "one"},
                        {"type": "tool_result", "tool_use_id": "call_2", "content": [{"type": "text", "text": "two"}]},
                        {"type": "text", "text": "and?"},
                    ],
                },
            ],
            "max_tokens": 1000,
        },
    ),
    (
        "thinking_blocks_open_the_assistant_turn_verbatim",
        {
            "messages": [
                HI,
                {
                    "role": "assistant",
                    "content": "Checking.",
                    "reasoning_content": "Weather needs the tool.",
                    "thinking_blocks": [
                        {
                            "index": 0,
                            "type": "thinking",
                            "thinking": "Weather needs the tool.",
                            "signature": "c2ln/+==",
                        },
                        {"index": 1, "type": "redacted_thinking", "data": "RW5jcnlwdGVk"},
                        {"type": "thinking", "thinking": "", "signature": "b21pdHRlZA==", "cache_control": None},
                    ],
                    "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "a", "arguments": "{}"}}],
                },
                {"role": "tool", "tool_call_id": "toolu_1", "content": "one"},
            ]
        },
        {
            "messages": [
                HI_OUT,
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "Weather needs the tool.", "signature": "c2ln/+=="},
                        {"type": "redacted_thinking", "data": "RW5jcnlwdGVk"},
                        {"type": "thinking", "thinking": "", "signature": "b21pdHRlZA=="},
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "toolu_1", "name": "a", "input": {}},
                    ],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "one"}]},
            ],
            "max_tokens": 1000,
        },
    ),
    (
        "consecutive_same_role_merged_empty_skipped",
        {"messages": [HI, {"role": "assistant", "content": ""}, {"role": "user", "content": "again"}]},
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "again"}]}
            ],
            "max_tokens": 1000,
        },
    ),
    ("stop_string", request(stop="END"), expected(stop_sequences=["END"])),
    ("stop_list", request(stop=["a", " b\n"]), expected(stop_sequences=["a", " b\n"])),
    (
        "assistant_refusal_kept_as_its_text",
        {"messages": [HI, {"role": "assistant", "content": None, "refusal": "I can't help with that."}, HI]},
        {
            "messages": [
                HI_OUT,
                {"role": "assistant", "content": [{"type": "text", "text": "I can't help with that."}]},
                HI_OUT,
            ],
            "max_tokens": 1000,
        },
    ),
    (
        "assistant_nulls_are_not_given",
        {"messages": [HI, {"role": "assistant", "content": "ok", "refusal": None, "function_call": None}]},
        {"messages": [HI_OUT, {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}], "max_tokens": 1000},
    ),
    ("max_tokens", request(max_tokens=50), expected(max_tokens=50)),
    ("max_completion_tokens_wins", request(max_tokens=50, max_completion_tokens=70), expected(max_tokens=70)),
    (
        "sampling_user_stream",
        request(temperature=0.2, top_p=0.9, top_k=40, user="u-1", stream=True),
        expected(temperature=0.2, top_p=0.9, top_k=40, metadata={"user_id": "u-1"}, stream=True),
    ),
    ("safety_identifier_is_the_user", request(safety_identifier="s-1"), expected(metadata={"user_id": "s-1"})),
    (
        "reasoning_low_fits",
        request(reasoning_effort="low", max_completion_tokens=8000),
        expected(max_tokens=8000, thinking={"type": "enabled", "budget_tokens": 2048}),
    ),
    (
        "reasoning_high_raises_max_tokens",
        request(reasoning_effort="high"),
        expected(max_tokens=1000 + 16384, thinking={"type": "enabled", "budget_tokens": 16384}),
    ),
    (
        "reasoning_with_temperature_one_and_top_p_high",
        request(reasoning_effort="minimal", temperature=1, top_p=0.97, max_tokens=5000),
        expected(max_tokens=5000, top_p=0.97, thinking={"type": "enabled", "budget_tokens": 1024}),
    ),
    ("reasoning_none", request(reasoning_effort="none"), expected()),
    (
        "response_format_json_schema",
        request(response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}}),
        expected(output_config={"format": {"type": "json_schema", "schema": CLOSED}}),
    ),
    (
        "response_format_json_schema_with_thinking",
        request(
            reasoning_effort="low",
            max_tokens=4000,
            response_format={"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}},
        ),
        expected(
            max_tokens=4000,
            thinking={"type": "enabled", "budget_tokens": 2048},
            output_config={"format": {"type": "json_schema", "schema": CLOSED}},
        ),
    ),
    (
        "response_format_json_object",
        request(response_format={"type": "json_object"}),
        expected(
            tools=[
                {
                    "name": JSON_TOOL,
                    "description": "Reply with the answer as a JSON object.",
                    "input_schema": {"type": "object"},
                }
            ],
            tool_choice={"type": "tool", "name": JSON_TOOL},
        ),
    ),
    (
        "response_format_json_object_beside_tools",
        request(response_format={"type": "json_object"}, tools=[TOOL]),
        expected(
            tools=[
                TOOL_OUT,
                {
                    "name": JSON_TOOL,
                    "description": "Reply with the answer as a JSON object.",
                    "input_schema": {"type": "object"},
                },
            ],
            tool_choice={"type": "any"},
        ),
    ),
    ("response_format_text", request(response_format={"type": "text"}), expected()),
    (
        "neutral_values_accepted_not_sent",
        request(
            n=1,
            presence_penalty=0,
            frequency_penalty=0.0,
            logprobs=False,
            top_logprobs=0,
            logit_bias={},
            modalities=["text"],
            store=False,
            metadata={"team": "a"},
            prompt_cache_key="k",
            service_tier="auto",
            stream_options={"include_usage": True},
            seed=None,
            audio=None,
        ),
        expected(),
    ),
]


@pytest.mark.parametrize(("body", "want"), [case[1:] for case in REQUESTS], ids=[case[0] for case in REQUESTS])
def test_request_translation(body, want):
    assert chat_to_messages(body, default_max_tokens=1000) == (want, [])
    # drop_params changes nothing when nothing needs dropping
    assert chat_to_messages(body, default_max_tokens=1000, drop_params=True) == (want, [])


# (parameter, value): each refused by name (in the message and in `param`), or dropped with drop_params.
UNSUPPORTED = [
    ("n", 2),
    ("presence_penalty", 0.5),
    ("frequency_penalty", -1),
    ("logprobs", True),
    ("top_logprobs", 3),
    ("logit_bias", {"50256": -100}),
    ("seed", 7),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("store", True),
    ("service_tier", "flex"),
    ("functions", [{"name": "f"}]),
    ("function_call", "auto"),
    # `verbosity` is left out with a Warning, as the Responses API's `text.verbosity`: one rule
    # (anthropic_codec.left_out; tests/test_translation_gaps.py)
    ("some_unknown_field", 1),
    ("temperature", 1.5),
    # Anthropic refuses whitespace-only stop sequences; OpenAI honours them.
    ("stop", "\n"),
    ("stop", ["\n", "\n\n"]),
    ("stop", [""]),
]


@pytest.mark.parametrize(("name", "value"), UNSUPPORTED)
def test_unsupported_parameter_refused_or_dropped(name, value):
    with pytest.raises(EgressError) as caught:
        chat_to_messages(request(**{name: value}), default_max_tokens=1000)
    assert caught.value.code == "unsupported_parameter"
    assert name in caught.value.message and caught.value.param == name
    assert chat_to_messages(request(**{name: value}), default_max_tokens=1000, drop_params=True) == (expected(), [name])


def test_web_search_options_are_anthropics_web_search_tool_and_its_citations_annotations():
    """Chat's `web_search_options` (https://platform.openai.com/docs/guides/tools-web-search) run
    Anthropic's web search; the text built on it cites pages, and the chat answer names them as
    OpenAI's search models do, in `message.annotations` (url_citation, spans in the content)."""
    options = {"search_context_size": "high", "user_location": {"type": "approximate", "approximate": {"city": "Oslo"}}}
    body, dropped = chat_to_messages(request(web_search_options=options), default_max_tokens=1000)
    assert body["tools"] == [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 10,
         "user_location": {"type": "approximate", "city": "Oslo"}},
    ]  # fmt: skip
    assert dropped == []
    with pytest.raises(EgressError) as caught:
        chat_to_messages(request(web_search_options={"user_location": "Oslo"}), default_max_tokens=1000)
    assert (caught.value.code, caught.value.param) == ("invalid_request", "web_search_options.user_location")
    cite = {"type": "web_search_result_location", "url": "https://example.com/a", "title": "A", "cited_text": "…"}
    message = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "stop_reason": "end_turn",
        "content": [
            {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "a"}},
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1",
             "content": [{"type": "web_search_result", "url": "https://example.com/a", "title": "A"}]},
            {"type": "text", "text": "Intro. "},
            {"type": "text", "text": "A is true.", "citations": [cite]},
        ],
        "usage": {"input_tokens": 10, "output_tokens": 5, "server_tool_use": {"web_search_requests": 1}},
    }  # fmt: skip
    reply = message_to_chat(message, model="claude-x", created=1)["choices"][0]["message"]
    assert reply["content"] == "Intro. A is true."
    assert reply["annotations"] == [
        {"type": "url_citation",
         "url_citation": {"start_index": 7, "end_index": 17, "url": "https://example.com/a", "title": "A"}},
    ]  # fmt: skip


THINKING = {"type": "enabled", "budget_tokens": 2048}


@pytest.mark.parametrize(
    ("fields", "name", "kept"),
    [
        ({"temperature": 0.3}, "temperature", {}),
        ({"top_p": 0.5}, "top_p", {}),
        ({"top_k": 5}, "top_k", {}),
        ({"tools": [TOOL], "tool_choice": "required"}, "tool_choice", {"tools": [TOOL_OUT]}),
        ({"response_format": {"type": "json_object"}}, "response_format", {}),
    ],
)
def test_thinking_conflicts(fields, name, kept):
    body = request(reasoning_effort="low", max_tokens=4000, **fields)
    with pytest.raises(EgressError) as caught:
        chat_to_messages(body, default_max_tokens=1000)
    assert (caught.value.code, name in caught.value.message, caught.value.param) == (
        "unsupported_parameter",
        True,
        name,
    )
    out, dropped = chat_to_messages(body, default_max_tokens=1000, drop_params=True)
    assert (out, dropped) == (expected(max_tokens=4000, thinking=THINKING, **kept), [name])


def test_unsupported_tool_type_dropped_alone():
    body = request(tools=[TOOL, {"type": "custom", "custom": {"name": "x"}}])
    with pytest.raises(EgressError, match="tools\\[1\\]") as caught:
        chat_to_messages(body, default_max_tokens=1000)
    assert caught.value.param == "tools[1]"
    assert chat_to_messages(body, default_max_tokens=1000, drop_params=True) == (
        expected(tools=[TOOL_OUT]),
        ["tools[1]"],
    )


def test_several_dropped_in_order():
    body = request(seed=1, n=3, logprobs=True)
    assert chat_to_messages(body, default_max_tokens=1000, drop_params=True)[1] == ["seed", "n", "logprobs"]


def test_a_whitespace_only_stop_sequence_beside_others_is_refused_or_dropped_alone():
    body = request(stop=["END", "\n", " "])
    with pytest.raises(EgressError) as caught:
        chat_to_messages(body, default_max_tokens=1000)
    assert (caught.value.code, caught.value.param) == ("unsupported_parameter", "stop")
    assert "whitespace-only stop sequences" in caught.value.message
    assert chat_to_messages(body, default_max_tokens=1000, drop_params=True) == (
        expected(stop_sequences=["END"]),
        ["stop"],
    )


# (id, message fields, refused field): assistant and user fields Anthropic has no place for.
MESSAGE_FIELDS = [
    (
        "assistant_function_call",
        {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}},
        "function_call",
    ),
    ("assistant_name", {"role": "assistant", "content": "ok", "name": "bot"}, "name"),
    ("user_name", {"role": "user", "content": "ok", "name": "alice"}, "name"),
    ("system_name", {"role": "system", "content": "ok", "name": "rules"}, "name"),
]


@pytest.mark.parametrize(("fields", "field"), [case[1:] for case in MESSAGE_FIELDS], ids=[c[0] for c in MESSAGE_FIELDS])
def test_message_fields_without_an_anthropic_place_are_refused_or_dropped(fields, field):
    body = {"messages": [HI, fields]}
    with pytest.raises(EgressError) as caught:
        chat_to_messages(body, default_max_tokens=1000)
    assert (caught.value.code, caught.value.param) == ("unsupported_parameter", f"messages[1].{field}")
    without = {"messages": [HI, {key: value for key, value in fields.items() if key != field}]}
    assert chat_to_messages(body, default_max_tokens=1000, drop_params=True) == (
        chat_to_messages(without, default_max_tokens=1000)[0],
        [f"messages[1].{field}"],
    )


def test_an_assistant_refusal_beside_content_follows_it():
    assistant = {"role": "assistant", "content": "Partly:", "refusal": "no more."}
    out, _ = chat_to_messages({"messages": [HI, assistant]}, default_max_tokens=1000)
    assert out["messages"][1]["content"] == [{"type": "text", "text": "Partly:"}, {"type": "text", "text": "no more."}]
    with pytest.raises(EgressError) as caught:
        chat_to_messages({"messages": [HI, {**assistant, "refusal": 5}]}, default_max_tokens=1000)
    assert (caught.value.code, caught.value.param) == ("invalid_request", "messages[1].refusal")


# (id, request, the field at fault: OpenAI's `param`, None when no one field is)
INVALID = [
    ("not_a_dict", [], None),
    ("no_messages", {"model": "x"}, "messages"),
    ("empty_messages", {"messages": []}, "messages"),
    ("only_system", {"messages": [{"role": "system", "content": "s"}]}, "messages"),
    ("bad_role", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    (
        "arguments_not_json",
        {
            "messages": [
                HI,
                {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]},
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
    (
        "arguments_not_an_object",
        {
            "messages": [
                HI,
                {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]},
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
    ("tool_without_id", {"messages": [HI, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
    (
        "image_ftp",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]},
        "messages[0].content[0].image_url.url",
    ),
    (
        "data_uri_not_base64",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,xx"}}]}]},
        "messages[0].content[0]",
    ),
    ("max_tokens_zero", request(max_tokens=0), "max_tokens"),
    ("max_tokens_bool", request(max_tokens=True), "max_tokens"),
    ("reasoning_effort_unknown", request(reasoning_effort="extreme"), "reasoning_effort"),
    ("reasoning_effort_list", request(reasoning_effort=["high"]), "reasoning_effort"),  # was a 500 (TypeError)
    ("reasoning_effort_object", request(reasoning_effort={"a": 1}), "reasoning_effort"),
    ("stop_number", request(stop=5), "stop"),
    ("temperature_string", request(temperature="hot"), "temperature"),
    ("tool_choice_required_without_tools", request(tool_choice="required"), "tool_choice"),
    ("tool_choice_garbage", request(tools=[TOOL], tool_choice={"type": "nosuch"}), "tool_choice"),
    (
        "allowed_tools_without_mode",
        request(tools=[TOOL], tool_choice={"type": "allowed_tools"}),
        "tool_choice.allowed_tools.mode",
    ),
    (
        "allowed_tools_naming_no_tool",
        request(
            tools=[TOOL],
            tool_choice={
                "type": "allowed_tools",
                "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "nosuch"}}]},
            },
        ),
        "tool_choice.allowed_tools.tools[0]",
    ),
    (
        "reserved_tool_name",
        request(tools=[{"type": "function", "function": {"name": JSON_TOOL}}]),
        "tools[0].function.name",
    ),
    ("tool_without_name", request(tools=[{"type": "function", "function": {}}]), "tools[0].function.name"),
    ("response_format_unknown", request(response_format={"type": "yaml"}), "response_format.type"),
    ("response_format_string", request(response_format="json_object"), "response_format"),
    ("stream_not_bool", request(stream="yes"), "stream"),
    ("user_not_str", request(user=5), "user"),
]


@pytest.mark.parametrize(("mode", "choice"), [("auto", {"type": "auto"}), ("required", {"type": "any"})])
def test_allowed_tools_leave_the_others_out(mode, choice):
    # OpenAI's allowed_tools: the model may call only those; Anthropic gets only those, and the mode.
    other = {"type": "function", "function": {"name": "other", "parameters": {"type": "object"}}}
    allowed = {"mode": mode, "tools": [{"type": "function", "function": {"name": TOOL["function"]["name"]}}]}
    body = request(tools=[TOOL, other], tool_choice={"type": "allowed_tools", "allowed_tools": allowed})
    messages, _ = chat_to_messages(body, default_max_tokens=1000)
    assert [tool["name"] for tool in messages["tools"]] == [TOOL["function"]["name"]]
    assert messages["tool_choice"] == choice


@pytest.mark.parametrize(("body", "param"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_request(body, param):
    with pytest.raises(EgressError) as caught:
        chat_to_messages(body, default_max_tokens=1000, drop_params=True)
    assert (caught.value.code, caught.value.param) == ("invalid_request", param)


SIGNED = {"type": "thinking", "thinking": "t", "signature": "sig"}


def with_thinking_blocks(blocks) -> dict:
    return {"messages": [HI, {"role": "assistant", "content": "ok", "thinking_blocks": blocks}]}


@pytest.mark.parametrize(
    ("blocks", "named"),
    [
        ({"type": "thinking"}, "messages[1].thinking_blocks must be a list"),
        ("thinking", "messages[1].thinking_blocks must be a list"),
        (["t"], "messages[1].thinking_blocks[0].type must be thinking or redacted_thinking"),
        ([{"thinking": "t", "signature": "s"}], "messages[1].thinking_blocks[0].type"),
        ([SIGNED, {"type": "reasoning", "text": "t"}], "messages[1].thinking_blocks[1].type"),
        ([{**SIGNED, "type": ["thinking"]}], "messages[1].thinking_blocks[0].type"),
        ([{"type": "thinking", "thinking": "t"}], "messages[1].thinking_blocks[0].signature"),
        ([{**SIGNED, "signature": ""}], "messages[1].thinking_blocks[0].signature"),
        ([{**SIGNED, "signature": None}], "messages[1].thinking_blocks[0].signature"),
        ([{**SIGNED, "signature": 7}], "messages[1].thinking_blocks[0].signature"),
        ([{**SIGNED, "thinking": None}], "messages[1].thinking_blocks[0].thinking"),
        ([{**SIGNED, "thinking": ["t"]}], "messages[1].thinking_blocks[0].thinking"),
        ([SIGNED, {"type": "redacted_thinking"}], "messages[1].thinking_blocks[1].data"),
        ([{"type": "redacted_thinking", "data": ""}], "messages[1].thinking_blocks[0].data"),
        ([{"type": "redacted_thinking", "data": {"x": 1}}], "messages[1].thinking_blocks[0].data"),
        ([{**SIGNED, "data": "d"}], "messages[1].thinking_blocks[0].data is not a field of a thinking block"),
        ([{"type": "redacted_thinking", "data": "d", "signature": "s"}], "thinking_blocks[0].signature is not a"),
        ([{**SIGNED, "cache_control": {"type": "ephemeral"}}], "thinking_blocks[0].cache_control is not a"),
    ],
)
def test_malformed_thinking_blocks_are_refused_by_name(blocks, named):
    with pytest.raises(EgressError) as caught:
        chat_to_messages(with_thinking_blocks(blocks), default_max_tokens=1000, drop_params=True)
    assert caught.value.code == "invalid_request" and named in caught.value.message


def test_input_audio_part_is_unsupported():
    body = {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}]}
    with pytest.raises(EgressError) as caught:
        chat_to_messages(body, default_max_tokens=1000)
    assert caught.value.code == "unsupported_parameter" and "input_audio" in caught.value.message
    assert caught.value.param == "messages[0].content[0]"


def test_budgets_are_valid_for_anthropic():
    budgets = [b for b in THINKING_BUDGETS.values() if b is not None]
    assert min(budgets) >= 1024 and budgets == sorted(budgets)
    for effort, budget in THINKING_BUDGETS.items():
        out, _ = chat_to_messages(request(reasoning_effort=effort, max_tokens=100), default_max_tokens=1)
        if budget is not None:
            assert out["max_tokens"] > out["thinking"]["budget_tokens"] == budget


def test_model_and_input_not_mutated():
    body = request(tools=[TOOL], parallel_tool_calls=False, stop=["a", ""])
    snapshot = orjson.dumps(body)
    out, _ = chat_to_messages(body, default_max_tokens=1000, drop_params=True)
    assert "model" not in out and orjson.dumps(body) == snapshot


# -- response -----------------------------------------------------------------------------------


def anthropic_message(content, stop_reason="end_turn", **usage):
    counts = {"input_tokens": 10, "output_tokens": 5, **usage}
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x", "content": content,
            "stop_reason": stop_reason, "stop_sequence": None, "usage": counts}  # fmt: skip


def chat(message: dict) -> dict:
    result = message_to_chat(message, model=MODEL, created=CREATED)
    ChatCompletion.model_validate(result)  # the SDK accepts it
    return result


def test_text_response():
    result = chat(anthropic_message([{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]))
    assert result["id"] == "chatcmpl-msg_1"
    assert (result["object"], result["created"], result["model"]) == ("chat.completion", CREATED, MODEL)
    assert result["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello"},
            "finish_reason": "stop",
            "native_finish_reason": "end_turn",
            "logprobs": None,
        }
    ]


def test_parallel_tool_use_response():
    content = [
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}},
    ]
    choice = chat(anthropic_message(content, "tool_use"))["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    calls = choice["message"]["tool_calls"]
    assert [(c["id"], c["type"], c["function"]["name"]) for c in calls] == [
        ("toolu_1", "function", "get_weather"),
        ("toolu_2", "function", "get_weather"),
    ]
    assert [orjson.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Rome"}]


def test_thinking_response():
    content = [
        {"type": "thinking", "thinking": "Let me think.", "signature": "sig"},
        {"type": "redacted_thinking", "data": "xx"},
        {"type": "text", "text": "42"},
    ]
    message = chat(anthropic_message(content))["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": "42",
        "reasoning_content": "Let me think.",
        "thinking_blocks": [
            {"type": "thinking", "thinking": "Let me think.", "signature": "sig"},
            {"type": "redacted_thinking", "data": "xx"},
        ],
    }


# A thinking tool turn as Anthropic answers it: thinking, a redacted segment, more thinking, text, a
# tool call. The signatures are opaque bytes, kept with characters JSON escapes ('/', '+', '=').
THINKING_TURN = [
    {"type": "thinking", "thinking": "The user wants weather.\nCall the tool.", "signature": "EqQBCkYI/+Ab=="},
    {
        "type": "redacted_thinking",
        "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpPkNRj2YfWXGmKDxH4mPnZ5sQ7vB5URj",
    },
    {"type": "thinking", "thinking": "Paris, in celsius.", "signature": "ErUBCkYIARgC"},
    {"type": "text", "text": "Let me check."},
    {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris"}},
]


def next_request(assistant: dict) -> dict:
    """The client's next turn: the assistant message as it came, then the tool's result."""
    call = assistant["tool_calls"][0]
    tool = {"role": "tool", "tool_call_id": call["id"], "content": "21C"}
    return {"messages": [HI, assistant, tool], "tools": [TOOL], "reasoning_effort": "low", "max_tokens": 4000}


def test_thinking_blocks_round_trip_json():
    message = chat(anthropic_message(THINKING_TURN, "tool_use"))["choices"][0]["message"]
    assert [block["type"] for block in message["thinking_blocks"]] == ["thinking", "redacted_thinking", "thinking"]
    assert message["reasoning_content"] == THINKING_TURN[0]["thinking"] + THINKING_TURN[2]["thinking"]
    # As a dict, and as the openai SDK's message object dumps it.
    sdk_message = ChatCompletion.model_validate(chat(anthropic_message(THINKING_TURN, "tool_use")))
    for assistant in (message, sdk_message.choices[0].message.model_dump(exclude_none=True)):
        out, _ = chat_to_messages(next_request(assistant), default_max_tokens=1000)
        assert out["messages"][1] == {"role": "assistant", "content": THINKING_TURN}
        assert out["thinking"] == THINKING


def test_a_response_without_thinking_has_no_thinking_blocks():
    message = chat(anthropic_message([{"type": "text", "text": "x"}]))["choices"][0]["message"]
    assert "thinking_blocks" not in message and "reasoning_content" not in message


def test_json_mode_tool_becomes_content():
    content = [{"type": "tool_use", "id": "toolu_1", "name": JSON_TOOL, "input": {"a": [1, 2]}}]
    choice = chat(anthropic_message(content, "tool_use"))["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": '{"a":[1,2]}'}
    assert choice["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "stop"),  # no tool call in the content: nothing for the client to run
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        ("something_new", "stop"),
        (None, "stop"),
    ],
)
def test_stop_reasons(stop_reason, finish_reason):
    choice = chat(anthropic_message([{"type": "text", "text": "x"}], stop_reason))["choices"][0]
    assert (choice["finish_reason"], choice["native_finish_reason"]) == (finish_reason, stop_reason)


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [("tool_use", "tool_calls"), ("end_turn", "tool_calls"), ("pause_turn", "tool_calls"), ("max_tokens", "length")],
)
def test_a_pending_tool_call_is_never_dropped(stop_reason, finish_reason):
    content = [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]
    choice = chat(anthropic_message(content, stop_reason))["choices"][0]
    assert choice["finish_reason"] == finish_reason
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}


def test_usage_arithmetic():
    message = anthropic_message(
        [{"type": "text", "text": "x"}],
        input_tokens=7,
        output_tokens=60,
        cache_read_input_tokens=300,
        cache_creation_input_tokens=1069,
        output_tokens_details={"thinking_tokens": 20},
    )
    assert chat(message)["usage"] == {
        "prompt_tokens": 7 + 300 + 1069,
        "completion_tokens": 60,
        "total_tokens": 7 + 300 + 1069 + 60,
        "prompt_tokens_details": {"cached_tokens": 300, "cache_write_tokens": 1069},
        "completion_tokens_details": {"reasoning_tokens": 20},
    }


def recorded_json(recording) -> dict:
    body = recording.body
    if any(name == "content-encoding" and "gzip" in value for name, value in recording.headers):
        body = gzip.decompress(body)
    return orjson.loads(body)


JSON_CASES = sorted(name for name in RECORDINGS if name.startswith("anthropic__json_"))


@pytest.mark.parametrize("name", JSON_CASES)
def test_recorded_json_response(name):
    recording = RECORDINGS[name]
    message = recorded_json(recording)
    result = chat(message)
    want = recording.meta["expected"]
    usage = result["usage"]
    assert usage["prompt_tokens"] == want["input_tokens"]
    assert usage["completion_tokens"] == want["output_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == (want["cache_read_tokens"] or 0)
    assert usage["prompt_tokens_details"]["cache_write_tokens"] == (want["cache_creation_tokens"] or 0)
    text = "".join(b["text"] for b in message["content"] if b["type"] == "text")
    assert result["choices"][0]["message"]["content"] == (text or None)
    calls = [b for b in message["content"] if b["type"] == "tool_use"]
    got = result["choices"][0]["message"].get("tool_calls", [])
    assert [(c["id"], c["function"]["name"], orjson.loads(c["function"]["arguments"])) for c in got] == [
        (b["id"], b["name"], b["input"]) for b in calls
    ]
    thinking = [b for b in message["content"] if b["type"] in ("thinking", "redacted_thinking")]
    assert result["choices"][0]["message"].get("thinking_blocks", []) == thinking


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "anthropic_type", "openai_type"),
    [
        (400, "invalid_request_error", "invalid_request_error"),
        (401, "authentication_error", "authentication_error"),
        (403, "permission_error", "permission_error"),
        (404, "not_found_error", "invalid_request_error"),
        (413, "request_too_large", "invalid_request_error"),
        (429, "rate_limit_error", "rate_limit_error"),
        (500, "api_error", "server_error"),
        (529, "overloaded_error", "server_error"),
        (418, "brand_new_error", "invalid_request_error"),
    ],
)
def test_error_to_openai(status, anthropic_type, openai_type):
    body = orjson.dumps({"type": "error", "error": {"type": anthropic_type, "message": "Nope."}})
    assert orjson.loads(error_to_openai(status, body)) == {
        "error": {"message": "Nope.", "type": openai_type, "param": None, "code": anthropic_type}
    }


def test_error_to_openai_unparseable():
    raw = b"<html>" + b"x" * 2000
    error = orjson.loads(error_to_openai(502, raw))["error"]
    assert error["type"] == "server_error" and error["code"] is None and error["param"] is None
    assert "<html>xxx" in error["message"] and len(error["message"]) < 560
    assert orjson.loads(error_to_openai(400, b'{"no":"error"}'))["error"]["type"] == "invalid_request_error"
    assert orjson.loads(error_to_openai(500, b"\xff\xfe"))["error"]["type"] == "server_error"


# -- streams ------------------------------------------------------------------------------------


def sse(*events: dict) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), orjson.dumps(e)) for e in events)


def start(message_id="msg_syn", input_tokens=25, **usage):
    message = {"id": message_id, "type": "message", "role": "assistant", "model": "claude-x", "content": [],
               "stop_reason": None, "usage": {"input_tokens": input_tokens, "output_tokens": 1, **usage}}  # fmt: skip
    return {"type": "message_start", "message": message}


def block(index, content_block):
    return {"type": "content_block_start", "index": index, "content_block": content_block}


def delta(index, **fields):
    return {"type": "content_block_delta", "index": index, "delta": fields}


def text(index, value):
    return delta(index, type="text_delta", text=value)


def args(index, value):
    return delta(index, type="input_json_delta", partial_json=value)


def tool(index, tool_id, name):
    return block(index, {"type": "tool_use", "id": tool_id, "name": name, "input": {}})


def stop(index):
    return {"type": "content_block_stop", "index": index}


def end(stop_reason, output_tokens):
    return {"type": "message_delta", "delta": {"stop_reason": stop_reason}, "usage": {"output_tokens": output_tokens}}


MESSAGE_STOP = {"type": "message_stop"}
PING = {"type": "ping"}

# Two tool_use blocks around a text block, their deltas interleaved: tool calls must be numbered
# 0 and 1 (their own order), not 1 and 3 (content-block indexes).
PARALLEL_TOOLS = sse(
    start(),
    block(0, {"type": "text", "text": ""}),
    text(0, "Let me check both."),
    stop(0),
    tool(1, "toolu_A", "get_weather"),
    args(1, ""),
    args(1, '{"city": "Pa'),
    block(2, {"type": "text", "text": ""}),
    text(2, " (and Rome)"),
    PING,
    tool(3, "toolu_B", "get_time"),
    args(3, '{"tz": '),
    args(1, 'ris"}'),
    stop(1),
    args(3, '"Europe/Rome"}'),
    stop(2),
    stop(3),
    end("tool_use", 77),
    MESSAGE_STOP,
)
JSON_MODE = sse(
    start("msg_json"),
    tool(0, "toolu_J", JSON_TOOL),
    args(0, '{"answer"'),
    args(0, ": 42}"),
    stop(0),
    end("tool_use", 9),
    MESSAGE_STOP,
)


def thinking(index, value):
    return delta(index, type="thinking_delta", thinking=value)


def signature(index, value):
    return delta(index, type="signature_delta", signature=value)


EMPTY_THINKING = {"type": "thinking", "thinking": "", "signature": ""}  # how Anthropic starts one
# THINKING_TURN, streamed: thinking in two pieces, a redacted segment, more thinking, text, a tool call.
THINKING_TOOLS = sse(
    start("msg_think"),
    block(0, EMPTY_THINKING),
    PING,
    thinking(0, "The user wants weather."),
    thinking(0, "\nCall the tool."),
    signature(0, THINKING_TURN[0]["signature"]),
    stop(0),
    block(1, THINKING_TURN[1]),
    stop(1),
    block(2, EMPTY_THINKING),
    thinking(2, THINKING_TURN[2]["thinking"]),
    signature(2, THINKING_TURN[2]["signature"]),
    stop(2),
    block(3, {"type": "text", "text": ""}),
    text(3, "Let me check."),
    stop(3),
    tool(4, "toolu_01A", "get_weather"),
    args(4, '{"city": '),
    args(4, '"Paris"}'),
    stop(4),
    end("tool_use", 90),
    MESSAGE_STOP,
)
# A tool without parameters, as Anthropic streams one: input {} at its start, then one empty
# input_json_delta; its arguments must be "{}" (JSON, as the JSON path gives them), never "".
TOOL_WITHOUT_ARGUMENTS = sse(
    start("msg_noargs"),
    tool(0, "toolu_N", "get_time"),
    args(0, ""),
    stop(0),
    tool(1, "toolu_W", "get_weather"),
    args(1, '{"city": "Oslo"}'),
    stop(1),
    end("tool_use", 12),
    MESSAGE_STOP,
)
SYNTHETIC = {
    "synthetic_parallel_tools": PARALLEL_TOOLS,
    "synthetic_json_mode": JSON_MODE,
    "synthetic_thinking_tools": THINKING_TOOLS,
    "synthetic_tool_without_arguments": TOOL_WITHOUT_ARGUMENTS,
}
STREAMS = {name: r.body for name, r in RECORDINGS.items() if name.startswith("anthropic__stream_")} | SYNTHETIC
assert len(STREAMS) >= 10

TRAILING = b'event: ping\ndata: {"type": "ping"}\n\nevent: message_start\ndata: {not json\n\ngarbage'


def transcode(pieces, include_usage=True) -> tuple[bytes, StreamTranscoder]:
    transcoder = StreamTranscoder(model=MODEL, created=CREATED, include_usage=include_usage)
    out = b"".join(transcoder.feed(piece) for piece in pieces)
    return out + transcoder.finish(), transcoder


def chunks_of(output: bytes) -> list[dict]:
    events = output.split(b"\n\n")
    assert events[-1] == b"", "every event ends with a blank line"
    assert events[-2] == b"data: [DONE]"
    chunks = []
    for event in events[:-2]:
        assert event.startswith(b"data: {")
        chunks.append(orjson.loads(event[6:]))
    return chunks


def accumulate(output: bytes):
    state = ChatCompletionStreamState()
    for chunk in chunks_of(output):
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    try:
        return state.get_final_completion()
    except openai.LengthFinishReasonError as cut:  # finish_reason "length" (max_tokens): still whole
        return cut.completion


def recorded(stream: bytes) -> dict:
    """What the stream says, read directly off its events: the reference the output must match."""
    events = [orjson.loads(line[5:]) for line in stream.split(b"\n") if line.startswith(b"data:")]
    kinds, text_parts, reasoning, calls, thinking = {}, [], [], [], {}
    for event in events:
        if event["type"] == "content_block_start":
            content_block = event["content_block"]
            kinds[event["index"]] = content_block["type"]
            if content_block["type"] == "tool_use":
                kinds[event["index"]] = len(calls)
                calls.append({"id": content_block["id"], "name": content_block["name"], "arguments": ""})
            elif content_block["type"] in ("thinking", "redacted_thinking"):
                thinking[event["index"]] = dict(content_block)
        elif event["type"] == "content_block_delta":
            d, kind = event["delta"], kinds[event["index"]]
            if d["type"] == "text_delta":
                text_parts.append(d["text"])
            elif d["type"] == "thinking_delta":
                reasoning.append(d["thinking"])
                thinking[event["index"]]["thinking"] += d["thinking"]
            elif d["type"] == "signature_delta":
                thinking[event["index"]]["signature"] = d["signature"]
            elif d["type"] == "input_json_delta" and isinstance(kind, int):
                calls[kind]["arguments"] += d["partial_json"]
    stop_reasons = [e["delta"]["stop_reason"] for e in events if e["type"] == "message_delta"]
    return {
        "text": "".join(text_parts),
        "reasoning": "".join(reasoning),
        "calls": calls,
        "thinking_blocks": [thinking[index] for index in sorted(thinking)],
        "stop": stop_reasons[-1],
    }


def unindexed(blocks) -> list[dict]:
    return [{key: value for key, value in block.items() if key != "index"} for block in blocks or ()]


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_stream_whole_bytewise_and_trailing_agree(name):
    stream = STREAMS[name]
    whole, transcoder = transcode([stream])
    assert transcoder.ended
    assert transcode([stream[i : i + 1] for i in range(len(stream))])[0] == whole
    trailing, transcoder = transcode([stream, TRAILING])
    assert trailing == whole and transcoder.ended
    assert transcode([stream + TRAILING])[0] == whole


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_stream_accumulates_to_the_recording(name):
    stream = STREAMS[name]
    output, _ = transcode([stream])
    chunks = chunks_of(output)
    want = recorded(stream)

    # Every chunk: the same id, object, created and the caller's model; role first; usage last.
    assert {(c["id"], c["object"], c["created"], c["model"]) for c in chunks} == {
        (chunks[0]["id"], "chat.completion.chunk", CREATED, MODEL)
    }
    assert chunks[0]["id"].startswith("chatcmpl-msg_")
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and "usage" in chunks[-1]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]].count(None) == len(chunks) - 2

    completion = accumulate(output)
    message = completion.choices[0].message
    if name == "synthetic_json_mode":
        assert orjson.loads(message.content) == {"answer": 42}
        assert message.tool_calls is None
        assert completion.choices[0].finish_reason == "stop"
    else:
        assert (message.content or "") == want["text"]
        calls = message.tool_calls or []
        assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [
            (c["id"], c["name"], c["arguments"] or "{}") for c in want["calls"]
        ]
        for call in calls:
            orjson.loads(call.function.arguments)  # each arrives whole
        if calls:
            assert completion.choices[0].finish_reason == "tool_calls"
    assert (getattr(message, "reasoning_content", None) or "") == want["reasoning"]
    # The openai SDK's accumulator rebuilds every thinking block, signature and all.
    assert unindexed(getattr(message, "thinking_blocks", None)) == want["thinking_blocks"]
    assert chunks[-2]["choices"][0]["native_finish_reason"] == want["stop"]

    usage = completion.usage
    if name in RECORDINGS:
        meta = RECORDINGS[name].meta["expected"]
        assert usage.prompt_tokens == meta["input_tokens"]
        assert usage.completion_tokens == meta["output_tokens"]
        assert usage.prompt_tokens_details.cached_tokens == (meta["cache_read_tokens"] or 0)
        assert usage.prompt_tokens_details.cache_write_tokens == (meta["cache_creation_tokens"] or 0)
        assert usage.total_tokens == meta["input_tokens"] + meta["output_tokens"]


def test_parallel_tool_indexes_are_dense_and_their_own():
    chunks = chunks_of(transcode([PARALLEL_TOOLS])[0])
    firsts = [
        call
        for c in chunks
        for call in (c["choices"][0]["delta"].get("tool_calls", []) if c["choices"] else [])
        if "id" in call
    ]
    assert firsts == [
        {"index": 0, "id": "toolu_A", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 1, "id": "toolu_B", "type": "function", "function": {"name": "get_time", "arguments": ""}},
    ]
    completion = accumulate(transcode([PARALLEL_TOOLS])[0])
    calls = completion.choices[0].message.tool_calls
    assert [orjson.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}, {"tz": "Europe/Rome"}]
    assert completion.choices[0].message.content == "Let me check both. (and Rome)"
    assert completion.usage.prompt_tokens == 25 and completion.usage.completion_tokens == 77


def test_input_that_never_came_is_an_empty_object_before_the_finish():
    # Blocks never stopped (a stream that goes straight to message_delta): a tool call's arguments
    # and JSON mode's answer are still "{}", in block order, before the finish chunk.
    stream = sse(start(), tool(0, "toolu_1", "get_time"), tool(1, "toolu_2", "now"), end("tool_use", 3), MESSAGE_STOP)
    chunks = chunks_of(transcode([stream])[0])
    assert [c["choices"][0]["delta"] for c in chunks[-4:-2]] == [
        {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]},
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    json_mode = sse(start(), tool(0, "toolu_J", JSON_TOOL), args(0, ""), stop(0), end("tool_use", 3), MESSAGE_STOP)
    assert accumulate(transcode([json_mode])[0]).choices[0].message.content == "{}"


def test_one_chunk_per_event_written_at_once():
    transcoder = StreamTranscoder(model=MODEL, created=CREATED, include_usage=False)
    events = PARALLEL_TOOLS.split(b"\n\n")[:-1]
    sizes = [len(transcoder.feed(event + b"\n\n")) for event in events]
    kinds = [orjson.loads(e.split(b"data: ", 1)[1])["type"] for e in events]
    for kind, size, event in zip(kinds, sizes, events, strict=True):
        carries = kind in ("message_start", "message_delta", "message_stop") or (
            kind in ("content_block_delta", "content_block_start")
            and (b'"tool_use"' in event or (b'"partial_json":""' not in event and b'"text":""' not in event))
        )
        assert (size > 0) == carries, (kind, event)


def test_thinking_stream_one_chunk_per_event_and_its_entries():
    transcoder = StreamTranscoder(model=MODEL, created=CREATED, include_usage=False)
    deltas = []
    for event in THINKING_TOOLS.split(b"\n\n")[:-1]:
        output = transcoder.feed(event + b"\n\n")
        data = orjson.loads(event.split(b"data: ", 1)[1])
        silent = data["type"] in ("ping", "content_block_stop") or data.get("content_block") in (
            EMPTY_THINKING,
            {"type": "text", "text": ""},
        )
        assert output.count(b"data: ") == (0 if silent else 1), event
        if output and data["type"] in ("content_block_start", "content_block_delta"):
            deltas.append(orjson.loads(output[6:])["choices"][0]["delta"])
    first, second = THINKING_TURN[0], THINKING_TURN[2]
    assert deltas[:6] == [
        {"reasoning_content": "The user wants weather.",
         "thinking_blocks": [{"index": 0, "type": "thinking", "thinking": "The user wants weather."}]},
        {"reasoning_content": "\nCall the tool.",
         "thinking_blocks": [{"index": 0, "type": "thinking", "thinking": "\nCall the tool."}]},
        {"thinking_blocks": [{"index": 0, "type": "thinking", "thinking": "", "signature": first["signature"]}]},
        {"thinking_blocks": [{"index": 1, **THINKING_TURN[1]}]},
        {"reasoning_content": second["thinking"],
         "thinking_blocks": [{"index": 2, "type": "thinking", "thinking": second["thinking"]}]},
        {"thinking_blocks": [{"index": 2, "type": "thinking", "thinking": "", "signature": second["signature"]}]},
    ]  # fmt: skip
    assert deltas[7]["tool_calls"][0]["index"] == 0  # tool calls keep their own numbering


def litellm_combined(chunks: list[dict]) -> list[dict]:
    """LiteLLM's reading of streamed thinking_blocks (ChunkProcessor.get_combined_thinking_content,
    litellm/litellm_core_utils/streaming_chunk_builder_utils.py): in order, ignoring any index."""
    blocks, parts = [], []
    for chunk in chunks:
        for entry in (chunk["choices"][0]["delta"].get("thinking_blocks") or []) if chunk["choices"] else []:
            if entry["type"] == "redacted_thinking":
                parts = []
                blocks.append({"type": "redacted_thinking", "data": entry["data"]})
                continue
            if entry.get("thinking"):
                parts.append(entry["thinking"])
            if entry.get("signature") and parts:
                blocks.append({"type": "thinking", "thinking": "".join(parts), "signature": entry["signature"]})
                parts = []
    return blocks


def test_thinking_blocks_round_trip_stream_whole_and_bytewise():
    whole = transcode([THINKING_TOOLS])[0]
    bytewise = transcode([THINKING_TOOLS[i : i + 1] for i in range(len(THINKING_TOOLS))])[0]
    assert bytewise == whole
    assert litellm_combined(chunks_of(whole)) == THINKING_TURN[:3]
    message = accumulate(whole).choices[0].message
    assert unindexed(message.thinking_blocks) == THINKING_TURN[:3]
    assert [block["index"] for block in message.thinking_blocks] == [0, 1, 2]
    # The accumulated message handed back as the SDK dumps it: the same Anthropic blocks, in order.
    out, _ = chat_to_messages(next_request(message.model_dump(exclude_none=True)), default_max_tokens=1000)
    assert out["messages"][1] == {"role": "assistant", "content": THINKING_TURN}


def test_thinking_block_indexes_stay_dense():
    # A thinking block that sends nothing takes no index; one that comes whole goes out in one chunk.
    whole_block = {"type": "thinking", "thinking": "All at once.", "signature": "c2ln"}
    stream = sse(
        start(),
        block(0, EMPTY_THINKING),
        stop(0),
        block(1, THINKING_TURN[1]),
        stop(1),
        block(2, whole_block),
        stop(2),
        end("end_turn", 3),
        MESSAGE_STOP,
    )
    chunks = chunks_of(transcode([stream])[0])
    entries = [
        c["choices"][0]["delta"]["thinking_blocks"]
        for c in chunks
        if c["choices"] and c["choices"][0]["delta"].get("thinking_blocks")
    ]
    assert entries == [[{"index": 0, **THINKING_TURN[1]}], [{"index": 1, **whole_block}]]
    message = accumulate(transcode([stream])[0]).choices[0].message
    assert unindexed(message.thinking_blocks) == [THINKING_TURN[1], whole_block]
    assert message.reasoning_content == "All at once."


def test_usage_chunk_only_when_asked():
    stream = RECORDINGS["anthropic__stream_simple"].body
    without, _ = transcode([stream], include_usage=False)
    chunks = chunks_of(without)
    assert all(c["choices"] and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_usage_latest_wins_never_a_sum():
    stream = sse(
        start(input_tokens=43, cache_read_input_tokens=10),
        block(0, {"type": "text", "text": ""}),
        text(0, "a"),
        {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 3}},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn"},
            "usage": {"input_tokens": 61, "output_tokens": 8},
        },
        MESSAGE_STOP,
    )
    usage = chunks_of(transcode([stream])[0])[-1]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (71, 8, 79)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 10


def test_error_mid_stream():
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    stream = sse(start(), block(0, {"type": "text", "text": ""}), text(0, "par"), error)
    output, transcoder = transcode([stream + sse(text(0, "never"))])
    assert transcoder.ended
    events = output.split(b"\n\n")
    assert events[-3:] == [
        b'data: {"error":{"message":"Overloaded","type":"server_error","param":null,"code":"overloaded_error"}}',
        b"data: [DONE]",
        b"",
    ]
    assert b"never" not in output


def test_unparseable_event_is_an_error():
    output, transcoder = transcode([sse(start()) + b"data: {oops\n\n"])
    assert transcoder.ended and output.endswith(b"data: [DONE]\n\n") and b'"error":' in output


def test_cut_stream_gets_no_done():
    stream = RECORDINGS["anthropic__stream_simple"].body
    cut = stream[: stream.index(b"event: message_delta")]
    output, transcoder = transcode([cut])
    assert not transcoder.ended and b"[DONE]" not in output and b'"content":"2"' in output
    assert transcoder.finish() == b""  # raises nothing, adds nothing


def test_last_event_without_blank_line_is_read_at_finish():
    stream = RECORDINGS["anthropic__stream_simple"].body.rstrip(b"\n")
    transcoder = StreamTranscoder(model=MODEL, created=CREATED, include_usage=True)
    head = transcoder.feed(stream)
    assert not transcoder.ended and not head.endswith(b"[DONE]\n\n")
    assert head + transcoder.finish() == transcode([RECORDINGS["anthropic__stream_simple"].body])[0]
    assert transcoder.ended


def test_crlf_framing():
    stream = RECORDINGS["anthropic__stream_simple"].body
    assert transcode([stream.replace(b"\n", b"\r\n")])[0] == transcode([stream])[0]


def test_unknown_events_and_blocks_ignored():
    stream = sse(
        start(),
        {"type": "brand_new_event", "x": 1},
        block(0, {"type": "mystery_block"}),
        delta(0, type="mystery_delta", x=1),
        block(1, {"type": "text", "text": ""}),
        delta(1, type="citations_delta", citation={}),
        text(1, "ok"),
        end("end_turn", 2),
        MESSAGE_STOP,
    )
    assert accumulate(transcode([stream])[0]).choices[0].message.content == "ok"


SHORT_STREAMS = sorted(name for name, stream in STREAMS.items() if len(stream) < 20_000)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SHORT_STREAMS), st.lists(st.integers(1, 2000), min_size=1, max_size=40))
def test_any_cut_gives_the_same_output(name, sizes):
    stream = STREAMS[name]
    assert transcode(cut_into(stream, sizes))[0] == transcode([stream])[0]


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_never_raises(data):
    transcoder = StreamTranscoder(model=MODEL, created=CREATED, include_usage=True)
    output = transcoder.feed(data) + transcoder.finish()
    assert output == b"" or output.endswith(b"\n\n")


@pytest.mark.parametrize("piece", [0, 1])
def test_a_streamed_web_search_answer_cites_its_pages_in_the_finish_chunk(piece):
    """As OpenAI's search models stream them (a gpt-4o-mini-search-preview chunk carries
    `"delta": {"annotations": [...]}, "finish_reason": "stop"`): the url_citation annotations, their
    spans into the streamed content, in the finish chunk; the same the JSON answer gives."""
    from tests.test_responses_codec import _assembled

    stream = STREAMS["anthropic__stream_web_search_server_tool"]
    pieces = [stream] if not piece else [stream[i : i + 1] for i in range(len(stream))]
    chunks = chunks_of(transcode(pieces)[0])
    content = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])
    finish = next(chunk for chunk in chunks if chunk["choices"] and chunk["choices"][0]["finish_reason"])
    annotations = finish["choices"][0]["delta"]["annotations"]
    assert len(annotations) == 9
    message = _assembled(stream)
    reply = message_to_chat(message, model=MODEL, created=CREATED)["choices"][0]["message"]
    assert reply["content"] == content and reply["annotations"] == annotations
    cited = [block for block in message["content"] if block["type"] == "text" and block.get("citations")]
    spans = {content[a["url_citation"]["start_index"] : a["url_citation"]["end_index"]] for a in annotations}
    assert spans == {block["text"] for block in cited}
    assert all(
        not chunk["choices"][0]["delta"].get("annotations")
        for chunk in chunks
        if chunk is not finish and chunk["choices"]
    )


@pytest.mark.parametrize(
    "content_block, sent",
    [
        ({"type": "text", "text": "", "citations": 5}, None),  # citations that are no list
        ({"type": "text", "text": "", "citations": True}, None),
        ({"type": "text", "text": ""}, {"type": "text_delta", "text": 5}),  # text that is no string
        ({"type": "text", "text": 7}, None),
        (
            {"type": "tool_use", "id": "t", "name": JSON_TOOL, "input": {}},
            {"type": "input_json_delta", "partial_json": 5},
        ),
    ],
)
def test_a_text_or_citations_of_the_wrong_type_are_no_content_and_never_raise(content_block, sent):
    """Counting the content's length for citation spans raised TypeError on a text that is no string
    (len(5)), and reading a block's citations on citations that are no list (list(5)): the stream was
    cut. Such a block gives no content and no annotation; the stream ends as any other."""
    events = [start(), block(0, content_block)]
    if sent is not None:
        events.append(delta(0, **sent))
    stream = sse(*events, block(1, {"type": "text", "text": ""}), text(1, "ok"), end("end_turn", 2), MESSAGE_STOP)
    output, transcoder = transcode([stream])
    assert transcoder.ended
    completion = accumulate(output)
    assert completion.choices[0].message.content == "ok" and not completion.choices[0].message.annotations


@pytest.mark.parametrize("citations", [5, True, "abc", {"url": "https://example.com"}])
def test_a_json_answers_citations_of_the_wrong_type_cite_nothing_and_never_raise(citations):
    """`citations` that is no list on a text block: iterating it raised TypeError (int, bool) and the
    translated answer was lost; it cites nothing, and the text is the content."""
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "hi", "citations": citations}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    reply = message_to_chat(message, model=MODEL, created=CREATED)["choices"][0]["message"]
    assert reply["content"] == "hi" and not reply.get("annotations")

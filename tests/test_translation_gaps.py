"""What the OpenAI-compatible surface loses on its way to Anthropic: every request field is mapped,
refused with a 400 naming it, or, when leaving it out breaks nothing, left out with a `Warning`
naming it, never lost without a word; and chat and the Responses API treat the same field by one
rule. Each case runs the openai SDK against the real egress process and the strict fake Anthropic
(tests/fake_provider.py), which refuses what the real Messages API refuses.
"""

from __future__ import annotations

import openai
import orjson
import pytest

from egress.anthropic_codec import chat_to_messages
from egress.errors import EgressError
from egress.responses_codec import responses_to_chat
from tests.fake_provider import TINY_PNG_BASE64, AnthropicInvalidRequest, validate_anthropic_request

MODEL = "claude-sonnet-4-0"
PNG = f"data:image/png;base64,{TINY_PNG_BASE64}"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def surface(start_egress, fake_provider, ca_file):
    return start_egress(
        f"""
[upstream]
ca_file = "{ca_file}"

[providers.anthropic]
base_url = "{fake_provider.base_url}"

[[routes]]
match = "claude-*"
provider = "anthropic"
"""
    )


def client(egress) -> openai.OpenAI:
    return openai.OpenAI(base_url=egress.url + "/v1", api_key="byo-gaps", max_retries=0, timeout=20)


def sent(fake_provider) -> dict:
    seen = fake_provider.requests[-1]
    assert seen.target.startswith("/v1/messages")
    return orjson.loads(seen.body)


def warnings_of(raw) -> list[str]:
    return [value.removeprefix('299 egress "').removesuffix('"') for value in raw.headers.get_list("warning")]


# -- metadata ---------------------------------------------------------------------------------------


def test_chat_metadata_tags_are_left_out_with_a_warning(surface, fake_provider):
    """OpenAI's `metadata` tags a stored completion (and only with store: true, which chat refuses
    here); Anthropic's takes only user_id. The tags were dropped without a word."""
    api = client(surface)
    raw = api.chat.completions.with_raw_response.create(model=MODEL, messages=HI, metadata={"team": "a"}, user="u-1")
    assert raw.parse().choices[0].message.content
    assert warnings_of(raw) == [
        "metadata: OpenAI's stored-completion tags have no Anthropic equivalent and were left out "
        "(an end user's id goes as safety_identifier)"
    ]
    assert sent(fake_provider)["metadata"] == {"user_id": "u-1"}  # the end user's id is mapped, not the tags
    raw = api.chat.completions.with_raw_response.create(model=MODEL, messages=HI, metadata={})
    assert warnings_of(raw) == [] and "metadata" not in sent(fake_provider)  # no tags: nothing lost


# -- the end user's id --------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["alice@example.com", "team a: bob.smith@corp.example", "+1 (415) 555-0100"])
def test_an_email_or_phone_as_the_user_goes_to_anthropic_as_a_digest(surface, fake_provider, user):
    """OpenAI takes any string as `user`, and apps put the user's email there; Anthropic refuses an
    email in metadata.user_id (400, BerriAI/litellm#10106) and asks for no phone number either. The
    id goes as a digest of itself: the same person is still the same id, and nothing identifying."""
    api = client(surface)
    api.chat.completions.create(model=MODEL, messages=HI, user=user)
    first = sent(fake_provider)["metadata"]["user_id"]
    assert user not in first and "@" not in first
    api.responses.create(model=MODEL, input="hi", safety_identifier=user)  # the Responses API: the same rule
    assert sent(fake_provider)["metadata"]["user_id"] == first
    api.chat.completions.create(model=MODEL, messages=HI, user=user + "x")
    assert sent(fake_provider)["metadata"]["user_id"] != first


@pytest.mark.parametrize("user", ["3f2a9c-user_17", "10482233"])  # a numeric account id is no phone number
def test_an_opaque_user_id_goes_as_it_is(surface, fake_provider, user):
    client(surface).chat.completions.create(model=MODEL, messages=HI, safety_identifier=user)
    assert sent(fake_provider)["metadata"] == {"user_id": user}


# -- image detail ---------------------------------------------------------------------------------


def test_an_image_detail_anthropic_does_not_apply_is_said_on_both_surfaces(surface, fake_provider):
    """`detail: low` (a small, cheap image) was dropped without a word on chat and on the Responses
    API: Anthropic scales the image itself. It is said now, under the field each caller sent."""
    api = client(surface)
    parts = [{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}]
    raw = api.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": parts}])
    raw.parse()
    assert warnings_of(raw) == [
        "messages[0].content[1].image_url.detail: 'low' has no Anthropic equivalent; "
        "the image went at Anthropic's own scale"
    ]
    assert sent(fake_provider)["messages"][0]["content"][1]["type"] == "image"
    content = [
        {"type": "input_text", "text": "what is it?"},
        {"type": "input_image", "image_url": PNG, "detail": "low"},
    ]
    raw = api.responses.with_raw_response.create(model=MODEL, input=[{"role": "user", "content": content}])
    raw.parse()
    assert warnings_of(raw) == [
        "input[0].content[1].detail: 'low' has no Anthropic equivalent; the image went at Anthropic's own scale"
    ]
    for detail in ("auto", "high"):  # what Anthropic does anyway: nothing to say
        parts[1]["image_url"]["detail"] = detail
        raw = api.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": parts}])
        assert warnings_of(raw) == []
        content[1]["detail"] = detail
        raw = api.responses.with_raw_response.create(model=MODEL, input=[{"role": "user", "content": content}])
        assert warnings_of(raw) == []


def test_an_image_a_tool_returned_with_its_detail_is_said_too():
    call = {"type": "function_call", "call_id": "c1", "name": "look", "arguments": "{}"}
    image = {"type": "input_image", "image_url": PNG, "detail": "original"}
    output = {"type": "function_call_output", "call_id": "c1", "output": [image]}
    _, warnings = responses_to_chat({"input": [{"role": "user", "content": "look"}, call, output]})
    assert [warning.partition(":")[0] for warning in warnings] == ["input[2].output[0].detail"]


@pytest.mark.parametrize("detail", ["ultra", 3])
def test_an_image_detail_of_no_known_value_is_a_400_naming_it(detail):
    part = {"type": "image_url", "image_url": {"url": PNG, "detail": detail}}
    with pytest.raises(EgressError) as raised:
        chat_to_messages({"messages": [{"role": "user", "content": [part]}]}, default_max_tokens=100)
    assert raised.value.code == "invalid_request" and raised.value.param == "messages[0].content[0].image_url.detail"
    with pytest.raises(EgressError) as raised:
        responses_to_chat(
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": PNG, "detail": detail}]}]}
        )
    assert raised.value.param == "input[0].content[0].detail"


# -- verbosity: one rule ----------------------------------------------------------------------------


def test_verbosity_is_one_rule_on_both_surfaces(surface, fake_provider):
    """Chat refused `verbosity: low` (400) while the Responses API took `text.verbosity: low` with a
    Warning: the same request field, two answers. Both warn now (Codex sends text.verbosity)."""
    api = client(surface)
    raw = api.chat.completions.with_raw_response.create(model=MODEL, messages=HI, verbosity="low")
    assert raw.parse().choices[0].message.content
    assert warnings_of(raw) == ["verbosity has no Anthropic equivalent and was not applied"]
    raw = api.responses.with_raw_response.create(model=MODEL, input="hi", text={"verbosity": "high"})
    assert raw.parse().output_text
    assert warnings_of(raw) == ["text.verbosity has no Anthropic equivalent and was not applied"]
    raw = api.chat.completions.with_raw_response.create(model=MODEL, messages=HI, verbosity="medium")
    assert warnings_of(raw) == []  # the default: nothing asked that Anthropic does not do
    assert "verbosity" not in sent(fake_provider)


@pytest.mark.parametrize("value", ["loud", 1, ["low"]])
def test_a_verbosity_of_no_known_value_is_a_400_naming_it_on_both_surfaces(value):
    with pytest.raises(EgressError) as raised:
        chat_to_messages({"messages": HI, "verbosity": value}, default_max_tokens=100)
    assert (raised.value.code, raised.value.param) == ("invalid_request", "verbosity")
    with pytest.raises(EgressError) as raised:
        responses_to_chat({"input": "hi", "text": {"verbosity": value}})
    assert (raised.value.code, raised.value.param) == ("invalid_request", "text.verbosity")


# -- a blank tool result ----------------------------------------------------------------------------


def test_the_fake_refuses_a_whitespace_only_tool_result_and_an_email_as_user_id():
    """What the real API refuses (NousResearch/hermes-agent#97641, BerriAI/litellm#10106)."""
    use = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
    body = {
        "model": "m",
        "max_tokens": 10,
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [use]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "\r\n"}]},
        ],
    }
    with pytest.raises(AnthropicInvalidRequest, match="non-whitespace"):
        validate_anthropic_request(body)
    del body["messages"][2]["content"][0]["content"]
    validate_anthropic_request(body)  # no content at all: a tool that printed nothing
    with pytest.raises(AnthropicInvalidRequest, match="email"):
        validate_anthropic_request({**body, "metadata": {"user_id": "alice@example.com"}})


def test_a_whitespace_only_tool_result_reaches_claude_on_both_surfaces(surface, fake_provider):
    """A shell tool that printed only a line break ("\\r\\n" on Windows) sent back as the tool's
    output: Anthropic refuses a blank text, a tool_result's string included, and every later turn
    of the loop carried it. It carries nothing: the result goes without content."""
    api = client(surface)
    call = {"id": "call_1", "type": "function", "function": {"name": "sh", "arguments": "{}"}}
    tool = {"type": "function", "function": {"name": "sh", "parameters": {"type": "object"}}}
    messages = [
        {"role": "user", "content": "run it"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "\r\n"},
    ]
    assert api.chat.completions.create(model=MODEL, messages=messages, tools=[tool]).choices[0].message.content
    assert sent(fake_provider)["messages"][-1]["content"] == [{"type": "tool_result", "tool_use_id": "call_1"}]
    messages[-1]["content"] = [{"type": "text", "text": "  \n"}]  # a list of blank parts: the same
    api.chat.completions.create(model=MODEL, messages=messages, tools=[tool])
    assert sent(fake_provider)["messages"][-1]["content"] == [{"type": "tool_result", "tool_use_id": "call_1"}]
    items = [
        {"role": "user", "content": "run it"},
        {"type": "function_call", "call_id": "call_1", "name": "sh", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "\n"},
    ]
    tools = [{"type": "function", "name": "sh", "parameters": {"type": "object"}}]
    assert api.responses.create(model=MODEL, input=items, tools=tools).output_text
    assert sent(fake_provider)["messages"][-1]["content"] == [{"type": "tool_result", "tool_use_id": "call_1"}]


# -- prompt_cache_breakpoint: OpenAI's cache mark -----------------------------------------------------

BREAKPOINT = {"mode": "explicit"}
MARK = {"type": "ephemeral", "ttl": "1h"}  # the shortest Anthropic lifetime as long as OpenAI's 30m minimum


def marks(body: dict) -> list[tuple[str, int, int]]:
    """(where, message, block) of every block of the sent body with a cache mark, and the mark."""
    found = [("system", 0, index) for index, block in enumerate(body.get("system") or ()) if "cache_control" in block]
    for number, message in enumerate(body["messages"]):
        for index, block in enumerate(message["content"]):
            if "cache_control" in block:
                assert block["cache_control"] == MARK
                found.append((message["role"], number, index))
    return found


def test_a_prompt_cache_breakpoint_is_anthropics_cache_mark_on_both_surfaces(surface, fake_provider):
    """`prompt_cache_breakpoint` marks "the exact end of a reusable prompt prefix" (openai-python
    chat content parts and Responses input parts), what cache_control is to Anthropic. It was
    dropped without a word: no prompt was ever cached, and the caller paid the whole prompt each turn."""
    api = client(surface)
    system = {"type": "text", "text": "You are terse. " * 50, "prompt_cache_breakpoint": BREAKPOINT}
    messages = [{"role": "system", "content": [system]}, {"role": "user", "content": "hi"}]
    first = api.chat.completions.create(model=MODEL, messages=messages)
    assert sent(fake_provider)["system"] == [{"type": "text", "text": system["text"], "cache_control": MARK}]
    second = api.chat.completions.create(model=MODEL, messages=messages)
    written = first.usage.prompt_tokens_details.cache_write_tokens
    assert written > 0 and second.usage.prompt_tokens_details.cached_tokens == written
    text = {"type": "input_text", "text": "You are brief. " * 50, "prompt_cache_breakpoint": BREAKPOINT}
    raw = api.responses.with_raw_response.create(model=MODEL, input=[{"role": "developer", "content": [text]}, *HI])
    assert raw.parse().usage.input_tokens_details.cache_write_tokens > 0 and warnings_of(raw) == []
    assert marks(sent(fake_provider)) == [("system", 0, 0)]


def test_more_breakpoints_than_anthropic_takes_keep_the_latest_four(surface, fake_provider):
    """OpenAI reads up to 80 breakpoints of a conversation and writes the latest four; Anthropic
    refuses a fifth mark (400). A history that marks each user turn keeps its latest four, said."""
    api = client(surface)
    messages = []
    for turn in range(6):
        part = {"type": "text", "text": f"question {turn}", "prompt_cache_breakpoint": BREAKPOINT}
        messages += [{"role": "user", "content": [part]}, {"role": "assistant", "content": f"answer {turn}"}]
    messages.append({"role": "user", "content": "and now?"})
    raw = api.chat.completions.with_raw_response.create(model=MODEL, messages=messages)
    raw.parse()
    assert [number for _, number, _ in marks(sent(fake_provider))] == [4, 6, 8, 10]
    assert warnings_of(raw) == [
        "prompt_cache_breakpoint: 6 given, Anthropic takes 4 cache marks at most; the latest 4 were kept"
    ]


def test_a_breakpoint_longer_than_anthropic_keeps_is_said_and_a_malformed_one_is_a_400():
    part = {"type": "text", "text": "long", "prompt_cache_breakpoint": {"mode": "explicit", "ttl": "12h"}}
    warnings: list[str] = []
    body, _ = chat_to_messages(
        {"messages": [{"role": "user", "content": [part]}]}, default_max_tokens=9, warnings=warnings
    )
    assert body["messages"][0]["content"][0]["cache_control"] == MARK
    assert warnings == ["prompt_cache_breakpoint: a ttl of 12h is longer than Anthropic keeps a cache; marked for 1h"]
    for mark in ({"mode": "implicit"}, {"mode": "explicit", "ttl": "5m"}, "explicit"):
        part["prompt_cache_breakpoint"] = mark
        with pytest.raises(EgressError) as raised:
            chat_to_messages({"messages": [{"role": "user", "content": [part]}]}, default_max_tokens=9)
        assert raised.value.param == "messages[0].content[0].prompt_cache_breakpoint"
    own = {"type": "text", "text": "mine", "cache_control": {"type": "ephemeral"}}  # the caller's own mark: as given
    body, _ = chat_to_messages({"messages": [{"role": "user", "content": [own]}]}, default_max_tokens=9)
    assert body["messages"][0]["content"][0]["cache_control"] == {"type": "ephemeral"}


# -- a file's name ----------------------------------------------------------------------------------

PDF = "data:application/pdf;base64," + "JVBERi0xLjQK"


def test_a_files_name_is_the_documents_title_on_both_surfaces():
    """OpenAI gives the model a file's `filename` with it; it was dropped. Anthropic's document
    `title` is given to the model the same way."""
    part = {"type": "file", "file": {"file_data": PDF, "filename": "q3-report.pdf"}}
    body, _ = chat_to_messages({"messages": [{"role": "user", "content": [part]}]}, default_max_tokens=9)
    document = body["messages"][0]["content"][0]
    assert (document["type"], document["title"]) == ("document", "q3-report.pdf")
    file = {"type": "input_file", "file_data": PDF, "filename": "q3-report.pdf"}
    chat, _ = responses_to_chat({"input": [{"role": "user", "content": [file]}]})
    body, _ = chat_to_messages(chat, default_max_tokens=9)
    assert body["messages"][0]["content"][0]["title"] == "q3-report.pdf"
    validate_anthropic_request({"model": "m", **body})  # a field the Messages API takes
    del part["file"]["filename"]
    body, _ = chat_to_messages({"messages": [{"role": "user", "content": [part]}]}, default_max_tokens=9)
    assert "title" not in body["messages"][0]["content"][0]


# -- a JSON schema's description ------------------------------------------------------------------


def test_a_response_formats_description_reaches_the_model_on_both_surfaces(surface, fake_provider):
    """json_schema.description is "used by the model to determine how to respond in the format";
    it was dropped on both surfaces. Anthropic's output_config.format has only the schema: the
    schema's own description carries it."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    why = "The city the user asked about, for a weather lookup."
    form = {"type": "json_schema", "json_schema": {"name": "place", "description": why, "schema": schema}}
    api = client(surface)
    api.chat.completions.create(model=MODEL, messages=HI, response_format=form)
    assert sent(fake_provider)["output_config"]["format"]["schema"]["description"] == why
    text = {"format": {"type": "json_schema", "name": "place", "description": why, "schema": schema}}
    api.responses.create(model=MODEL, input="hi", text=text)
    assert sent(fake_provider)["output_config"]["format"]["schema"]["description"] == why
    own = {**schema, "description": "the schema's own"}  # a schema that says it itself keeps its words
    form["json_schema"]["schema"] = own
    api.chat.completions.create(model=MODEL, messages=HI, response_format=form)
    assert sent(fake_provider)["output_config"]["format"]["schema"]["description"] == "the schema's own"

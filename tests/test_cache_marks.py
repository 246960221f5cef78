"""Cache marks and a blank last turn on the way to Anthropic (anthropic_codec._breakpoints, _messages).

Anthropic refuses more than four `cache_control` blocks in all (tools, system and messages) and a 1h
mark after a 5m one, in the order tools, system, messages (prompt-caching docs, "Mixing different
TTLs"): the marks made from OpenAI's `prompt_cache_breakpoint` take what the caller's own marks leave,
and never a place Anthropic refuses. A user message left out as blank must not turn the assistant's
message before it into a prefill. Unit cases run the codec against the strict fake's validator;
the end-to-end ones run the openai SDK against the real egress process and the fake Anthropic.
"""

from __future__ import annotations

import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egress.anthropic_codec import chat_to_messages
from egress.errors import EgressError
from egress.responses_codec import responses_param, responses_to_chat
from tests.fake_provider import AnthropicInvalidRequest, validate_anthropic_request
from tests.test_translation_gaps import client, sent, surface  # noqa: F401  (surface: the fixture)

MODEL = "claude-sonnet-4-0"
BREAKPOINT = {"mode": "explicit"}
HOUR = {"type": "ephemeral", "ttl": "1h"}
FIVE = {"type": "ephemeral", "ttl": "5m"}
OWN = {"type": "ephemeral"}  # the caller's own mark, 5m as Anthropic reads a ttl left out
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}


def warnings_of(raw) -> list[str]:
    return [value.removeprefix('299 egress "').removesuffix('"') for value in raw.headers.get_list("warning")]


def translate(chat: dict) -> tuple[dict, list[str]]:
    """The Anthropic request for `chat`, checked by the strict fake, and its warnings."""
    warnings: list[str] = []
    body, _ = chat_to_messages(chat, default_max_tokens=64, warnings=warnings)
    validate_anthropic_request({**body, "model": MODEL})
    return body, warnings


def marked(body: dict) -> list:
    """Every cache mark of an Anthropic request, in prompt order (tools, system, messages)."""
    blocks = [*(body.get("tools") or ()), *(body.get("system") or ())]
    blocks += [block for message in body["messages"] for block in message["content"]]
    return [block["cache_control"] for block in blocks if "cache_control" in block]


def text(words: str, **mark) -> dict:
    return {"type": "text", "text": words, **mark}


# -- the fake refuses what Anthropic refuses ------------------------------------------------------------


def test_the_fake_refuses_a_1h_mark_after_a_5m_one_in_prompt_order():
    """Anthropic: "Cache entries with longer TTL must appear before shorter TTLs" (prompt-caching docs,
    "Mixing different TTLs"), in the order tools, system, messages; worded as its 400
    (kristianvast/hermes-claude-auth#31)."""
    messages = [{"role": "user", "content": [text("q", cache_control=HOUR)]}]
    early = {"model": MODEL, "max_tokens": 9, "system": [text("s", cache_control=HOUR)], "messages": messages}
    validate_anthropic_request(early)
    validate_anthropic_request({**early, "messages": [{"role": "user", "content": [text("q", cache_control=OWN)]}]})
    late = {"model": MODEL, "max_tokens": 9, "system": [text("s", cache_control=OWN)], "messages": messages}
    with pytest.raises(AnthropicInvalidRequest, match=r"^messages\.0\.content\.0\.cache_control\.ttl: a ttl='1h'"):
        validate_anthropic_request(late)
    tools = [{"name": "t", "input_schema": {"type": "object"}, "cache_control": FIVE}]
    first = {"model": MODEL, "max_tokens": 9, "tools": tools, "system": [text("s", cache_control=HOUR)]}
    first["messages"] = [{"role": "user", "content": "q"}]
    with pytest.raises(AnthropicInvalidRequest, match=r"^system\.0\.cache_control\.ttl"):
        validate_anthropic_request(first)  # tools come first, whatever the order of the body's keys


# -- four marks in all --------------------------------------------------------------------------------


def _history(turns: int) -> list[dict]:
    messages = []
    for turn in range(turns):
        part = text(f"question {turn}", prompt_cache_breakpoint=BREAKPOINT)
        messages += [{"role": "user", "content": [part]}, {"role": "assistant", "content": f"answer {turn}"}]
    return [*messages, {"role": "user", "content": "and now?"}]


def test_breakpoints_take_only_the_places_the_callers_own_marks_leave():
    """Anthropic counts every cache_control block, the caller's own on tools, system prompt and parts
    included ("A maximum of 4 blocks with cache_control may be provided"): the breakpoints were kept
    four by themselves, and a request with two marks of the caller's went with six, a 400."""
    own = {"role": "system", "content": [text("rules", cache_control=HOUR)]}
    body, warnings = translate({"messages": [own, *_history(3)], "tools": [{**TOOL, "cache_control": HOUR}]})
    assert marked(body) == [HOUR, HOUR, HOUR, HOUR]
    assert "cache_control" not in body["messages"][0]["content"][0]  # the earliest breakpoint gave way
    assert warnings == [
        "prompt_cache_breakpoint: 3 given besides 2 cache_control marks, Anthropic takes 4 cache marks at most; "
        "the latest 2 were kept"
    ]
    full = [{**TOOL, "function": {**TOOL["function"], "name": f"t{n}"}, "cache_control": HOUR} for n in range(4)]
    body, warnings = translate({"messages": _history(1), "tools": full})
    assert len(marked(body)) == 4 and warnings == [
        "prompt_cache_breakpoint: 1 given besides 4 cache_control marks, Anthropic takes 4 cache marks at most; "
        "none was kept"
    ]


def test_the_callers_own_marks_anthropic_would_refuse_are_a_400_naming_cache_control():
    """Marks of the caller's are sent as given, so egress can't choose among them: five of them, or a
    1h one after a 5m one, is what Anthropic refuses, said before the request leaves, on both surfaces."""
    five = [text(f"part {n}", cache_control=OWN) for n in range(5)]
    misordered = [text("a", cache_control=OWN), text("b", cache_control=HOUR)]
    for parts, said in ((five, "5 blocks carry one"), (misordered, "a ttl of 1h comes after a cache_control of 5m")):
        with pytest.raises(EgressError) as caught:
            chat_to_messages({"messages": [{"role": "user", "content": parts}]}, default_max_tokens=9)
        assert caught.value.param == "cache_control" and said in caught.value.message
        responses = [
            {"type": "input_text", "text": part["text"], "cache_control": part["cache_control"]} for part in parts
        ]
        chat, _ = responses_to_chat({"model": MODEL, "input": [{"role": "user", "content": responses}]})
        with pytest.raises(EgressError) as caught:
            chat_to_messages(chat, default_max_tokens=9)
        assert responses_param(caught.value.param) == "cache_control" and said in caught.value.message


# -- a 1h mark never after a 5m one -------------------------------------------------------------------


def test_a_breakpoint_after_a_callers_5m_mark_is_marked_for_5m_and_said():
    """A breakpoint becomes a 1h mark (OpenAI's lifetime is a 30 min minimum); after a mark of the
    caller's of 5m (a ttl left out is 5m), Anthropic refuses it: it goes for 5m, the longest there."""
    system = {"role": "system", "content": [text("rules", cache_control=OWN)]}
    user = {"role": "user", "content": [text("q", prompt_cache_breakpoint={"mode": "explicit", "ttl": "12h"})]}
    body, warnings = translate({"messages": [system, user]})
    assert marked(body) == [OWN, FIVE]
    assert warnings == [
        "prompt_cache_breakpoint: 1 after a cache_control of 5m marked for 5m, not 1h: Anthropic takes a longer "
        "ttl only before a shorter one"
    ]
    # One on a tool puts every mark after it: tools come first.
    user = {"role": "user", "content": [text("q", prompt_cache_breakpoint=BREAKPOINT)]}
    body, _ = translate(
        {"messages": [{"role": "system", "content": "rules"}, user], "tools": [{**TOOL, "cache_control": FIVE}]}
    )
    assert marked(body) == [FIVE, FIVE]


def test_a_breakpoint_before_a_callers_5m_mark_stays_1h():
    first = {"role": "user", "content": [text("context", prompt_cache_breakpoint=BREAKPOINT)]}
    later = {"role": "user", "content": [text("q", cache_control=OWN)]}
    body, warnings = translate({"messages": [first, {"role": "assistant", "content": "ok"}, later]})
    assert marked(body) == [HOUR, OWN] and warnings == []


_MARK = st.sampled_from([None, "breakpoint", "12h", "own", "own5m", "own1h"])


def _part(index: int, mark: str | None) -> dict:
    part = text(f"part {index}")
    if mark in ("breakpoint", "12h"):
        part["prompt_cache_breakpoint"] = {"mode": "explicit", "ttl": "12h"} if mark == "12h" else BREAKPOINT
    elif mark is not None:
        part["cache_control"] = {"own": OWN, "own5m": FIVE, "own1h": HOUR}[mark]
    return part


@settings(max_examples=400, deadline=None)
@given(
    st.lists(_MARK, max_size=3),
    st.lists(_MARK, max_size=3),
    st.lists(st.lists(_MARK, min_size=1, max_size=3), min_size=1, max_size=5),
)
def test_a_request_is_refused_by_egress_or_taken_by_anthropic_never_refused_there(tools, system, turns):
    """Any mix of the caller's marks and breakpoints on tools, system and turns: the translation is
    taken by the strict fake, or a 400 naming cache_control when the caller's own marks alone break a
    rule; never one Anthropic refuses for its marks. Breakpoints fill what the caller's leave."""
    chat: dict = {"messages": [{"role": "system", "content": [_part(n, m) for n, m in enumerate(system)] or "s"}]}
    for number, marks in enumerate(turns):
        role = "user" if number % 2 == 0 else "assistant"
        chat["messages"].append({"role": role, "content": [_part(n, m) for n, m in enumerate(marks)]})
    if turns and len(turns) % 2 == 0:
        chat["messages"].append({"role": "user", "content": "go on"})
    chat["tools"] = []
    for number, mark in enumerate(tools):
        tool = {**TOOL, "function": {**TOOL["function"], "name": f"t{number}"}}
        if mark is not None and mark.startswith("own"):
            tool["cache_control"] = {"own": OWN, "own5m": FIVE, "own1h": HOUR}[mark]
        chat["tools"].append(tool)
    parts = system + [mark for marks in turns for mark in marks]  # tools take no breakpoint
    own = [mark for mark in tools + parts if mark is not None and mark.startswith("own")]  # in prompt order
    shorter = [index for index, mark in enumerate(own) if mark != "own1h"]
    broken = len(own) > 4 or any(mark == "own1h" and shorter and shorter[0] < index for index, mark in enumerate(own))
    try:
        body, _ = translate(chat)
    except EgressError as error:
        assert broken and error.param == "cache_control"
        return
    assert not broken
    breakpoints = sum(mark in ("breakpoint", "12h") for mark in parts)
    assert len(marked(body)) == len(own) + min(breakpoints, 4 - len(own))


def test_both_surfaces_send_a_breakpoint_after_a_callers_mark_that_anthropic_takes(surface, fake_provider):  # noqa: F811
    """End to end: the fake Anthropic refused the 1h mark after the caller's 5m one with a 400, which
    reached the caller; now the request is answered and the Warning says what changed."""
    api = client(surface)
    system = {"role": "system", "content": [text("You are terse. " * 40, cache_control=OWN)]}
    user = {"role": "user", "content": [text("hi", prompt_cache_breakpoint=BREAKPOINT)]}
    raw = api.chat.completions.with_raw_response.create(model=MODEL, messages=[system, user])
    raw.parse()
    assert marked(sent(fake_provider)) == [OWN, FIVE]
    assert [w for w in warnings_of(raw) if "marked for 5m" in w]
    developer = {
        "role": "developer",
        "content": [{"type": "input_text", "text": "You are brief. " * 40, "cache_control": OWN}],
    }
    question = {
        "role": "user",
        "content": [{"type": "input_text", "text": "hi", "prompt_cache_breakpoint": BREAKPOINT}],
    }
    raw = api.responses.with_raw_response.create(model=MODEL, input=[developer, question])
    raw.parse()
    assert marked(sent(fake_provider)) == [OWN, FIVE]
    assert [w for w in warnings_of(raw) if "marked for 5m" in w]


# -- a blank last user message ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "last",
    [
        [{"role": "user", "content": "  \n"}],
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": [{"type": "text", "text": "\t"}]}],
        [{"role": "user", "content": " "}, {"role": "assistant", "content": "\n"}],  # a blank prefill is left out too
        [{"role": "user", "content": " "}, {"role": "system", "content": "be brief"}],
    ],
)
def test_a_blank_last_user_message_is_a_400_naming_it_not_a_prefill(last):
    """Blank text is left out (Anthropic refuses it) and an empty user message with it; when it was the
    caller's last turn, the assistant's answer before it became the last message, which Anthropic
    continues as a prefill: the request quietly asked for more of the last answer."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}, *last]
    with pytest.raises(EgressError) as caught:
        chat_to_messages({"messages": messages}, default_max_tokens=9)
    assert caught.value.status == 400 and caught.value.param == "messages[2].content"
    assert "continued instead of answered" in caught.value.message


def test_a_blank_last_user_item_is_the_same_400_on_the_responses_api():
    for content in (" ", [{"type": "input_text", "text": "\n"}]):
        items = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
            {"role": "user", "content": content},
        ]
        chat, _ = responses_to_chat({"model": MODEL, "input": items})
        with pytest.raises(EgressError) as caught:
            chat_to_messages(chat, default_max_tokens=9)
        assert "continued instead of answered" in caught.value.message
        assert responses_param(caught.value.param) == "input"


@pytest.mark.parametrize(
    "rest",
    [
        [{"role": "user", "content": " "}, {"role": "user", "content": "go on"}],  # the turn still ends with the user
        [{"role": "user", "content": " "}, {"role": "assistant", "content": "Sure,"}],  # the caller's own last message
        [{"role": "assistant", "content": " "}],  # a blank answer: the user's turn is last
    ],
)
def test_a_blank_message_before_the_callers_last_is_still_left_out(rest):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}, *rest]
    body, _ = translate({"messages": messages})  # left out in the history as before, merging what it parted
    last = next(message for message in reversed(messages) if message["content"].strip())
    assert body["messages"][-1]["role"] == last["role"]
    assert body["messages"][-1]["content"][-1]["text"] == last["content"]


def test_a_blank_last_turn_never_reaches_anthropic_on_either_surface(surface, fake_provider):  # noqa: F811
    api = client(surface)
    before = len(fake_provider.requests)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=MODEL, messages=[*history, {"role": "user", "content": "\r\n"}])
    assert caught.value.body["param"] == "messages[2].content"
    with pytest.raises(openai.BadRequestError) as caught:
        api.responses.create(model=MODEL, input=[*history, {"role": "user", "content": "  "}])
    assert caught.value.body["param"] == "input"
    assert len(fake_provider.requests) == before

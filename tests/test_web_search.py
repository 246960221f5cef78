"""Web search on a Claude model through the unified surface: the OpenAI SDK's web search (the
Responses API's `web_search` tool, chat's `web_search_options`) runs as Anthropic's web search
server tool, and the answer comes back as OpenAI's (web_search_call items, url_citation
annotations), billed per search. The upstream answers with pydantic-ai's recorded Anthropic web
search stream (tests/recordings/anthropic__stream_web_search_server_tool, SOURCES.md)."""

from __future__ import annotations

from pathlib import Path

import openai
import orjson
import pytest

from tests.support import ScriptedUpstream, wait_until, whole_lines

RECORDED = (Path(__file__).parent / "recordings" / "anthropic__stream_web_search_server_tool" / "body").read_bytes()
STREAM_REPLY = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncontent-length: %d\r\n\r\n" % len(RECORDED)
    + RECORDED
)


def _egress(start_egress, tmp_path, upstream):
    usage_file = tmp_path / "usage.jsonl"
    egress = start_egress(f'[providers.anthropic]\nbase_url = "{upstream.base_url}"\n[usage]\njsonl = "{usage_file}"\n')
    egress.usage_file = usage_file
    return egress


def _sent(upstream: ScriptedUpstream) -> dict:
    (request,) = upstream.requests
    return orjson.loads(request.split(b"\r\n\r\n", 1)[1])


def _recorded_text() -> str:
    events = [orjson.loads(line[5:]) for line in RECORDED.split(b"\n") if line.startswith(b"data:")]
    deltas = [event["delta"] for event in events if event["type"] == "content_block_delta"]
    return "".join(delta["text"] for delta in deltas if delta["type"] == "text_delta")


def _fact(egress) -> dict:
    assert wait_until(lambda: egress.usage_file.exists() and whole_lines(egress.usage_file.read_bytes()), timeout=3)
    (line,) = whole_lines(egress.usage_file.read_bytes())
    return orjson.loads(line)


def test_the_openai_sdks_web_search_runs_as_anthropics_and_streams_back_as_openais(start_egress, tmp_path):
    upstream = ScriptedUpstream([STREAM_REPLY])
    try:
        egress = _egress(start_egress, tmp_path, upstream)
        client = openai.OpenAI(base_url=egress.url + "/v1", api_key="sk-ant-byo", max_retries=0)
        tool = {"type": "web_search", "user_location": {"type": "approximate", "country": "US"}}
        with client.responses.stream(model="claude-sonnet-4-0", input="Top 3 news today?", tools=[tool]) as stream:
            kinds = [event.type for event in stream]
            response = stream.get_final_response()
        assert _sent(upstream)["tools"] == [
            {
                "type": "web_search_20250305",
                "name": "web_search",
                "user_location": {"type": "approximate", "country": "US"},
            }
        ]
        searches = [item for item in response.output if item.type == "web_search_call"]
        assert [search.status for search in searches] == ["completed", "completed"]
        assert searches[0].action.query == "top world news today"
        assert searches[0].action.sources and searches[0].action.sources[0].url.startswith("https://")
        annotations = [a for item in response.output if item.type == "message" for a in item.content[0].annotations]
        assert len(annotations) == 9 and all(a.type == "url_citation" and a.url.startswith("http") for a in annotations)
        assert kinds.count("response.web_search_call.completed") == 2
        assert kinds.count("response.output_text.annotation.added") == 9
        assert response.output_text == _recorded_text()
        fact = _fact(egress)
        assert (fact["usage"], fact["web_search_requests"], fact["surface"]) == ("complete", 2, "responses")
    finally:
        upstream.stop()


def test_chats_web_search_options_run_as_anthropics_web_search(start_egress, tmp_path):
    upstream = ScriptedUpstream([STREAM_REPLY])
    try:
        egress = _egress(start_egress, tmp_path, upstream)
        client = openai.OpenAI(base_url=egress.url + "/v1", api_key="sk-ant-byo", max_retries=0)
        chunks = list(
            client.chat.completions.create(
                model="claude-sonnet-4-0",
                messages=[{"role": "user", "content": "Top 3 news today?"}],
                web_search_options={"search_context_size": "medium"},
                stream=True,
            )
        )
        assert _sent(upstream)["tools"] == [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        assert text == _recorded_text() and chunks[-1].choices[0].finish_reason == "stop"
        # The pages cited, in the finish chunk's delta, as OpenAI's search models stream them.
        finish = next(chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason)
        annotations = (finish.choices[0].delta.model_extra or {}).get("annotations")
        assert len(annotations) == 9 and all(a["url_citation"]["url"].startswith("http") for a in annotations)
        fact = _fact(egress)
        assert (fact["usage"], fact["web_search_requests"], fact["surface"]) == ("complete", 2, "chat")
    finally:
        upstream.stop()


def test_a_malformed_web_search_tool_is_a_400_naming_the_field_as_sent(start_egress, tmp_path):
    """The Responses tool's fields are checked under the names the caller sent (its location is
    flat: `tools[0].user_location.city`), never under chat's `web_search_options`, which it did not
    send; `filters.allowed_domains: null` (openai-python's Filters: Optional) is no filter."""
    upstream = ScriptedUpstream([STREAM_REPLY])
    try:
        egress = _egress(start_egress, tmp_path, upstream)
        client = openai.OpenAI(base_url=egress.url + "/v1", api_key="sk-ant-byo", max_retries=0)
        for tool, param in (
            (
                {"type": "web_search", "user_location": {"type": "approximate", "city": 7}},
                "tools[0].user_location.city",
            ),
            ({"type": "web_search", "search_context_size": "max"}, "tools[0].search_context_size"),
            ({"type": "web_search", "filters": {"allowed_domains": "a.com"}}, "tools[0].filters"),
        ):
            with pytest.raises(openai.BadRequestError) as raised:
                client.responses.create(model="claude-sonnet-4-0", input="news?", tools=[tool])
            assert raised.value.param == param and param in raised.value.message
        assert upstream.requests == []
        tool = {"type": "web_search", "filters": {"allowed_domains": None}}
        with client.responses.stream(model="claude-sonnet-4-0", input="news?", tools=[tool]) as stream:
            assert stream.get_final_response().output_text == _recorded_text()
        assert _sent(upstream)["tools"] == [{"type": "web_search_20250305", "name": "web_search"}]
    finally:
        upstream.stop()


def test_a_long_codex_history_of_searches_is_one_warning(start_egress, tmp_path):
    """Codex sends its whole history each turn: a header per web_search_call left out went over
    what its HTTP client (hyper: 100 headers) takes, after a hundred searches. One Warning says all."""
    upstream = ScriptedUpstream([STREAM_REPLY])
    try:
        egress = _egress(start_egress, tmp_path, upstream)
        client = openai.OpenAI(base_url=egress.url + "/v1", api_key="sk-ant-byo", max_retries=0)
        search = {"type": "web_search_call", "status": "completed", "action": {"type": "search", "query": "news"}}
        history: list = [{"role": "user", "content": "news?"}]
        for turn in range(120):
            history += [
                search,
                {"role": "assistant", "content": f"Answer {turn}."},
                {"role": "user", "content": "more"},
            ]
        raw = client.responses.with_raw_response.create(
            model="claude-sonnet-4-0", input=history, tools=[{"type": "web_search"}], stream=True
        )
        assert raw.headers.get_list("warning") == [
            "299 egress \"input[1], input[4], input[7] and 117 more: 120 web_search_call items can't be sent back "
            'to Anthropic and were left out"'
        ]
        raw.parse().close()
        assert [turn["role"] for turn in _sent(upstream)["messages"]][:3] == ["user", "assistant", "user"]
    finally:
        upstream.stop()

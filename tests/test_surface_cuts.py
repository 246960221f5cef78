"""A translated answer cut short is a cut for the caller too, never a clean 200 without a completion."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import orjson
import pytest

from tests import test_surface
from tests.support import (
    LoopbackServer,
    RawClient,
    ScriptedUpstream,
    _split_request,
    request_bytes,
    wait_until,
    whole_lines,
)

surface = test_surface.surface


def post(egress, body: dict, scenario: str, extra: dict | None = None):
    with RawClient(egress.port) as client:
        headers = {"Content-Type": "application/json", "x-fake-scenario": scenario, **(extra or {})}
        client.send(request_bytes("POST", "/v1/chat/completions", headers, orjson.dumps(body)))
        response = client.read_response("POST")
        return response, client.server_closed()


def test_a_json_answer_cut_mid_body_cuts_the_caller(surface):
    response, closed = post(
        surface, {"model": "claude-fake", "messages": [{"role": "user", "content": "hi"}]}, "stream-cut"
    )
    assert not response.complete  # chunked without its terminator: a cut
    assert closed
    assert b'"choices"' not in response.body


def test_a_json_answer_cut_mid_body_is_an_error_in_the_sdk(surface):
    client = openai.OpenAI(base_url=surface.url + "/v1", api_key="byo-surface", max_retries=0)
    with pytest.raises(openai.APIError):
        client.chat.completions.create(
            model="claude-fake",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-scenario": "stream-cut"},
        )


def test_a_stream_that_ends_without_message_stop_cuts_the_caller(surface):
    body = {"model": "claude-fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    response, closed = post(surface, body, "long-stream", {"x-fake-events": "3", "x-fake-interval": "0"})
    assert response.status == 200
    assert not response.complete
    assert closed
    assert b"[DONE]" not in response.body


# -- a raw Anthropic upstream: the terminating chunk late, a stream cut inside an event --------------


class _AnthropicStream(LoopbackServer):
    """Answers every request with a recorded Anthropic stream, chunked, then `after` (bytes) once
    `pause` seconds have passed: the terminating chunk late, as a real connection may deliver it."""

    def __init__(self, body: bytes, after: bytes, pause: float, close: bool = False) -> None:
        self.body, self.after, self.pause, self.close = body, after, pause, close
        super().__init__()

    def _serve(self, conn) -> None:
        for _ in self._requests(conn, _split_request):
            head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            head += b"connection: close\r\n\r\n" if self.close else b"transfer-encoding: chunked\r\n\r\n"
            data = self.body if self.close else b"%x\r\n%s\r\n" % (len(self.body), self.body)
            try:
                conn.sendall(head + data)
                time.sleep(self.pause)
                conn.sendall(self.after)
            except OSError:
                return
            if self.close:
                conn.close()
                return


RECORDED = (Path(__file__).parent / "recordings" / "anthropic__stream_simple" / "body").read_bytes()


def _translated(start_egress, tmp_path, upstream) -> object:
    usage_file = tmp_path / "usage.jsonl"
    egress = start_egress(f'[providers.anthropic]\nbase_url = "{upstream.base_url}"\n[usage]\njsonl = "{usage_file}"\n')
    egress.usage_file = usage_file
    return egress


def _fact(egress) -> dict:
    assert wait_until(lambda: egress.usage_file.exists() and whole_lines(egress.usage_file.read_bytes()), timeout=3)
    (line,) = whole_lines(egress.usage_file.read_bytes())
    return orjson.loads(line)


def test_an_sdk_that_closes_at_done_before_the_providers_last_chunk_is_a_complete_response(start_egress, tmp_path):
    """The OpenAI SDK stops reading at [DONE], which egress writes at message_stop; the provider's
    terminating chunk comes after. Before, that close was logged as client_gone, usage partial."""
    upstream = _AnthropicStream(RECORDED, b"0\r\n\r\n", pause=0.5)
    try:
        egress = _translated(start_egress, tmp_path, upstream)
        client = openai.OpenAI(base_url=egress.url + "/v1", api_key="sk-ant-byo", max_retries=0)
        chunks = list(
            client.chat.completions.create(
                model="claude-fake", messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )
        assert chunks and chunks[-1].choices[0].finish_reason == "stop"
        fact = _fact(egress)
        assert (fact["usage"], fact["outcome"]) == ("complete", "complete"), fact
        assert wait_until(lambda: egress.access_records(), timeout=3)
        assert egress.access_records()[0]["outcome"] == "complete"
    finally:
        upstream.stop()


def test_a_stream_closed_inside_its_last_event_is_a_cut_not_a_provider_error(start_egress, tmp_path):
    """Framed by the close: the provider's bytes end mid-event. The caller sees a cut (as for any
    cut stream), never an `api_error` event egress made up as if the provider had sent it."""
    cut = RECORDED[: RECORDED.index(b"event: message_delta")] + b'event: message_delta\ndata: {"type":"mess'
    upstream = _AnthropicStream(cut, b"", pause=0.0, close=True)
    try:
        egress = _translated(start_egress, tmp_path, upstream)
        body = {"model": "claude-fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with RawClient(egress.port) as raw:
            raw.send(
                request_bytes(
                    "POST", "/v1/chat/completions", {"Authorization": "Bearer sk-ant-byo"}, orjson.dumps(body)
                )
            )
            response = raw.read_response("POST")
        assert response.status == 200 and not response.complete
        assert b"could not parse" not in response.body and b"[DONE]" not in response.body
        fact = _fact(egress)
        assert (fact["usage"], fact["usage_reason"], fact["outcome"]) == ("partial", "cut", "upstream_cut"), fact
    finally:
        upstream.stop()


def test_a_whole_message_for_a_stream_request_is_a_cut_not_an_empty_stream(start_egress, tmp_path):
    message = (Path(__file__).parent / "recordings" / "anthropic__json_cache_creation_5m" / "body").read_bytes()
    upstream = ScriptedUpstream(
        [b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(message), message)]
    )
    try:
        egress = _translated(start_egress, tmp_path, upstream)
        client = openai.OpenAI(base_url=egress.url + "/v1", api_key="sk-ant-byo", max_retries=0)
        with pytest.raises(openai.APIError):
            list(
                client.chat.completions.create(
                    model="claude-fake", messages=[{"role": "user", "content": "hi"}], stream=True
                )
            )
    finally:
        upstream.stop()

"""The official SDKs, pointed at egress with their own (BYO) keys, behave as if calling the provider.

The SDKs' HTTP transport is wrapped to record the exact body bytes it receives, which must equal,
byte for byte, what the fake provider sent.
"""

from __future__ import annotations

import anthropic
import httpx2 as httpx
import openai
import orjson
import pytest

from tests.fake_provider import _openai_events
from tests.support import wait_until

BYO_OPENAI_KEY = "sk-byo-openai-0123456789abcdef"
BYO_ANTHROPIC_KEY = "sk-ant-byo-0123456789abcdef"


class RecordingTransport(httpx.HTTPTransport):
    """Keeps the raw (de-chunked, not decoded) body bytes of every response the SDK reads."""

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[bytes] = []
        self.responses: list[httpx.Response] = []
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = super().handle_request(request)
        sink = bytearray()
        self.bodies.append(sink)
        self.responses.append(response)
        inner = response.stream

        class Recorded(httpx.SyncByteStream):
            def __iter__(self):
                for chunk in inner:
                    sink.extend(chunk)
                    yield chunk

            def close(self) -> None:
                inner.close()

        return httpx.Response(
            response.status_code, headers=response.headers, stream=Recorded(), extensions=response.extensions
        )


def _openai(egress, transport, prefix="/openai/v1", api_key=BYO_OPENAI_KEY) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=egress.url + prefix,
        api_key=api_key,
        max_retries=0,
        http_client=httpx.Client(transport=transport),
    )


def _anthropic(egress, transport, api_key=BYO_ANTHROPIC_KEY) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=egress.url + "/anthropic",
        api_key=api_key,
        max_retries=0,
        http_client=httpx.Client(transport=transport),
    )


def _assert_no_secret_logged(egress) -> None:
    logs = egress.logs()
    assert BYO_OPENAI_KEY not in logs and BYO_ANTHROPIC_KEY not in logs


def test_openai_sdk_completion(egress, fake_provider):
    transport = RecordingTransport()
    client = _openai(egress, transport)
    completion = client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "Hello from the fake provider."
    assert completion.usage.prompt_tokens == 12
    seen = fake_provider.requests[-1]
    assert seen.target == "/v1/chat/completions"
    assert seen.header("authorization") == f"Bearer {BYO_OPENAI_KEY}"
    assert seen.header("host") == f"localhost:{fake_provider.port}"
    assert seen.header("x-forwarded-for") is None
    response = transport.responses[-1]
    assert transport.bodies[-1] == fake_provider.sent_bodies[response.headers["x-request-id"]]
    assert response.headers["x-ratelimit-remaining-requests"] == "9999"
    assert response.headers["x-egress-request-id"]
    _assert_no_secret_logged(egress)


def test_openai_sdk_stream_is_byte_identical(egress, fake_provider):
    transport = RecordingTransport()
    client = _openai(egress, transport)
    stream = client.chat.completions.create(
        model="gpt-fake",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Hello from the fake provider."
    response = transport.responses[-1]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["transfer-encoding"] == "chunked"
    sent = fake_provider.sent_bodies[response.headers["x-request-id"]]
    assert sent.endswith(b"data: [DONE]\n\n")
    assert transport.bodies[-1] == sent
    _assert_no_secret_logged(egress)


def test_openai_stream_without_include_usage_reads_as_a_direct_call(egress, fake_provider):
    transport = RecordingTransport()
    client = _openai(egress, transport)
    stream = client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}], stream=True)
    chunks = list(stream)
    assert all(chunk.usage is None for chunk in chunks)
    seen = fake_provider.requests[-1]
    # egress asked the provider for usage, to meter it...
    assert orjson.loads(seen.body)["stream_options"] == {"include_usage": True}
    sent = fake_provider.sent_bodies[transport.responses[-1].headers["x-request-id"]]
    assert b'"usage":{' in sent and b'"usage":null' in sent
    # ...and the caller received exactly what the provider sends when nobody asks.
    direct = b"".join(_openai_events({"model": "gpt-fake"}))
    assert transport.bodies[-1] == direct
    assert b'"usage"' not in transport.bodies[-1]


def test_anthropic_sdk_message(egress, fake_provider):
    transport = RecordingTransport()
    client = _anthropic(egress, transport)
    message = client.messages.create(
        model="claude-fake",
        max_tokens=64,
        messages=[{"role": "user", "content": "hi"}],
        # Older SDKs send x-api-key, newer ones Authorization: both must arrive untouched.
        extra_headers={"anthropic-beta": "fake-beta-2026-01-01", "x-api-key": BYO_ANTHROPIC_KEY},
    )
    assert message.content[0].text == "Hello from the fake provider."
    seen = fake_provider.requests[-1]
    assert seen.target == "/v1/messages"
    assert seen.header("x-api-key") == BYO_ANTHROPIC_KEY
    assert seen.header("authorization") == transport.requests[-1].headers.get("authorization")
    assert seen.header("anthropic-beta") == "fake-beta-2026-01-01"
    assert seen.header("anthropic-version")
    response = transport.responses[-1]
    assert transport.bodies[-1] == fake_provider.sent_bodies[response.headers["request-id"]]
    _assert_no_secret_logged(egress)


def test_anthropic_sdk_stream_is_byte_identical(egress, fake_provider):
    transport = RecordingTransport()
    client = _anthropic(egress, transport)
    with client.messages.stream(
        model="claude-fake", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from the fake provider."
    assert final.usage.output_tokens == 6
    response = transport.responses[-1]
    sent = fake_provider.sent_bodies[response.headers["request-id"]]
    assert sent.startswith(b"event: message_start\n")
    assert transport.bodies[-1] == sent
    _assert_no_secret_logged(egress)


def test_drop_in_v1_routes_by_path(egress, fake_provider):
    openai_transport, anthropic_transport = RecordingTransport(), RecordingTransport()
    # /v1/models is egress's own list (the unified surface); other bare /v1 paths go to openai.
    with pytest.raises(openai.NotFoundError):  # the fake's own 404, relayed: the request reached it
        _openai(egress, openai_transport, prefix="/v1").files.list()
    assert fake_provider.requests[-1].target == "/v1/files"
    anthropic.Anthropic(
        base_url=egress.url,
        api_key=BYO_ANTHROPIC_KEY,
        max_retries=0,
        http_client=httpx.Client(transport=anthropic_transport),
    ).messages.create(model="claude-fake", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert fake_provider.requests[-1].target == "/v1/messages"
    assert wait_until(lambda: len(egress.access_records()) >= 2, timeout=3)
    assert [r["provider"] for r in egress.access_records()[-2:]] == ["openai", "anthropic"]


def test_keep_alive_reuses_upstream_connection(egress, fake_provider):
    client = _openai(egress, RecordingTransport())
    for _ in range(5):
        client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    assert fake_provider.connections_opened == 1


def test_an_egress_error_names_its_request_id_where_the_sdks_read_it(egress):
    """egress's own answers carried their id as `x-egress-request-id` only: an SDK's error said
    `request_id=None` (the OpenAI SDKs read `x-request-id`, Anthropic's `request-id`), and the
    access-log line explaining the error could not be found from it."""
    transport = RecordingTransport()
    client = _openai(egress, transport, api_key="bai_not-a-real-key")
    with pytest.raises(openai.AuthenticationError) as raised:
        client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    openai_id = raised.value.request_id
    assert openai_id and openai_id == transport.responses[-1].headers["x-egress-request-id"]
    assert raised.value.code == "invalid_key"
    transport = RecordingTransport()
    client = _anthropic(egress, transport, api_key="bai_not-a-real-key")
    with pytest.raises(anthropic.AuthenticationError) as raised:
        client.messages.create(model="claude-fake", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    anthropic_id = raised.value.request_id
    assert anthropic_id and anthropic_id == transport.responses[-1].headers["x-egress-request-id"]
    assert anthropic_id != openai_id
    assert wait_until(lambda: f'"request_id":"{anthropic_id}"' in egress.logs(), timeout=5)
    assert f'"request_id":"{openai_id}"' in egress.logs()

"""Routing by model and the one model policy, through the real process and the official SDKs: what
`/v1/models` offers a virtual key is what the call path serves it, and the passthrough reads a
body's models as the provider reads them, no more (a tool call sent back is not a model choice)
and no less (a multipart form read with the boundary and head rules the provider's parser uses)."""

from __future__ import annotations

from pathlib import Path

import anthropic
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.vkeys import mint, public_key_text
from tests.support import RawClient, request_bytes

ISSUER = Ed25519PrivateKey.generate()
OPENAI_POOL = "sk-pool-rr-openai-0123"
ANTHROPIC_POOL = "sk-ant-pool-rr-0123456"
MESSAGES = [{"role": "user", "content": "Say hi"}]


@pytest.fixture
def gateway(start_egress, fake_provider, ca_file, tmp_path: Path):
    (tmp_path / "openai.key").write_text(OPENAI_POOL + "\n")
    (tmp_path / "anthropic.key").write_text(ANTHROPIC_POOL + "\n")
    config = f"""
[upstream]
ca_file = "{ca_file}"

[providers.openai]
base_url = "{fake_provider.base_url}"
pool_keys = ["file:{tmp_path / "openai.key"}"]
models = ["gpt-fake", "gpt-other"]

[providers.anthropic]
base_url = "{fake_provider.base_url}"
pool_keys = ["file:{tmp_path / "anthropic.key"}"]
models = ["claude-fake"]

[providers.nokeys]
base_url = "{fake_provider.base_url}"
models = ["nk-model"]

[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]

[[routes]]
match = "claude-fake"
provider = "anthropic"
fallbacks = ["openai:gpt-fake"]

[[routes]]
match = "nk-*"
provider = "nokeys"

[[routes]]
match = "gpt-*"
provider = "openai"
fallbacks = ["claude-fake"]
"""
    return start_egress(config)


def test_a_virtual_key_is_offered_only_what_the_call_path_serves_it(gateway, fake_provider):
    # `nokeys` has no pool key: a virtual key's call there is 403 no_pool_key, so it is not listed.
    key = mint(ISSUER, "app", models=["gpt-fake", "claude-*", "nk-*"])[0]
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    listed = sorted(model.id for model in sdk.models.list())
    assert listed == ["claude-fake", "gpt-fake"]
    for model in listed:
        assert sdk.chat.completions.create(model=model, messages=MESSAGES).choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError) as raised:
        sdk.chat.completions.create(model="nk-model", messages=MESSAGES)
    assert raised.value.code == "no_pool_key"
    # A BYO key may call it with its own credential: listed for it.
    byo = openai.OpenAI(base_url=gateway.url + "/v1", api_key="sk-byo-caller", max_retries=0)
    assert "nk-model" in {model.id for model in byo.models.list()}


TASK_CALL = [
    {"role": "user", "content": "review this"},
    {
        "role": "assistant",
        "content": [
            {
                "type": "tool_use",
                "id": "toolu_01",
                "name": "Task",
                "input": {"description": "look", "prompt": "go", "subagent_type": "general-purpose", "model": "haiku"},
            }
        ],
    },
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "done"}]},
]


def test_a_tool_call_sent_back_is_not_taken_for_a_model_choice(gateway, fake_provider):
    # Claude Code's Task tool takes `"model": "haiku"`: every turn after one such call carries it.
    key = mint(ISSUER, "app", models=["claude-*"])[0]
    client = anthropic.Anthropic(base_url=gateway.url + "/anthropic", api_key=key, max_retries=0)
    message = client.messages.create(model="claude-fake", max_tokens=10, messages=TASK_CALL)
    assert message.content
    assert [request.json()["model"] for request in fake_provider.requests] == ["claude-fake"]
    # The model the request does choose is still the key's to allow.
    with pytest.raises(anthropic.PermissionDeniedError) as raised:
        client.messages.create(model="haiku", max_tokens=10, messages=TASK_CALL)
    assert raised.value.body["error"]["code"] == "model_not_permitted"
    assert len(fake_provider.requests) == 1


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        # The provider's parser takes the parameter named boundary (B); A is the tail of another.
        (
            "multipart/form-data; xboundary=A; boundary=B",
            b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-transcribe\r\n'
            b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            b'--A\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--A--\r\n\r\n--B--\r\n',
        ),
        # A folded Content-Disposition line (Werkzeug unfolds it and reads `model`).
        (
            "multipart/form-data; boundary=B",
            b'--B\r\nContent-Disposition: form-data;\r\n name="model"\r\n\r\ngpt-4o-transcribe\r\n--B--\r\n',
        ),
    ],
    ids=["decoy-boundary", "folded-head"],
)
def test_a_form_is_read_as_the_providers_parser_reads_it(gateway, fake_provider, content_type, body):
    key = mint(ISSUER, "app", models=["whisper-1"])[0]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": content_type}
    with RawClient(gateway.port) as raw:
        raw.send(request_bytes("POST", "/openai/v1/audio/transcriptions", headers, body))
        response = raw.read_response("POST")
    assert (response.status, response.error_code) == (403, "model_not_permitted"), response.body
    assert fake_provider.requests == []


def test_one_model_is_answered_as_the_list_has_it(gateway, fake_provider):
    # GET /v1/models/{id} is the list's own entry for the key, or 404: never OpenAI's answer for a
    # model egress lists from another provider, nor one the key may not use.
    key = mint(ISSUER, "app", models=["gpt-fake", "claude-*"])[0]
    sdk = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    listed = {model.id: model for model in sdk.models.list()}
    for model_id in ("claude-fake", "gpt-fake"):
        assert sdk.models.retrieve(model_id) == listed[model_id]
    for model_id in ("gpt-other", "no-such-model"):
        with pytest.raises(openai.NotFoundError) as raised:
            sdk.models.retrieve(model_id)
        assert raised.value.code == "model_not_found"
    assert fake_provider.requests == []


def test_the_model_list_is_only_read(gateway, fake_provider):
    key = mint(ISSUER, "app")[0]
    with RawClient(gateway.port) as raw:
        raw.send(request_bytes("POST", "/v1/models", {"Authorization": f"Bearer {key}"}, b"{}"))
        response = raw.read_response("POST")
    assert (response.status, response.error_code) == (405, "method_not_allowed")
    assert fake_provider.requests == []


def test_a_surface_path_s_other_methods_go_where_the_drop_in_sends_them(gateway, fake_provider):
    # Only a POST is routed by its body's model; GET /v1/chat/completions (OpenAI's stored
    # completions, the SDK's chat.completions.list()) goes to the openai row with its pool key.
    key = mint(ISSUER, "app")[0]
    with RawClient(gateway.port) as raw:
        raw.send(request_bytes("GET", "/v1/chat/completions?limit=2", {"Authorization": f"Bearer {key}"}))
        response = raw.read_response()
    assert response.status == 404 and b"Unknown path /v1/chat/completions" in response.body  # the fake's own
    (sent,) = fake_provider.requests
    assert (sent.method, sent.target) == ("GET", "/v1/chat/completions?limit=2")
    assert sent.header("authorization") == f"Bearer {OPENAI_POOL}"


@pytest.mark.parametrize(
    ("method", "target", "allowed"),
    [
        ("DELETE", "/v1/models/ft:gpt-other:org::abc123", False),  # a fine-tuned model the key may not touch
        ("DELETE", "/openai/v1/models/ft%3Agpt-other%3Aorg%3A%3Aabc123", False),  # the passthrough, encoded
        ("GET", "/openai/v1/models/gpt-other", False),
        ("DELETE", "/v1/models/ft:gpt-fake:org::abc123", True),
    ],
)
def test_a_model_a_path_names_is_under_the_policy(gateway, fake_provider, method, target, allowed):
    key = mint(ISSUER, "app", models=["gpt-fake", "ft:gpt-fake:*"])[0]
    with RawClient(gateway.port) as raw:
        raw.send(request_bytes(method, target, {"Authorization": f"Bearer {key}"}))
        response = raw.read_response()
    if allowed:
        assert len(fake_provider.requests) == 1 and fake_provider.requests[0].method == method
    else:
        assert (response.status, response.error_code) == (403, "model_not_permitted"), response.body
        assert fake_provider.requests == []


def test_a_second_content_type_is_refused_under_a_policy(gateway, fake_provider):
    # The policy would read the form with the first boundary; the provider's parser may take the
    # last (gunicorn does) and find a model the policy never saw.
    key = mint(ISSUER, "app", models=["whisper-1"])[0]
    body = (
        b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-4o-transcribe\r\n--B--\r\n'
        b'--A\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--A--\r\n'
    )
    head = (
        f"POST /openai/v1/audio/transcriptions HTTP/1.1\r\nHost: egress\r\nAuthorization: Bearer {key}\r\n"
        "Content-Type: multipart/form-data; boundary=A\r\nContent-Type: multipart/form-data; boundary=B\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    with RawClient(gateway.port) as raw:
        raw.send(head.encode() + body)
        response = raw.read_response("POST")
    assert (response.status, response.error_code) == (403, "model_not_permitted"), response.body
    assert fake_provider.requests == []

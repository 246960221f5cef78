"""Fallbacks of a model route, through the real process and the OpenAI SDK: once the route's own
accounts are exhausted the request goes to the next fallback that can serve it, translated when its
dialect differs, within one attempt budget; never for a BYO key, never to a model the caller's key
may not use, never to a model that lacks what the request needs."""

from __future__ import annotations

from pathlib import Path

import openai
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.vkeys import mint, public_key_text
from tests.support import RawClient, request_bytes, samples, value

ISSUER = Ed25519PrivateKey.generate()
OPENAI_POOL = "sk-pool-fallback-openai-0123"
ANTHROPIC_POOL = "sk-ant-pool-fallback-0123456"
MESSAGES = [{"role": "user", "content": "Say hi"}]

ROUTES = """
[[routes]]
match = "claude-fake"
provider = "anthropic"
fallbacks = ["openai:gpt-fake"]

[[routes]]
match = "claude-picky"
provider = "anthropic"
fallbacks = [{ model = "openai:gpt-json", serves = ["json_mode"] }, "openai:gpt-fake"]

[[routes]]
match = "gpt-fake"
provider = "openai"
fallbacks = ["anthropic:claude-fake"]

[[routes]]
match = "gpt-chain"
provider = "openai"
fallbacks = ["openai:gpt-fake", "anthropic:claude-fake"]
"""


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
models = ["gpt-fake"]

[providers.anthropic]
base_url = "{fake_provider.base_url}"
pool_keys = ["file:{tmp_path / "anthropic.key"}"]
models = ["claude-fake"]

[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]
{ROUTES}
"""
    return start_egress(config)


def sdk(egress, key: str | None = None, models: list[str] | None = None) -> openai.OpenAI:
    key = key or mint(ISSUER, "fallback-app", models=models)[0]
    return openai.OpenAI(base_url=egress.url + "/v1", api_key=key, max_retries=0)


def overloaded(model: str, retry_after: str | None = None) -> dict:
    headers = {"x-fake-overloaded-model": model}
    if retry_after:
        headers["x-fake-retry-after"] = retry_after
    return headers


def upstream_calls(fake_provider) -> list[tuple[str, str, str]]:
    """(API, model, credential) of each request the provider saw, in order."""
    calls = []
    for request in fake_provider.requests:
        api = "messages" if request.target.endswith("/messages") else "chat"
        credential = request.header("x-api-key") or (request.header("authorization") or "").removeprefix("Bearer ")
        calls.append((api, request.json().get("model"), credential))
    return calls


def test_an_overloaded_claude_falls_back_to_openai_with_no_error_for_the_caller(gateway, fake_provider):
    raw = sdk(gateway).chat.completions.with_raw_response.create(
        model="claude-fake", messages=MESSAGES, extra_headers=overloaded("claude-fake")
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.model == "gpt-fake"  # which model answered is never hidden
    assert raw.headers["x-egress-attempts"] == "2"
    assert upstream_calls(fake_provider) == [
        ("messages", "claude-fake", ANTHROPIC_POOL),
        ("chat", "gpt-fake", OPENAI_POOL),  # the fallback provider's own pool key
    ]
    # The Anthropic-only headers of the translation did not follow the request to OpenAI.
    assert fake_provider.requests[1].header("anthropic-version") is None
    found = samples(gateway.admin_port)
    assert value(found, "egress_fallbacks_total", provider="anthropic", fallback="openai") == 1


def test_an_overloaded_openai_model_falls_back_to_claude_translated_and_streamed(gateway, fake_provider):
    stream = sdk(gateway).chat.completions.create(
        model="gpt-fake",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=overloaded("gpt-fake"),
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert {chunk.model for chunk in chunks} == {"claude-fake"}
    assert upstream_calls(fake_provider) == [
        ("chat", "gpt-fake", OPENAI_POOL),
        ("messages", "claude-fake", ANTHROPIC_POOL),
    ]
    anthropic_body = fake_provider.requests[1].json()
    assert anthropic_body["stream"] is True
    assert anthropic_body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}]


def test_a_fallback_that_lacks_what_the_request_needs_is_skipped(gateway, fake_provider):
    # claude-picky's first fallback serves JSON mode only: a request with tools skips it.
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
    client = sdk(gateway)
    headers = overloaded("claude-picky", retry_after="30")  # the account then cools for 30 s
    completion = client.chat.completions.create(
        model="claude-picky", messages=MESSAGES, tools=tools, extra_headers=headers
    )
    assert completion.model == "gpt-fake"
    assert [call[:2] for call in upstream_calls(fake_provider)] == [("messages", "claude-picky"), ("chat", "gpt-fake")]
    # A JSON-mode request may use the first one (Anthropic's account is cooling now: not asked).
    fake_provider.requests.clear()
    completion = client.chat.completions.create(
        model="claude-picky", messages=MESSAGES, response_format={"type": "json_object"}
    )
    assert completion.model == "gpt-json"
    assert [call[:2] for call in upstream_calls(fake_provider)] == [("chat", "gpt-json")]


def test_when_no_fallback_can_serve_the_providers_own_answer_goes_back(gateway, fake_provider):
    client = sdk(gateway, models=["claude-*", "gpt-json"])  # gpt-fake is not this key's to use
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(
            model="claude-picky", messages=MESSAGES, tools=tools, extra_headers=overloaded("claude-picky")
        )
    assert raised.value.status_code == 529
    assert raised.value.code == "overloaded_error"  # Anthropic's error, in the OpenAI shape
    assert raised.value.response.headers["x-egress-attempts"] == "1"
    assert [call[0] for call in upstream_calls(fake_provider)] == ["messages"]


def test_the_callers_model_list_bounds_the_fallbacks(gateway, fake_provider):
    client = sdk(gateway, models=["claude-*"])  # may use Claude models only
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="claude-fake", messages=MESSAGES, extra_headers=overloaded("claude-fake"))
    assert raised.value.status_code == 529
    assert [call[0] for call in upstream_calls(fake_provider)] == ["messages"]
    assert raised.value.response.headers["x-egress-attempts"] == "1"


def test_a_byo_key_never_falls_back(gateway, fake_provider):
    client = sdk(gateway, key="sk-ant-byo-caller-0123456789")
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model="claude-fake", messages=MESSAGES, extra_headers=overloaded("claude-fake"))
    assert raised.value.status_code == 529
    assert upstream_calls(fake_provider) == [("messages", "claude-fake", "sk-ant-byo-caller-0123456789")]


def test_a_provider_with_every_account_cooling_falls_back_before_sending(gateway, fake_provider):
    client = sdk(gateway)
    # The first request's 529 carries a 30 s hint: the only Anthropic account cools for 30 s.
    client.chat.completions.create(
        model="claude-fake", messages=MESSAGES, extra_headers=overloaded("claude-fake", retry_after="30")
    )
    fake_provider.requests.clear()
    raw = client.chat.completions.with_raw_response.create(model="claude-fake", messages=MESSAGES)
    assert raw.parse().model == "gpt-fake"
    assert raw.headers["x-egress-attempts"] == "1"  # Anthropic was not asked at all
    assert upstream_calls(fake_provider) == [("chat", "gpt-fake", OPENAI_POOL)]


@pytest.mark.parametrize("max_attempts", [2, 3])
def test_one_attempt_budget_covers_accounts_and_fallbacks(start_egress, fake_provider, ca_file, tmp_path, max_attempts):
    (tmp_path / "openai.keys").write_text(OPENAI_POOL + "\n" + OPENAI_POOL + "-second\n")  # two accounts
    (tmp_path / "anthropic.key").write_text(ANTHROPIC_POOL + "\n")
    config = f"""
[upstream]
ca_file = "{ca_file}"

[accounts]
max_attempts = {max_attempts}

[providers.openai]
base_url = "{fake_provider.base_url}"
pool_keys = ["file:{tmp_path / "openai.keys"}"]

[providers.anthropic]
base_url = "{fake_provider.base_url}"
pool_keys = ["file:{tmp_path / "anthropic.key"}"]

[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]
{ROUTES}
"""
    egress = start_egress(config)
    body = orjson.dumps({"model": "gpt-chain", "messages": MESSAGES})
    headers = {
        "Authorization": f"Bearer {mint(ISSUER, 'budget')[0]}",
        "x-fake-overloaded-model": "gpt-chain, claude-fake",
        "Content-Type": "application/json",
    }
    with RawClient(egress.port) as client:
        client.send(request_bytes("POST", "/v1/chat/completions", headers, body))
        response = client.read_response("POST")
    calls = [call[:2] for call in upstream_calls(fake_provider)]
    # gpt-chain on each OpenAI account (503), then the first fallback that has an account free:
    # gpt-fake's provider is cooling, so claude-fake (529). One budget across all of it.
    expected = [("chat", "gpt-chain"), ("chat", "gpt-chain"), ("messages", "claude-fake")]
    assert calls == expected[:max_attempts]
    assert response.headers["x-egress-attempts"] == str(max_attempts)
    # The last answer goes back as the provider gave it (translated to the caller's dialect).
    assert response.status == (503 if max_attempts == 2 else 529)
    assert orjson.loads(response.body)["error"]["code"] == (None if max_attempts == 2 else "overloaded_error")


def test_fallbacks_are_checked_when_the_config_loads(tmp_path):
    from egress.config import ConfigError, load_config

    path = tmp_path / "egress.toml"
    path.write_text('[[routes]]\nmatch = "claude-*"\nprovider = "anthropic"\nfallbacks = ["nowhere:model"]\n')
    with pytest.raises(ConfigError, match=r"routes\[0\]\.fallbacks\[0\]"):
        load_config(path)
    path.write_text(
        '[[routes]]\nmatch = "claude-*"\nprovider = "anthropic"\n'
        'fallbacks = [{ model = "openai:gpt-4.1-mini", serves = ["telepathy"] }]\n'
    )
    with pytest.raises(ConfigError, match="telepathy"):
        load_config(path)


@pytest.mark.parametrize(
    ("document", "needed"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, set()),
        ({"messages": [], "tools": [{"type": "function"}]}, {"tools"}),
        ({"messages": [], "response_format": {"type": "json_schema"}}, {"json_mode"}),
        ({"messages": [], "response_format": {"type": "text"}}, set()),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, {"images"}),
        # The Responses API's shapes: text.format, and image parts among its input items.
        ({"input": "hi", "text": {"format": {"type": "json_object"}}}, {"json_mode"}),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, {"images"}),
        ({"input": [{"type": "function_call_output", "output": "x"}], "tools": [{}]}, {"tools"}),
    ],
)
def test_what_a_request_needs_of_a_fallback(document, needed):
    from egress.routes import needs

    assert needs(document) == needed


def test_a_fallback_drops_what_its_own_route_says_it_may(start_egress, fake_provider, ca_file, tmp_path):
    # gpt-fake's route keeps every parameter; claude-fake's drops what Anthropic can't honour (seed).
    # Falling back to it, its own route decides: seed is dropped, and the caller answered.
    (tmp_path / "openai.key").write_text(OPENAI_POOL + "\n")
    (tmp_path / "anthropic.key").write_text(ANTHROPIC_POOL + "\n")
    egress = start_egress(
        f"""
[upstream]
ca_file = "{ca_file}"

[providers.openai]
base_url = "{fake_provider.base_url}"
pool_keys = ["file:{tmp_path / "openai.key"}"]

[providers.anthropic]
base_url = "{fake_provider.base_url}"
pool_keys = ["file:{tmp_path / "anthropic.key"}"]

[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]

[[routes]]
match = "claude-fake"
provider = "anthropic"
drop_params = true

[[routes]]
match = "gpt-fake"
provider = "openai"
fallbacks = ["claude-fake"]
"""
    )
    raw = sdk(egress).chat.completions.with_raw_response.create(
        model="gpt-fake", messages=MESSAGES, seed=7, extra_headers=overloaded("gpt-fake")
    )
    assert raw.parse().model == "claude-fake"
    assert [call[:2] for call in upstream_calls(fake_provider)] == [("chat", "gpt-fake"), ("messages", "claude-fake")]
    assert "seed" not in fake_provider.requests[1].json()

"""The unified surface through the real process: one base URL, any model, the OpenAI SDK unchanged."""

from __future__ import annotations

from pathlib import Path

import openai
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.vkeys import mint, public_key_text
from tests.support import RawClient, request_bytes, wait_until

ISSUER = Ed25519PrivateKey.generate()
POOL = "sk-pool-surface-0123456789"

ROUTES = """
[[routes]]
match = "claude-*"
provider = "anthropic"

[[routes]]
match = "gpt-*"
provider = "openai"
"""


@pytest.fixture
def surface(start_egress, fake_provider, ca_file, tmp_path: Path):
    pool = tmp_path / "pool.keys"
    pool.write_text(POOL + "\n")
    usage_file = tmp_path / "usage.jsonl"
    config = f"""
[upstream]
ca_file = "{ca_file}"

[providers.openai]
base_url = "{fake_provider.base_url}"
pool_keys = ["file:{pool}"]
models = ["gpt-fake", "gpt-denied", "gpt-4o"]
deny_models = ["gpt-denied"]

[providers.anthropic]
base_url = "{fake_provider.base_url}"
pool_keys = ["file:{pool}"]
models = ["claude-fake"]

[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]

[usage]
jsonl = "{usage_file}"
{ROUTES}
"""
    egress = start_egress(config)
    egress.usage_file = usage_file
    return egress


def client(egress, key: str = "sk-byo-surface") -> openai.OpenAI:
    return openai.OpenAI(base_url=egress.url + "/v1", api_key=key, max_retries=0)


def facts(egress, count: int) -> list[dict]:
    def read():
        if not egress.usage_file.exists():
            return []
        return [orjson.loads(line) for line in egress.usage_file.read_bytes().splitlines()]

    assert wait_until(lambda: len(read()) >= count, timeout=3)
    return read()


def test_a_gpt_model_is_routed_to_openai_and_the_model_stays_the_callers(surface, fake_provider):
    completion = client(surface).chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content
    seen = fake_provider.requests[-1]
    assert seen.target == "/v1/chat/completions" and orjson.loads(seen.body)["model"] == "gpt-fake"
    assert seen.header("authorization") == "Bearer sk-byo-surface"
    fact = facts(surface, 1)[0]
    assert (fact["surface"], fact["provider"], fact["requested_model"]) == ("chat", "openai", "gpt-fake")


def test_provider_colon_model_sends_the_providers_own_name(surface, fake_provider):
    client(surface).chat.completions.create(model="openai:gpt-fake", messages=[{"role": "user", "content": "hi"}])
    assert orjson.loads(fake_provider.requests[-1].body)["model"] == "gpt-fake"


def test_errors_of_the_surface(surface, fake_provider):
    sdk = client(surface)
    cases = [
        ({"messages": []}, 400, "model_required"),
        ({"model": "llama-3", "messages": []}, 404, "model_not_found"),
        ({"model": "gpt-denied", "messages": []}, 403, "model_not_permitted"),
        ({"model": "openai:gpt-denied", "messages": []}, 403, "model_not_permitted"),
    ]
    for body, status, code in cases:
        with pytest.raises(openai.APIStatusError) as raised:
            sdk.post("/chat/completions", body=body, cast_to=object)
        assert (raised.value.status_code, raised.value.code) == (status, code), body
    with RawClient(surface.port) as raw:
        raw.send(request_bytes("POST", "/v1/chat/completions", {"Content-Type": "application/json"}, b"{not json"))
        response = raw.read_response("POST")
        assert (response.status, response.error_code) == (400, "invalid_request")
        assert raw.keeps_alive()
    assert fake_provider.requests == []


def test_a_denied_model_is_refused_on_the_passthrough_too(surface, fake_provider):
    passthrough = openai.OpenAI(base_url=surface.url + "/openai/v1", api_key="sk-byo", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as raised:
        passthrough.chat.completions.create(model="gpt-denied", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.code == "model_not_permitted"
    passthrough.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    assert len(fake_provider.requests) == 1


def test_models_lists_what_the_call_path_serves(surface, fake_provider):
    listed = sorted(model.id for model in client(surface).models.list())
    assert listed == ["claude-fake", "gpt-4o", "gpt-fake"]  # gpt-denied is denied, so never listed
    key, _ = mint(ISSUER, "narrow", models=["gpt-4o*"])
    assert [model.id for model in client(surface, key).models.list()] == ["gpt-4o"]
    # The key's list is enforced on the call path as it is in the listing, on every path.
    with pytest.raises(openai.PermissionDeniedError):
        client(surface, key).chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "x"}])
    passthrough = openai.OpenAI(base_url=surface.url + "/openai/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        passthrough.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "x"}])
    assert fake_provider.requests == []  # the list was egress's own answer, never the provider's
    with RawClient(surface.port) as raw:
        raw.send(request_bytes("GET", "/v1/models", credential=False))
        response = raw.read_response()
    assert (response.status, response.error_code) == (401, "missing_key")

"""The @anthropic-ai/sdk npm package (tests/node/anthropic.mjs) through egress's passthrough, as a
Node app would call it: a virtual key swapped for the pool key, the SDK's stream helper assembling
the relayed events into its final Message, the usage facts carrying the provider's numbers, and a
refusal of egress's own naming its request id where the SDK reads it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.vkeys import mint, public_key_text
from tests.conftest import virtual_key_config
from tests.support import run_node_script
from tests.test_facts import facts_of

pytestmark = pytest.mark.timeout(60)

NODE_DIR = Path(__file__).parent / "node"
SCRIPT = NODE_DIR / "anthropic.mjs"
ISSUER = Ed25519PrivateKey.generate()
POOL_KEY = "sk-pool-test-0123456789"  # virtual_key_config's
TEXT = "Hello from the fake provider."  # tests/fake_provider.py's answer


def run_node(egress, scenario: str, key: str) -> dict:
    env = {name: value for name, value in os.environ.items() if not name.startswith("ANTHROPIC_")}
    env["EGRESS_API_KEY"] = key
    return run_node_script(SCRIPT, [egress.url + "/anthropic", scenario], env)


@pytest.fixture
def keyed(start_egress, fake_provider, ca_file, tmp_path):
    usage_file = tmp_path / "usage.jsonl"
    issuer = public_key_text(ISSUER.public_key())
    config = virtual_key_config(fake_provider, ca_file, tmp_path, issuer, extra=f'[usage]\njsonl = "{usage_file}"\n')
    egress = start_egress(config)
    egress.usage_file = usage_file
    return egress


def test_the_anthropic_npm_sdk_streams_and_creates_through_a_virtual_key(keyed, fake_provider):
    key, claims = mint(ISSUER, "node-app")
    streamed = run_node(keyed, "stream-final", key)
    created = run_node(keyed, "create", key)
    stream_request, create_request = fake_provider.requests
    # The pool key went upstream, never the virtual key.
    assert stream_request.header("x-api-key") == create_request.header("x-api-key") == POOL_KEY
    assert key not in keyed.logs()
    # The SDK assembled the relayed events into the provider's Message.
    message = streamed["message"]
    assert "".join(streamed["deltas"]) == message["content"][0]["text"] == TEXT
    assert (message["stop_reason"], message["usage"]["output_tokens"]) == ("end_turn", 6)
    assert created["message"]["content"][0]["text"] == TEXT and created["message"]["usage"]["output_tokens"] == 7
    # The provider's own id, where the SDK reads it (`request-id`).
    assert streamed["requestID"] == stream_request.response_id
    assert created["requestID"] == create_request.response_id
    facts = facts_of(keyed, 2)
    assert [(f["kid"], f["subject"], f["stream"], f["usage"]) for f in facts] == [
        (claims.kid, "node-app", True, "complete"),
        (claims.kid, "node-app", False, "complete"),
    ]
    for fact, seen, request in zip(facts, (message, created["message"]), fake_provider.requests, strict=True):
        assert fact["output_tokens"] == seen["usage"]["output_tokens"]
        assert fact["input_tokens"] == seen["usage"]["input_tokens"]
        assert fact["upstream_request_id"] == request.response_id


def test_a_refusal_reaches_the_anthropic_npm_sdk_with_its_request_id(keyed, fake_provider):
    refused = run_node(keyed, "stream-error", "bai_not-a-real-key")["error"]
    assert (refused["class"], refused["status"]) == ("AuthenticationError", 401)
    assert refused["requestID"] and f'"request_id":"{refused["requestID"]}"' in keyed.logs()
    assert fake_provider.requests == []  # refused before the provider

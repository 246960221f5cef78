"""Route resolution: the provider is the first segment, the rest goes upstream verbatim."""

from __future__ import annotations

import pytest

from egress.errors import EgressError
from egress.providers import BUILTIN_PROVIDERS, Provider, Router, guess_dialect

ROUTER = Router({**BUILTIN_PROVIDERS, "vllm": Provider("vllm", "http://127.0.0.1:8000/base/")})

ROUTES = [
    # target, provider, upstream target
    (b"/openai/v1/chat/completions", "openai", b"/v1/chat/completions"),
    (b"/groq/openai/v1/chat/completions", "groq", b"/openai/v1/chat/completions"),
    (b"/openrouter/api/v1/models?x=1&y=%2F", "openrouter", b"/api/v1/models?x=1&y=%2F"),
    (b"/fireworks/inference/v1/embeddings", "fireworks", b"/inference/v1/embeddings"),
    (b"/anthropic/v1/messages?beta=true", "anthropic", b"/v1/messages?beta=true"),
    (b"/openai", "openai", b"/"),
    (b"/openai?x=1", "openai", b"/?x=1"),
    (b"/openai/v1/files/file-abc%20def/content", "openai", b"/v1/files/file-abc%20def/content"),
    (b"/openai//v1/x", "openai", b"//v1/x"),  # verbatim: no normalisation
    (b"/openai/v1/a.b/..x/...?q=/../", "openai", b"/v1/a.b/..x/...?q=/../"),  # dots that are no segment
    (b"/vllm/v1/completions", "vllm", b"/base/v1/completions"),
    # drop-in default
    (b"/v1/chat/completions", "openai", b"/v1/chat/completions"),
    (b"/v1/messages", "anthropic", b"/v1/messages"),
    (b"/v1/messages/count_tokens", "anthropic", b"/v1/messages/count_tokens"),
    (b"/v1/messages?beta=true", "anthropic", b"/v1/messages?beta=true"),
    (b"/v1/messagesx", "openai", b"/v1/messagesx"),
    (b"/v1/models", "openai", b"/v1/models"),
]


@pytest.mark.parametrize(("target", "provider", "upstream"), ROUTES)
def test_routes(target, provider, upstream):
    route = ROUTER.resolve(target)
    assert route.provider.name == provider
    assert route.upstream_target == upstream


@pytest.mark.parametrize("target", [b"/unknown/v1/x", b"/OpenAI/v1/x", b"/", b"/healthzz", b"//openai/v1"])
def test_unknown_provider(target):
    with pytest.raises(EgressError) as raised:
        ROUTER.resolve(target)
    assert raised.value.code == "unknown_provider"
    assert "openai" in raised.value.message and "xai" in raised.value.message


@pytest.mark.parametrize(
    "target",
    [b"/vllm/../admin", b"/vllm/v1/../../admin", b"/vllm/%2e%2e/admin", b"/vllm/%2E./x", b"/openai/./v1", b"/x/.."],
)
def test_dot_segments_are_refused(target):
    # Relayed verbatim under a base path, `..` would leave it at any upstream that resolves it.
    with pytest.raises(EgressError) as raised:
        ROUTER.resolve(target)
    assert raised.value.code == "bad_request" and "'..'" in raised.value.message


@pytest.mark.parametrize(
    ("target", "says"),
    [
        (b"/vllm/..%2fadmin", "encoded slash"),  # nginx decodes %2F, then resolves the dots
        (b"/vllm/%2e%2e%2Fadmin", "encoded slash"),
        (b"/vllm/..\\admin", "backslash"),  # WHATWG URL parsers (node) read \\ as /
        (b"/vllm/%2e%2e%5cadmin", "backslash"),
        (b"/vllm/..;/admin", "'..'"),  # a path parameter: Tomcat's reading of ..
        (b"/vllm/v1/x#frag", "fragment"),
        (b"/vllm/v1/x?y#frag", "fragment"),
    ],
)
def test_slashes_egress_cannot_see_and_fragments_are_refused(target, says):
    with pytest.raises(EgressError) as raised:
        ROUTER.resolve(target)
    assert raised.value.code == "bad_request" and says in raised.value.message


def test_target_must_be_origin_form():
    with pytest.raises(EgressError) as raised:
        ROUTER.resolve(b"http://evil.test/openai/v1")
    assert raised.value.code == "bad_request"


def test_ten_builtin_providers_with_their_hosts():
    hosts = {name: row.origin.host for name, row in BUILTIN_PROVIDERS.items()}
    assert hosts == {
        "openai": "api.openai.com",
        "anthropic": "api.anthropic.com",
        "openrouter": "openrouter.ai",
        "fireworks": "api.fireworks.ai",
        "groq": "api.groq.com",
        "deepseek": "api.deepseek.com",
        "together": "api.together.xyz",
        "cerebras": "api.cerebras.ai",
        "mistral": "api.mistral.ai",
        "xai": "api.x.ai",
    }
    assert all(row.origin.tls and row.origin.port == 443 for row in BUILTIN_PROVIDERS.values())
    assert BUILTIN_PROVIDERS["anthropic"].auth == "x-api-key"
    assert BUILTIN_PROVIDERS["anthropic"].dialect == "anthropic"


def test_origin_host_header_carries_non_default_port():
    assert Provider("a", "https://h.test").origin.host_header == b"h.test"
    assert Provider("a", "https://h.test:8443").origin.host_header == b"h.test:8443"
    assert Provider("a", "http://[::1]:8000").origin.host_header == b"[::1]:8000"
    assert Provider("a", "http://[::1]:8000").origin.host == "::1"


def test_guess_dialect():
    assert guess_dialect(b"/nope/v1/messages", False) == "openai"
    assert guess_dialect(b"/v1/messages", False) == "anthropic"
    assert guess_dialect(b"/nope/x", True) == "anthropic"
    assert guess_dialect(b"/nope/x", False) == "openai"

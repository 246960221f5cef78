"""A caller's own provider key (BYO) reaches only the provider it belongs to (auth.py, providers.KeyFormats).

Sans-IO: the ownership rule over the built-in rows, its config field, the query's credentials and the
doctor check. Through the real `egress serve`: the unified surface and passthrough refuse a key of
another provider before a byte goes upstream, and `allow_byo = false` refuses a caller's key in any
credential header egress knows.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from egress.config import ConfigError, load_config
from egress.doctor import check_cleartext_pool_keys, diagnose
from egress.providers import BUILTIN_PROVIDERS, KeyFormats, query_credentials
from tests.support import RawClient, ScriptedUpstream, request_bytes

FORMATS = KeyFormats(BUILTIN_PROVIDERS.values())
OPENAI_KEY = "sk-proj-SECRETopenaiPROJECTkey0123456789"
ANTHROPIC_KEY = "sk-ant-api03-SECRETanthropicKEY0123456789"
LEGACY_KEY = "sk-SECRETlegacyOrDeepseek0123456789"  # OpenAI's legacy form and DeepSeek's alike
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
MESSAGE = orjson.dumps(
    {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
)
ANTHROPIC_OK = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(MESSAGE) + MESSAGE
)

# (key, routed to, whose key it is when not that provider's: () when it may go)
OWNERSHIP = [
    (OPENAI_KEY, "openai", ()),
    (OPENAI_KEY, "anthropic", ("openai",)),
    (OPENAI_KEY, "deepseek", ("openai",)),  # sk-proj- is more specific than DeepSeek's sk-
    ("sk-svcacct-x", "deepseek", ("openai",)),
    ("sk-admin-x", "groq", ("openai",)),
    (ANTHROPIC_KEY, "anthropic", ()),
    (ANTHROPIC_KEY, "openai", ("anthropic",)),  # sk-ant- beats OpenAI's own sk-
    (ANTHROPIC_KEY, "deepseek", ("anthropic",)),
    (LEGACY_KEY, "openai", ()),  # ambiguous between OpenAI and DeepSeek: both take it
    (LEGACY_KEY, "deepseek", ()),
    (LEGACY_KEY, "anthropic", ("deepseek", "openai")),
    ("sk-an", "anthropic", ("deepseek", "openai")),  # not sk-ant-: a plain sk- key
    ("sk-or-v1-abc", "openrouter", ()),
    ("sk-or-v1-abc", "openai", ("openrouter",)),
    ("gsk_abc", "groq", ()),
    ("gsk_abc", "openai", ("groq",)),
    ("gsk-abc", "openai", ()),  # no one's prefix
    ("xai-abc", "xai", ()),
    ("xai-abc", "anthropic", ("xai",)),
    ("csk-abc", "cerebras", ()),
    ("csk_abc", "openai", ("cerebras",)),
    ("fw_abc", "fireworks", ()),
    ("fw_abc", "groq", ("fireworks",)),
    ("0123456789abcdef", "anthropic", ()),  # a key of no known form: not refused on a guess
    (ANTHROPIC_KEY, "mistral", ()),  # a provider with no documented form takes any key
    (OPENAI_KEY, "together", ()),
]


@pytest.mark.parametrize(("key", "provider", "owners"), OWNERSHIP)
def test_a_key_belongs_to_the_provider_with_the_longest_matching_prefix(key, provider, owners):
    assert FORMATS.foreign_owners(key.encode(), BUILTIN_PROVIDERS[provider]) == owners


def test_every_built_in_prefix_is_its_own_providers_and_no_one_elses_more_specific():
    for row in BUILTIN_PROVIDERS.values():
        for prefix in row.key_prefixes:
            assert FORMATS.foreign_owners(prefix.encode() + b"x", row) == (), (row.name, prefix)


def _config(tmp_path: Path, text: str):
    path = tmp_path / "egress.toml"
    path.write_text(text)
    return load_config(str(path))


def test_key_prefixes_are_inherited_by_a_built_in_row_and_can_be_cleared_or_declared(tmp_path):
    config = _config(
        tmp_path,
        """
[providers.anthropic]
base_url = "http://127.0.0.1:9"

[providers.openai]
base_url = "http://127.0.0.1:9"
key_prefixes = []

[providers.local]
base_url = "http://127.0.0.1:9"

[providers.internal]
base_url = "http://127.0.0.1:9"
key_prefixes = ["int_"]
""",
    )
    providers = config.providers
    assert providers["anthropic"].key_prefixes == ("sk-ant-",)
    assert providers["openai"].key_prefixes == ()
    assert providers["local"].key_prefixes == ()
    formats = KeyFormats(providers.values())
    # The openai row takes any key now; its prefixes no longer make a key OpenAI's elsewhere.
    assert formats.foreign_owners(ANTHROPIC_KEY.encode(), providers["openai"]) == ()
    assert formats.foreign_owners(OPENAI_KEY.encode(), providers["deepseek"]) == ()
    assert formats.foreign_owners(b"int_abc", providers["anthropic"]) == ("internal",)
    assert formats.foreign_owners(ANTHROPIC_KEY.encode(), providers["internal"]) == ("anthropic",)


@pytest.mark.parametrize("value", ['[""]', '["sk ant"]', '"sk-"', "[1]"])
def test_a_malformed_key_prefix_is_a_config_error_naming_the_field(tmp_path, value):
    with pytest.raises(ConfigError, match=r"providers\.anthropic\.key_prefixes"):
        _config(tmp_path, f"[providers.anthropic]\nkey_prefixes = {value}\n")


def test_the_query_credentials_are_found_decoded():
    assert query_credentials(b"/v1/x?alt=sse&key=sk%2Dant-abc&b=") == [b"sk-ant-abc"]
    assert query_credentials(b"/v1/x?%6Bey=gsk_a&key=") == [b"gsk_a", b""]
    assert query_credentials(b"/v1/x?keys=a&monkey=b") == []


# --- the doctor ----------------------------------------------------------------------------------


def test_doctor_warns_when_a_pool_key_goes_over_plain_http_off_loopback(tmp_path):
    keys = tmp_path / "pool.keys"
    keys.write_text("sk-pool-0123456789\n")
    keys.chmod(0o600)
    config = _config(
        tmp_path,
        f"""
[providers.lan]
base_url = "http://10.1.2.3:8000"
pool_keys = ["file:{keys}"]

[providers.local]
base_url = "http://127.0.0.1:8000"
pool_keys = ["file:{keys}"]

[providers.ipv6local]
base_url = "http://[::1]:8000"
pool_keys = ["file:{keys}"]

[providers.open]
base_url = "http://10.1.2.4:8000"
allow_anonymous = true

[providers.openai]
pool_keys = ["file:{keys}"]
""",
    )
    findings = check_cleartext_pool_keys(config)
    assert [(f.level, f.details["provider"]) for f in findings] == [("warn", "lan")]
    assert "10.1.2.3" in findings[0].message and "sk-pool" not in findings[0].message
    everything = diagnose(str(tmp_path / "egress.toml"))
    assert any(f.check == "cleartext_pool_keys" and f.level == "warn" for f in everything)


def test_doctor_is_quiet_when_every_pool_key_goes_over_https_or_loopback(tmp_path):
    keys = tmp_path / "pool.keys"
    keys.write_text("sk-pool-0123456789\n")
    config = _config(tmp_path, f'[providers.openai]\npool_keys = ["file:{keys}"]\n')
    assert [(f.check, f.level) for f in check_cleartext_pool_keys(config)] == [("cleartext_pool_keys", "ok")]


# --- through the real process --------------------------------------------------------------------


@pytest.fixture
def upstreams():
    started: list[ScriptedUpstream] = []

    def start(replies: list) -> ScriptedUpstream:
        upstream = ScriptedUpstream(replies)
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        upstream.stop()


def _send(egress, method: str, target: str, headers: dict[str, str], body: bytes = b"{}"):
    with RawClient(egress.port) as client:
        client.send(request_bytes(method, target, {"content-type": "application/json", **headers}, body, False))
        return client.read_response(method)


def _refused(response, provider: str, *secrets: str) -> None:
    assert response.status == 401, response.body
    assert response.error_code == "byo_key_wrong_provider"
    text = response.body.decode()
    assert f"routed to {provider}" in text
    for secret in secrets:
        assert secret not in text and secret[:12] not in text


CHAT = orjson.dumps({"model": "claude-x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
RESPONSES = orjson.dumps({"model": "claude-x", "input": "hi", "max_output_tokens": 5})


@pytest.mark.parametrize(("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/responses", RESPONSES)])
def test_an_openai_key_asking_for_a_claude_model_is_refused_before_anything_is_sent(
    start_egress, upstreams, path, body
):
    anthropic = upstreams([ANTHROPIC_OK, ANTHROPIC_OK])
    egress = start_egress(f'[providers.anthropic]\nbase_url = "{anthropic.base_url}"\n')
    _refused(_send(egress, "POST", path, {"Authorization": f"Bearer {OPENAI_KEY}"}, body), "anthropic", OPENAI_KEY)
    # A legacy sk- key (OpenAI's or DeepSeek's) is not Anthropic's either.
    _refused(_send(egress, "POST", path, {"Authorization": f"Bearer {LEGACY_KEY}"}, body), "anthropic", LEGACY_KEY)
    assert anthropic.requests == []
    # The caller's Anthropic key goes, moved to Anthropic's scheme.
    answer = _send(egress, "POST", path, {"Authorization": f"Bearer {ANTHROPIC_KEY}"}, body)
    assert answer.status == 200, answer.body
    assert len(anthropic.requests) == 1 and f"x-api-key: {ANTHROPIC_KEY}".encode() in anthropic.requests[0]
    logs = egress.logs()
    assert OPENAI_KEY not in logs and LEGACY_KEY not in logs and ANTHROPIC_KEY not in logs


def test_passthrough_refuses_another_providers_key_in_any_credential_header(start_egress, upstreams):
    upstream = upstreams([OK] * 8)
    url = upstream.base_url
    egress = start_egress(
        f'[providers.openai]\nbase_url = "{url}"\n[providers.anthropic]\nbase_url = "{url}"\n'
        f'[providers.deepseek]\nbase_url = "{url}"\n'
    )
    chat = "/openai/v1/chat/completions"
    _refused(_send(egress, "POST", chat, {"Authorization": f"Bearer {ANTHROPIC_KEY}"}), "openai", ANTHROPIC_KEY)
    _refused(_send(egress, "POST", "/anthropic/v1/messages", {"x-api-key": OPENAI_KEY}), "anthropic", OPENAI_KEY)
    _refused(
        _send(egress, "POST", "/deepseek/v1/chat/completions", {"Authorization": f"Bearer {OPENAI_KEY}"}), "deepseek"
    )
    # The right key in Authorization does not carry another provider's key beside it.
    beside = {"Authorization": f"Bearer {OPENAI_KEY}", "x-goog-api-key": ANTHROPIC_KEY}
    _refused(_send(egress, "POST", chat, beside), "openai", ANTHROPIC_KEY)
    _refused(_send(egress, "POST", chat + "?key=sk-ant-api03-q", {"Authorization": f"Bearer {OPENAI_KEY}"}), "openai")
    assert upstream.requests == []
    # The ambiguous sk- form goes to either provider that takes it; a key of its own provider goes.
    for target in (chat, "/deepseek/v1/chat/completions"):
        assert _send(egress, "POST", target, {"Authorization": f"Bearer {LEGACY_KEY}"}).status == 200
    assert _send(egress, "POST", chat, {"Authorization": f"Bearer {OPENAI_KEY}"}).status == 200
    assert len(upstream.requests) == 3


def test_an_operator_can_let_a_row_take_keys_of_any_form(start_egress, upstreams):
    upstream = upstreams([OK])
    egress = start_egress(f'[providers.anthropic]\nbase_url = "{upstream.base_url}"\nkey_prefixes = []\n')
    assert _send(egress, "POST", "/anthropic/v1/messages", {"x-api-key": LEGACY_KEY}).status == 200
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/local/v1/chat/completions", {"x-goog-api-key": "AIzaSECRETgoogleKEY"}),
        ("/local/v1/chat/completions", {"api-key": "SECRETazureKEY0123"}),
        ("/local/v1/chat/completions?alt=sse&key=AIzaSECRETqueryKEY", {}),
    ],
)
def test_allow_byo_false_refuses_a_callers_key_in_any_credential_header(start_egress, upstreams, target, headers):
    upstream = upstreams([OK])
    egress = start_egress(
        f'[keys]\nallow_byo = false\n[providers.local]\nbase_url = "{upstream.base_url}"\nallow_anonymous = true\n'
    )
    refused = _send(egress, "POST", target, headers)
    assert refused.status == 401 and refused.error_code == "byo_not_allowed", refused.body
    assert b"SECRET" not in refused.body
    assert upstream.requests == []
    # The anonymous provider still takes a request with no key at all.
    assert _send(egress, "POST", "/local/v1/chat/completions", {}).status == 200
    assert len(upstream.requests) == 1


@pytest.mark.parametrize(
    ("target", "headers", "sent"),
    [
        ("/azure/openai/deployments/d/chat/completions", {"api-key": "azureKEY0123"}, b"api-key: azureKEY0123"),
        ("/azure/v1/models", {"x-goog-api-key": "AIzaGoogleKEY0123"}, b"x-goog-api-key: AIzaGoogleKEY0123"),
        ("/azure/v1/models?key=AIzaQueryKEY0123", {}, b"key=AIzaQueryKEY0123"),
    ],
)
def test_a_callers_own_key_in_its_providers_own_header_is_brought(start_egress, upstreams, target, headers, sent):
    # Azure OpenAI reads `api-key`, Gemini `x-goog-api-key` or `?key=`: a caller's key there was a 401
    # missing_key, though egress forwards those headers as they come. It is a BYO key like any other.
    upstream = upstreams([OK])
    egress = start_egress(f'[providers.azure]\nbase_url = "{upstream.base_url}"\n')
    response = _send(egress, "POST", target, headers)
    assert response.status == 200, response.body
    assert len(upstream.requests) == 1 and sent in upstream.requests[0]
    closed_config = f'[keys]\nallow_byo = false\n[providers.azure]\nbase_url = "{upstream.base_url}"\n'
    closed = start_egress(closed_config, name="closed")
    refused = _send(closed, "POST", target, headers)
    assert refused.status == 401 and refused.error_code == "byo_not_allowed", refused.body
    assert len(upstream.requests) == 1

"""Virtual keys against the real process: the provider sees a pool key, never the virtual one."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import anthropic
import openai
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.auth import PoolRotation, wipe_all_pool_keys
from egress.providers import BUILTIN_PROVIDERS
from egress.secrets import Secret
from egress.vkeys import SIGNING_DOMAIN, _b64encode, issuer_id, mint, public_key_text
from tests.conftest import provider_config
from tests.support import RawClient, request_bytes, run_egress_cli, wait_until

ISSUER = Ed25519PrivateKey.generate()
UNTRUSTED = Ed25519PrivateKey.generate()
OPENAI_POOL = ["sk-pool-openai-aaaaaaaaaaaaaaaa", "sk-pool-openai-bbbbbbbbbbbbbbbb"]
ANTHROPIC_POOL = "sk-ant-pool-cccccccccccccccc"


@pytest.fixture
def pool_files(tmp_path: Path) -> dict[str, Path]:
    openai_keys = tmp_path / "openai.keys"
    openai_keys.write_text("# two keys, used in turn\n" + "\n".join(OPENAI_POOL) + "\n")
    anthropic_keys = tmp_path / "anthropic.keys"
    anthropic_keys.write_text(ANTHROPIC_POOL + "\n")
    for path in (openai_keys, anthropic_keys):
        path.chmod(0o600)
    return {"openai": openai_keys, "anthropic": anthropic_keys}


def keyed_config(
    fake, ca_file, pool_files, deny_file: Path | None = None, keys_extra: str = "", server: str = ""
) -> str:
    keys = f'[keys]\ntrusted_issuers = ["{public_key_text(ISSUER.public_key())}"]\n{keys_extra}\n'
    if deny_file is not None:
        keys += f'deny_file = "{deny_file}"\ndeny_poll_interval = 0.2\n'
    config = provider_config(fake, ca_file, server=server, extra=keys, pool_keys=pool_files)
    config += f'\n[providers.groq]\nbase_url = "{fake.base_url}"\n'  # no pool key
    config += f'\n[providers.local-model]\nbase_url = "{fake.base_url}"\nallow_anonymous = true\n'
    return config


@pytest.fixture
def keyed(start_egress, fake_provider, ca_file, pool_files, tmp_path):
    deny_file = tmp_path / "denied-kids"
    egress = start_egress(keyed_config(fake_provider, ca_file, pool_files, deny_file))
    egress.deny_file = deny_file
    return egress


def openai_client(egress, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=egress.url + "/openai/v1", api_key=key, max_retries=0)


def chat(client: openai.OpenAI):
    return client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])


def assert_secrets_absent(egress, *tokens: str) -> None:
    logs = egress.logs()
    for secret in (*OPENAI_POOL, ANTHROPIC_POOL, *tokens):
        assert secret not in logs


def test_openai_sdk_virtual_key_is_swapped_for_pool_keys_in_turn(keyed, fake_provider):
    token, claims = mint(ISSUER, "billing-app", providers=["openai"], ttl_seconds=3600)
    client = openai_client(keyed, token)
    assert chat(client).choices[0].message.content == "Hello from the fake provider."
    stream = client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    seen = [request.header("authorization") for request in fake_provider.requests]
    assert seen == [f"Bearer {OPENAI_POOL[0]}", f"Bearer {OPENAI_POOL[1]}"]
    for request in fake_provider.requests:
        assert token not in str(request.headers) and request.header("x-api-key") is None
    records = [r for r in keyed.access_records() if r["status"] == 200]
    assert {(r["kid"], r["sub"]) for r in records} == {(claims.kid, "billing-app")}
    assert_secrets_absent(keyed, token)


def test_anthropic_sdk_x_api_key_path(keyed, fake_provider):
    token, _ = mint(ISSUER, "support-bot", providers=["anthropic"])
    # The SDK's own x-api-key header, as older SDKs and most tools send it.
    client = anthropic.Anthropic(
        base_url=keyed.url + "/anthropic", api_key=None, default_headers={"x-api-key": token}, max_retries=0
    )
    message = client.messages.create(model="claude-fake", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text == "Hello from the fake provider."
    seen = fake_provider.requests[-1]
    assert seen.header("x-api-key") == ANTHROPIC_POOL
    assert seen.header("authorization") is None
    # And the bearer path of newer SDKs lands in the provider's own scheme too.
    bearer = anthropic.Anthropic(base_url=keyed.url + "/anthropic", api_key=token, max_retries=0)
    bearer.messages.create(model="claude-fake", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    assert fake_provider.requests[-1].header("x-api-key") == ANTHROPIC_POOL
    assert fake_provider.requests[-1].header("authorization") is None
    assert_secrets_absent(keyed, token)


def test_byo_key_passes_unchanged_next_to_virtual_keys(keyed, fake_provider):
    chat(openai_client(keyed, "sk-caller-own-key"))
    assert fake_provider.requests[-1].header("authorization") == "Bearer sk-caller-own-key"


def test_allow_byo_false_accepts_virtual_keys_only(start_egress, fake_provider, ca_file, pool_files):
    egress = start_egress(keyed_config(fake_provider, ca_file, pool_files, keys_extra="allow_byo = false"))
    refused = _error(egress, "sk-caller-own-key")
    assert refused.status_code == 401 and refused.code == "byo_not_allowed"
    anthropic_client = anthropic.Anthropic(base_url=egress.url + "/anthropic", api_key="sk-ant-own", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as raised:
        anthropic_client.messages.create(model="claude-fake", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert raised.value.body["error"]["code"] == "byo_not_allowed"  # the caller's own dialect
    assert fake_provider.requests == []  # nothing went upstream
    token, _ = mint(ISSUER, "billed-app")
    assert chat(openai_client(egress, token)).choices[0].message.content  # virtual keys work as before
    assert_secrets_absent(egress, "sk-caller-own-key", "sk-ant-own", token)


def _error(egress, key: str, provider: str = "openai") -> openai.APIStatusError:
    client = openai.OpenAI(base_url=f"{egress.url}/{provider}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as raised:
        chat(client)
    return raised.value


def test_refusals_with_stable_codes(keyed, fake_provider):
    valid, _ = mint(ISSUER, "app", providers=["openai", "groq"])
    expired, _ = mint(ISSUER, "app", ttl_seconds=60, now=1_700_000_000)
    anthropic_only, _ = mint(ISSUER, "app", providers=["anthropic"])
    untrusted, _ = mint(UNTRUSTED, "app")
    flipped = valid[:40] + ("A" if valid[40] != "A" else "B") + valid[41:]
    cases = [
        (expired, "openai", 401, "key_expired"),
        (anthropic_only, "openai", 403, "provider_not_permitted"),
        (untrusted, "openai", 401, "invalid_key"),
        (flipped, "openai", 401, "invalid_key"),
        ("bai_not-a-key", "openai", 401, "invalid_key"),
        (valid, "groq", 403, "no_pool_key"),
    ]
    for key, provider, status, code in cases:
        error = _error(keyed, key, provider)
        assert (error.status_code, error.code) == (status, code), key
        assert key not in error.message
    assert fake_provider.requests == []
    assert_secrets_absent(keyed, valid, expired, anthropic_only, untrusted)


def test_missing_key_and_anonymous_providers(keyed, fake_provider):
    with RawClient(keyed.port) as client:
        client.send(request_bytes("GET", "/openai/v1/models", credential=False))
        response = client.read_response()
        assert response.status == 401 and response.error_code == "missing_key"
        client.send(request_bytes("GET", "/local-model/v1/models", credential=False))
        assert client.read_response().status == 200
    assert fake_provider.requests[-1].header("authorization") is None


def test_anthropic_dialect_refusal(keyed):
    with RawClient(keyed.port) as client:
        client.send(request_bytes("POST", "/anthropic/v1/messages", {"x-api-key": "bai_garbage"}, b"{}"))
        response = client.read_response("POST")
    document = response.json()
    assert response.status == 401
    assert document["type"] == "error" and document["error"]["type"] == "authentication_error"
    assert document["error"]["code"] == "invalid_key"


def test_revocation_by_deny_file_takes_effect_on_the_next_request(keyed, fake_provider):
    token, claims = mint(ISSUER, "app")
    client = openai_client(keyed, token)
    chat(client)  # verified and cached
    config = keyed.config_path
    result = run_egress_cli("keys", "revoke", claims.kid, "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert claims.kid in keyed.deny_file.read_text()

    def refused() -> bool:
        try:
            chat(client)
        except openai.AuthenticationError as error:
            return error.code == "key_revoked"
        return False

    assert wait_until(refused, timeout=3, interval=0.1)
    inspect = run_egress_cli("keys", "inspect", token, "--config", str(config))
    assert "status: revoked" in inspect.stdout and inspect.returncode == 1


def test_sighup_reloads_the_deny_file_at_once(start_egress, fake_provider, ca_file, pool_files, tmp_path):
    deny_file = tmp_path / "denied-kids"
    config = keyed_config(fake_provider, ca_file, pool_files, deny_file).replace(
        "deny_poll_interval = 0.2", "deny_poll_interval = 3600.0"
    )
    egress = start_egress(config)
    token, claims = mint(ISSUER, "app")
    client = openai_client(egress, token)
    chat(client)
    deny_file.write_text(f"# revoked by the on-call engineer\n{claims.kid}\n")
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: b"deny_file_reloaded" in egress.stderr_path.read_bytes(), timeout=3)
    assert _error(egress, token).code == "key_revoked"
    deny_file.write_text("")  # un-revoked by editing the file
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: egress.stderr_path.read_bytes().count(b"deny_file_reloaded") == 2, timeout=3)
    chat(client)


def test_missing_pool_key_source_stops_startup_naming_it(start_egress, fake_provider, ca_file, tmp_path):
    config = provider_config(fake_provider, ca_file).replace(
        f'[providers.openai]\nbase_url = "{fake_provider.base_url}"',
        f'[providers.openai]\nbase_url = "{fake_provider.base_url}"\npool_keys = ["env:EGRESS_TEST_NO_SUCH_VAR"]',
    )
    with pytest.raises(RuntimeError, match="EGRESS_TEST_NO_SUCH_VAR"):
        start_egress(config)


def test_keys_cli_round_trip(tmp_path, fake_provider, ca_file, pool_files):
    issuer = tmp_path / "issuer.pem"
    created = run_egress_cli("keys", "issuer-new", "--out", str(issuer))
    assert created.returncode == 0 and (issuer.stat().st_mode & 0o777) == 0o600
    public_key = created.stdout.split("public key: ")[1].split()[0]
    again = run_egress_cli("keys", "issuer-new", "--out", str(issuer))
    assert again.returncode == 1  # never overwritten
    minted = run_egress_cli(
        "keys",
        "mint",
        "--issuer-key",
        str(issuer),
        "--sub",
        "cli-app",
        "--providers",
        "openai",
        "--ttl",
        "2h",
        "--tier",
        "gold",
    )
    token = minted.stdout.strip()
    assert minted.returncode == 0 and token.startswith("bai_") and token not in minted.stderr
    config = tmp_path / "inspect.toml"
    config.write_text(f'[keys]\ntrusted_issuers = ["{public_key}"]\n')
    inspected = run_egress_cli("keys", "inspect", token, "--config", str(config))
    assert inspected.returncode == 0 and "status: valid" in inspected.stdout
    assert '"sub": "cli-app"' in inspected.stdout and '"tier": "gold"' in inspected.stdout
    other = tmp_path / "other.toml"
    other.write_text(f'[keys]\ntrusted_issuers = ["{public_key_text(UNTRUSTED.public_key())}"]\n')
    inspected = run_egress_cli("keys", "inspect", token, "--config", str(other))
    assert inspected.returncode == 1 and "status: untrusted issuer" in inspected.stdout
    tampered = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    inspected = run_egress_cli("keys", "inspect", tampered, "--config", str(config))
    assert inspected.returncode == 1 and "status: bad signature" in inspected.stdout


def test_keys_cli_agrees_with_the_server_and_refuses_empty_allowlists(keyed, fake_provider, tmp_path):
    later, _ = mint(ISSUER, "app", now=int(time.time()) + 600)  # signed, but issued in the future
    within_skew, _ = mint(ISSUER, "app", now=int(time.time()) + 20)
    config = str(keyed.config_path)
    inspected = run_egress_cli("keys", "inspect", later, "--config", config)
    assert inspected.returncode == 1 and inspected.stdout.endswith("status: not yet valid\n"), inspected.stdout
    assert _error(keyed, later).code == "key_not_yet_valid"  # what the server says of it
    inspected = run_egress_cli("keys", "inspect", within_skew, "--config", config)
    assert inspected.returncode == 0 and inspected.stdout.endswith("status: valid\n"), inspected.stdout
    expired, _ = mint(ISSUER, "app", ttl_seconds=60, now=1_700_000_000)
    assert run_egress_cli("keys", "inspect", expired, "--config", config).stdout.endswith("status: expired\n")
    # An allowlist option that names nothing used to mint a key with no allowlist: unrestricted.
    issuer = tmp_path / "cli-issuer.pem"
    assert run_egress_cli("keys", "issuer-new", "--out", str(issuer)).returncode == 0
    for option, message in [
        (("--models", " , "), "--models names no model"),
        (("--models", ""), "--models names no model"),
        (("--providers", ","), "--providers names no provider"),
    ]:
        minted = run_egress_cli("keys", "mint", "--issuer-key", str(issuer), "--sub", "app", *option)
        assert minted.returncode == 2 and message in minted.stderr and minted.stdout == "", minted.stderr
    minted = run_egress_cli("keys", "mint", "--issuer-key", str(issuer), "--sub", "app", "--models", " gpt-4o* , ")
    assert minted.returncode == 0 and minted.stdout.startswith("bai_")


# -- what an adversarial review found ---------------------------------------------------------


def test_a_key_issued_in_the_future_is_not_valid_yet(keyed, fake_provider):
    later, _ = mint(ISSUER, "app", now=int(time.time()) + 3600)
    error = _error(keyed, later)
    assert (error.status_code, error.code) == (401, "key_not_yet_valid")
    within_skew, _ = mint(ISSUER, "app", now=int(time.time()) + 20)  # clocks a little apart
    assert chat(openai_client(keyed, within_skew)).choices
    assert len(fake_provider.requests) == 1


def forged(kid: str) -> str:
    """Well formed, from the trusted issuer's id, signed by someone else: costs a verification."""
    document = {"iat": int(time.time()), "iss": issuer_id(ISSUER.public_key()), "kid": kid, "sub": "x", "v": 1}
    payload = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    signature = UNTRUSTED.sign(SIGNING_DOMAIN + payload)
    return (b"bai_" + _b64encode(payload) + b"." + _b64encode(signature)).decode()


def test_failed_verifications_per_address_are_capped(start_egress, fake_provider, ca_file, pool_files):
    egress = start_egress(
        keyed_config(fake_provider, ca_file, pool_files, keys_extra="invalid_key_burst = 5\ninvalid_key_rate = 0.1")
    )
    valid, _ = mint(ISSUER, "app")
    assert chat(openai_client(egress, valid)).choices  # verified once, then cached
    keys = [forged(f"{index:016x}") for index in range(8)]
    codes = []
    for key in keys:
        error = _error(egress, key)
        codes.append((error.status_code, error.code))
        if error.status_code == 429:
            assert int(error.response.headers["retry-after"]) >= 1
    assert codes == [(401, "invalid_key")] * 5 + [(429, "too_many_invalid_keys")] * 3
    # A key that already failed is answered from memory; one already verified still works.
    assert _error(egress, keys[0]).code == "invalid_key"
    assert chat(openai_client(egress, valid)).choices
    assert len(fake_provider.requests) == 2


def test_byo_limit_holds_however_the_key_is_spelled(start_egress, fake_provider, ca_file):
    egress = start_egress(provider_config(fake_provider, ca_file, extra="[limits]\nrequests_per_minute = 2\n"))
    spellings = [
        ("Authorization", "Bearer sk-byo-same"),
        ("Authorization", "bearer sk-byo-same"),
        ("Authorization", "BEARER sk-byo-same"),
        ("Authorization", "Bearer   sk-byo-same"),
        ("Authorization", "Bearer\tsk-byo-same"),
        ("Authorization", "Bearer sk-byo-same  "),
        ("x-api-key", "sk-byo-same"),
        ("x-api-key", "  sk-byo-same"),
    ]
    statuses = []
    for name, value in spellings:
        with RawClient(egress.port) as client:
            client.send(request_bytes("GET", "/openai/v1/models", {name: value}))
            statuses.append(client.read_response().status)
    assert statuses.count(429) == len(spellings) - 2, statuses


def test_a_retired_pool_key_is_wiped_when_its_last_request_is_gone():
    provider = BUILTIN_PROVIDERS["openai"]
    rotation = PoolRotation(provider, [(Secret(b"sk-retired", "env:X"), "")])
    header = rotation.accounts[0].credential()
    held = [rotation]  # what an exchange's lease does
    del rotation
    assert bytes(header[1]) == b"Bearer sk-retired"  # still in use: intact
    held.clear()
    assert set(header[1]) == {0}  # the last holder gone: wiped at once
    live = PoolRotation(provider, [(Secret(b"sk-live", "env:Y"), "")])
    value = live.accounts[0].credential()[1]
    wipe_all_pool_keys()  # the exit path reaches every rotation, not only the first Authenticator's
    assert set(value) == {0}


@pytest.mark.timeout(150)
def test_a_request_authenticated_before_a_reload_sends_its_pool_key_whole(
    start_egress, fake_provider, ca_file, pool_files
):
    # The old rotation used to be wiped on a timer (body_timeout + 60 s) after a reload, while a
    # request that authenticated before it could still be waiting its turn: the provider then got
    # NUL bytes for a key. A pipelined request waits behind a 64-second stream.
    egress = start_egress(keyed_config(fake_provider, ca_file, pool_files, server="body_timeout = 0.5"))
    key, _ = mint(ISSUER, "app")
    stream = b'{"model":"gpt-fake","messages":[],"stream":true}'
    slow = {
        "Authorization": f"Bearer {key}",
        "Content-Type": "application/json",
        "x-fake-scenario": "long-stream",
        "x-fake-events": "64",
        "x-fake-interval": "1",
    }
    with RawClient(egress.port, timeout=120) as client:
        client.send(
            request_bytes(
                "POST", "/openai/v1/chat/completions", {**slow, "x-fake-events": "64", "x-fake-interval": "1"}, stream
            )
            + request_bytes("GET", "/openai/v1/models", {"Authorization": f"Bearer {key}"})
        )
        assert wait_until(lambda: len(fake_provider.requests) == 1, timeout=5)
        pool_files["openai"].write_text("sk-pool-openai-after-reload\n")
        egress.signal(signal.SIGHUP)
        assert wait_until(lambda: b'"event":"reloaded"' in egress.stderr_path.read_bytes(), timeout=5)
        assert client.read_response("POST").status == 200
        assert client.read_response().status == 200
    sent = fake_provider.requests[-1].header("authorization")
    assert sent in {f"Bearer {pool}" for pool in OPENAI_POOL}, repr(sent)


def test_a_virtual_key_request_sends_the_pool_key_and_no_credential_of_the_callers(keyed, fake_provider):
    """Gemini's x-goog-api-key and `?key=`, Azure OpenAI's api-key: a caller's own key sent beside
    a virtual key used to reach the provider next to the pool key."""
    token, _ = mint(ISSUER, "app")
    callers = {
        "x-goog-api-key": "sk-caller-goog",
        "api-key": "sk-caller-azure",
        # Which organization or project of the pool key is billed is the operator's, not the caller's.
        "OpenAI-Organization": "org-caller",
        "OpenAI-Project": "proj-caller",
        "Content-Type": "application/json",
    }
    body = b'{"model":"gpt-fake","messages":[{"role":"user","content":"hi"}]}'
    # The rest of the query goes as it came: order, encoding, an empty parameter, a `keys`.
    query = "?api-version=2024-06-01&key=sk-caller-query&x=%20y+z&&keys=1&%6Bey=sk-caller-encoded"
    cases = [
        ("/openai/v1/chat/completions" + query, "/v1/chat/completions?api-version=2024-06-01&x=%20y+z&&keys=1"),
        ("/v1/chat/completions" + query, "/v1/chat/completions?api-version=2024-06-01&x=%20y+z&&keys=1"),  # by model
        ("/openai/v1/chat/completions?key=sk-caller-query", "/v1/chat/completions"),
    ]
    with RawClient(keyed.port) as client:
        for target, _ in cases:
            client.send(request_bytes("POST", target, {"Authorization": f"Bearer {token}", **callers}, body))
            assert client.read_response("POST").status == 200
        # A BYO key is the caller's business: everything it sent goes as it came.
        client.send(request_bytes("POST", "/openai/v1/chat/completions" + query, callers, body))
        assert client.read_response("POST").status == 200
    *pooled, byo = fake_provider.requests
    assert [request.target for request in pooled] == [upstream for _, upstream in cases]
    for request in pooled:
        assert request.header("authorization") in {f"Bearer {pool}" for pool in OPENAI_POOL}
        assert "sk-caller" not in repr(request.headers) and token not in repr(request.headers)
        assert request.header("openai-organization") is None and request.header("openai-project") is None
    assert byo.target == "/v1/chat/completions" + query
    assert byo.header("x-goog-api-key") == "sk-caller-goog" and byo.header("api-key") == "sk-caller-azure"
    assert byo.header("openai-project") == "proj-caller"
    assert_secrets_absent(keyed, token, "sk-caller-goog", "sk-caller-azure", "sk-caller-query")

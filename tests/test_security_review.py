"""A security review against the real process: where keys go, and what caller bytes can do.

The upstream is a ScriptedUpstream, so each test sees the exact bytes egress sent the provider.
"""

from __future__ import annotations

import time

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.auth import Authenticator, client_of
from egress.config import parse_config
from egress.denyset import DenySet
from egress.errors import EgressError
from egress.http1 import content_length_of, inspect_request, inspect_response
from egress.vkeys import SIGNING_DOMAIN, _b64encode, issuer_id, mint, public_key_text
from tests.support import RawClient, ScriptedUpstream, admin_get, request_bytes

ISSUER = Ed25519PrivateKey.generate()
POOL_OPENAI = "sk-pool-openai-SECRET0123456789"
POOL_ANTHROPIC = "sk-ant-pool-SECRET9876543210"
OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
CHAT = b'{"model":"gpt-fake","messages":[{"role":"user","content":"hi"}]}'
MESSAGE = (
    b'{"id":"msg_1","type":"message","role":"assistant","model":"claude-x","content":[{"type":"text","text":"hi"}],'
    b'"stop_reason":"end_turn","usage":{"input_tokens":1,"output_tokens":1}}'
)
MESSAGE_REPLY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(MESSAGE),
    MESSAGE,
)
# OpenAI's 401 quotes the key it refused (a short key whole; https://platform.openai.com/docs/guides/error-codes).
QUOTED = (
    b'{"error":{"message":"Incorrect API key provided: %s.","type":"invalid_request_error","code":"invalid_api_key"}}'
)
REFUSED = b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(QUOTED % POOL_OPENAI.encode()),
    QUOTED % POOL_OPENAI.encode(),
)
DROP_CLAUDE = '[[routes]]\nmatch = "claude-*"\nprovider = "anthropic"\ndrop_params = true\n'


@pytest.fixture
def pooled(start_egress, tmp_path):
    """egress with openai and anthropic on two ScriptedUpstreams, each with one pool key."""
    started = []

    def start(openai_replies: list, anthropic_replies: list = (), extra: str = ""):
        openai_upstream = ScriptedUpstream(list(openai_replies))
        anthropic_upstream = ScriptedUpstream(list(anthropic_replies))
        started.extend((openai_upstream, anthropic_upstream))
        for name, key in (("openai.key", POOL_OPENAI), ("anthropic.key", POOL_ANTHROPIC)):
            (tmp_path / name).write_text(key + "\n")
            (tmp_path / name).chmod(0o600)
        egress = start_egress(
            f'[keys]\ntrusted_issuers = ["{public_key_text(ISSUER.public_key())}"]\n'
            # Listed models: no model-list fetch takes a scripted reply.
            f'[providers.openai]\nbase_url = "{openai_upstream.base_url}"\nmodels = ["gpt-fake"]\n'
            f'pool_keys = ["file:{tmp_path / "openai.key"}"]\n'
            f'[providers.anthropic]\nbase_url = "{anthropic_upstream.base_url}"\nmodels = ["claude-x"]\n'
            f'pool_keys = ["file:{tmp_path / "anthropic.key"}"]\n'
            f'[usage]\njsonl = "{tmp_path / "usage.jsonl"}"\n{extra}'
        )
        egress.usage_file = tmp_path / "usage.jsonl"
        return egress, openai_upstream, anthropic_upstream

    yield start
    for upstream in started:
        upstream.stop()


def heads(upstream: ScriptedUpstream) -> list[bytes]:
    """The request heads the provider received."""
    return [raw.split(b"\r\n\r\n", 1)[0] for raw in upstream.requests]


def everything_shown(egress) -> str:
    """Every place an operator reads: the access and event logs, usage facts, /metrics, /status."""
    text = egress.logs()
    if egress.usage_file.exists():
        text += egress.usage_file.read_text()
    for path in ("/metrics", "/status"):
        status, body = admin_get(egress.admin_port, path)
        assert status == 200
        text += body.decode("latin-1")
    return text


# -- bugs ----------------------------------------------------------------------------------------


def test_a_dropped_parameter_name_cannot_split_the_response(pooled):
    """A route with drop_params lists the dropped names in x-egress-dropped-params, and a name is any
    JSON key of the caller's body: `"x\\r\\nset-cookie: a=b\\r\\n\\r\\nHTTP/1.1 200 OK": 1` ended egress's
    header block early, added a header and began a second response on the connection.
    Needs /tmp/review_security/surface.py.patch (surface.py builds the header)."""
    token, _ = mint(ISSUER, "app")
    egress, _, _ = pooled([], [MESSAGE_REPLY], extra=DROP_CLAUDE)
    name = "x\r\nset-cookie: a=b\r\n\r\nHTTP/1.1 200 OK"
    body = orjson.dumps({"model": "claude-x", "messages": [{"role": "user", "content": "hi"}], name: 1})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", "Connection": "close"}
    with RawClient(egress.port) as client:
        client.send(request_bytes("POST", "/v1/chat/completions", headers, body))
        response = client.read_response("POST")
    assert response.status == 200 and response.complete
    assert "set-cookie" not in response.headers
    assert response.json()["choices"][0]["message"]["content"] == "hi"  # the body, not a second head
    dropped = response.headers["x-egress-dropped-params"]
    assert dropped.startswith("x??set-cookie: a=b") and "\r" not in dropped and "\n" not in dropped


def test_the_dropped_parameters_header_is_bounded(pooled):
    """Ten thousand unknown keys in a body made one header of megabytes, past any client's limit."""
    token, _ = mint(ISSUER, "app")
    egress, _, _ = pooled([], [MESSAGE_REPLY], extra=DROP_CLAUDE)
    document = {"model": "claude-x", "messages": [{"role": "user", "content": "hi"}]}
    document.update({f"unknown_{index}_{'x' * 300}": 1 for index in range(10_000)})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", "Connection": "close"}
    with RawClient(egress.port) as client:
        client.send(request_bytes("POST", "/v1/chat/completions", headers, orjson.dumps(document)))
        response = client.read_response("POST")
    assert response.status == 200 and response.complete
    dropped = response.headers["x-egress-dropped-params"]
    assert len(dropped) < 8192 and dropped.endswith("(9968 more)")


LEADING_ZEROS = b"0" * 5000 + b"2"


def test_a_content_length_with_thousands_of_leading_zeros_is_a_length():
    """RFC 9110 §8.6: 1*DIGIT. llhttp takes any number of leading zeros; int() refuses past 4,300
    digits, and the ValueError was a 500 internal_error (the request) or a 502 (the response)."""
    facts = inspect_request([(b"Host", b"a"), (b"Content-Length", LEADING_ZEROS)], "1.1")
    assert facts.content_length == 2
    assert inspect_response([(b"content-length", LEADING_ZEROS)]).content_length == 2
    assert content_length_of(b" 17 ") == 17 and content_length_of(b"1" * 30) == 2**63
    assert content_length_of(b"0" * 30) == 0 and content_length_of(b"0" * 30 + b"x") is None


def test_leading_zeros_in_content_length_end_to_end(pooled):
    token, _ = mint(ISSUER, "app")
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: " + LEADING_ZEROS + b"\r\n\r\n{}"
    egress, upstream, _ = pooled([OK, reply])
    auth = b"Authorization: Bearer " + token.encode() + b"\r\n"
    with RawClient(egress.port) as client:
        client.send(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: a\r\n"
            + auth
            + b"Content-Length: "
            + LEADING_ZEROS
            + b"\r\n\r\n{}"
        )
        first = client.read_response("POST")
        client.send(request_bytes("POST", "/openai/v1/chat/completions", {"Authorization": f"Bearer {token}"}, CHAT))
        second = client.read_response("POST")
    assert (first.status, first.body) == (200, b"{}")
    assert (second.status, second.body) == (200, b"{}")
    assert b"content-length: 2\r\n" in upstream.requests[0]
    assert "internal_error" not in egress.logs()


# -- what holds ----------------------------------------------------------------------------------


def test_keys_in_odd_places_never_reach_a_log_a_metric_or_the_provider_beside_the_pool_key(pooled):
    token, _ = mint(ISSUER, "app")
    virtual = [
        {"Authorization": f"Bearer {token}", "x-api-key": "sk-caller-xapi", "api-key": "sk-caller-azure"},
        {"Authorization": "Bearer sk-caller-byo", "x-api-key": token, "x-goog-api-key": "sk-caller-goog"},
        {"Authorization": f"Bearer {token} \t"},  # trailing whitespace
        {"x-api-key": f"{token}   "},
        {"Authorization": "Basic c2stY2FsbGVyLWJhc2ljOg==", "x-api-key": token},
        {"Authorization": f"bearer\t{token}"},
        # A header named in Connection is hop-by-hop: the caller's goes, the pool key egress adds stays.
        {"Authorization": f"Bearer {token}", "Connection": "keep-alive, authorization, x-api-key"},
    ]
    egress, upstream, _ = pooled([OK] * (len(virtual) + 1) + [REFUSED])
    target = "/openai/v1/chat/completions?key=sk-caller-query&api-version=1"
    with RawClient(egress.port) as client:
        for headers in virtual:
            client.send(request_bytes("POST", target, headers, CHAT))
            assert client.read_response("POST").status == 200, headers
        # `//host` after the provider is a path on the provider's own origin, never another host.
        client.send(request_bytes("GET", "/openai//evil.example/x", {"Authorization": f"Bearer {token}"}))
        assert client.read_response().status == 200
        # The provider's 401 quotes the pool key: never relayed.
        client.send(request_bytes("POST", target, {"Authorization": f"Bearer {token}"}, CHAT))
        refused = client.read_response("POST")
    for absolute in (b"http://evil.example/openai/v1/models", b"//evil.example/openai/v1/models"):
        with RawClient(egress.port) as client:  # a 400 closes the connection
            client.send(
                b"GET " + absolute + b" HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer %s\r\n\r\n" % token.encode()
            )
            assert client.read_response().status in (400, 404)
    assert refused.status == 502 and refused.error_code == "pool_key_refused"
    assert POOL_OPENAI.encode() not in refused.body
    sent = heads(upstream)
    assert len(sent) == len(virtual) + 2
    for head in sent:
        lines = head.lower().split(b"\r\n")
        credentials = [
            line
            for line in lines
            if line.split(b":")[0] in (b"authorization", b"x-api-key", b"api-key", b"x-goog-api-key")
        ]
        assert credentials == [b"authorization: bearer " + POOL_OPENAI.lower().encode()], head
        assert lines[1] == b"host: " + upstream.base_url.split("//")[1].encode()
        assert b"sk-caller" not in head and token.encode() not in head
    assert sent[-2].startswith(b"GET //evil.example/x HTTP/1.1\r\n")
    shown = everything_shown(egress)
    for secret in (POOL_OPENAI, POOL_ANTHROPIC, token, "sk-caller", "c2stY2FsbGVy"):
        assert secret not in shown, secret


def test_a_key_scoped_to_one_provider_is_refused_on_every_way_to_another(pooled):
    token, _ = mint(ISSUER, "app", providers=["openai"])
    egress, upstream, anthropic_upstream = pooled([OK], [MESSAGE_REPLY] * 4)
    message = b'{"model":"claude-x","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
    chat_claude = b'{"model":"claude-x","messages":[{"role":"user","content":"hi"}]}'
    chat_qualified = b'{"model":"anthropic:claude-x","messages":[{"role":"user","content":"hi"}]}'
    ways = [
        ("/anthropic/v1/messages", message, {"Authorization": f"Bearer {token}"}),
        ("/v1/messages", message, {"x-api-key": token, "anthropic-version": "2023-06-01"}),
        ("/v1/chat/completions", chat_claude, {"Authorization": f"Bearer {token}"}),
        ("/v1/chat/completions", chat_qualified, {"Authorization": f"Bearer {token}"}),
    ]
    with RawClient(egress.port) as client:
        for target, body, headers in ways:
            client.send(request_bytes("POST", target, {"Content-Type": "application/json", **headers}, body))
            answer = client.read_response("POST")
            assert (answer.status, answer.error_code) == (403, "provider_not_permitted"), target
        client.send(request_bytes("POST", "/v1/chat/completions", {"Authorization": f"Bearer {token}"}, CHAT))
        assert client.read_response("POST").status == 200
    assert heads(anthropic_upstream) == []
    assert len(heads(upstream)) == 1


def test_expired_future_and_forged_keys_get_no_100_continue_and_send_nothing(pooled):
    now = int(time.time())
    expired, _ = mint(ISSUER, "app", ttl_seconds=1, now=now - 100)
    future, _ = mint(ISSUER, "app", now=now + 3600)
    forged, _ = mint(Ed25519PrivateKey.generate(), "app")
    egress, upstream, _ = pooled([])
    for token, code in ((expired, "key_expired"), (future, "key_not_yet_valid"), (forged, "invalid_key")):
        with RawClient(egress.port) as client:  # answered before its body, so the connection closes
            client.send(
                b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                b"Content-Length: %d\r\nAuthorization: Bearer %s\r\n\r\n" % (len(CHAT), token.encode())
            )
            answer = client.read_response("POST")
            assert (answer.status, answer.error_code, answer.informational) == (401, code, [])
            assert client.server_closed()
    assert heads(upstream) == []
    shown = everything_shown(egress)
    assert expired not in shown and future not in shown and forged not in shown


def test_an_ipv6_host_gets_one_invalid_key_allowance_for_its_whole_slash_64():
    """An IPv6 host may send from any address of its /64 (RFC 8981): counted per address, each new
    source address came with a fresh burst of verifications, so the cap on forged keys had no end."""
    config = parse_config(
        {
            "keys": {
                "trusted_issuers": [public_key_text(ISSUER.public_key())],
                "invalid_key_burst": 3,
                "invalid_key_rate": 0.001,
            },
            "server": {"access_log": "off"},
        }
    )
    auth = Authenticator(config, DenySet(), {})
    other = Ed25519PrivateKey.generate()
    issuer = issuer_id(ISSUER.public_key())

    def forged(index: int) -> bytes:  # from the trusted issuer's id, signed by another: a verification each
        document = {"iat": int(time.time()), "iss": issuer, "kid": f"{index:016x}", "sub": "x", "v": 1}
        payload = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
        return b"bai_" + _b64encode(payload) + b"." + _b64encode(other.sign(SIGNING_DOMAIN + payload))

    def code(index: int, peer: str) -> str:
        with pytest.raises(EgressError) as refused:
            auth.claims_for(forged(index), peer)
        return refused.value.code

    codes = [code(index, f"2001:db8:0:7::{index + 1:x}:443") for index in range(6)]
    assert codes == ["invalid_key"] * 3 + ["too_many_invalid_keys"] * 3
    assert code(6, "2001:db8:0:7:ffff:ffff:ffff:ffff:1") == "too_many_invalid_keys"
    # Another /64, and IPv4 (an IPv4-mapped address among them), each have their own.
    assert code(7, "2001:db8:0:8::1:443") == "invalid_key"
    assert [code(8 + index, "::ffff:192.0.2.1:80") for index in range(4)][-1] == "too_many_invalid_keys"
    assert code(12, "192.0.2.2:80") == "invalid_key"
    assert client_of("fe80::1%eth0:80") == client_of("fe80::2:80") == "fe80000000000000/64"

"""Anthropic's Message Batches through egress: a batch object's `results_url` (batch_urls.py), read by
the official SDK, brings the results back through egress, metered and with egress's key."""

from __future__ import annotations

import os
from pathlib import Path

import anthropic
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.batch_urls import MAX_BODY, BatchUrlFilter
from egress.providers import BUILTIN_PROVIDERS, Origin
from egress.vkeys import mint, public_key_text
from tests.support import ScriptedUpstream, run_node_script
from tests.test_facts import facts_of

ISSUER = Ed25519PrivateKey.generate()
ANTHROPIC = BUILTIN_PROVIDERS["anthropic"].origin
BATCH_ID = "msgbatch_013Zva2CMHLNnXjNJJKqJ2EF"
RESULTS_PATH = f"/v1/messages/batches/{BATCH_ID}/results"


def _batch(origin: str, status: str = "ended", batch_id: str = BATCH_ID) -> dict:
    """A Message Batch as Anthropic sends it (https://docs.anthropic.com/en/api/retrieving-message-batches):
    `results_url` absolute once it ended, null while it is processing."""
    ended = status == "ended"
    return {
        "id": batch_id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": {"processing": 0 if ended else 2, "succeeded": 2 if ended else 0, "errored": 0,
                           "canceled": 0, "expired": 0},
        "ended_at": "2024-08-20T18:37:24.100435Z" if ended else None,
        "created_at": "2024-08-20T18:37:24.100435Z",
        "expires_at": "2024-08-21T18:37:24.100435Z",
        "archived_at": None,
        "cancel_initiated_at": None,
        "results_url": f"{origin}/v1/messages/batches/{batch_id}/results" if ended else None,
    }  # fmt: skip


# -- the filter, sans-IO -------------------------------------------------------------------------
_ONE = orjson.dumps(_batch("https://api.anthropic.com"), option=orjson.OPT_INDENT_2)
_LISTED = orjson.dumps(
    {
        "data": [_batch("https://api.anthropic.com"), _batch("", "in_progress", "msgbatch_2")],
        "first_id": BATCH_ID,
        "has_more": False,
        "last_id": "msgbatch_2",
    }
)
_TRICKY = (
    b'{"id":"msgbatch_1","type":"message_batch","note":"\\"results_url\\": \\"https://api.anthropic.com/v1/x\\"",'
    b'"results_url" : "https:\\/\\/api.anthropic.com\\/v1\\/messages\\/batches\\/msgbatch_1\\/results"}'
)
CASES = [
    # (name, origin, body, expected)
    ("one batch", ANTHROPIC, _ONE, _ONE.replace(b"https://api.anthropic.com/v1/", b"/v1/")),
    ("a list", ANTHROPIC, _LISTED, _LISTED.replace(b"https://api.anthropic.com/v1/", b"/v1/")),
    ("processing: null", ANTHROPIC, orjson.dumps(_batch("", "in_progress")), orjson.dumps(_batch("", "in_progress"))),
    ("no results_url", ANTHROPIC, b'{"id":"msgbatch_1","type":"message_batch_deleted"}', None),
    ("another host", ANTHROPIC, orjson.dumps(_batch("https://files.example")), None),
    ("http, not https", ANTHROPIC, orjson.dumps(_batch("http://api.anthropic.com")), None),
    ("userinfo", ANTHROPIC, orjson.dumps(_batch("https://u@api.anthropic.com")), None),
    ("explicit default port", ANTHROPIC, orjson.dumps(_batch("https://api.anthropic.com:443")),
     orjson.dumps(_batch("https://api.anthropic.com:443")).replace(b"https://api.anthropic.com:443", b"")),
    ("under the row's base path", Origin.from_url("http://10.0.0.7:8080/claude"),
     orjson.dumps(_batch("http://10.0.0.7:8080/claude")),
     orjson.dumps(_batch("http://10.0.0.7:8080/claude")).replace(b"http://10.0.0.7:8080/claude", b"")),
    ("outside the row's base path", Origin.from_url("http://10.0.0.7:8080/claude"),
     orjson.dumps(_batch("http://10.0.0.7:8080")), None),
    # Only a results_url key's value: the same text inside another string is left alone.
    ("key-like text in a value, escaped slashes", ANTHROPIC, _TRICKY,
     _TRICKY.replace(b'"https:\\/\\/api.anthropic.com\\/v1\\/messages\\/batches\\/msgbatch_1\\/results"',
                     b'"/v1/messages/batches/msgbatch_1/results"')),
    ("not JSON", ANTHROPIC, b'{"results_url":"https://api.anthropic.com/v1/x"', None),
    # Made relative, these would be network-path references: resolved as URLs are (`new URL(url, base)`,
    # urljoin), `//files.example/x` names another host, which would get the caller's key.
    ("a path starting //", ANTHROPIC, b'{"results_url":"https://api.anthropic.com//files.example/v1/x"}', None),
    ("a path starting /\\", ANTHROPIC, b'{"results_url":"https://api.anthropic.com/\\\\files.example/v1/x"}', None),
    ("// under the row's base path", Origin.from_url("http://10.0.0.7:8080/claude"),
     b'{"results_url":"http://10.0.0.7:8080/claude//files.example/x"}', None),
]  # fmt: skip


def _run(origin: Origin, pieces) -> bytes:
    url_filter = BatchUrlFilter(origin)
    out = b"".join(url_filter.feed(piece) for piece in pieces) + url_filter.finish()
    assert url_filter.answered
    return out


@pytest.mark.parametrize(("name", "origin", "body", "expected"), CASES, ids=[case[0] for case in CASES])
def test_the_filter_makes_the_rows_results_url_relative_and_nothing_else(name, origin, body, expected):
    expected = body if expected is None else expected
    assert _run(origin, [body]) == expected
    assert _run(origin, [body[i : i + 1] for i in range(len(body))]) == expected
    if expected != body:
        assert orjson.loads(expected) != orjson.loads(body)  # the case does rewrite something


def test_the_filter_relays_a_body_over_its_bound_untouched():
    listed = {"data": [_batch("https://api.anthropic.com", batch_id=f"msgbatch_{n}") for n in range(3000)]}
    body = orjson.dumps(listed)
    assert len(body) > MAX_BODY
    assert _run(ANTHROPIC, [body]) == body
    assert _run(ANTHROPIC, [body[i : i + 65536] for i in range(0, len(body), 65536)]) == body


def test_the_filter_stays_on_a_2xx_json_body_only():
    url_filter = BatchUrlFilter(ANTHROPIC)
    assert url_filter.head(200, b"application/json")
    assert url_filter.head(200, b"Application/JSON; charset=utf-8")
    assert not url_filter.head(404, b"application/json")  # an error body is relayed as it came
    assert not url_filter.head(200, b"text/event-stream")
    assert not url_filter.head(200, b"")


# -- the real SDK through the real process -------------------------------------------------------
def _reply(body: bytes, content_type: bytes = b"application/json") -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\nrequest-id: req_1\r\ncontent-length: %d\r\n\r\n"
    return head % (content_type, len(body)) + body


def _results() -> bytes:
    """The results (https://docs.anthropic.com/en/api/retrieving-message-batch-results): JSONL, a line
    per request, in no particular order."""
    return b"".join(
        orjson.dumps({"custom_id": name, "result": {"type": "succeeded", "message": {
            "id": f"msg_{name}", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": given, "output_tokens": made}}}}) + b"\n"
        for name, given, made in (("my-first-request", 11, 36), ("my-second-request", 10, 34))
    )  # fmt: skip


@pytest.fixture
def batches(start_egress, tmp_path):
    """An egress whose anthropic row (a pool key, virtual keys trusted) goes to a ScriptedUpstream
    answering as Anthropic does, `results_url` absolute on the row's own origin."""
    upstream = ScriptedUpstream([])
    origin = upstream.base_url
    upstream.replies += [
        _reply(orjson.dumps(_batch(origin, "in_progress"))),  # create
        _reply(orjson.dumps(_batch(origin))),  # retrieve
        _reply(orjson.dumps(_batch(origin))),  # results(): its retrieve first
        _reply(_results(), b"application/binary"),  # then a GET of results_url
    ]
    pool = tmp_path / "pool.keys"
    pool.write_text("sk-pool-test-0123456789\n")
    usage_file = tmp_path / "usage.jsonl"
    egress = start_egress(
        f"""
[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]

[providers.anthropic]
base_url = "{origin}"
pool_keys = ["file:{pool}"]
models = ["claude-sonnet-4-5"]  # listed: no model list fetched with the pool key

[usage]
jsonl = "{usage_file}"
"""
    )
    egress.usage_file = usage_file
    yield egress, upstream
    upstream.stop()


def _create_retrieve_and_read(client: anthropic.Anthropic) -> tuple[str | None, list]:
    params = {"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": [{"role": "user", "content": "Hello"}]}
    created = client.messages.batches.create(
        requests=[
            {"custom_id": "my-first-request", "params": params},
            {"custom_id": "my-second-request", "params": params},
        ]
    )
    assert (created.id, created.processing_status, created.results_url) == (BATCH_ID, "in_progress", None)
    retrieved = client.messages.batches.retrieve(BATCH_ID)
    results = list(client.messages.batches.results(BATCH_ID))
    assert len(results) == 2
    return retrieved.results_url, results


def _assert_read_through_egress(egress, upstream, kid: str | None, mount: str) -> None:
    requests = upstream.requests
    assert [request.split(b"\r\n", 1)[0] for request in requests] == [
        b"POST /v1/messages/batches HTTP/1.1",
        b"GET /v1/messages/batches/%s HTTP/1.1" % BATCH_ID.encode(),
        b"GET /v1/messages/batches/%s HTTP/1.1" % BATCH_ID.encode(),
        b"GET /v1/messages/batches/%s/results HTTP/1.1" % BATCH_ID.encode(),
    ]
    facts = facts_of(egress, 4)
    assert [
        (f["path"], f["usage"], f["usage_reason"], f["input_tokens"], f["output_tokens"], f["model"], f["batch_id"])
        for f in facts
    ] == [
        (f"{mount}/v1/messages/batches", "missing", "batch", None, None, None, BATCH_ID),
        (f"{mount}/v1/messages/batches/{BATCH_ID}", "missing", "batch", None, None, None, BATCH_ID),
        (f"{mount}/v1/messages/batches/{BATCH_ID}", "missing", "batch", None, None, None, BATCH_ID),
        (f"{mount}{RESULTS_PATH}", "complete", None, 21, 70, "claude-sonnet-4-5", BATCH_ID),
    ]
    assert {f["kid"] for f in facts} == {kid}
    # A batch object is asked for as JSON egress can read (its results are not filtered).
    # Asked for identity, not left without the header: with none, any coding is acceptable (RFC 9110
    # §12.5.3), and a gzip body would go out unedited, its absolute results_url with it.
    for request in requests[:3]:
        head = request.split(b"\r\n\r\n", 1)[0].lower()
        assert head.count(b"\r\naccept-encoding:") == 1 and b"\r\naccept-encoding: identity\r\n" in head + b"\r\n"


@pytest.mark.parametrize("mount", ["/anthropic", ""], ids=["provider route", "drop-in /v1"])
def test_the_sdk_reads_a_batchs_results_through_egress_with_its_own_key(batches, mount):
    """Before, the SDK read the provider's absolute results_url itself: the results were never billed."""
    egress, upstream = batches
    client = anthropic.Anthropic(base_url=egress.url + mount, api_key="sk-ant-byo", max_retries=0, timeout=5)
    results_url, results = _create_retrieve_and_read(client)
    assert [(r.custom_id, r.result.type, r.result.message.usage.output_tokens) for r in results] == [
        ("my-first-request", "succeeded", 36),
        ("my-second-request", "succeeded", 34),
    ]
    _assert_read_through_egress(egress, upstream, None, mount)
    assert all(b" sk-ant-byo\r\n" in request for request in upstream.requests)  # the caller's own key
    assert results_url == RESULTS_PATH  # relative: the SDK joins it to its own base URL, egress's


def test_the_sdk_reads_a_batchs_results_through_egress_with_a_virtual_key(batches):
    """Before, the SDK sent the virtual key itself to the provider's results_url: a secret leaked to a
    third party (and refused there)."""
    egress, upstream = batches
    key, claims = mint(ISSUER, "batch-app")
    client = anthropic.Anthropic(base_url=egress.url + "/anthropic", api_key=key, max_retries=0, timeout=5)
    results_url, results = _create_retrieve_and_read(client)
    for request in upstream.requests:
        assert b"bai_" not in request and key.encode() not in request
        assert b" sk-pool-test-0123456789\r\n" in request  # egress's pool key in its place
    assert [r.custom_id for r in results] == ["my-first-request", "my-second-request"]
    _assert_read_through_egress(egress, upstream, claims.kid, "/anthropic")
    assert results_url == RESULTS_PATH


def test_the_sdk_sees_relative_results_urls_in_a_list_and_a_cancel(batches):
    egress, upstream = batches
    origin = upstream.base_url
    listed = {"data": [_batch(origin), _batch(origin, "in_progress", "msgbatch_2")], "first_id": BATCH_ID,
              "has_more": False, "last_id": "msgbatch_2"}  # fmt: skip
    upstream.replies[:] = [_reply(orjson.dumps(listed)), _reply(orjson.dumps(_batch(origin, "canceling")))]
    client = anthropic.Anthropic(base_url=egress.url + "/anthropic", api_key="sk-ant-byo", max_retries=0, timeout=5)
    page = client.messages.batches.list(limit=2)
    assert [(batch.id, batch.results_url) for batch in page.data] == [(BATCH_ID, RESULTS_PATH), ("msgbatch_2", None)]
    canceled = client.messages.batches.cancel(BATCH_ID)
    assert canceled.processing_status == "canceling" and canceled.results_url is None
    facts = facts_of(egress, 2)
    assert [(f["usage_reason"], f["batch_id"]) for f in facts] == [("not_metered", None), ("batch", BATCH_ID)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "base", ["/anthropic", "/anthropic/", ""], ids=["no trailing slash", "trailing slash", "drop-in"]
)
def test_the_npm_sdk_reads_a_batchs_results_through_egress_with_a_virtual_key(batches, base):
    """@anthropic-ai/sdk's `batches.results()` (tests/node/anthropic.mjs): `buildURL` joins the relative
    results_url to its base URL, one `/` dropped when both have it."""
    egress, upstream = batches
    del upstream.replies[0]  # no create: the scenario retrieves, then reads the results
    key, claims = mint(ISSUER, "node-batch-app")
    env = {name: value for name, value in os.environ.items() if not name.startswith("ANTHROPIC_")}
    env.update(EGRESS_API_KEY=key, BATCH_ID=BATCH_ID)
    out = run_node_script(Path(__file__).parent / "node" / "anthropic.mjs", [egress.url + base, "batch-results"], env)
    assert out["resultsURL"] == RESULTS_PATH
    assert [r["custom_id"] for r in out["results"]] == ["my-first-request", "my-second-request"]
    assert [request.split(b"\r\n", 1)[0] for request in upstream.requests] == [
        b"GET /v1/messages/batches/%s HTTP/1.1" % BATCH_ID.encode(),
        b"GET /v1/messages/batches/%s HTTP/1.1" % BATCH_ID.encode(),
        b"GET /v1/messages/batches/%s/results HTTP/1.1" % BATCH_ID.encode(),
    ]
    assert all(
        key.encode() not in request and b" sk-pool-test-0123456789\r\n" in request for request in upstream.requests
    )
    facts = facts_of(egress, 3)
    assert [(f["usage"], f["input_tokens"], f["output_tokens"], f["batch_id"]) for f in facts] == [
        ("missing", None, None, BATCH_ID),
        ("missing", None, None, BATCH_ID),
        ("complete", 21, 70, BATCH_ID),
    ]
    assert {f["kid"] for f in facts} == {claims.kid}

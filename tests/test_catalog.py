"""`GET /v1/models` from the providers' own lists: fetched with a pool key in the background, the
last good list kept through failures, and never a wait on a slow provider."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import openai
import orjson
import pytest

from egress.catalog import ListError, list_target, parse_list
from egress.providers import Provider
from tests.support import LoopbackServer, RawClient, _split_request, request_bytes, samples, value, wait_until

POOL = "sk-pool-catalog-0123456789"


# --- the wire, sans-IO -----------------------------------------------------------------------


def test_list_targets_follow_each_providers_api_root():
    assert list_target(Provider("openai", "https://api.openai.com")) == b"/v1/models"
    assert list_target(Provider("groq", "https://api.groq.com", api_root="/openai/v1")) == b"/openai/v1/models"
    assert list_target(Provider("vllm", "http://10.0.0.1:8000/prefix")) == b"/prefix/v1/models"
    anthropic = Provider("anthropic", "https://api.anthropic.com", auth="x-api-key", dialect="anthropic")
    assert list_target(anthropic) == b"/v1/models?limit=1000"
    assert list_target(anthropic, "claude 3&x") == b"/v1/models?limit=1000&after_id=claude%203%26x"


def test_an_openai_list_is_one_page():
    body = b'{"object":"list","data":[{"id":"gpt-4o","object":"model","owned_by":"system"},{"id":"o3"}]}'
    assert parse_list(body) == (["gpt-4o", "o3"], None)


def test_an_anthropic_list_pages_by_its_last_id():
    page = {
        "data": [{"id": "claude-opus-4-1", "type": "model", "display_name": "Claude Opus 4.1"}],
        "has_more": True,
        "first_id": "claude-opus-4-1",
        "last_id": "claude-opus-4-1",
    }
    assert parse_list(orjson.dumps(page)) == (["claude-opus-4-1"], "claude-opus-4-1")
    page["has_more"] = False
    assert parse_list(orjson.dumps(page)) == (["claude-opus-4-1"], None)


@pytest.mark.parametrize(
    "body",
    [
        b"<html>",
        b"[]",
        b'{"object":"list"}',
        b'{"data":{"id":"x"}}',
        b'{"data":[{"name":"no-id"}]}',
        b'{"data":[{"id":""}]}',
        b'{"data":[{"id":7}]}',
        b'{"data":[{"id":"bad\\nid"}]}',
        orjson.dumps({"data": [{"id": "x" * 300}]}),
    ],
)
def test_a_list_egress_cant_read_is_refused_whole(body):
    with pytest.raises(ListError):
        parse_list(body)


# --- the running process -----------------------------------------------------------------------


class ModelListUpstream(LoopbackServer):
    """A provider's list endpoint: OpenAI's one page, or Anthropic's pages of one model each.

    `mode` is "ok", "fail" (a 500) or "hang" (reads the request, never answers); every request is
    recorded with its headers.
    """

    def __init__(self, openai_ids: list[str], anthropic_ids: list[str]) -> None:
        self.openai_ids = openai_ids
        self.anthropic_ids = anthropic_ids
        self.mode = "ok"
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        for raw in self._requests(conn, _split_request):
            head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            target = head[0].split(" ")[1]
            headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in head[1:])}
            with self.lock:
                self.requests.append((target, headers))
                mode = self.mode
            if mode == "hang":
                while not self._stop.is_set():
                    time.sleep(0.05)
                return
            if mode == "fail":
                body, status = b'{"error":{"message":"internal","type":"server_error"}}', "500 Internal Server Error"
            elif target.startswith("/anthropic/"):
                body, status = self._anthropic_page(target), "200 OK"
            else:
                page = {"object": "list", "data": [{"id": m, "object": "model"} for m in self.openai_ids]}
                body, status = orjson.dumps(page), "200 OK"
            head_bytes = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
            try:
                conn.sendall(head_bytes.encode() + body)
            except OSError:
                return

    def _anthropic_page(self, target: str) -> bytes:
        after = target.partition("after_id=")[2] or None
        ids = self.anthropic_ids
        start = ids.index(after) + 1 if after else 0
        data = [{"id": m, "type": "model", "display_name": m} for m in ids[start : start + 1]]
        more = start + 1 < len(ids)
        return orjson.dumps({"data": data, "has_more": more, "first_id": ids[start], "last_id": ids[start]})

    def seen(self, prefix: str) -> list[tuple[str, dict[str, str]]]:
        with self.lock:
            return [request for request in self.requests if request[0].startswith(prefix)]


@pytest.fixture
def lists():
    upstream = ModelListUpstream(["gpt-4o", "gpt-4o-mini", "shared-model"], ["claude-a", "claude-b", "shared-model"])
    yield upstream
    upstream.stop()


def catalog_config(upstream: ModelListUpstream, tmp_path: Path, refresh: float = 600.0, extra: str = "") -> str:
    pool = tmp_path / "pool.keys"
    pool.write_text(POOL + "\n")
    return f"""
[upstream]
model_list_refresh = {refresh}
model_list_timeout = 1.0

[providers.openai]
base_url = "{upstream.base_url}/openai"
pool_keys = ["file:{pool}"]

[providers.anthropic]
base_url = "{upstream.base_url}/anthropic"
pool_keys = ["file:{pool}"]

[providers.groq]
base_url = "{upstream.base_url}/groq"
models = ["llama-configured"]

[[routes]]
match = "claude-*"
provider = "anthropic"
[[routes]]
match = "llama-*"
provider = "groq"
[[routes]]
match = "*"
provider = "openai"
{extra}
"""


def listed(egress) -> dict[str, str]:
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/v1/models"))
        response = client.read_response()
    assert response.status == 200, response.body
    return {entry["id"]: entry["owned_by"] for entry in response.json()["data"]}


def test_models_come_from_each_providers_own_list_fetched_with_a_pool_key(start_egress, lists, tmp_path):
    egress = start_egress(catalog_config(lists, tmp_path))
    assert wait_until(lambda: len(listed(egress)) == 7, timeout=5), listed(egress)
    assert listed(egress) == {
        "gpt-4o": "openai",
        "gpt-4o-mini": "openai",
        "openai:shared-model": "openai",
        "claude-a": "anthropic",
        "claude-b": "anthropic",
        "anthropic:shared-model": "anthropic",
        "llama-configured": "groq",  # the row's own `models`: never fetched
    }
    openai_fetches = lists.seen("/openai/")
    assert [target for target, _ in openai_fetches] == ["/openai/v1/models"]
    assert openai_fetches[0][1]["authorization"] == f"Bearer {POOL}"
    anthropic_fetches = lists.seen("/anthropic/")
    assert [target for target, _ in anthropic_fetches] == [
        "/anthropic/v1/models?limit=1000",
        "/anthropic/v1/models?limit=1000&after_id=claude-a",
        "/anthropic/v1/models?limit=1000&after_id=claude-b",
    ]
    for _, headers in anthropic_fetches:
        assert headers["x-api-key"] == POOL
        assert headers["anthropic-version"] == "2023-06-01"
        assert "authorization" not in headers
    assert lists.seen("/groq/") == []
    assert POOL not in egress.logs()


def test_what_is_listed_is_what_is_served_through_the_sdk(start_egress, lists, tmp_path):
    egress = start_egress(catalog_config(lists, tmp_path))
    client = openai.OpenAI(base_url=egress.url + "/v1", api_key="sk-byo-catalog", max_retries=0)
    assert wait_until(lambda: len(list(client.models.list())) == 7, timeout=5)
    ids = {model.id: model.owned_by for model in client.models.list()}
    assert ids["claude-b"] == "anthropic" and ids["anthropic:shared-model"] == "anthropic"


def test_the_last_good_list_is_served_while_the_provider_fails(start_egress, lists, tmp_path):
    egress = start_egress(catalog_config(lists, tmp_path, refresh=0.3))
    assert wait_until(lambda: len(listed(egress)) == 7, timeout=5)  # every provider's list is in
    good = listed(egress)
    before = len(lists.seen("/openai/"))
    lists.mode = "fail"
    # Refreshed every 0.3 s: wait until a refresh has failed (one more request, answered 500).
    assert wait_until(lambda: len(lists.seen("/openai/")) >= before + 2, timeout=5)
    assert listed(egress) == good
    found = samples(egress.admin_port)
    assert value(found, "egress_model_list_fetches_total", provider="openai", outcome="error") >= 1
    assert value(found, "egress_model_list_fetches_total", provider="openai", outcome="ok") >= 1
    assert '"event":"model_list_failed"' in egress.logs()
    assert "the provider answered 500" in egress.logs()
    assert POOL not in egress.logs()
    lists.mode = "ok"
    lists.openai_ids = ["gpt-5"]
    assert wait_until(lambda: "gpt-5" in listed(egress), timeout=10)
    assert "gpt-4o" not in listed(egress)


def test_a_provider_that_never_answers_never_holds_up_the_list(start_egress, lists, tmp_path):
    lists.mode = "hang"
    egress = start_egress(catalog_config(lists, tmp_path))
    assert wait_until(lambda: lists.seen("/openai/") and lists.seen("/anthropic/"), timeout=5)
    started = time.monotonic()
    assert listed(egress) == {"llama-configured": "groq"}
    # Answered from memory; a listing that waited on the provider would take the 1 s fetch timeout.
    assert time.monotonic() - started < 0.9
    assert wait_until(lambda: "timed out" in egress.logs(), timeout=5)


def test_a_reload_keeps_the_lists_of_providers_it_did_not_move(start_egress, lists, tmp_path):
    egress = start_egress(catalog_config(lists, tmp_path))
    assert wait_until(lambda: len(listed(egress)) == 7, timeout=5)
    lists.mode = "hang"  # any refetch would leave its provider's list empty
    egress.config_path.write_text(catalog_config(lists, tmp_path).replace('"llama-configured"', '"llama-reloaded"'))
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: '"event":"reloaded"' in egress.logs(), timeout=5), egress.logs()
    shown = listed(egress)
    assert shown["claude-a"] == "anthropic" and shown["gpt-4o"] == "openai"
    assert shown["llama-reloaded"] == "groq" and "llama-configured" not in shown


def test_the_list_is_fetched_over_verified_tls(start_egress, fake_provider, ca_file, tmp_path):
    pool = tmp_path / "pool.keys"
    pool.write_text(POOL + "\n")
    egress = start_egress(
        f"""
[upstream]
ca_file = "{ca_file}"
[providers.openai]
base_url = "{fake_provider.base_url}"
pool_keys = ["file:{pool}"]
"""
    )
    assert wait_until(lambda: "gpt-fake" in listed(egress), timeout=5)
    fetch = next(r for r in fake_provider.list_fetches if r.target == "/v1/models")
    assert fetch.header("authorization") == f"Bearer {POOL}"

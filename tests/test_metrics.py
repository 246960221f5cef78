"""/metrics on the admin listener, scraped after a mixed run, matches what was sent."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import openai
import orjson
import trustme
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.vkeys import mint, public_key_text
from tests.conftest import provider_config, virtual_key_config
from tests.support import RawClient, admin_get, free_port, request_bytes, samples, value, wait_until
from tests.test_workers import worker_indexes, worker_pids

ISSUER = Ed25519PrivateKey.generate()


def test_metrics_after_a_mixed_run(start_egress, fake_provider, ca_file, tmp_path):
    config = virtual_key_config(
        fake_provider, ca_file, tmp_path, public_key_text(ISSUER.public_key()), "[limits]\nrequests_per_minute = 4\n"
    )
    egress = start_egress(config)
    key, _ = mint(ISSUER, "metrics-app")
    client = openai.OpenAI(base_url=egress.url + "/openai/v1", api_key=key, max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="gpt-fake", messages=messages)
    client.chat.completions.create(model="gpt-fake", messages=messages)
    list(
        client.chat.completions.create(
            model="gpt-fake", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    client.models.list()
    for _ in range(2):
        try:
            client.models.list()
        except openai.RateLimitError:
            pass
    with RawClient(egress.port) as raw:
        raw.send(request_bytes("GET", "/nosuch/v1/models"))
        raw.read_response()
        raw.send(request_bytes("GET", "/openai/v1/models", {"Authorization": "Bearer bai_garbage"}))
        raw.read_response()

    found = samples(egress.admin_port)
    assert value(found, "egress_requests_total", provider="openai", status_class="2xx") == 4
    assert value(found, "egress_requests_total", provider="openai", status_class="4xx") == 3
    assert value(found, "egress_requests_total", provider="none", status_class="4xx") == 1
    assert value(found, "egress_rate_limited_total", provider="openai") == 2
    assert value(found, "egress_key_failures_total", reason="invalid_key") == 1
    assert value(found, "egress_tokens_total", provider="openai", model="gpt-fake", kind="input") == 36
    assert value(found, "egress_tokens_total", provider="openai", model="gpt-fake", kind="output") == 20
    assert value(found, "egress_usage_facts_total", provider="openai", usage="complete") == 3
    assert value(found, "egress_usage_facts_total", provider="openai", usage="missing") == 1  # /models
    assert value(found, "egress_request_duration_seconds_count", provider="openai") == 7
    assert value(found, "egress_upstream_ttfb_seconds_count", provider="openai") == 4
    # The caller's time to a head counts every answer, egress's own (the 429s, the 401) too.
    assert value(found, "egress_ttfb_seconds_count", provider="openai") == 7
    # Every answer the provider gave whole: egress's own part of it, and one stream's duration.
    assert value(found, "egress_overhead_seconds_count", provider="openai") == 4
    assert (
        0
        <= value(found, "egress_overhead_seconds_sum", provider="openai")
        < value(found, "egress_request_duration_seconds_sum", provider="openai")
    )
    assert value(found, "egress_stream_duration_seconds_count", provider="openai") == 1
    assert value(found, "egress_response_bytes_total", provider="openai") > 0
    assert value(found, "egress_upstream_idle_connections", host="localhost") == 1
    assert value(found, "egress_deny_set_size") == 0
    assert value(found, "egress_open_connections") >= 0
    assert all("kid" not in dict(labels) and "path" not in dict(labels) for _, labels in found)
    # The process's own figures, as prometheus-client's process collector reads them from /proc.
    assert value(found, "process_resident_memory_bytes") > 0
    assert value(found, "process_open_fds") > 0
    assert value(found, "process_start_time_seconds") > 1_700_000_000


def test_health_and_readiness_on_the_admin_listener(egress, fake_provider):
    assert admin_get(egress.admin_port, "/healthz")[0] == 200
    assert admin_get(egress.admin_port, "/readyz")[0] == 200
    assert admin_get(egress.admin_port, "/nope")[0] == 404
    with RawClient(egress.port, timeout=10) as client:
        body = b'{"model":"gpt-fake","messages":[],"stream":true}'
        client.send(
            request_bytes(
                "POST",
                "/openai/v1/chat/completions",
                {
                    "Content-Type": "application/json",
                    "x-fake-scenario": "long-stream",
                    "x-fake-events": "30",
                    "x-fake-interval": "0.05",
                },
                body,
            )
        )
        assert wait_until(lambda: fake_provider.streams, timeout=5)
        egress.signal()
        assert wait_until(lambda: admin_get(egress.admin_port, "/readyz")[0] == 503, timeout=2)
        assert client.read_response("POST").complete
    assert egress.wait(timeout=10) == 0


def test_overhead_leaves_out_the_time_the_provider_took(egress, fake_provider):
    headers = {"x-fake-scenario": "slow-head", "x-fake-delay": "0.6", "Authorization": "Bearer sk-byo-metrics"}
    with RawClient(egress.port, timeout=10) as client:
        client.send(request_bytes("GET", "/openai/v1/models", headers))
        assert client.read_response().status == 200
    found = samples(egress.admin_port)
    # The provider held its head 0.6 s: the request took longer than that, egress's part far less.
    assert value(found, "egress_request_duration_seconds_bucket", provider="openai", le="0.5") == 0
    assert value(found, "egress_upstream_ttfb_seconds_bucket", provider="openai", le="0.5") == 0
    assert value(found, "egress_overhead_seconds_bucket", provider="openai", le="0.5") == 1
    assert value(found, "egress_overhead_seconds_count", provider="openai") == 1


def byo_models(port: int, count: int) -> None:
    """`count` BYO requests, each on a connection of its own: SO_REUSEPORT spreads them over the workers."""
    for _ in range(count):
        with RawClient(port) as client:
            client.send(request_bytes("GET", "/openai/v1/models", {"Authorization": "Bearer sk-byo-workers"}))
            assert client.read_response().status == 200


def scrapes_agree(port: int, name: str, expected: float, **labels: str) -> None:
    """Every scrape (each a new connection, reaching either worker) says the host's total."""
    for _ in range(6):
        assert value(samples(port), name, **labels) == expected


def test_one_endpoint_answers_for_every_worker_and_a_restart_never_takes_a_count_back(
    start_egress, fake_provider, ca_file
):
    egress = start_egress(provider_config(fake_provider, ca_file), workers=2)
    byo_models(egress.port, 30)
    served = {record["worker"] for record in egress.access_records()}
    assert served == {0, 1}  # both workers answered some: the sum below is over both
    scrapes_agree(egress.admin_port, "egress_requests_total", 30, provider="openai", status_class="2xx")
    found = samples(egress.admin_port)
    assert value(found, "egress_worker_up", worker="0") == value(found, "egress_worker_up", worker="1") == 1
    for worker in ("0", "1", "supervisor"):  # every process's own figures, told apart by `worker`
        assert value(found, "process_resident_memory_bytes", worker=worker) > 0
    assert value(found, "egress_open_connections", worker="0") >= 0
    counters = ("egress_requests_total", "egress_request_duration_seconds_count", "egress_response_bytes_total")
    assert not any("worker" in dict(labels) for name, labels in found if name in counters)

    status = orjson.loads(admin_get(egress.admin_port, "/status")[1])
    assert {(entry["worker"], entry["pid"]) for entry in status["workers"]} == {
        (index, pid) for index, pid in worker_indexes(egress).items()
    }
    assert all(entry["running"] and entry["open_connections"] >= 0 for entry in status["workers"])

    victim = max(worker_pids(egress))
    os.kill(victim, signal.SIGKILL)  # no drain, no flush: the counts are already in shared memory
    assert wait_until(lambda: len(worker_pids(egress) - {victim}) == 2, timeout=10)
    restarted = orjson.loads(admin_get(egress.admin_port, "/status")[1])["workers"]
    assert {entry["pid"] for entry in restarted} == set(worker_indexes(egress).values()) and victim not in {
        entry["pid"] for entry in restarted
    }
    scrapes_agree(egress.admin_port, "egress_requests_total", 30, provider="openai", status_class="2xx")
    byo_models(egress.port, 10)
    scrapes_agree(egress.admin_port, "egress_requests_total", 40, provider="openai", status_class="2xx")
    assert value(samples(egress.admin_port), "egress_request_duration_seconds_count", provider="openai") == 40


def test_sse_events_are_counted_by_surface(egress, fake_provider):
    with RawClient(egress.port, timeout=10) as client:
        for _ in range(2):
            client.send(
                request_bytes(
                    "POST",
                    "/openai/v1/chat/completions",
                    {
                        "Content-Type": "application/json",
                        "Authorization": "Bearer sk-byo-events",
                        "x-fake-scenario": "long-stream",
                        "x-fake-events": "17",
                        "x-fake-interval": "0",
                    },
                    b'{"model":"gpt-fake","messages":[],"stream":true}',
                )
            )
            body = client.read_response("POST").body
    client = openai.OpenAI(base_url=egress.url + "/v1", api_key="sk-byo-events", max_retries=0)
    chunks = list(
        client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}], stream=True)
    )
    found = samples(egress.admin_port)
    events = body.count(b"\n\n")
    assert events >= 17
    assert value(found, "egress_sse_events_total", provider="openai", surface="passthrough") == 2 * events
    # The unified surface's stream: every chunk the SDK read, and the closing [DONE].
    assert value(found, "egress_sse_events_total", provider="openai", surface="chat") == len(chunks) + 1
    assert value(found, "egress_requests_total", provider="openai", surface="chat", status_class="2xx") == 1
    assert value(found, "egress_requests_total", provider="openai", surface="passthrough", status_class="2xx") == 2


def test_promtool_finds_the_exposition_clean(start_egress, fake_provider, ca_file, tmp_path):
    """`promtool check metrics` (Prometheus's own linter) on a scrape of two workers after mixed traffic."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: .ci/run installs it (Debian package prometheus)"
    config = virtual_key_config(fake_provider, ca_file, tmp_path, public_key_text(ISSUER.public_key()), "")
    egress = start_egress(config, workers=2)
    key, _ = mint(ISSUER, "promtool-app")
    client = openai.OpenAI(base_url=egress.url + "/openai/v1", api_key=key, max_retries=0)
    client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    list(client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}], stream=True))
    byo_models(egress.port, 4)
    status, exposition = admin_get(egress.admin_port, "/metrics")
    assert status == 200 and b"egress_tokens_total" in exposition and b'worker="supervisor"' in exposition
    checked = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked


def test_errors_incomplete_responses_and_new_upstream_connections_are_counted(
    start_egress, fake_provider, ca_file, tmp_path
):
    closed = free_port()  # nothing listens there
    config = provider_config(fake_provider, ca_file) + f'\n[providers.gone]\nbase_url = "http://127.0.0.1:{closed}"\n'
    egress = start_egress(config)
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/openai/v1/models"))
        assert client.read_response().status == 200
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/gone/v1/models"))
        refused = client.read_response()
        assert refused.status == 502  # egress's own upstream_connect_error
        attempts = int(refused.headers["x-egress-attempts"])  # a refused connect is tried again
    with RawClient(egress.port) as client:  # two events, then the provider aborts: a cut response
        body = b'{"model":"gpt-fake","messages":[],"stream":true}'
        headers = {"Content-Type": "application/json", "x-fake-scenario": "cut-stream"}
        client.send(request_bytes("POST", "/openai/v1/chat/completions", headers, body))
        assert not client.read_response("POST").complete
    found = samples(egress.admin_port)
    assert value(found, "egress_errors_total", provider="gone", code="upstream_connect_error") == 1
    assert value(found, "egress_errors_total") == 1
    assert value(found, "egress_responses_incomplete_total", provider="openai", outcome="upstream_cut") == 1
    assert value(found, "egress_upstream_connections_total", host="127.0.0.1", outcome="error") == attempts > 1
    assert value(found, "egress_upstream_connections_total", outcome="ok") >= 1
    # A provider whose certificate egress can't verify (another CA's bundle): a TLS failure.
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    untrusting = start_egress(provider_config(fake_provider, other_ca), name="untrusting")
    with RawClient(untrusting.port) as client:
        client.send(request_bytes("GET", "/openai/v1/models"))
        refused = client.read_response()
        assert refused.status == 502
    found = samples(untrusting.admin_port)
    tries = int(refused.headers["x-egress-attempts"])
    assert value(found, "egress_upstream_connections_total", outcome="tls_error") == tries
    assert value(found, "egress_upstream_connections_total") == tries  # none of them counted otherwise

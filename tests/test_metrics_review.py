"""What /metrics and /status tell an operator of a multi-worker host, checked against what happened."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import openai
import orjson

from tests.conftest import provider_config
from tests.support import RawClient, admin_get, egress_command, free_port, request_bytes, samples, value, wait_until
from tests.test_surface_cuts import RECORDED, _AnthropicStream, _translated
from tests.test_workers import worker_indexes


def byo_models(port: int, count: int) -> None:
    for _ in range(count):  # a connection each: the kernel spreads them over the workers
        with RawClient(port) as client:
            client.send(request_bytes("GET", "/openai/v1/models", {"Authorization": "Bearer sk-byo-review"}))
            assert client.read_response().status == 200


def status_of(port: int) -> dict:
    status, body = admin_get(port, "/status")
    assert status == 200
    return orjson.loads(body)


def answers(port: int) -> bool:
    try:
        return admin_get(port, "/healthz")[0] == 200
    except OSError:
        return False


def test_status_reports_the_hosts_dropped_facts_whichever_worker_answers(
    start_egress, fake_provider, ca_file, tmp_path
):
    config = provider_config(fake_provider, ca_file, extra=f'[usage]\njsonl = "{tmp_path}/usage.jsonl"\n')
    egress = start_egress(config, workers=2)
    # Worker 1's usage file can no longer be opened (a directory at its path): what it meters is dropped.
    w1 = tmp_path / "usage-w1.jsonl"
    w1.rename(tmp_path / "usage-w1.jsonl.1")
    w1.mkdir()
    egress.signal(signal.SIGUSR1)
    assert wait_until(lambda: egress.stderr_path.read_bytes().count(b'"event":"logs_reopened"') == 2, timeout=5)
    byo_models(egress.port, 30)
    assert wait_until(lambda: len(egress.access_records()) == 30, timeout=5)  # logged just after the answer
    served = [record["worker"] for record in egress.access_records()]
    lost = served.count(1)
    assert 0 < lost < 30
    assert wait_until(
        lambda: value(samples(egress.admin_port), "egress_usage_facts_dropped_total", sink="jsonl") == lost, timeout=5
    )
    answered = set()
    for _ in range(12):  # each on a new connection: either worker answers
        document = status_of(egress.admin_port)
        answered.add(document["worker"])
        assert document["usage"]["jsonl_dropped"] == lost, document["usage"]
        dropped = {entry["worker"]: entry["jsonl_dropped"] for entry in document["workers"]}
        assert dropped == {0: 0, 1: lost}
    assert answered == {0, 1}


def test_a_dead_workers_gauges_and_process_figures_are_gone_before_it_is_restarted(
    start_egress, fake_provider, ca_file
):
    egress = start_egress(provider_config(fake_provider, ca_file), workers=2)
    byo_models(egress.port, 6)
    # Counted in the log phase, just after the answer is written: all six before the kill.
    assert wait_until(lambda: value(samples(egress.admin_port), "egress_requests_total") == 6, timeout=5)
    victim = worker_indexes(egress)[1]
    os.kill(egress.pid, signal.SIGSTOP)  # the supervisor can neither reap nor restart it
    try:
        os.kill(victim, signal.SIGKILL)
        assert wait_until(
            lambda: Path(f"/proc/{victim}/stat").read_bytes().rpartition(b")")[2].split()[0] == b"Z", timeout=5
        )
        # The kernel may reset a connection it had queued for the dead worker's admin listener.
        assert wait_until(lambda: answers(egress.admin_port), timeout=5)
        for _ in range(6):
            found = samples(egress.admin_port)
            assert value(found, "egress_worker_up", worker="1") == 0
            assert value(found, "egress_worker_up", worker="0") == 1
            assert not [key for key in found if ("worker", "1") in key[1] and key[0] != "egress_worker_up"], found
            assert value(found, "egress_requests_total", status_class="2xx") == 6
            document = status_of(egress.admin_port)
            assert document["workers"][1] == {"worker": 1, "running": False}
    finally:
        os.kill(egress.pid, signal.SIGCONT)


def test_the_model_label_cap_is_the_hosts_not_each_workers(start_egress, fake_provider, ca_file):
    egress = start_egress(provider_config(fake_provider, ca_file), workers=2)
    for index in range(70):  # the fake names the model it was asked for, as llama.cpp's server does
        body = orjson.dumps({"model": f"local-model-{index}", "messages": [{"role": "user", "content": "hi"}]})
        with RawClient(egress.port) as client:
            headers = {"Authorization": "Bearer sk-byo-models", "Content-Type": "application/json"}
            client.send(request_bytes("POST", "/openai/v1/chat/completions", headers, body))
            assert client.read_response("POST").status == 200
    assert {record["worker"] for record in egress.access_records()} == {0, 1}
    found = samples(egress.admin_port)
    models = {dict(labels)["model"] for name, labels in found if name == "egress_tokens_total"}
    assert "other" in models and len(models - {"other"}) == 50, sorted(models)
    assert value(found, "egress_tokens_total", provider="openai", kind="input") == 70 * 12


def test_the_admin_listeners_405_names_the_methods_it_allows(egress):
    with socket.create_connection(("127.0.0.1", egress.admin_port), timeout=5) as sock:
        sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head = data.partition(b"\r\n\r\n")[0].split(b"\r\n")
    assert head[0].startswith(b"HTTP/1.1 405")
    assert b"allow: GET, HEAD" in head[1:]  # RFC 9110 §15.5.6: a 405 MUST list them


def test_a_revocation_stream_never_reached_reads_as_infinitely_stale(start_egress, fake_provider, ca_file, tmp_path):
    """NATS configured, no snapshot, the broker down since start: egress_deny_set_age_seconds is
    +Inf for every worker (an alert on `> 300` fires), not absent (which an alert never sees)."""
    nats = f'[nats]\nurl = "nats://127.0.0.1:{free_port()}"\nsnapshot = "{tmp_path}/deny.snapshot"\n'
    egress = start_egress(provider_config(fake_provider, ca_file, extra=nats), workers=2)
    byo_models(egress.port, 2)  # requests flow on the deny-set as it is
    found = samples(egress.admin_port)
    ages = {
        dict(labels)["worker"]: age for (name, labels), age in found.items() if name == "egress_deny_set_age_seconds"
    }
    assert ages == {"0": math.inf, "1": math.inf}
    exposition = admin_get(egress.admin_port, "/metrics")[1]
    checked = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, timeout=30)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked
    document = status_of(egress.admin_port)["deny_set"]
    assert document["nats_configured"] and not document["stream_connected"] and document["age_s"] is None


def test_no_revocation_stream_no_staleness_series(egress):
    found = samples(egress.admin_port)
    assert not [key for key in found if key[0] == "egress_deny_set_age_seconds"]


def test_a_stream_the_sdk_closes_at_done_is_in_the_stream_and_overhead_histograms(start_egress, tmp_path):
    """A translated stream whose caller closes at [DONE], before the provider's terminating chunk:
    a complete response (test_surface_cuts), so its stream duration and egress's overhead are observed."""
    upstream = _AnthropicStream(RECORDED, b"0\r\n\r\n", pause=0.5)
    try:
        egress = _translated(start_egress, tmp_path, upstream)
        client = openai.OpenAI(base_url=egress.url + "/v1", api_key="sk-ant-byo", max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        assert list(client.chat.completions.create(model="claude-fake", messages=messages, stream=True))
        assert wait_until(lambda: egress.access_records(), timeout=3)
        assert egress.access_records()[0]["outcome"] == "complete"
        found = samples(egress.admin_port)
        labels = {"provider": "anthropic", "surface": "chat"}
        assert value(found, "egress_requests_total", status_class="2xx", **labels) == 1
        assert value(found, "egress_stream_duration_seconds_count", **labels) == 1
        assert value(found, "egress_overhead_seconds_count", **labels) == 1
        assert value(found, "egress_overhead_seconds_sum", **labels) < 0.25  # the provider's stream is not egress's
    finally:
        upstream.stop()


def test_the_supervisor_has_its_process_figures_when_it_is_pid_1(fake_provider, ca_file, tmp_path):
    """egress as a container's entrypoint: the supervisor is PID 1 of its PID namespace. Its
    process_* figures were left out then (a parent of PID 1 was taken for init's)."""
    config = tmp_path / "egress.toml"
    config.write_text(provider_config(fake_provider, ca_file))
    admin_port = free_port()
    command = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL", *egress_command()]
    command += ["serve", "--config", str(config), "--listen", "127.0.0.1:0"]
    command += ["--admin-listen", f"127.0.0.1:{admin_port}", "--workers", "2"]
    with open(tmp_path / "stderr.log", "wb") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    logged = tmp_path / "stderr.log"
    try:
        assert wait_until(lambda: b'"event":"supervisor_ready","workers":2,"pid":1}' in logged.read_bytes(), timeout=15)
        assert wait_until(lambda: answers(admin_port), timeout=5)
        for _ in range(4):  # either worker answers
            found = samples(admin_port)
            for worker in ("0", "1", "supervisor"):
                assert value(found, "process_resident_memory_bytes", worker=worker) > 0, worker
    finally:
        # unshare ignores SIGTERM while it waits: the supervisor (its child, PID 1 inside) is told.
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGTERM)
        if not children:
            process.kill()
        process.wait(timeout=15)


def test_a_slow_upload_is_no_part_of_egress_s_overhead(start_egress, fake_provider, ca_file):
    # The caller's body trickling in (and a pipelined request's wait behind the one before) comes
    # before the request's turn: egress_overhead_seconds counted it as egress's own time.
    egress = start_egress(provider_config(fake_provider, ca_file))
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
    head = (
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: egress\r\nAuthorization: Bearer sk-byo-upload\r\n"
        b"Content-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(("127.0.0.1", egress.port), timeout=10) as sock:
        sock.sendall(head + body[:10])
        time.sleep(0.7)
        sock.sendall(body[10:])
        while sock.recv(65536):
            pass
    found = samples(egress.admin_port)
    assert value(found, "egress_overhead_seconds_count", provider="openai") == 1
    assert value(found, "egress_overhead_seconds_sum", provider="openai") < 0.3
    # The whole, as ever: from the head's first byte (the 0.7 s sleep, less the head's own way there).
    assert value(found, "egress_request_duration_seconds_sum", provider="openai") >= 0.6

"""Operations follow-ups, each against the real `egress serve`: a reload without a config file, the
open relay said at a reload, `/dev/stdout` as an access log, a bare-LF request on the admin port,
each worker's own uptime in /status, and /metrics through a worker's SIGKILL."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import provider_config
from tests.support import (
    EgressProcess,
    RawClient,
    admin_get,
    request_bytes,
    run_egress_cli,
    value,
    wait_until,
)
from tests.test_metrics import byo_models
from tests.test_reload import events
from tests.test_workers import worker_indexes, worker_pids


class CommandLineEgress(EgressProcess):
    """`egress serve` with the command line a test gives (no `--config` at all, a listen address
    off loopback), stopped by `launch` whatever the test's outcome."""

    def __init__(self, workdir: Path, config_text: str | None, args: list[str], workers: int) -> None:
        super().__init__(workdir, config_text or "", name="cli", workers=workers)
        if config_text is None:
            self.config_path.unlink()
        self.args = args

    def serve_args(self) -> list[str]:
        return self.args


@pytest.fixture
def launch(tmp_path: Path, egress_processes: list):
    def start(config_text: str | None, args: list[str], workers: int = 1) -> CommandLineEgress:
        process = CommandLineEgress(tmp_path, config_text, args, workers)
        egress_processes.append(process)
        return process.start()

    return start


# --- 1. SIGHUP with the built-in config --------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_without_a_config_file_says_it_cannot(launch, workers):
    """`systemctl reload` of an egress started without --config: one line says nothing was reloaded
    and why, instead of silence (one process) or `supervisor_reload` as if it had worked."""
    egress = launch(None, ["--listen", "127.0.0.1:0"], workers=workers)
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: events(egress, "reload_skipped"), timeout=5), egress.logs()
    assert wait_until(lambda: len(events(egress, "logs_reopened")) == workers, timeout=5)  # the rest of a SIGHUP
    time.sleep(0.2)
    (skipped,) = events(egress, "reload_skipped")
    assert "--config" in skipped["reason"]
    assert not events(egress, "supervisor_reload") and not events(egress, "reloaded")
    with RawClient(egress.port) as client:  # and it serves on as before
        client.send(request_bytes("GET", "/nosuch/v1/models"))
        assert client.read_response().status == 404


# --- 2. the open relay, at a reload --------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_that_opens_the_relay_says_so_as_a_start_does(launch, fake_provider, ca_file, workers):
    closed = provider_config(fake_provider, ca_file, extra="[keys]\nallow_byo = false\n")
    # Off loopback, as an operator's would be; every connection of the test comes from loopback.
    egress = launch(closed, ["--config", "cli.toml", "--listen", "0.0.0.0:0"], workers=workers)
    assert not events(egress, "open_relay")
    egress.config_path.write_text(provider_config(fake_provider, ca_file, extra="[keys]\nallow_byo = true\n"))
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: len(events(egress, "reloaded")) == workers, timeout=10), egress.logs()
    assert wait_until(lambda: events(egress, "open_relay"), timeout=5), egress.logs()
    time.sleep(0.2)
    (relay,) = events(egress, "open_relay")  # once for the host, as at start
    assert relay["listen"].startswith("0.0.0.0:") and "allow_byo" in relay["message"]
    # Closed again by the next reload: nothing said.
    egress.config_path.write_text(closed)
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: len(events(egress, "reloaded")) == 2 * workers, timeout=10), egress.logs()
    time.sleep(0.2)
    assert len(events(egress, "open_relay")) == 1


# --- 3. /dev/stdout as the access log ------------------------------------------------------------


@pytest.mark.parametrize("path", ["/dev/stdout", "/dev/stderr"])
def test_an_access_log_on_dev_stdout_is_pointed_to_stdout(tmp_path, path):
    config = tmp_path / "egress.toml"
    config.write_text(f'[server]\naccess_log = "{path}"\n')
    stream = path.rsplit("/", 1)[1]
    for args in (["config", "check", str(config)], ["serve", "--config", str(config), "--listen", "127.0.0.1:0"]):
        result = run_egress_cli(*args)  # stdout and stderr are pipes here: not regular files
        assert result.returncode == 2, result
        assert f'server.access_log = "{stream}"' in result.stderr, result.stderr
    doctor = run_egress_cli("doctor", "--config", str(config))
    (line,) = [line for line in doctor.stdout.splitlines() if "server.access_log" in line]
    assert line.startswith("fail  state_paths") and f'"{stream}"' in line


# --- 4. a bare-LF request on the admin port ------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\nHost: admin\n\n",
        b"GET /metrics HTTP/1.1\r\nHost: admin\n\n",
        b"GET /status HTTP/1.1\nHost: admin\r\n\r\n",
        b"GET /healthz HTTP/1.1\n",  # not even a whole head yet: the first line is already wrong
    ],
)
def test_a_bare_lf_request_gets_a_400_on_both_ports_never_a_silent_wait(egress, head):
    for port in (egress.port, egress.admin_port):
        with RawClient(port, timeout=3) as client:
            began = time.monotonic()
            client.send(head)
            response = client.read_response()
            assert response.status == 400, port
            assert client.server_closed(timeout=2)
            assert time.monotonic() - began < 2
    assert admin_get(egress.admin_port, "/healthz")[0] == 200  # CRLF still served


# --- 5. each worker's own uptime in /status ------------------------------------------------------


def test_status_gives_each_workers_own_uptime(start_egress, fake_provider, ca_file):
    egress = start_egress(provider_config(fake_provider, ca_file), workers=2)
    time.sleep(1.5)  # so that the restarted worker is clearly younger than the host
    status = orjson.loads(admin_get(egress.admin_port, "/status")[1])
    assert all(entry["uptime_s"] >= 1.4 for entry in status["workers"])
    first = worker_pids(egress)
    victim = max(first)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(worker_pids(egress) - first) == 1, timeout=10)
    (successor,) = worker_pids(egress) - first
    status = orjson.loads(admin_get(egress.admin_port, "/status")[1])
    by_pid = {entry["pid"]: entry for entry in status["workers"]}
    restarted, survivor = by_pid[successor], by_pid[min(first)]
    assert 0 <= restarted["uptime_s"] <= time.monotonic() - killed_at + 0.1
    assert survivor["uptime_s"] >= 1.4
    assert status["uptime_s"] >= 1.4  # the host's: since egress started, whichever worker answers


# --- /metrics through a worker's SIGKILL ---------------------------------------------------------


def _scrape(port: int) -> tuple[dict[tuple[str, frozenset], float], dict[str, str], bytes]:
    """Every sample, each family's type, and the exposition as sent."""
    status, body = admin_get(port, "/metrics")
    assert status == 200
    found, types = {}, {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found, types, body


def _promtool_clean(exposition: bytes) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: .ci/run installs it (Debian package prometheus)"
    checked = subprocess.run([promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), checked


def _counters(found, types) -> dict:
    """The samples that must never go down: egress's counters, and its histograms' buckets, counts
    and sums. Not `process_*`: a process's own CPU seconds start again with the process, as any
    exporter's do, and its `process_start_time_seconds` says so."""
    kept = {}
    for (name, labels), sample in found.items():
        family = re.sub(r"_(total|bucket|count|sum|created)$", "", name)
        if types.get(family) in ("counter", "histogram") and not name.startswith("process_"):
            kept[(name, labels)] = sample
    return kept


def test_metrics_through_a_worker_killed_outright(start_egress, fake_provider, ca_file):
    egress = start_egress(provider_config(fake_provider, ca_file), workers=2)
    byo_models(egress.port, 20)
    found, types, exposition = _scrape(egress.admin_port)
    _promtool_clean(exposition)
    before = _counters(found, types)
    assert value(found, "egress_requests_total", provider="openai", status_class="2xx") == 20
    indexes = worker_indexes(egress)
    victim_index = 1
    victim = indexes[victim_index]
    started = found[("process_start_time_seconds", frozenset({("worker", str(victim_index))}))]
    supervisor = egress.pid
    os.kill(supervisor, signal.SIGSTOP)  # no restart until the dead worker's scrape is read
    try:
        os.kill(victim, signal.SIGKILL)
        time.sleep(0.3)
        for _ in range(4):  # whichever worker answers: only the survivor can
            found, types, exposition = _scrape(egress.admin_port)
            _promtool_clean(exposition)
            for key, sample in before.items():
                assert found.get(key, 0) >= sample, key
            assert found[("egress_worker_up", frozenset({("worker", str(victim_index))}))] == 0
            dead = [key for key in found if ("worker", str(victim_index)) in key[1] and key[0] != "egress_worker_up"]
            assert not dead, dead
    finally:
        os.kill(supervisor, signal.SIGCONT)
    assert wait_until(lambda: len(worker_pids(egress) - {victim}) == 2, timeout=10)
    byo_models(egress.port, 10)
    for _ in range(4):
        found, types, exposition = _scrape(egress.admin_port)
        _promtool_clean(exposition)
        for key, sample in before.items():
            assert found.get(key, 0) >= sample, key
        assert found[("egress_worker_up", frozenset({("worker", str(victim_index))}))] == 1
        assert found[("process_start_time_seconds", frozenset({("worker", str(victim_index))}))] >= started
    assert value(found, "egress_requests_total", provider="openai", status_class="2xx") == 30

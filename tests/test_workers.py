"""The process model: workers sharing a port and a rate limit, restarts, reloads, systemd readiness."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from egress.config import MAX_CONFIG_BYTES
from egress.errors import cannot_listen
from egress.workers import ConfigBox
from tests.conftest import provider_config
from tests.support import (
    EgressProcess,
    RawClient,
    admin_get,
    egress_command,
    request_bytes,
    samples,
    value,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent


def listening(egress: EgressProcess) -> list[dict]:
    """The `listening` line of every worker start, oldest first."""
    events = (orjson.loads(line) for line in egress.stderr_path.read_bytes().splitlines())
    return [event for event in events if event.get("event") == "listening"]


def worker_pids(egress: EgressProcess) -> set[int]:
    return {event["pid"] for event in listening(egress)}


def worker_indexes(egress: EgressProcess) -> dict[int, int]:
    """Worker index -> pid of the latest start of each."""
    return {event["worker"]: event["pid"] for event in listening(egress)}


def statuses(port: int, count: int, headers: dict | None = None) -> list[int]:
    found = []
    for _ in range(count):  # a new connection each time, so the kernel spreads them over workers
        with RawClient(port) as client:
            client.send(request_bytes("GET", "/openai/v1/models", headers))
            found.append(client.read_response().status)
    return found


def test_two_workers_share_the_port_and_one_rate_limit(start_egress, fake_provider, ca_file):
    egress = start_egress(
        provider_config(fake_provider, ca_file, extra="[limits]\nrequests_per_minute = 6\n"), workers=2
    )
    assert len(worker_pids(egress)) == 2
    results = statuses(egress.port, 12)
    # Six admitted in all, not six per worker: the sketch lives in memory both workers share.
    assert results.count(200) == 6 and results.count(429) == 6
    served_by = {record["worker"] for record in egress.access_records()}
    assert served_by == {0, 1}, "the kernel spread connections over both workers"


def test_a_crashed_worker_is_restarted(start_egress, fake_provider, ca_file):
    egress = start_egress(provider_config(fake_provider, ca_file), workers=2)
    victim = sorted(worker_pids(egress))[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: b'"event":"worker_restarted"' in egress.stderr_path.read_bytes(), timeout=5)
    assert wait_until(lambda: len(worker_pids(egress) - {victim}) == 2, timeout=5)
    assert statuses(egress.port, 6) == [200] * 6
    egress.signal(signal.SIGTERM)
    assert egress.wait(timeout=15) == 0


def test_sighup_reloads_providers_without_dropping_connections(start_egress, fake_provider, ca_file):
    config = provider_config(fake_provider, ca_file)
    egress = start_egress(config, workers=2)
    kept = RawClient(egress.port)
    kept.send(request_bytes("GET", "/openai/v1/models"))
    assert kept.read_response().status == 200
    assert statuses(egress.port, 1) == [200]
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/added/v1/models"))
        assert client.read_response().status == 404
    egress.config_path.write_text(config + f'\n[providers.added]\nbase_url = "{fake_provider.base_url}/added"\n')
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: egress.stderr_path.read_bytes().count(b'"event":"reloaded"') == 2, timeout=5)
    for _ in range(4):
        with RawClient(egress.port) as client:
            client.send(request_bytes("GET", "/added/v1/models"))
            assert client.read_response().status == 200
    assert fake_provider.requests[-1].target == "/added/v1/models"
    kept.send(request_bytes("GET", "/openai/v1/models"))  # the connection opened before the reload
    assert kept.read_response().status == 200
    kept.close()


def test_a_worker_restarted_after_a_reload_starts_with_the_reloaded_config(start_egress, fake_provider, ca_file):
    config = provider_config(fake_provider, ca_file)
    egress = start_egress(config, workers=2)
    egress.config_path.write_text(config + f'\n[providers.added]\nbase_url = "{fake_provider.base_url}/added"\n')
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: egress.stderr_path.read_bytes().count(b'"event":"reloaded"') == 2, timeout=5)
    victim = worker_indexes(egress)[1]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: worker_indexes(egress)[1] != victim, timeout=5)
    # Every worker, the restarted one too, serves the provider the reload added.
    answered = set()
    for _ in range(40):  # a new connection each time, so the kernel spreads them over both workers
        with RawClient(egress.port) as client:
            client.send(request_bytes("GET", "/added/v1/models"))
            answered.add(client.read_response().status)
    assert answered == {200}
    served = {
        (record["worker"], record["status"])
        for record in egress.access_records()
        if record["path"] == "/added/v1/models"
    }
    assert served == {(0, 200), (1, 200)}, served
    # A metric says whether the last reload took, per worker; the restarted worker loaded its config.
    found = samples(egress.admin_port)
    assert value(found, "egress_config_last_reload_successful", worker="0") == 1
    assert value(found, "egress_config_last_reload_successful", worker="1") == 1


def test_a_reload_reads_the_file_once_for_every_worker(start_egress, fake_provider, ca_file):
    """The file changes again while the SIGHUP goes round: every worker still reloads the bytes the
    supervisor read, and no worker runs a config the others do not."""
    config = provider_config(fake_provider, ca_file)
    egress = start_egress(config, workers=2)
    late = worker_indexes(egress)[1]
    os.kill(late, signal.SIGSTOP)  # worker 1 takes its SIGHUP only once the file has changed again
    try:
        egress.config_path.write_text(config + f'\n[providers.added]\nbase_url = "{fake_provider.base_url}/added"\n')
        egress.signal(signal.SIGHUP)
        assert wait_until(lambda: egress.stderr_path.read_bytes().count(b'"event":"reloaded"') == 1, timeout=5)
        egress.config_path.write_text(config + f'\n[providers.later]\nbase_url = "{fake_provider.base_url}/later"\n')
    finally:
        os.kill(late, signal.SIGCONT)
    assert wait_until(lambda: egress.stderr_path.read_bytes().count(b'"event":"reloaded"') == 2, timeout=5)
    served = set()
    for _ in range(40):  # a new connection each time, so the kernel spreads them over both workers
        for provider in ("added", "later"):
            with RawClient(egress.port) as client:
                client.send(request_bytes("GET", f"/{provider}/v1/models"))
                served.add((provider, client.read_response().status))
    assert served == {("added", 200), ("later", 404)}, served
    assert {record["worker"] for record in egress.access_records() if record["path"] == "/added/v1/models"} == {0, 1}
    # Both run one config, and say so: /status per worker, and egress_config_info's digest label.
    document = orjson.loads(admin_get(egress.admin_port, "/status")[1])
    hashes = {row["config_hash"] for row in document["workers"]}
    assert hashes == {document["config_hash"]}, document["workers"]
    reloaded = [orjson.loads(line) for line in egress.stderr_path.read_bytes().splitlines() if b'"reloaded"' in line]
    assert {event["config_digest"] for event in reloaded} == hashes
    found = samples(egress.admin_port)
    assert {dict(labels)["digest"] for name, labels in found if name == "egress_config_info"} == hashes


def test_a_config_file_gone_at_reload_is_refused_by_every_worker_alike(start_egress, fake_provider, ca_file):
    egress = start_egress(provider_config(fake_provider, ca_file), workers=2)
    egress.config_path.unlink()
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: egress.stderr_path.read_bytes().count(b'"event":"reload_failed"') == 2, timeout=5)
    failures = [
        orjson.loads(line)["error"] for line in egress.stderr_path.read_bytes().splitlines() if b"reload_failed" in line
    ]
    assert len(set(failures)) == 1 and "No such file or directory" in failures[0], failures
    found = samples(egress.admin_port)
    assert value(found, "egress_config_last_reload_successful", worker="0") == 0
    assert value(found, "egress_config_last_reload_successful", worker="1") == 0
    assert statuses(egress.port, 4) == [200] * 4  # the running config serves on


def test_a_reload_that_fails_half_way_changes_nothing_anywhere(start_egress, fake_provider, ca_file, tmp_path):
    """A new provider and a CA bundle that does not load: every worker refuses the whole reload in
    config check's words (before, the provider went live and the reload read as a success), and a
    worker restarted afterwards starts, with the running config."""
    config = provider_config(fake_provider, ca_file)
    egress = start_egress(config, workers=2)
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("not a certificate\n")
    changed = config.replace(f'ca_file = "{ca_file}"', f'ca_file = "{garbled}"')
    assert changed != config
    egress.config_path.write_text(changed + f'\n[providers.added]\nbase_url = "{fake_provider.base_url}/added"\n')
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: egress.stderr_path.read_bytes().count(b'"event":"reload_failed"') == 2, timeout=5)
    errors = {
        orjson.loads(line)["error"] for line in egress.stderr_path.read_bytes().splitlines() if b"reload_failed" in line
    }
    assert errors == {f"upstream.ca_file {garbled}: no PEM certificates (NO_CERTIFICATE_OR_CRL_FOUND)"}, errors
    check = subprocess.run(
        [*egress_command(), "config", "check", str(egress.config_path)], capture_output=True, text=True
    )
    assert check.returncode == 2 and errors.pop() in check.stderr
    found = samples(egress.admin_port)
    assert value(found, "egress_config_last_reload_successful", worker="0") == 0
    assert value(found, "egress_config_last_reload_successful", worker="1") == 0
    victim = worker_indexes(egress)[1]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: worker_indexes(egress)[1] != victim, timeout=5)
    for provider, status in (("added", 404), ("openai", 200)):
        answered = set()
        for _ in range(20):
            with RawClient(egress.port) as client:
                client.send(request_bytes("GET", f"/{provider}/v1/models"))
                answered.add(client.read_response().status)
        assert answered == {status}, (provider, answered)
    assert b"Traceback" not in egress.stderr_path.read_bytes()


def test_a_reload_names_the_settings_only_a_restart_changes(start_egress, fake_provider, ca_file, tmp_path):
    config = provider_config(fake_provider, ca_file)
    egress = start_egress(config)
    egress.config_path.write_text(
        config
        + f'\n[limits]\nsketch_width = 1024\nrequests_per_minute = 5\n[usage]\njsonl = "{tmp_path / "u.jsonl"}"\n'
    )
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: b'"event":"reloaded"' in egress.stderr_path.read_bytes(), timeout=5)
    (ignored,) = [
        orjson.loads(line) for line in egress.stderr_path.read_bytes().splitlines() if b'"reload_ignored"' in line
    ]
    # Not server.listen or admin_listen: the command line sets them (--listen), at a restart too.
    assert set(ignored["settings"]) == {"limits.sketch_width", "usage.jsonl"}
    results = statuses(egress.port, 7)  # the limit, which a reload does change, took
    assert results.count(200) == 5 and results.count(429) == 2, results


def test_config_box_hands_over_whole_writes_only():
    box = ConfigBox()
    assert box.take() is None  # nothing written yet
    box.put(b'[server]\nlisten = "127.0.0.1:1"\n')
    assert box.take() == (b'[server]\nlisten = "127.0.0.1:1"\n', False)
    box.put(b"cannot read config file", error=True)
    assert box.take() == (b"cannot read config file", True)
    box.put(b"x" * MAX_CONFIG_BYTES)
    assert box.take() == (b"x" * MAX_CONFIG_BYTES, False)
    # A write in progress (odd sequence): a worker reading now waits for the next signal.
    sequence = int.from_bytes(box.buffer[:8], "little")
    box.buffer[:8] = (sequence + 1).to_bytes(8, "little")
    assert box.take() is None


def test_a_bad_reload_keeps_the_running_config(start_egress, fake_provider, ca_file):
    config = provider_config(fake_provider, ca_file)
    egress = start_egress(config)
    egress.config_path.write_text(config + "\n[bogus]\nnot_a_key = 1\n")
    before = value(samples(egress.admin_port), "egress_config_last_reload_success_timestamp_seconds")
    assert before > 0 and value(samples(egress.admin_port), "egress_config_last_reload_successful") == 1
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: b'"event":"reload_failed"' in egress.stderr_path.read_bytes(), timeout=5)
    assert b"unknown key 'bogus'" in egress.stderr_path.read_bytes()
    assert statuses(egress.port, 1) == [200]
    found = samples(egress.admin_port)
    assert value(found, "egress_config_last_reload_successful") == 0  # what an alert watches
    assert value(found, "egress_config_last_reload_success_timestamp_seconds") == before
    egress.config_path.write_text(config)
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: b'"event":"reloaded"' in egress.stderr_path.read_bytes(), timeout=5)
    found = samples(egress.admin_port)
    assert value(found, "egress_config_last_reload_successful") == 1
    assert value(found, "egress_config_last_reload_success_timestamp_seconds") > before


@pytest.mark.parametrize("workers", [1, 2])
def test_readiness_and_stopping_reach_the_notify_socket(tmp_path, fake_provider, ca_file, workers):
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # standing in for systemd
    listener.bind(str(notify_path))
    listener.settimeout(15)
    config = tmp_path / "egress.toml"
    config.write_text(provider_config(fake_provider, ca_file))
    environment = {**os.environ, "NOTIFY_SOCKET": str(notify_path)}  # the child's, not ours
    process = subprocess.Popen(
        [
            *egress_command(),
            "serve",
            "--config",
            str(config),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "off",
            "--workers",
            str(workers),
        ],
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        ready, _ = listener.recvfrom(4096)
        assert ready.startswith(b"READY=1")
        process.send_signal(signal.SIGTERM)
        stopping, _ = listener.recvfrom(4096)
        assert stopping == b"STOPPING=1"
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        listener.close()


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    unit = (ROOT / "deploy" / "egress.service").read_text()
    for directive in (
        "Type=notify",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=\n",
        "DynamicUser=yes",
        "LimitNOFILE=",
        "ExecReload=/bin/kill -HUP",
        "KillMode=mixed",
    ):
        assert directive in unit, directive
    if analyze is None:
        return  # the directives above are still checked; verification needs systemd's tools
    # verify wants ExecStart to exist: point it at this installation's egress.
    local = tmp_path / "egress.service"
    local.write_text(unit.replace("/opt/egress/bin/egress", egress_command()[0]))
    result = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Unknown" not in result.stderr and "Failed" not in result.stderr, result.stderr


def test_the_unit_runs_the_egress_the_readme_installs():
    """The unit's ExecStart is the console script of the README's virtualenv, in both places."""
    unit = (ROOT / "deploy" / "egress.service").read_text()
    (exec_start,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    binary = exec_start.removeprefix("ExecStart=").split()[0]
    venv = binary.removesuffix("/bin/egress")
    assert venv != binary, binary
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running under systemd", 1)[1].split("\n## ", 1)[0]
    assert f"python3 -m venv {venv}" in section and f"{venv}/bin/pip install ." in section
    assert "/usr/local/bin" not in section


def test_the_readme_lists_every_error_egress_answers_with_its_status_and_connection():
    from egress.errors import ERROR_KINDS

    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Errors egress answers itself", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:4] for line in table.splitlines() if line.startswith("| ") and "`" in line]
    for code, kind in ERROR_KINDS.items():
        found = [(status.strip(), connection.strip()) for status, codes, connection in rows if f"`{code}`" in codes]
        assert found, f"{code} is missing from the README's errors table"
        assert found == [(str(kind.status), "closed" if kind.closes else "kept")], (code, found)


def _serve_until_it_exits(config: Path, *args: str) -> tuple[int, str, float]:
    started = time.monotonic()
    process = subprocess.Popen(
        [*egress_command(), "serve", "--config", str(config), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, stderr = process.communicate(timeout=25)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    return process.returncode, stderr, time.monotonic() - started


def test_a_port_in_use_is_one_clear_line_and_a_prompt_exit(tmp_path):
    config = tmp_path / "egress.toml"
    config.write_text("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, stderr, seconds = _serve_until_it_exits(
            config, "--listen", f"127.0.0.1:{port}", "--admin-listen", "off", "--workers", "1"
        )
    assert code == 1, stderr
    assert f"egress: server.listen 127.0.0.1:{port}: cannot listen: Address already in use" in stderr.splitlines()
    assert seconds < 15


def test_a_listen_host_the_resolver_refuses_reads_the_resolver_s_own_words():
    # getaddrinfo's codes are not errno values: strerror(-2) would read "Unknown error -2".
    refused = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    line = str(cannot_listen("listen", "nosuchhost.invalid:8787", refused))
    assert line == "server.listen nosuchhost.invalid:8787: cannot listen: Name or service not known"
    busy = OSError(98, "Address already in use")
    assert str(cannot_listen("admin_listen", "127.0.0.1:1", busy)).endswith("cannot listen: Address already in use")


def test_a_port_in_use_with_workers_is_one_clear_line_before_any_worker_starts(tmp_path):
    config = tmp_path / "egress.toml"
    config.write_text("")
    with socket.socket() as taken:  # the admin port, held by another process (no SO_REUSEPORT)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = ("--listen", "127.0.0.1:0", "--admin-listen", f"127.0.0.1:{port}", "--workers", "2")
        code, stderr, seconds = _serve_until_it_exits(config, *args)
    assert code == 1, stderr
    assert stderr.splitlines() == [
        f"egress: server.admin_listen 127.0.0.1:{port}: cannot listen: Address already in use"
    ]
    assert seconds < 15  # not the 30 s readiness wait


def test_a_second_egress_on_a_port_in_use_is_refused_not_joined(start_egress, fake_provider, ca_file, tmp_path):
    """Workers bind with SO_REUSEPORT, which would let a second egress of the same user join the
    first's listeners and take half its connections: the supervisor refuses a port in use first."""
    first = start_egress(provider_config(fake_provider, ca_file), workers=2)
    config = tmp_path / "second.toml"
    config.write_text("")  # no providers of the first's: any connection it took would answer 404
    code, stderr, seconds = _serve_until_it_exits(
        config, "--listen", f"127.0.0.1:{first.port}", "--admin-listen", "off", "--workers", "2"
    )
    assert code == 1 and seconds < 15, stderr
    assert f"egress: server.listen 127.0.0.1:{first.port}: cannot listen: Address already in use" in stderr
    assert statuses(first.port, 20) == [200] * 20


def test_a_worker_that_cannot_open_a_file_says_which_and_why(tmp_path):
    """A worker's start failing on a file (here the access log is a directory, past the preflight
    that catches it in serve) logs the path and the reason, and exits with the start-up code."""
    directory = tmp_path / "a-directory"
    directory.mkdir()
    program = f"""
import mmap, multiprocessing, os, sys
from egress.config import parse_config
from egress.serve import serve
from egress.workers import WorkerContext
server = {{"listen": "127.0.0.1:0", "admin_listen": "off", "access_log": {str(directory)!r}}}
config = parse_config({{"server": server}})
ready_read, ready_write = os.pipe()
shared = memoryview(mmap.mmap(-1, 1 << 24))
context = WorkerContext(1, 2, shared, shared, multiprocessing.Lock(), shared, ready_write, b"k" * 32)
sys.exit(serve(config, None, context))
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=30, cwd=ROOT)
    events = [orjson.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert done.returncode == 3, done.stderr
    assert [(e["event"], e["worker"], e["error"]) for e in events] == [
        ("worker_failed_to_start", 1, f"{directory}: Is a directory")
    ], done.stderr


def test_workers_stop_when_their_supervisor_is_killed(start_egress, fake_provider, ca_file):
    egress = start_egress(provider_config(fake_provider, ca_file), workers=2)
    workers = worker_pids(egress)
    assert len(workers) == 2
    egress.process.kill()  # SIGKILL: the supervisor forwards nothing
    egress.process.wait(timeout=10)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    try:
        assert wait_until(lambda: all(gone(pid) for pid in workers), timeout=10)
    finally:
        for pid in workers:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)

"""Configuration review: values `config check` passed that `serve` then failed on or ignored.

- NATS subjects and stream names: a prefix with a space, a wildcard or an empty token, a stream
  with a `.`, were accepted and showed up only at run time, as a publisher or revocation feed
  retrying forever (nats-py: ValueError) or facts on the wrong subject.
- `serve --listen/--admin-listen` skipped the file's own listener checks.
- A reloaded `drain_timeout` was logged as taken, and the drain waited the start's.
- Every SIGHUP of `serve --listen …` reported the flag's settings as changes a restart would make.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time

import pytest

from egress.config import ConfigError, parse_config, with_overrides
from tests.conftest import provider_config
from tests.support import RawClient, egress_command, free_port, run_egress_cli, wait_until
from tests.test_reload import events

NATS = {"url": "nats://127.0.0.1:4222", "snapshot": "/tmp/egress-review.snapshot"}


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"usage": {"nats_subject_prefix": "egress usage"}}, "usage.nats_subject_prefix"),
        ({"usage": {"nats_subject_prefix": "egress.*"}}, "usage.nats_subject_prefix"),
        ({"usage": {"nats_subject_prefix": "egress.>"}}, "usage.nats_subject_prefix"),
        ({"usage": {"nats_subject_prefix": "egress.usage."}}, "usage.nats_subject_prefix"),
        ({"usage": {"nats_subject_prefix": ".egress"}}, "usage.nats_subject_prefix"),
        ({"usage": {"nats_subject_prefix": "egress..usage"}}, "usage.nats_subject_prefix"),
        ({"usage": {"nats_subject_prefix": ""}}, "usage.nats_subject_prefix"),
        ({"usage": {"nats_subject_prefix": "egress\tusage"}}, "usage.nats_subject_prefix"),
        ({"usage": {"nats_subject_prefix": "$JS.API"}}, "usage.nats_subject_prefix"),
        ({"usage": {"nats_stream": "usage.facts"}}, "usage.nats_stream"),
        ({"usage": {"nats_stream": "USAGE*"}}, "usage.nats_stream"),
        ({"usage": {"nats_stream": "USAGE>"}}, "usage.nats_stream"),
        ({"usage": {"nats_stream": "EGRESS USAGE"}}, "usage.nats_stream"),
        ({"usage": {"nats_stream": "a/b"}}, "usage.nats_stream"),
        ({"usage": {"nats_stream": "a\\b"}}, "usage.nats_stream"),
        # "" used to mean core NATS without a word: facts neither deduplicated nor stored.
        ({"usage": {"nats_stream": ""}}, "usage.nats_stream"),
        ({"usage": {"nats_stream": "S" * 256}}, "usage.nats_stream"),
        ({"nats": {**NATS, "stream": "EGRESS.REVOCATIONS"}}, "nats.stream"),
        ({"nats": {**NATS, "stream": ""}}, "nats.stream"),
        ({"nats": {**NATS, "subject": "egress.revocations.>"}}, "nats.subject"),
        ({"nats": {**NATS, "subject": "egress revocations"}}, "nats.subject"),
        ({"nats": {**NATS, "subject": "egress.revocations."}}, "nats.subject"),
        # One broker, two streams: the usage stream must not be the revocations' nor take their subject.
        ({"nats": NATS, "usage": {"nats_publish": True, "nats_stream": "EGRESS_REVOCATIONS"}}, "usage.nats_stream"),
        ({"nats": NATS, "usage": {"nats_publish": True, "nats_subject_prefix": "egress"}}, "nats.subject"),
    ],
)
def test_a_nats_name_the_broker_refuses_is_a_config_error_naming_its_key(table, named):
    with pytest.raises(ConfigError, match=rf"^{named} "):
        parse_config(table)


@pytest.mark.parametrize(
    "table",
    [
        {"usage": {"nats_subject_prefix": "billing.usage-v2", "nats_stream": "EGRESS_USAGE"}},
        {"nats": {**NATS, "stream": "REVOKED_KEYS", "subject": "acme.egress.revoked"}},
        # Apart: the revocation subject is no `<prefix>.<provider>` subject.
        {"nats": NATS, "usage": {"nats_publish": True, "nats_subject_prefix": "egress.usage", "nats_stream": "U"}},
        {"nats": {**NATS, "subject": "egress"}, "usage": {"nats_publish": True, "nats_subject_prefix": "egress"}},
    ],
)
def test_nats_names_the_broker_takes_are_accepted(table):
    parse_config(table)


def test_config_check_and_serve_refuse_a_stream_name_with_a_dot(tmp_path):
    path = tmp_path / "egress.toml"
    path.write_text(
        f'[nats]\nurl = "nats://127.0.0.1:1"\nsnapshot = "{tmp_path / "snap"}"\n'
        '[usage]\nnats_publish = true\nnats_stream = "usage.facts"\n'
    )
    for args in (("config", "check", str(path)), ("serve", "--config", str(path), "--listen", "127.0.0.1:0")):
        result = run_egress_cli(*args)
        assert result.returncode == 2, result.stderr
        assert "usage.nats_stream 'usage.facts' has one of" in result.stderr


def test_a_listen_flag_on_the_files_admin_port_is_refused(tmp_path):
    """Under workers both listeners bind with SO_REUSEPORT: the kernel shared the one port's
    connections between them (/v1 answered 404 by the admin listener every other request)."""
    port = free_port()
    path = tmp_path / "egress.toml"
    path.write_text(f'[server]\nadmin_listen = "127.0.0.1:{port}"\naccess_log = "off"\n')
    command = [*egress_command(), "serve", "--config", str(path), "--listen", f"127.0.0.1:{port}", "--workers", "2"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("egress served both listeners on one port")
    assert process.returncode == 2
    assert f"server.admin_listen 127.0.0.1:{port} is --listen's port" in stderr
    # And the other way round, and a malformed flag is named as the flag.
    config = parse_config({"server": {"listen": f"127.0.0.1:{port}"}})
    with pytest.raises(ConfigError, match=r"^--admin-listen .* is server\.listen's port"):
        with_overrides(config, admin_listen=f"0.0.0.0:{port}")
    with pytest.raises(ConfigError, match=r"^--listen must be HOST:PORT"):
        with_overrides(config, listen="8787")
    assert with_overrides(config, listen="127.0.0.1:0", admin_listen="off").overrides == {
        "server.listen",
        "server.admin_listen",
    }


def test_a_reloaded_drain_timeout_is_the_one_the_drain_waits(start_egress, fake_provider, ca_file):
    config = provider_config(fake_provider, ca_file, server="drain_timeout = 60\nbody_timeout = 120")
    egress = start_egress(config)
    egress.config_path.write_text(config.replace("drain_timeout = 60", "drain_timeout = 1"))
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: events(egress, "reloaded") or events(egress, "reload_failed"), timeout=5)
    assert events(egress, "reloaded"), egress.logs()
    with RawClient(egress.port, timeout=10) as client:
        # In flight: its body is still on its way when the stop comes.
        client.send(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.3)
        started = time.monotonic()
        egress.signal(signal.SIGTERM)
        try:
            egress.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the drain did not end within 10 s: {events(egress, 'draining')}")
    assert time.monotonic() - started < 5
    assert [event["timeout_s"] for event in events(egress, "draining")] == [1.0]


def test_a_reload_under_listen_flags_reports_only_what_the_file_changed(start_egress, fake_provider, ca_file):
    """start_egress passes --listen and --admin-listen, as a systemd unit may: every SIGHUP said
    server.listen and server.admin_listen would change only on restart, though no one changed them."""
    config = provider_config(fake_provider, ca_file)
    egress = start_egress(config)
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: len(events(egress, "reloaded")) == 1, timeout=5), egress.logs()
    assert events(egress, "reload_ignored") == []
    egress.config_path.write_text(config.replace("[server]", '[server]\naccess_log = "stderr"', 1))
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: len(events(egress, "reloaded")) == 2, timeout=5), egress.logs()
    assert [event["settings"] for event in events(egress, "reload_ignored")] == [["server.access_log"]]
    # The flags stay the running addresses: the same port answers.
    with RawClient(egress.port) as client:
        client.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.read_response().status == 200


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("server", "access_log"), ("usage", "jsonl")),
        (("usage", "jsonl"), ("nats", "snapshot")),
        (("keys", "deny_file"), ("server", "access_log")),
    ],
)
def test_two_settings_naming_one_file_are_refused(tmp_path, first, second):
    """Two writers on one file: access-log lines among the usage facts carry the facts' request
    ids, so `usage report` billed the one it read first, the access line: 0 tokens."""
    path = str(tmp_path / "egress.log")
    table: dict = {"nats": dict(NATS)} if "nats" in (first[0], second[0]) else {}
    for section, key in (first, second):
        table.setdefault(section, {})[key] = path if (section, key) == first else str(tmp_path / "." / "egress.log")
    with pytest.raises(ConfigError, match=r"'s file: give each its own") as refused:
        parse_config(table)
    assert {".".join(first), ".".join(second)} <= set(re.findall(r"[a-z_]+\.[a-z_]+", str(refused.value)))


def test_config_check_refuses_the_access_log_and_usage_file_on_one_path(start_egress, fake_provider, ca_file, tmp_path):
    shared = tmp_path / "egress.log"
    config = provider_config(
        fake_provider, ca_file, server=f'access_log = "{shared}"', extra=f'[usage]\njsonl = "{shared}"\n'
    )
    check = tmp_path / "check.toml"
    check.write_text(config)
    result = run_egress_cli("config", "check", str(check))
    assert result.returncode == 2, "config check passed a file two writers share"
    assert "usage.jsonl" in result.stderr and "server.access_log" in result.stderr


@pytest.mark.parametrize(
    ("table", "named"),
    [
        ({"limits": {"tokens_per_minute": 10}}, "limits.tokens_per_minute"),
        ({"limits": {"tiers": {"gold": {"tokens_per_minute": 10}}}}, "limits.tiers.gold.tokens_per_minute"),
        ({"usage": {"jsonl": "/tmp/usage.jsonl"}}, "usage.jsonl"),
        ({"nats": NATS, "usage": {"nats_publish": True}}, "usage.nats_publish"),
    ],
)
def test_what_only_metering_feeds_is_refused_with_metering_off(table, named):
    """With usage.enabled = false a token limit let every request through (measured: 4 of 4
    requests of 19 tokens under tokens_per_minute = 10 passed; 1 of 4 with metering on)."""
    table.setdefault("usage", {})["enabled"] = False
    with pytest.raises(ConfigError, match=rf"^{re.escape(named)} is set, but usage\.enabled = false"):
        parse_config(table)
    table["usage"]["enabled"] = True
    parse_config(table)
    # Requests limits need no metering.
    parse_config({"limits": {"requests_per_minute": 10}, "usage": {"enabled": False}})


def test_a_reload_adding_a_token_limit_under_metering_off_is_refused(start_egress, fake_provider, ca_file):
    config = provider_config(fake_provider, ca_file, extra="[usage]\nenabled = false\n")
    egress = start_egress(config)
    # The file turns metering on too, but [usage] changes only on restart: the limit would not apply.
    egress.config_path.write_text(
        provider_config(fake_provider, ca_file, extra="[limits]\ntokens_per_minute = 10\n[usage]\nenabled = true\n")
    )
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: events(egress, "reloaded") or events(egress, "reload_failed"), timeout=5)
    (failed,) = events(egress, "reload_failed")
    assert failed["error"].startswith("limits.tokens_per_minute is set, but usage.enabled = false")
    assert "until a restart" in failed["error"]


def test_a_port_0_the_supervisor_fixed_is_no_change_on_reload():
    from egress.serve import ignored_on_reload

    written = parse_config({"server": {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0"}})
    # workers.supervise binds port 0 once for every worker and runs with the port it got.
    running = parse_config({"server": {"listen": "127.0.0.1:41234", "admin_listen": "127.0.0.1:41235"}})
    assert ignored_on_reload(running, written) == []
    moved = parse_config({"server": {"listen": "0.0.0.0:0", "admin_listen": "off"}})
    assert ignored_on_reload(running, moved) == ["server.listen", "server.admin_listen"]

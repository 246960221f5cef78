"""An operator's walk-through of the README: what `doctor`, `keys` and `usage report` say and do.

Each test runs the command as an operator types it (or its `main` in process where the host's
users must be faked), on temporary files only.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import orjson

from egress import cli
from tests.support import admin_get, run_egress_cli, samples, value

DEPLOYED = Path(__file__).parent.parent / "deploy" / "egress.toml"
ISSUER = "JFW7T2YSO9KvMLmV_JrNVZP4S1Z2303oRzD_YajQKAs"
QUIET = '[server]\nlisten = "127.0.0.1:0"\nadmin_listen = "off"\n'


def _callers(tmp_path: Path, text: str) -> tuple[int, dict]:
    path = tmp_path / "egress.toml"
    path.write_text(text)
    result = run_egress_cli("doctor", "--json", "--config", str(path))
    (finding,) = [one for one in orjson.loads(result.stdout)["findings"] if one["check"] == "callers"]
    return result.returncode, finding


def test_doctor_warns_of_a_config_that_refuses_every_caller(tmp_path: Path, monkeypatch) -> None:
    # deploy/egress.toml as the README installs it: BYO keys off, no trusted issuer. It started and
    # doctor found all ok, while every request got a 401.
    code, finding = _callers(tmp_path, DEPLOYED.read_text().replace("0.0.0.0:8787", "127.0.0.1:0"))
    assert code == 1 and finding["level"] == "warn", finding
    assert "every request is refused" in finding["message"] and "trusted_issuers" in finding["message"]

    # Virtual keys verify, but no provider has a pool key to swap in: each one is a 403.
    code, finding = _callers(tmp_path, QUIET + f'[keys]\ntrusted_issuers = ["{ISSUER}"]\nallow_byo = false\n')
    assert code == 1 and finding["level"] == "warn" and "no_pool_key" in finding["message"], finding

    monkeypatch.setenv("OPERATOR_REVIEW_KEY", "sk-operator-review-0123456789")
    served = QUIET + f'[keys]\ntrusted_issuers = ["{ISSUER}"]\nallow_byo = false\n'
    code, finding = _callers(tmp_path, served + '[providers.openai]\npool_keys = ["env:OPERATOR_REVIEW_KEY"]\n')
    assert code == 0 and finding["level"] == "ok" and "openai" in finding["message"], finding
    code, finding = _callers(
        tmp_path,
        QUIET + '[providers.local]\nbase_url = "http://127.0.0.1:1"\n'
        "allow_anonymous = true\n[keys]\nallow_byo = false\n",
    )
    assert code == 0 and finding["level"] == "ok" and "local" in finding["message"], finding


def test_revoke_as_root_leaves_the_deny_file_readable_by_the_service(tmp_path: Path, monkeypatch, capsys) -> None:
    # Under deploy/egress.service the state directory belongs to the service's DynamicUser, and the
    # operator revokes as root: a deny file created root's, 0600, was one the running egress could
    # not read (the kid stayed usable) and its next start refused.
    state = tmp_path / "state"
    state.mkdir()
    if os.geteuid() == 0:
        os.chown(state, 4242, 4343)  # a service user's directory
    owner = state.stat()
    config = tmp_path / "egress.toml"
    config.write_text(f'[keys]\ndeny_file = "{state / "denied-kids"}"\n')
    given = []
    chown = os.chown
    monkeypatch.setattr(
        os, "chown", lambda path, uid, gid: (given.append((str(path), uid, gid)), chown(path, uid, gid))
    )
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # as root, whoever runs the tests
    assert cli.main(["keys", "revoke", "0123456789abcdef", "--config", str(config)]) == 0
    deny_file = state / "denied-kids"
    assert given == [(str(deny_file), owner.st_uid, owner.st_gid)]
    assert (deny_file.stat().st_uid, deny_file.stat().st_gid) == (owner.st_uid, owner.st_gid)
    # A second revoke appends to the file as it is: given away once, at its creation.
    assert cli.main(["keys", "revoke", "fedcba9876543210", "--config", str(config)]) == 0
    assert len(given) == 1
    assert deny_file.read_text() == "0123456789abcdef\nfedcba9876543210\n"
    assert "revoked fedcba9876543210" in capsys.readouterr().out


def test_usage_report_on_a_path_with_no_usage_file_says_so(tmp_path: Path) -> None:
    # egress creates its usage file at start: no file at all is a wrong path (a typo, another host's
    # config), which printed an empty table and exit 0, every total a quiet day's 0.
    missing = tmp_path / "usage.jsonl"
    result = run_egress_cli("usage", "report", "--file", str(missing), "--json")
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.splitlines() == [
        f"egress: {missing}: no usage file there, nor a rotation or a worker's file of it"
    ]
    config = tmp_path / "egress.toml"
    config.write_text(f'[usage]\njsonl = "{missing}"\n')
    assert run_egress_cli("usage", "report", "--config", str(config)).returncode == 2
    # A worker's file alone (usage-w0.jsonl, under --workers) is the usage file's: reported.
    fact = {"request_id": "r1", "ts": 4e9, "provider": "openai", "usage": "complete", "input_tokens": 3}
    (tmp_path / "usage-w0.jsonl").write_bytes(orjson.dumps(fact) + b"\n")
    result = run_egress_cli("usage", "report", "--file", str(missing), "--json")
    assert result.returncode == 0 and orjson.loads(result.stdout)["openai"]["input_tokens"] == 3, result.stderr


def test_a_taken_port_is_one_line_with_one_worker_too(tmp_path: Path) -> None:
    # README: "A port already in use is refused at start, with one line, whatever the number of
    # workers". One worker bound its admin port first and said `admin_listening` before the main
    # port's refusal: an operator read that the admin listener was up.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        for listen, admin, setting in ((address, "127.0.0.1:0", "listen"), ("127.0.0.1:0", address, "admin_listen")):
            result = run_egress_cli("serve", "--workers", "1", "--listen", listen, "--admin-listen", admin)
            assert result.returncode == 1
            said = f"egress: server.{setting} {address}: cannot listen: Address already in use"
            assert result.stderr.splitlines() == [said], result.stderr


def test_a_worker_count_no_host_can_map_is_one_line_in_check_and_serve_alike(tmp_path: Path) -> None:
    # The supervisor maps a slab per worker before it forks: 2^62 of them overflowed the mapping's
    # size, a traceback (no fork was reached, so the old code is safe to run here).
    config = tmp_path / "egress.toml"
    config.write_text(f'[server]\nlisten = "127.0.0.1:0"\nadmin_listen = "off"\nworkers = {2**62}\n')
    for command in (("config", "check", str(config)), ("serve", "--config", str(config))):
        result = run_egress_cli(*command)
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == ["egress: config error: server.workers must be at most 1024"], (
            result.stderr
        )
    result = run_egress_cli("serve", "--listen", "127.0.0.1:0", "--admin-listen", "off", "--workers", str(2**62))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [
        f"egress: config error: --workers takes 0..1024 (0: [server] workers, else one per CPU), not {2**62}"
    ]


def test_status_names_a_lone_worker_as_its_workers_list_and_metrics_do(start_egress) -> None:
    # /status said `"worker": null` beside `workers: [{"worker": 0, ...}]` and the metrics'
    # worker="0": the worker that answered matched no entry of its own list.
    egress = start_egress(QUIET.replace('"off"', '"127.0.0.1:0"'))
    status, body = admin_get(egress.admin_port, "/status")
    document = orjson.loads(body)
    assert status == 200 and document["worker"] == 0, document
    (entry,) = document["workers"]
    assert (entry["worker"], entry["pid"]) == (document["worker"], document["pid"]) == (0, egress.pid)
    assert value(samples(egress.admin_port), "egress_worker_up", worker="0") == 1


def test_doctor_warns_of_a_relative_path_that_depends_on_where_egress_starts(tmp_path: Path, monkeypatch) -> None:
    # `config check` in /etc/egress read `file:openai.keys` beside the config; the systemd unit,
    # started in /, looked for /openai.keys and refused to start.
    (tmp_path / "openai.keys").write_text("sk-operator-review-relative\n")
    (tmp_path / "openai.keys").chmod(0o600)
    config = QUIET + '[usage]\njsonl = "usage.jsonl"\n[providers.openai]\npool_keys = ["file:openai.keys"]\n'
    (tmp_path / "egress.toml").write_text(config)
    monkeypatch.chdir(tmp_path)
    result = run_egress_cli("doctor", "--json", "--config", "egress.toml")
    found = [one for one in orjson.loads(result.stdout)["findings"] if one["check"] == "relative_paths"]
    assert {(one["level"], one["setting"], one["path"]) for one in found} == {
        ("warn", "usage.jsonl", "usage.jsonl"),
        ("warn", "providers.openai.pool_keys[0]", "openai.keys"),
    }, found
    assert all(f"({tmp_path} now, / under systemd)" in one["message"] for one in found)
    assert "sk-operator-review-relative" not in result.stdout + result.stderr
    (tmp_path / "egress.toml").write_text(
        config.replace('"usage.jsonl"', f'"{tmp_path}/usage.jsonl"').replace(
            "file:openai.keys", f"file:{tmp_path}/openai.keys"
        )
    )
    result = run_egress_cli("doctor", "--json", "--config", "egress.toml")
    assert result.returncode == 0, result.stdout

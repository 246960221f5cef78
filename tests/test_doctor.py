"""`egress doctor` as an operator runs it: the real command on temporary config files.

The shadowing decision (`doctor.covers`) is also checked on its own, against fnmatch itself on
every short name, since a false warning would send an operator chasing a route that works.
"""

from __future__ import annotations

import itertools
import os
import socket
import subprocess
from fnmatch import fnmatchcase
from pathlib import Path

import orjson
import pytest

from egress.doctor import OPEN_RELAY, covers
from tests.fake_provider import FakeProvider
from tests.support import LoopbackServer, egress_command, free_port

# Distinctive, so a leak anywhere in the output is found by a plain substring search.
FAKE_KEY = "sk-doctor-FAKE-7c1e9a0b5d3f4e2a"
OTHER_KEY = "sk-doctor-OTHER-0f9e8d7c6b5a4932"

QUIET_PORTS = '[server]\nlisten = "127.0.0.1:0"\nadmin_listen = "127.0.0.1:0"\n'


def doctor(tmp_path: Path, config_text: str, *args: str, env: dict[str, str] | None = None):
    """`egress doctor --config FILE ARGS…` with `config_text` in FILE; the environment is a copy."""
    path = tmp_path / "egress.toml"
    path.write_text(config_text)
    return subprocess.run(
        [*egress_command(), "doctor", "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ) if env is None else env,
    )


def findings(result: subprocess.CompletedProcess) -> list[dict]:
    return orjson.loads(result.stdout)["findings"]


def key_file(tmp_path: Path, name: str, key: str, mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(f"# {name}\n{key}\n")
    path.chmod(mode)
    return path


def assert_no_key(result: subprocess.CompletedProcess, *keys: str) -> None:
    for key in keys or (FAKE_KEY, OTHER_KEY):
        assert key not in result.stdout
        assert key not in result.stderr


def test_good_config_is_ok(tmp_path: Path, ca_file: Path) -> None:
    keys = key_file(tmp_path, "openai.keys", FAKE_KEY)
    config = (
        QUIET_PORTS
        + f"""
[upstream]
ca_file = "{ca_file}"

[keys]
deny_file = "{tmp_path / "denied-kids"}"

[providers.openai]
pool_keys = [{{ name = "team-a", key = "file:{keys}" }}, "env:DOCTOR_TEST_KEY"]

[[routes]]
match = "claude-3-*"
provider = "anthropic"
[[routes]]
match = "claude-*"
provider = "anthropic"
[[routes]]
match = "*"
provider = "openai"
"""
    )
    env = {**os.environ, "DOCTOR_TEST_KEY": OTHER_KEY}
    result = doctor(tmp_path, config, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(line.startswith("ok  ") for line in result.stdout.splitlines()), result.stdout
    assert "ok  pool_keys  providers.openai.pool_keys[0] (team-a)" in result.stdout

    result = doctor(tmp_path, config, "--json", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    document = orjson.loads(result.stdout)
    assert document["status"] == "ok"
    checks = {finding["check"] for finding in document["findings"]}
    assert {"config", "routes", "pool_keys", "state_paths", "ca_file", "byo_hash_key", "open_relay", "ports"} <= checks
    assert all(finding["level"] == "ok" and finding["message"] for finding in document["findings"])
    assert_no_key(result)


def test_config_error_fails_with_its_message(tmp_path: Path) -> None:
    result = doctor(tmp_path, '[server]\nlisten = "127.0.0.1:0"\nlisen = "typo"\n')
    assert result.returncode == 2
    assert result.stdout.startswith("fail  config  unknown key 'server.lisen'"), result.stdout
    assert len(result.stdout.splitlines()) == 1  # nothing else can be checked

    result = doctor(tmp_path, '[server]\nlisten = "nowhere"\n', "--json")
    assert result.returncode == 2
    document = orjson.loads(result.stdout)
    assert document["status"] == "fail"
    assert document["findings"] == [
        {"check": "config", "level": "fail", "message": "server.listen must be HOST:PORT, not 'nowhere'"}
    ]


def routes(*matches: str) -> str:
    return "".join(f'[[routes]]\nmatch = "{match}"\nprovider = "openai"\n' for match in matches)


@pytest.mark.parametrize(
    ("earlier", "later"),
    [("*", "claude-*"), ("claude-*", "claude-3-*"), ("gpt-4o", "gpt-4o"), ("gpt-?o*", "gpt-4o-mini"), ("*", "*")],
)
def test_shadowed_route_warns_naming_both(tmp_path: Path, earlier: str, later: str) -> None:
    result = doctor(tmp_path, QUIET_PORTS + routes(earlier, later))
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("warn")]
    assert line.startswith("warn  routes  routes[1]")
    assert f"{later!r}" in line and f"routes[0] ({earlier!r}" in line

    (finding,) = [
        f for f in findings(doctor(tmp_path, QUIET_PORTS + routes(earlier, later), "--json")) if f["level"] == "warn"
    ]
    assert finding | {"message": ""} == {
        "check": "routes",
        "level": "warn",
        "message": "",
        "route": 1,
        "match": later,
        "shadowed_by": 0,
        "shadowed_by_match": earlier,
    }


def test_routes_that_can_match_are_ok(tmp_path: Path) -> None:
    result = doctor(tmp_path, QUIET_PORTS + routes("claude-3-*", "claude-*", "gpt-4o", "gpt-4o*", "[!g]*", "*"))
    assert result.returncode == 0, result.stdout
    assert "ok  routes  6 routes" in result.stdout


def test_route_that_matches_nothing_warns(tmp_path: Path) -> None:
    result = doctor(tmp_path, QUIET_PORTS + routes("gpt-[z-a]"))
    assert result.returncode == 1
    assert "warn  routes  routes[0] ('gpt-[z-a]') matches no model name" in result.stdout


# Earlier, later, whether earlier matches every non-empty name later does.
COVERS_CASES = [
    ("*", "claude-*", True),
    ("claude-*", "claude-3-*", True),
    ("claude-3-*", "claude-*", False),
    ("claude-*", "claude-*", True),
    ("claude-*", "claude", False),
    ("claude*", "claude", True),
    ("?*", "*", True),  # only the empty name tells them apart, and a model is never empty
    ("*?", "?*", True),
    ("*a*", "a*", True),
    ("*a", "a*", False),
    ("gpt-[0-9]*", "gpt-4o*", True),
    ("gpt-[0-3]*", "gpt-4o*", False),
    ("[!a]*", "[b-z]*", True),
    ("[!a]*", "[a-z]*", False),
    ("[a-z]*", "[!a]*", False),  # [!a] takes every character but one, far beyond a-z
    ("[]]x", "]x", True),  # a ] right after [ belongs to the class
    ("[x", "[x", True),  # an unclosed [ is a literal
    ("[x", "x", False),
    ("", "gpt-[z-a]", True),  # a reversed range matches nothing
    ("", "*", False),
]


@pytest.mark.parametrize(("earlier", "later", "expected"), COVERS_CASES)
def test_covers(earlier: str, later: str, expected: bool) -> None:
    assert covers(earlier, later) is expected


def test_covers_agrees_with_fnmatch_on_every_short_name() -> None:
    tokens = ["a", "b", "*", "?", "[ab]", "[!a]", "[b-c]"]
    patterns = sorted({"".join(p) for n in (1, 2) for p in itertools.product(tokens, repeat=n)})
    # "d" stands for every character no pattern names.
    names = ["".join(s) for n in range(1, 6) for s in itertools.product("abcd", repeat=n)]
    matched = {pattern: {name for name in names if fnmatchcase(name, pattern)} for pattern in patterns}
    for earlier, later in itertools.product(patterns, repeat=2):
        assert covers(earlier, later) is (matched[later] <= matched[earlier]), (earlier, later)


def test_missing_or_unreadable_pool_key_source_fails(tmp_path: Path) -> None:
    directory = tmp_path / "a-directory"
    directory.mkdir()
    config = (
        QUIET_PORTS
        + f"""
[providers.openai]
pool_keys = ["file:{tmp_path / "missing.keys"}", "file:{directory}", "env:DOCTOR_UNSET_KEY"]
"""
    )
    env = {name: value for name, value in os.environ.items() if name != "DOCTOR_UNSET_KEY"}
    result = doctor(tmp_path, config, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    missing = f"fail  pool_keys  providers.openai.pool_keys[0]: cannot read key file {tmp_path / 'missing.keys'}"
    assert missing in result.stdout
    assert f"fail  pool_keys  providers.openai.pool_keys[1]: cannot read key file {directory}" in result.stdout
    assert "fail  pool_keys  providers.openai.pool_keys[2]: environment variable DOCTOR_UNSET_KEY is unset" in (
        result.stdout
    )


def test_group_readable_key_file_warns_and_no_key_is_shown(tmp_path: Path) -> None:
    keys = key_file(tmp_path, "anthropic.keys", FAKE_KEY, mode=0o644)
    config = QUIET_PORTS + f'[providers.anthropic]\npool_keys = ["file:{keys}"]\n'
    result = doctor(tmp_path, config)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"warn  pool_keys  providers.anthropic.pool_keys[0]: key file {keys} is readable by group or others" in (
        result.stdout
    )
    assert "mode 0644" in result.stdout
    assert_no_key(result)
    result = doctor(tmp_path, config, "--json")
    assert orjson.loads(result.stdout)["status"] == "warn"
    assert_no_key(result)


def test_byo_hash_key_source_is_checked(tmp_path: Path) -> None:
    result = doctor(tmp_path, QUIET_PORTS + f'[limits]\nbyo_hash_key = "file:{tmp_path / "nope"}"\n')
    assert result.returncode == 2
    assert "fail  byo_hash_key  limits.byo_hash_key: cannot read key file" in result.stdout


def test_missing_or_garbled_ca_file_fails(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    result = doctor(tmp_path, QUIET_PORTS + f'[upstream]\nca_file = "{missing}"\n')
    assert result.returncode == 2
    assert f"fail  ca_file  upstream.ca_file {missing}: No such file or directory" in result.stdout

    garbled = tmp_path / "garbled-ca.pem"
    garbled.write_text("not a certificate\n")
    result = doctor(tmp_path, QUIET_PORTS + f'[upstream]\nca_file = "{garbled}"\n')
    assert result.returncode == 2
    assert f"fail  ca_file  upstream.ca_file {garbled}: no PEM certificates" in result.stdout


def test_state_directory_missing_warns(tmp_path: Path) -> None:
    snapshot = tmp_path / "no-such-dir" / "revocations.snapshot"
    config = (
        QUIET_PORTS
        + f"""
[keys]
deny_file = "{tmp_path / "denied-kids"}"

[nats]
url = "nats://doctor:s3cret-nats-password@127.0.0.1:4222"
snapshot = "{snapshot}"
"""
    )
    result = doctor(tmp_path, config, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    (warned,) = [f for f in findings(result) if f["level"] == "warn"]
    assert warned["check"] == "state_paths" and warned["setting"] == "nats.snapshot"
    assert warned["nats_url"] == "nats://doctor:<redacted>@127.0.0.1:4222"
    assert "s3cret-nats-password" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("setting", "section", "key"),
    [
        ("keys.deny_file", "keys", "deny_file"),
        ("usage.jsonl", "usage", "jsonl"),
        ("server.access_log", "server", "access_log"),
    ],
)
def test_a_state_path_that_is_a_directory_fails_check_and_serve_alike(tmp_path: Path, setting, section, key) -> None:
    """serve stops on a file setting that names a directory, with any number of workers: config
    check, doctor and serve's preflight say so first, in the same words."""
    directory = tmp_path / "a-directory"
    directory.mkdir()
    server = QUIET_PORTS if section != "server" else QUIET_PORTS.rstrip("\n") + f'\n{key} = "{directory}"\n'
    config = server + (f'\n[{section}]\n{key} = "{directory}"\n' if section != "server" else "")
    message = f"{setting} {directory}: is a directory"
    result = doctor(tmp_path, config)
    assert result.returncode == 2 and f"fail  state_paths  {message}" in result.stdout, result.stdout
    path = tmp_path / "egress.toml"
    for command in (["config", "check", str(path)], ["serve", "--config", str(path), "--workers", "2"]):
        refused = subprocess.run([*egress_command(), *command], capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2 and message in refused.stderr, (command, refused.stderr)
        assert "Traceback" not in refused.stderr


def test_non_loopback_listen_warns_of_an_open_relay(tmp_path: Path) -> None:
    result = doctor(tmp_path, '[server]\nlisten = "0.0.0.0:0"\nadmin_listen = "off"\n')
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("warn")]
    assert line.startswith("warn  open_relay  server.listen 0.0.0.0:0: ")
    assert OPEN_RELAY in line


def test_allow_byo_false_closes_the_open_relay(tmp_path: Path) -> None:
    # With an issuer and a pool key, so that virtual keys are served (else `callers` warns: nothing is).
    config = '[server]\nlisten = "0.0.0.0:0"\nadmin_listen = "off"\n[keys]\nallow_byo = false\n'
    config += 'trusted_issuers = ["JFW7T2YSO9KvMLmV_JrNVZP4S1Z2303oRzD_YajQKAs"]\n'
    config += '[providers.openai]\npool_keys = ["env:DOCTOR_TEST_KEY"]\n'
    result = doctor(tmp_path, config, env={**os.environ, "DOCTOR_TEST_KEY": FAKE_KEY})
    assert result.returncode == 0, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if "open_relay" in line]
    assert line.startswith("ok  open_relay") and "allow_byo = false" in line


def test_the_open_relay_is_said_at_start_when_nothing_limits_it(capfd) -> None:
    from egress.config import parse_config
    from egress.serve import _warn_if_open_relay

    relay = parse_config({"server": {"listen": "0.0.0.0:8787"}})
    _warn_if_open_relay(relay, limited=False)
    _warn_if_open_relay(relay, limited=True)  # limits bound what a relay costs: not said
    _warn_if_open_relay(parse_config({"server": {"listen": "0.0.0.0:8787"}, "keys": {"allow_byo": False}}), False)
    _warn_if_open_relay(parse_config({}), limited=False)  # loopback
    lines = [line for line in capfd.readouterr().err.splitlines() if '"event":"open_relay"' in line]
    assert len(lines) == 1 and "keys.allow_byo = false" in lines[0]


def test_port_in_use_warns(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        listen = free_port()
        # Every worker serves the one admin port: with two, there is still one address to check.
        config = f'[server]\nlisten = "127.0.0.1:{listen}"\nadmin_listen = "127.0.0.1:{port}"\nworkers = 2\n'
        result = doctor(tmp_path, config)
    assert result.returncode == 1, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("warn")]
    assert line == f"warn  ports  server.admin_listen 127.0.0.1:{port}: in use (egress may already be running)"


def test_check_against_the_provider_accepts_each_key(tmp_path: Path, fake_provider: FakeProvider, ca_file: Path):
    openai_keys = key_file(tmp_path, "openai.keys", FAKE_KEY)
    anthropic_keys = key_file(tmp_path, "anthropic.keys", OTHER_KEY)
    config = (
        QUIET_PORTS
        + f"""
[upstream]
ca_file = "{ca_file}"

[providers.openai]
base_url = "{fake_provider.base_url}"
pool_keys = [{{ name = "team-a", key = "file:{openai_keys}" }}]

[providers.anthropic]
base_url = "{fake_provider.base_url}"
pool_keys = ["file:{anthropic_keys}"]
"""
    )
    result = doctor(tmp_path, config, "--check", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    accounts = {f["provider"]: f for f in findings(result) if f["check"] == "accounts"}
    assert accounts["openai"]["level"] == accounts["anthropic"]["level"] == "ok"
    assert accounts["openai"]["account"] == "team-a" and accounts["openai"]["status"] == 200
    assert len(accounts["anthropic"]["account"]) == 12  # a hash of the key, never the key
    assert_no_key(result)

    by_path = {request.target: request for request in fake_provider.requests}
    assert set(by_path) == {"/v1/models", "/v1/models?limit=1000"}
    assert by_path["/v1/models"].header("authorization") == f"Bearer {FAKE_KEY}"
    anthropic = by_path["/v1/models?limit=1000"]
    assert anthropic.header("x-api-key") == OTHER_KEY and anthropic.header("authorization") is None
    assert anthropic.header("anthropic-version") == "2023-06-01"


class KeyedUpstream(LoopbackServer):
    """A plain-HTTP provider that refuses one key with a 401 and lists models for any other."""

    def __init__(self, refused: str) -> None:
        self.refused = f"Bearer {refused}\r\n".encode()
        self.requests: list[bytes] = []
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        for request in self._requests(conn, _head):
            self.requests.append(request)
            if self.refused in request:
                status, body = b"401 Unauthorized", b'{"error":{"message":"Incorrect API key provided"}}'
            else:
                status, body = b"200 OK", b'{"object":"list","data":[{"id":"gpt-keyed","object":"model"}]}'
            head = b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % (status, len(body))
            try:
                conn.sendall(head + body)
            except OSError:
                return


def _head(buffer: bytes) -> tuple[bytes, bytes] | None:
    end = buffer.find(b"\r\n\r\n")
    return None if end < 0 else (buffer[: end + 4], buffer[end + 4 :])


def test_check_names_the_refused_account_never_its_key(tmp_path: Path) -> None:
    upstream = KeyedUpstream(refused=FAKE_KEY)
    try:
        team_a = key_file(tmp_path, "team-a.key", FAKE_KEY)
        team_b = key_file(tmp_path, "team-b.key", OTHER_KEY)
        config = (
            QUIET_PORTS
            + f"""
[providers.openai]
base_url = "{upstream.base_url}"
pool_keys = [{{ name = "team-a", key = "file:{team_a}" }}, {{ name = "team-b", key = "file:{team_b}" }}]
"""
        )
        result = doctor(tmp_path, config, "--check")
        json_result = doctor(tmp_path, config, "--check", "--json")
    finally:
        upstream.stop()
    assert result.returncode == 2, result.stdout + result.stderr
    assert "fail  accounts  openai account team-a: the provider refuses this key (401)" in result.stdout
    assert "ok  accounts  openai account team-b: the provider accepts this key (200)" in result.stdout
    assert_no_key(result)
    assert json_result.returncode == 2 and orjson.loads(json_result.stdout)["status"] == "fail"
    assert_no_key(json_result)
    assert len(upstream.requests) == 4 and all(r.startswith(b"GET /v1/models HTTP/1.1\r\n") for r in upstream.requests)


def test_check_of_an_unreachable_provider_fails(tmp_path: Path) -> None:
    keys = key_file(tmp_path, "openai.keys", FAKE_KEY)
    closed = free_port()  # nothing listens there
    config = QUIET_PORTS + f'[providers.openai]\nbase_url = "http://127.0.0.1:{closed}"\npool_keys = ["file:{keys}"]\n'
    result = doctor(tmp_path, config, "--check")
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("fail")]
    assert line.startswith("fail  accounts  openai account ")
    assert f"cannot connect to http://127.0.0.1:{closed}" in line
    assert_no_key(result)

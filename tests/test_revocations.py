"""The distributed deny-set against a real nats-server (JetStream) and real egress processes."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import nats
import openai
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.config import NatsConfig
from egress.revocations import ensure_stream, public_url
from egress.vkeys import mint, public_key_text
from tests.conftest import provider_config, virtual_key_config
from tests.support import (
    EgressProcess,
    NatsServer,
    RawClient,
    egress_command,
    free_port,
    nats_server_binary,
    request_bytes,
    run_egress_cli,
    samples,
    value,
    wait_until,
)

ISSUER = Ed25519PrivateKey.generate()
POOL_KEY = "sk-pool-nats-dddddddddddddddd"


def nats_config(fake, ca_file, workdir: Path, nats: NatsServer | str, name: str, nats_lines: str = "") -> str:
    pool = workdir / "pool.keys"
    pool.write_text(POOL_KEY + "\n")
    url = nats if isinstance(nats, str) else nats.url
    return provider_config(
        fake,
        ca_file,
        pool_keys={"openai": pool},
        extra=f"""
[keys]
trusted_issuers = ["{public_key_text(ISSUER.public_key())}"]

[nats]
url = "{url}"
snapshot = "{workdir / f"{name}.snapshot"}"
max_reconnect_wait = 0.5
{nats_lines}
""",
    )


def start(workdir: Path, fake, ca_file, nats: NatsServer | str, name: str, nats_lines: str = "") -> EgressProcess:
    process = EgressProcess(workdir, nats_config(fake, ca_file, workdir, nats, name, nats_lines), name=name).start()
    return process


def following(process: EgressProcess, times: int = 1) -> bool:
    return process.stderr_path.read_bytes().count(b'"event":"revocations_following"') >= times


def status_for(process: EgressProcess, token: str) -> int:
    with RawClient(process.port) as client:
        client.send(request_bytes("GET", "/openai/v1/models", {"Authorization": f"Bearer {token}"}))
        response = client.read_response()
    if response.status != 200:
        assert response.error_code == "key_revoked", response.body
    return response.status


def revoke(config: Path, kid: str) -> None:
    result = run_egress_cli("keys", "revoke", kid, "--config", str(config))
    assert result.returncode == 0, result.stderr


def health(process: EgressProcess) -> dict:
    with RawClient(process.port) as client:
        client.send(request_bytes("GET", "/healthz"))
        return orjson.loads(client.read_response().body)["deny_set"]


@pytest.fixture
def processes():
    started: list[EgressProcess] = []
    yield started
    for process in started:
        process.stop()


def test_revocation_reaches_two_instances_within_a_second(nats_server, fake_provider, ca_file, tmp_path, processes):
    first = start(tmp_path, fake_provider, ca_file, nats_server, "first")
    second = start(tmp_path, fake_provider, ca_file, nats_server, "second")
    processes += [first, second]
    assert wait_until(lambda: following(first) and following(second), timeout=10)
    token, claims = mint(ISSUER, "app")
    assert status_for(first, token) == 200 and status_for(second, token) == 200
    assert fake_provider.requests[-1].header("authorization") == f"Bearer {POOL_KEY}"

    revoke(first.config_path, claims.kid)  # returns once JetStream has acknowledged the publish
    assert wait_until(lambda: status_for(first, token) == 401 and status_for(second, token) == 401, timeout=1.0)
    snapshot = orjson.loads((tmp_path / "first.snapshot").read_bytes())
    assert claims.kid in snapshot["kids"] and snapshot["last_sequence"] == 1
    assert ((tmp_path / "first.snapshot").stat().st_mode & 0o777) == 0o600
    other, _ = mint(ISSUER, "other-app")
    assert status_for(first, other) == 200


def test_snapshot_enforces_revocations_before_the_broker_is_back(
    nats_server, fake_provider, ca_file, tmp_path, processes
):
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    assert wait_until(lambda: following(egress), timeout=10)
    token, claims = mint(ISSUER, "app")
    revoke(egress.config_path, claims.kid)
    assert wait_until(lambda: status_for(egress, token) == 401, timeout=2)
    egress.stop()
    nats_server.kill()

    restarted = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(restarted)
    assert status_for(restarted, token) == 401  # the very first request, with no broker at all
    valid, _ = mint(ISSUER, "app")
    assert status_for(restarted, valid) == 200
    assert health(restarted)["stream_connected"] is False


def test_revocations_published_while_down_are_applied_gap_free(
    nats_server, fake_provider, ca_file, tmp_path, processes
):
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    assert wait_until(lambda: following(egress), timeout=10)
    tokens = [mint(ISSUER, f"app-{index}") for index in range(4)]
    revoke(egress.config_path, tokens[0][1].kid)
    assert wait_until(lambda: status_for(egress, tokens[0][0]) == 401, timeout=2)
    egress.stop()

    for _, claims in tokens[1:3]:  # published while egress is down
        revoke(egress.config_path, claims.kid)
    restarted = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(restarted)
    assert wait_until(lambda: following(restarted), timeout=10)
    assert b'"from_sequence":2' in restarted.stderr_path.read_bytes()  # resumed, not replayed
    for token, _ in tokens[:3]:
        assert wait_until(lambda token=token: status_for(restarted, token) == 401, timeout=2)
    assert status_for(restarted, tokens[3][0]) == 200


def test_broker_killed_mid_run(nats_server, fake_provider, ca_file, tmp_path, processes):
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    assert wait_until(lambda: following(egress), timeout=10)
    valid, _ = mint(ISSUER, "app")
    revoked, claims = mint(ISSUER, "app")
    revoke(egress.config_path, claims.kid)
    assert wait_until(lambda: status_for(egress, revoked) == 401, timeout=2)
    assert health(egress)["stream_connected"] is True and health(egress)["age_seconds"] == 0

    nats_server.kill()
    assert wait_until(lambda: health(egress)["stream_connected"] is False, timeout=3)
    for _ in range(5):
        assert status_for(egress, valid) == 200
        assert status_for(egress, revoked) == 401
    time.sleep(0.3)
    assert health(egress)["age_seconds"] > 0

    nats_server.start()  # same port, same store: egress finds its way back
    assert wait_until(lambda: following(egress, times=2), timeout=10)
    later, later_claims = mint(ISSUER, "app")
    revoke(egress.config_path, later_claims.kid)
    assert wait_until(lambda: status_for(egress, later) == 401, timeout=2)
    assert status_for(egress, valid) == 200


def test_no_secret_in_any_log(nats_server, fake_provider, ca_file, tmp_path, processes):
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    token, _ = mint(ISSUER, "app")
    client = openai.OpenAI(base_url=egress.url + "/openai/v1", api_key=token, max_retries=0)
    client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    egress.stop()
    captured = egress.logs() + nats_server.log.read_text()
    assert POOL_KEY not in captured and token not in captured and token[4:60] not in captured


# --- The stream's identity, catch-up at start, and the CLI against a dead broker -----------------

STREAM = NatsConfig()  # the stream and subject egress and `egress keys revoke` use by default


def _on_broker(nats_server: NatsServer, action) -> None:
    async def run() -> None:
        client = await nats.connect(nats_server.url, allow_reconnect=False, connect_timeout=2)
        try:
            await action(client.jetstream())
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(run(), 20))


def publish_bodies(nats_server: NatsServer, bodies: list[bytes]) -> None:
    """Straight onto the stream, no `Nats-Msg-Id`: what any NATS client (`nats pub`) can send."""

    async def publish(js) -> None:
        await ensure_stream(js, STREAM)
        for body in bodies:
            await js.publish(STREAM.subject, body)

    _on_broker(nats_server, publish)


def recreate_stream(nats_server: NatsServer) -> None:
    async def recreate(js) -> None:
        await js.delete_stream(STREAM.stream)
        await ensure_stream(js, STREAM)

    _on_broker(nats_server, recreate)


def empty_broker(nats_server: NatsServer) -> None:
    """The broker comes back on the same port with nothing in its store (a new volume, a wiped disk)."""
    nats_server.kill()
    shutil.rmtree(nats_server.store, ignore_errors=True)
    nats_server.start()


def refused(process: EgressProcess, tokens: list[str]) -> int:
    return sum(status_for(process, token) == 401 for token in tokens)


def keys(count: int) -> tuple[list[str], list[bytes]]:
    minted = [mint(ISSUER, f"app-{index}") for index in range(count)]
    return [token for token, _ in minted], [claims.kid.encode() for _, claims in minted]


def test_stream_recreated_by_an_empty_broker_while_running(nats_server, fake_provider, ca_file, tmp_path, processes):
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    assert wait_until(lambda: following(egress), timeout=10)
    tokens, kids = keys(40)
    publish_bodies(nats_server, kids[:15])
    assert wait_until(lambda: refused(egress, tokens[:15]) == 15, timeout=3)

    # Frozen, egress cannot reconnect before the new stream has grown past the sequence it holds.
    egress.signal(signal.SIGSTOP)
    try:
        empty_broker(nats_server)
        publish_bodies(nats_server, kids[15:])  # sequences 1..25 of a new stream
    finally:
        egress.signal(signal.SIGCONT)
    assert wait_until(lambda: following(egress, times=2), timeout=10)
    assert wait_until(lambda: refused(egress, tokens) == 40, timeout=3), refused(egress, tokens)
    assert health(egress)["stream_connected"] is True
    assert b'"event":"revocations_stream_reset"' in egress.stderr_path.read_bytes()


def test_stream_recreated_while_egress_was_down(nats_server, fake_provider, ca_file, tmp_path, processes):
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    assert wait_until(lambda: following(egress), timeout=10)
    tokens, kids = keys(40)
    publish_bodies(nats_server, kids[:15])
    assert wait_until(lambda: refused(egress, tokens[:15]) == 15, timeout=3)
    egress.stop()

    empty_broker(nats_server)
    publish_bodies(nats_server, kids[15:])
    restarted = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(restarted)
    assert refused(restarted, tokens) == 40
    restarted.stop()
    snapshot = orjson.loads((tmp_path / "egress.snapshot").read_bytes())
    assert sorted(snapshot["kids"]) == sorted(kid.decode() for kid in kids)
    assert snapshot["last_sequence"] == 25 and snapshot["stream_created"]

    again = start(tmp_path, fake_provider, ca_file, nats_server, "egress")  # the same stream: resumed
    processes.append(again)
    logged = again.stderr_path.read_bytes()
    assert b'"from_sequence":26' in logged and b"revocations_stream_reset" not in logged
    assert refused(again, tokens) == 40


def test_revocations_purged_before_a_worker_read_them_are_counted(
    nats_server, fake_provider, ca_file, tmp_path, processes
):
    # Stopped at sequence 3; five more revocations, then the stream purged down to its last one (an
    # operator's purge, or its limits): sequences 4..7 are gone, and a revoked key among them may pass.
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    assert wait_until(lambda: following(egress), timeout=10)
    tokens, kids = keys(8)
    publish_bodies(nats_server, kids[:3])
    assert wait_until(lambda: refused(egress, tokens[:3]) == 3, timeout=3)
    egress.stop()
    publish_bodies(nats_server, kids[3:])

    async def purge(js) -> None:
        await js.purge_stream(STREAM.stream, keep=1)

    _on_broker(nats_server, purge)
    restarted = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(restarted)
    assert wait_until(lambda: following(restarted), timeout=10)
    assert b'"event":"revocations_gap"' in restarted.stderr_path.read_bytes()
    assert value(samples(restarted.admin_port), "egress_revocations_lost_total") == 4
    assert refused(restarted, tokens) == 4  # the first three, from the snapshot, and the last one


def test_keys_inspect_says_how_far_it_checked_the_stream(nats_server, fake_provider, ca_file, tmp_path, processes):
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    assert wait_until(lambda: following(egress), timeout=10)
    tokens, kids = keys(2)
    publish_bodies(nats_server, kids[:1])
    assert wait_until(lambda: refused(egress, tokens[:1]) == 1, timeout=3)
    egress.stop()  # its snapshot holds the revocation
    revoked = run_egress_cli("keys", "inspect", tokens[0], "--config", str(egress.config_path))
    assert revoked.returncode == 1 and "status: revoked" in revoked.stdout, revoked.stdout
    valid = run_egress_cli("keys", "inspect", tokens[1], "--config", str(egress.config_path))
    assert valid.returncode == 0 and "status: valid" in valid.stdout
    assert "revocation stream: checked as of" in valid.stdout and "(the local snapshot), not since" in valid.stdout
    (tmp_path / "egress.snapshot").unlink()  # another host: no snapshot of the stream here
    elsewhere = run_egress_cli("keys", "inspect", tokens[0], "--config", str(egress.config_path))
    assert "status: valid" in elsewhere.stdout and "revocation stream: not checked" in elsewhere.stdout


def test_stream_deleted_and_re_added_while_connected(nats_server, fake_provider, ca_file, tmp_path, processes):
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    assert wait_until(lambda: following(egress), timeout=10)
    tokens, kids = keys(40)
    publish_bodies(nats_server, kids[:15])
    assert wait_until(lambda: refused(egress, tokens[:15]) == 15, timeout=3)

    recreate_stream(nats_server)
    publish_bodies(nats_server, kids[15:])
    assert wait_until(lambda: refused(egress, tokens) == 40, timeout=5), refused(egress, tokens)
    assert health(egress)["stream_connected"] is True


def test_first_requests_after_a_restart_see_revocations_published_while_down(
    nats_server, fake_provider, ca_file, tmp_path, processes
):
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    assert wait_until(lambda: following(egress), timeout=10)
    egress.stop()
    minted = [mint(ISSUER, f"app-{index}") for index in range(5)]
    for _, claims in minted:
        revoke(egress.config_path, claims.kid)

    restarted = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(restarted)
    assert [status_for(restarted, token) for token, _ in minted] == [401] * 5
    assert b'"event":"revocations_caught_up"' in restarted.stderr_path.read_bytes()


def test_start_is_bounded_when_the_broker_does_not_answer(fake_provider, ca_file, tmp_path, processes):
    silent = socket.socket()  # accepts TCP connections, never says a word of NATS
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        began = time.monotonic()
        egress = start(tmp_path, fake_provider, ca_file, url, "egress", nats_lines="connect_timeout = 0.5")
        processes.append(egress)
        assert time.monotonic() - began < 6
        assert b'"event":"revocations_start_without_broker"' in egress.stderr_path.read_bytes()
        valid, _ = mint(ISSUER, "app")
        assert status_for(egress, valid) == 200
    finally:
        silent.close()


def test_start_without_a_broker_is_logged(nats_server, fake_provider, ca_file, tmp_path, processes):
    nats_server.kill()
    began = time.monotonic()
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    assert time.monotonic() - began < 6
    assert b'"event":"revocations_start_without_broker"' in egress.stderr_path.read_bytes()


def revoke_config(tmp_path: Path, url: str | None = None) -> tuple[Path, Path]:
    deny = tmp_path / "deny.txt"
    config = tmp_path / "revoke.toml"
    nats_table = f'[nats]\nurl = "{url}"\nsnapshot = "{tmp_path / "snapshot"}"\nconnect_timeout = 1.0\n' if url else ""
    config.write_text(f'[keys]\ndeny_file = "{deny}"\n\n{nats_table}')
    return config, deny


@pytest.mark.parametrize("broker", ["closed port", "silent listener"])
def test_revoke_with_the_broker_down_fails_fast_and_shows_no_secret(tmp_path, broker):
    silent = None
    if broker == "closed port":
        port = free_port()
    else:
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
    try:
        config, deny = revoke_config(tmp_path, f"nats://operator:hunter2-secret@127.0.0.1:{port}")
        began = time.monotonic()
        result = subprocess.run(
            [*egress_command(), "keys", "revoke", "0123456789abcdef", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=15,
        )
        elapsed = time.monotonic() - began
    finally:
        if silent is not None:
            silent.close()
    assert result.returncode == 1, result.stderr
    assert elapsed < 8
    printed = result.stdout + result.stderr
    assert "Traceback" not in printed
    assert "hunter2" not in printed and "operator" not in printed
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"nats://127.0.0.1:{port}" in lines[0] and "unreachable" in lines[0] and "deny file" in lines[0]
    assert deny.read_text() == "0123456789abcdef\n"


def test_revoke_refused_by_the_broker_says_so_in_one_line(tmp_path):
    port = free_port()
    broker = subprocess.Popen(
        [
            *(nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")),
            *("--user", "operator", "--pass", "right-password"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: _accepting(port), timeout=10, interval=0.05)
        config, _ = revoke_config(tmp_path, f"nats://operator:wrong-password@127.0.0.1:{port}")
        result = run_egress_cli("keys", "revoke", "0123456789abcdef", "--config", str(config))
    finally:
        broker.kill()
        broker.wait(timeout=10)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"egress: revocation not published to nats://127.0.0.1:{port}: not authorized (the deny file was updated)"
    )


def test_serve_with_a_wrong_nats_password_says_not_authorized_not_unreachable(tmp_path, fake_provider, ca_file):
    port = free_port()
    broker = subprocess.Popen(
        [
            *(nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")),
            *("--user", "operator", "--pass", "right-password"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    egress = None
    try:
        assert wait_until(lambda: _accepting(port), timeout=10, interval=0.05)
        url = f"nats://operator:wrong-password@127.0.0.1:{port}"
        egress = start(tmp_path, fake_provider, ca_file, url, "wrongpw")
        events = [orjson.loads(line) for line in egress.stderr_path.read_bytes().splitlines()]
        started = [e for e in events if e.get("event") == "revocations_start_without_broker"]
        assert [e["reason"] for e in started] == ["not authorized"], egress.logs()
        failed = [e for e in events if e.get("event") == "revocations_unavailable"]
        assert failed and {e["reason"] for e in failed} == {"not authorized"}
        assert "wrong-password" not in egress.logs()
    finally:
        if egress is not None:
            egress.stop()
        broker.kill()
        broker.wait(timeout=10)


def _accepting(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_revoke_takes_a_whole_key_by_its_kid_and_never_echoes_a_key(tmp_path):
    config, deny = revoke_config(tmp_path)
    token, claims = mint(ISSUER, "app")
    result = run_egress_cli("keys", "revoke", token, "--config", str(config))
    assert result.returncode == 0, result.stderr
    printed = result.stdout + result.stderr
    assert claims.kid in printed
    assert token not in printed and token[4:40] not in printed
    assert deny.read_text() == f"{claims.kid}\n"
    for wrong in ("bai_" + token[30:], "sk-live-Zm9vYmFyYmF6cXV4cXV1eA", token[:-1] + "!"):
        result = run_egress_cli("keys", "revoke", wrong, "--config", str(config))
        assert result.returncode != 0
        printed = result.stdout + result.stderr
        assert wrong[4:20] not in printed and "Traceback" not in printed, printed
    assert deny.read_text() == f"{claims.kid}\n"


# --- The deny file: bad lines, a watcher that never dies ----------------------------------------


def deny_file_config(fake, ca_file, workdir: Path, deny: Path) -> str:
    return virtual_key_config(
        fake,
        ca_file,
        workdir,
        public_key_text(ISSUER.public_key()),
        extra=f'deny_file = "{deny}"\ndeny_poll_interval = 0.05\n',
    )


def metric(process: EgressProcess, name: str) -> float | None:
    with RawClient(process.admin_port) as client:
        client.send(request_bytes("GET", "/metrics", credential=False))
        text = client.read_response().body.decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_a_non_utf8_line_in_the_deny_file_is_reported_and_skipped_at_start(
    fake_provider, ca_file, tmp_path, start_egress
):
    (first, first_claims), (second, second_claims), (valid, _) = (mint(ISSUER, "app") for _ in range(3))
    deny = tmp_path / "deny.txt"
    deny.write_bytes(first_claims.kid.encode() + b"\n\xff\xfe latin-1 \xe9\n" + second_claims.kid.encode() + b"\n")
    egress = start_egress(deny_file_config(fake_provider, ca_file, tmp_path, deny))
    assert status_for(egress, first) == 401 and status_for(egress, second) == 401
    assert status_for(egress, valid) == 200
    events = [record for record in map(orjson.loads, egress.stderr_path.read_bytes().splitlines())]
    bad = [event for event in events if event["event"] == "deny_file_bad_lines"]
    assert len(bad) == 1 and bad[0]["lines"] == [2] and bad[0]["count"] == 1
    assert "latin" not in egress.stderr_path.read_text(errors="replace")
    assert metric(egress, "egress_deny_file_bad_lines_total") == 1


def test_the_deny_file_watcher_survives_a_bad_line(fake_provider, ca_file, tmp_path, start_egress):
    (first, first_claims), (second, second_claims), (third, third_claims) = (mint(ISSUER, "app") for _ in range(3))
    deny = tmp_path / "deny.txt"
    deny.write_text(first_claims.kid + "\n")
    egress = start_egress(deny_file_config(fake_provider, ca_file, tmp_path, deny))
    assert status_for(egress, first) == 401
    with open(deny, "ab") as fh:
        fh.write(b"\xff\n")
    assert wait_until(lambda: b'"event":"deny_file_bad_lines"' in egress.stderr_path.read_bytes(), timeout=3)
    with open(deny, "ab") as fh:
        fh.write(second_claims.kid.encode() + b"\n")
    assert wait_until(lambda: status_for(egress, second) == 401, timeout=3)
    with open(deny, "ab") as fh:
        fh.write(third_claims.kid.encode() + b"\n")
    egress.signal(signal.SIGHUP)
    assert wait_until(lambda: status_for(egress, third) == 401, timeout=3)
    assert status_for(egress, first) == 401


# --- Adversarial inputs ----------------------------------------------------------------------------


def test_stream_messages_are_normalised_and_garbage_is_skipped(
    nats_server, fake_provider, ca_file, tmp_path, processes
):
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    assert wait_until(lambda: following(egress), timeout=10)
    tokens, kids = keys(4)
    valid, _ = mint(ISSUER, "app")
    publish_bodies(
        nats_server,
        [
            b"  " + kids[0].upper() + b" \r\n",  # `nats pub` by hand: case and whitespace
            b"\xff\xfe\x00",
            b"",
            b"bai_eyJub3QiOiJhIGtleSJ9.c2ln",
            kids[1],
            kids[1],  # a duplicate past the dedupe window
            b"0123456789abcdef0",
            kids[2],
        ],
    )
    revoke(egress.config_path, kids[3].decode())
    revoke(egress.config_path, kids[3].decode())  # the same revocation twice: one stream message
    assert wait_until(lambda: refused(egress, tokens) == 4, timeout=3), refused(egress, tokens)
    assert status_for(egress, valid) == 200
    logged = egress.stderr_path.read_bytes()
    assert logged.count(b'"event":"revocation_message_ignored"') == 4
    assert b"bai_" not in logged and b"eyJub3Qi" not in logged
    # Counted, not only logged (each worker's tally, summed on /metrics).
    assert value(samples(egress.admin_port), "egress_revocation_messages_ignored_total") == 4
    egress.stop()
    snapshot = orjson.loads((tmp_path / "egress.snapshot").read_bytes())
    assert sorted(snapshot["kids"]) == sorted(kid.decode() for kid in kids) and snapshot["last_sequence"] == 9


@pytest.mark.parametrize(
    "snapshot",
    [
        b'{"version":1,"last_sequence":3,"kids":["0123',
        b"[]",
        b'"text"',
        b'{"version":1,"last_sequence":1,"kids":5}',
        b'{"version":1,"last_sequence":null,"kids":[]}',
        b'{"version":1,"last_sequence":"7","kids":[]}',
        b'{"version":1,"last_sequence":-4,"kids":[]}',
        b'{"version":1,"last_sequence":2,"kids":[],"written_at":"yesterday"}',
        b"\x00\xff\xfe garbage",
        b"",
        None,  # a directory where the snapshot should be
    ],
    ids=lambda value: "directory" if value is None else repr(value[:24]),
)
def test_a_bad_snapshot_is_reported_and_the_stream_replayed(
    nats_server, fake_provider, ca_file, tmp_path, processes, snapshot
):
    tokens, kids = keys(2)
    publish_bodies(nats_server, kids)
    path = tmp_path / "egress.snapshot"
    if snapshot is None:
        path.mkdir()
    else:
        path.write_bytes(snapshot)
    egress = start(tmp_path, fake_provider, ca_file, nats_server, "egress")
    processes.append(egress)
    assert b'"event":"snapshot_unreadable"' in egress.stderr_path.read_bytes()
    assert refused(egress, tokens) == 2


def test_deny_file_replaced_by_a_directory_then_restored(fake_provider, ca_file, tmp_path, start_egress):
    (first, first_claims), (second, second_claims) = (mint(ISSUER, "app") for _ in range(2))
    deny = tmp_path / "deny.txt"
    deny.write_text(first_claims.kid + "\n")
    egress = start_egress(deny_file_config(fake_provider, ca_file, tmp_path, deny))
    assert status_for(egress, first) == 401
    deny.unlink()
    deny.mkdir()
    assert wait_until(lambda: b'"event":"deny_file_unreadable"' in egress.stderr_path.read_bytes(), timeout=3)
    egress.signal(signal.SIGHUP)
    time.sleep(0.2)
    assert status_for(egress, first) == 401  # what the file said last still holds
    deny.rmdir()
    deny.write_text(first_claims.kid + "\n" + second_claims.kid + "\n")
    assert wait_until(lambda: status_for(egress, second) == 401, timeout=3)
    assert egress.stderr_path.read_bytes().count(b'"event":"deny_file_unreadable"') == 1


def test_sighup_storm_while_the_deny_file_changes(fake_provider, ca_file, tmp_path, start_egress):
    minted = [mint(ISSUER, f"app-{index}") for index in range(30)]
    deny = tmp_path / "deny.txt"
    deny.write_text("# revoked keys\r\n")
    egress = start_egress(deny_file_config(fake_provider, ca_file, tmp_path, deny))
    for _, claims in minted:
        with open(deny, "ab") as fh:
            fh.write(claims.kid.encode() + b"\r\n")  # CRLF, as a Windows editor writes it
        egress.signal(signal.SIGHUP)
        egress.signal(signal.SIGHUP)
    assert wait_until(lambda: refused(egress, [token for token, _ in minted]) == 30, timeout=3)
    assert egress.process.poll() is None


def test_revoke_appends_a_line_even_after_a_last_line_without_newline(tmp_path):
    config, deny = revoke_config(tmp_path)
    deny.write_text("0123456789abcdef")  # written by hand, no newline at the end
    result = run_egress_cli("keys", "revoke", "fedcba9876543210", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert deny.read_text().splitlines() == ["0123456789abcdef", "fedcba9876543210"]


def test_a_deny_file_that_is_a_directory_stops_the_start_with_one_line(fake_provider, ca_file, tmp_path):
    deny = tmp_path / "deny.txt"
    deny.mkdir()
    process = EgressProcess(tmp_path, deny_file_config(fake_provider, ca_file, tmp_path, deny))
    with pytest.raises(RuntimeError) as failure:
        process.start(timeout=10)
    process.stop()
    assert "Traceback" not in str(failure.value) and str(deny) in str(failure.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://operator:hunter2@broker.internal:4222", "nats://broker.internal:4222"),
        ("tls://s3cr3t-token@10.0.0.7", "tls://10.0.0.7:4222"),
        ("nats://user:pa%40ss@[::1]:14222", "nats://[::1]:14222"),
        ("broker.internal:5222", "nats://broker.internal:5222"),
        ("nats://user:pw@host:notaport", "nats://host:?"),
    ],
)
def test_public_url_never_shows_credentials(url: str, shown: str) -> None:
    assert public_url(url) == shown

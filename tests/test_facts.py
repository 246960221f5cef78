"""Usage facts from the real process with the official SDKs, the token limit they feed, the report."""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import anthropic
import openai
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from egress.vkeys import mint, public_key_text
from tests.conftest import provider_config, virtual_key_config
from tests.support import RawClient, request_bytes, run_egress_cli, samples, value, wait_until, whole_lines
from tests.test_workers import statuses, worker_pids

ISSUER = Ed25519PrivateKey.generate()


@pytest.fixture
def metered(start_egress, fake_provider, ca_file, tmp_path):
    usage_file = tmp_path / "usage.jsonl"
    config = virtual_key_config(
        fake_provider,
        ca_file,
        tmp_path,
        public_key_text(ISSUER.public_key()),
        extra=f"""
[limits.tiers.small]
tokens_per_minute = 30

[usage]
jsonl = "{usage_file}"
""",
    )
    egress = start_egress(config)
    egress.usage_file = usage_file
    return egress


def facts_of(egress, count: int) -> list[dict]:
    def read() -> list[dict]:
        if not egress.usage_file.exists():
            return []
        return [orjson.loads(line) for line in whole_lines(egress.usage_file.read_bytes())]

    assert wait_until(lambda: len(read()) >= count, timeout=3), read()
    return read()


def test_facts_for_both_dialects_json_and_stream(metered):
    key, claims = mint(ISSUER, "billing-app")
    client = openai.OpenAI(base_url=metered.url + "/openai/v1", api_key=key, max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="gpt-fake", messages=messages)
    list(
        client.chat.completions.create(
            model="gpt-fake", messages=messages, stream=True, stream_options={"include_usage": True}
        )
    )
    list(client.chat.completions.create(model="gpt-fake", messages=messages, stream=True))
    claude = anthropic.Anthropic(base_url=metered.url + "/anthropic", api_key="sk-ant-byo", max_retries=0)
    claude.messages.create(model="claude-fake", max_tokens=8, messages=messages)
    with claude.messages.stream(model="claude-fake", max_tokens=8, messages=messages) as stream:
        stream.get_final_message()

    facts = facts_of(metered, 5)
    rows = [(f["provider"], f["stream"], f["usage"], f["input_tokens"], f["output_tokens"]) for f in facts]
    assert rows == [
        ("openai", False, "complete", 12, 7),
        ("openai", True, "complete", 12, 6),
        ("openai", True, "complete", 12, 6),  # the caller didn't ask for usage: egress did
        ("anthropic", False, "complete", 12, 7),
        ("anthropic", True, "complete", 12, 6),
    ]
    assert {f["kid"] for f in facts[:3]} == {claims.kid} and facts[0]["subject"] == "billing-app"
    assert facts[0]["identity"] == f"kid:{claims.kid}"
    assert facts[3]["kid"] is None and facts[3]["identity"].startswith("byo:")
    assert "sk-ant-byo" not in metered.usage_file.read_text()
    assert [f["requested_model"] for f in facts] == ["gpt-fake"] * 3 + ["claude-fake"] * 2
    assert [f["model"] for f in facts] == ["gpt-fake"] * 3 + ["claude-fake"] * 2
    assert len({f["request_id"] for f in facts}) == 5
    assert all(f["status"] == 200 and f["ttfb_ms"] > 0 and f["total_ms"] >= f["ttfb_ms"] for f in facts)


def test_facts_and_access_lines_carry_the_callers_and_the_providers_request_ids(metered, fake_provider):
    key, _ = mint(ISSUER, "support-app")
    client = openai.OpenAI(base_url=metered.url + "/openai/v1", api_key=key, max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    asked = client.chat.completions.create(model="gpt-fake", messages=messages, extra_headers={"X-Request-Id": "app-7"})
    plain = client.chat.completions.create(model="gpt-fake", messages=messages)
    claude = anthropic.Anthropic(base_url=metered.url + "/anthropic", api_key="sk-ant-byo", max_retries=0)
    message = claude.messages.create(model="claude-fake", max_tokens=8, messages=messages)
    facts = facts_of(metered, 3)
    # The provider's id as the SDK reads it (OpenAI's x-request-id, Anthropic's request-id).
    assert [f["upstream_request_id"] for f in facts] == [asked._request_id, plain._request_id, message._request_id]
    assert all(f["upstream_request_id"] for f in facts)
    assert [f["client_request_id"] for f in facts] == ["app-7", None, None]
    # The caller's id is forwarded to the provider as it came.
    assert fake_provider.request_for(asked._request_id).header("x-request-id") == "app-7"
    lines = {line["request_id"]: line for line in metered.access_records()}
    for fact in facts:
        line = lines[fact["request_id"]]
        assert (line["client_request_id"], line["upstream_request_id"]) == (
            fact["client_request_id"],
            fact["upstream_request_id"],
        )


def test_cut_and_abandoned_streams_yield_partial_facts(metered, fake_provider):
    body = b'{"model":"gpt-fake","messages":[],"stream":true}'
    with RawClient(metered.port) as client:
        client.send(
            request_bytes(
                "POST",
                "/openai/v1/chat/completions",
                {"Content-Type": "application/json", "x-fake-scenario": "cut-stream"},
                body,
            )
        )
        assert not client.read_response("POST").complete
    with RawClient(metered.port) as client:
        client.send(
            request_bytes(
                "POST",
                "/anthropic/v1/messages",
                {
                    "Content-Type": "application/json",
                    "x-fake-scenario": "long-stream",
                    "x-fake-events": "200",
                    "x-fake-interval": "0.01",
                },
                b'{"model":"claude-fake","messages":[],"stream":true}',
            )
        )
        client.sock.recv(4096)
        time.sleep(0.2)
    facts = facts_of(metered, 2)
    cut, abandoned = facts
    # One content delta and the role chunk before it: every chunk with a delta counts (usage.py _DELTA).
    assert (cut["usage"], cut["outcome"], cut["estimated_output_tokens"]) == ("partial", "upstream_cut", 2)
    assert abandoned["usage"] == "partial" and abandoned["outcome"] == "client_gone"
    assert abandoned["estimated_output_tokens"] > 0


def test_a_request_whose_client_left_before_the_answer_still_yields_a_fact(metered):
    """It reached the provider, which may have generated: a fact says so (missing, no_answer), so
    billing can reconcile with the provider's own invoice."""
    with RawClient(metered.port) as client:
        client.send(
            request_bytes(
                "POST",
                "/openai/v1/chat/completions",
                {"Content-Type": "application/json", "x-fake-scenario": "slow-head"},
                b'{"model":"gpt-fake","messages":[]}',
            )
        )
        time.sleep(0.3)
    (fact,) = facts_of(metered, 1)
    assert (fact["usage"], fact["usage_reason"], fact["outcome"], fact["status"]) == (
        "missing",
        "no_answer",
        "client_gone",
        0,
    )


def test_token_limit_fed_by_the_meter(metered):
    key, _ = mint(ISSUER, "small-app", tier="small")  # 30 tokens a minute; each call costs 12 + 7
    client = openai.OpenAI(base_url=metered.url + "/openai/v1", api_key=key, max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="gpt-fake", messages=messages)
    facts_of(metered, 1)  # the fact, and so the token count, lands after the response
    client.chat.completions.create(model="gpt-fake", messages=messages)
    facts_of(metered, 2)
    with pytest.raises(openai.RateLimitError) as raised:
        client.chat.completions.create(model="gpt-fake", messages=messages)
    headers = raised.value.response.headers
    assert raised.value.code == "rate_limited"
    assert headers["x-ratelimit-limit-tokens"] == "30" and headers["x-ratelimit-remaining-tokens"] == "0"
    assert int(headers["retry-after"]) >= 1


def test_usage_report(metered):
    key, _ = mint(ISSUER, "report-app")
    client = openai.OpenAI(base_url=metered.url + "/openai/v1", api_key=key, max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])
    facts_of(metered, 3)
    duplicate = metered.usage_file.read_bytes().splitlines()[0]
    with open(metered.usage_file, "ab") as fh:  # a republished fact is billed once
        fh.write(duplicate + b"\n" + b'{"half a line')
    result = run_egress_cli("usage", "report", "--config", str(metered.config_path), "--by", "subject", "--json")
    assert result.returncode == 0, result.stderr
    totals = orjson.loads(result.stdout)
    assert totals["report-app"]["requests"] == 3
    assert totals["report-app"]["input_tokens"] == 36 and totals["report-app"]["output_tokens"] == 21
    table = run_egress_cli("usage", "report", "--file", str(metered.usage_file), "--by", "model", "--since", "1h")
    assert table.returncode == 0 and "gpt-fake" in table.stdout and "input_tokens" in table.stdout


def test_facts_reach_a_real_nats_server_once_each(start_egress, fake_provider, ca_file, tmp_path, nats_server):
    import asyncio

    import nats

    config = provider_config(
        fake_provider,
        ca_file,
        extra=f"""
[nats]
url = "{nats_server.url}"
snapshot = "{tmp_path / "revocations.snapshot"}"

[usage]
nats_publish = true
nats_stream = "EGRESS_USAGE_TEST"
""",
    )
    egress = start_egress(config)
    client = openai.OpenAI(base_url=egress.url + "/openai/v1", api_key="sk-byo-nats", max_retries=0)
    for _ in range(3):
        client.chat.completions.create(model="gpt-fake", messages=[{"role": "user", "content": "hi"}])

    async def stream_contents() -> list[tuple[str, dict]]:
        connection = await nats.connect(nats_server.url)
        try:
            js = connection.jetstream()
            subscription = await js.pull_subscribe("egress.usage.>", stream="EGRESS_USAGE_TEST")
            messages = await subscription.fetch(10, timeout=1)
            result = [(message.subject, orjson.loads(message.data)) for message in messages]
            for message in messages:
                await message.ack()
            # A republished fact (same request id) is stored once.
            duplicate = result[0][1]
            await js.publish(
                "egress.usage.openai", orjson.dumps(duplicate), headers={"Nats-Msg-Id": duplicate["request_id"]}
            )
            info = await js.stream_info("EGRESS_USAGE_TEST")
            return result, info.state.messages
        finally:
            await connection.close()

    def published() -> bool:
        return egress.stderr_path.read_bytes().count(b"usage_publisher_connected") >= 1

    assert wait_until(published, timeout=5)
    result: list = []
    stored = 0

    def three_arrived() -> bool:
        nonlocal result, stored
        result, stored = asyncio.run(stream_contents())
        return len(result) >= 3

    assert wait_until(three_arrived, timeout=5, interval=0.2)
    assert [subject for subject, _ in result] == ["egress.usage.openai"] * 3
    assert {fact["usage"] for _, fact in result} == {"complete"}
    assert [fact["input_tokens"] for _, fact in result] == [12, 12, 12]
    assert stored == 3
    assert "sk-byo-nats" not in str(result)


def test_report_reads_every_workers_file_and_rotation(tmp_path):
    from egress.facts import worker_path
    from egress.report import aggregate, files_of

    base = str(tmp_path / "usage.jsonl")
    assert worker_path(base, 1) == str(tmp_path / "usage-w1.jsonl")
    written = {
        worker_path(base, 0): ["a", "b"],
        worker_path(base, 0) + ".1": ["c"],
        worker_path(base, 1): ["d", "a"],  # "a" twice: billed once
    }
    for path, ids in written.items():
        lines = [
            orjson.dumps({"ts": time.time(), "request_id": i, "provider": "openai", "input_tokens": 1}) for i in ids
        ]
        Path(path).write_bytes(b"\n".join(lines) + b"\n")
    assert sorted(files_of(base)) == sorted(written)
    assert aggregate(files_of(base), 0, "provider")["openai"]["requests"] == 4


def test_report_reads_every_fact_when_egress_rotates_while_it_reads(tmp_path, monkeypatch):
    """Rotation renames usage.jsonl -> .1 -> .2 between two of the report's opens: read by name,
    the facts that moved into a name already read were missed (a billing job run during traffic
    got a low bill). Read by inode, and listed again until nothing is new, every fact counts once."""
    from egress import report

    base = tmp_path / "usage.jsonl"

    def write(path, numbers) -> None:
        with open(path, "ab") as fh:
            for number in numbers:
                fact = {"ts": time.time(), "request_id": f"r{number}", "provider": "p", "usage": "complete"}
                fh.write(orjson.dumps(fact) + b"\n")

    write(f"{base}.1", range(10))
    write(base, range(10, 20))
    real, rotated = report._read_on, []

    def racing(path: str, done: dict):
        read = real(path, done)
        if not rotated:  # egress rotates right after the report read its first file
            rotated.append(path)
            os.replace(f"{base}.1", f"{base}.2")
            os.replace(base, f"{base}.1")
            write(base, range(20, 30))
        return read

    monkeypatch.setattr(report, "_read_on", racing)
    totals = report.aggregate(report.files_of(str(base)), 0, "provider", relist=lambda: report.files_of(str(base)))
    assert totals["p"]["requests"] == 30


def test_a_file_retention_ends_is_said(tmp_path, monkeypatch):
    """keep_files bounds the rotations kept: the oldest goes at the next rotation, with a line
    that names it, never without a word."""
    from egress import facts

    logged: list[dict] = []
    monkeypatch.setattr(facts, "log_event", lambda event, **fields: logged.append({"event": event, **fields}))
    path = tmp_path / "usage.jsonl"

    async def main():
        sink = facts.FactSink(str(path), rotate_bytes=10, keep_files=1, queue_size=100)
        for number in range(3):  # each fact is over rotate_bytes: a rotation after each batch
            sink.emit(a_fact(number))
            sink.flush()
        sink.close()

    asyncio.run(main())
    gone = [entry for entry in logged if entry["event"] == "usage_file_rotated_out"]
    assert gone and gone[0]["path"] == f"{path}.1" and gone[0]["bytes"] > 0, logged


def test_report_has_cache_write_reasoning_and_cost_and_keeps_the_states_apart(tmp_path):
    from egress.report import aggregate, render_table

    facts = [
        {"usage": "complete", "input_tokens": 100, "output_tokens": 10, "cache_read_tokens": 60},
        {"usage": "complete", "input_tokens": 50, "cache_creation_tokens": 40, "reasoning_tokens": 7},
        {"usage": "partial", "input_tokens": 5, "estimated_output_tokens": 3},
        {"usage": "missing"},
        {"usage": "missing"},
        {"usage": "unparseable"},
        {"usage": "complete", "input_tokens": 1, "provider_cost": 0.25},
        {"usage": "complete", "input_tokens": 1, "provider_cost": 0.5},
    ]
    path = tmp_path / "usage.jsonl"
    path.write_bytes(
        b"".join(
            orjson.dumps({"ts": time.time(), "request_id": f"r{index}", "provider": "p", **fact}) + b"\n"
            for index, fact in enumerate(facts)
        )
    )
    row = aggregate([str(path)], 0, "provider")["p"]
    assert row["requests"] == 8 and row["input_tokens"] == 157 and row["output_tokens"] == 10
    assert (row["cache_read_tokens"], row["cache_write_tokens"], row["reasoning_tokens"]) == (60, 40, 7)
    assert (row["partial"], row["missing"], row["unparseable"]) == (1, 2, 1)
    assert row["provider_cost"] == 0.75 and row["estimated_output_tokens"] == 3
    table = render_table({"p": row}, "provider").splitlines()
    header = table[0].split()
    assert header[header.index("cache_write_tokens")] and table[1].split()[header.index("provider_cost")] == "0.75"


# A full disk: every fact is written whole or counted as dropped, and failures are logged sparingly.


class FullDisk:
    """`os` as facts.py sees it, on a disk with `room` bytes left that takes at most `chunk` a call.

    Like the kernel on ENOSPC or EFBIG: a write that doesn't fit writes what fits and returns the
    short count; the next one raises."""

    def __init__(self, room: int, chunk: int = 1 << 30) -> None:
        self.room = room
        self.chunk = chunk

    def write(self, fd: int, data) -> int:
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = os.write(fd, bytes(data[: min(len(data), self.chunk, self.room)]))
        self.room -= written
        return written

    def __getattr__(self, name: str):
        return getattr(os, name)


def a_fact(index: int) -> dict:
    return {"provider": "openai", "usage": "complete", "request_id": f"req-{index}", "pad": "x" * (index % 37)}


def run_sink(path: Path, disk: FullDisk, batches: list[int], monkeypatch, rooms: list[int] | None = None):
    """Emit `batches` of facts, one flush each, on `disk`; `rooms[i]` frees that much room before batch i."""
    from egress import facts

    monkeypatch.setattr(facts, "os", disk)
    logged: list[dict] = []
    monkeypatch.setattr(facts, "log_event", lambda event, **fields: logged.append({"event": event, **fields}))

    async def main():
        sink = facts.FactSink(str(path), rotate_bytes=1 << 30, keep_files=2, queue_size=10_000)
        index = 0
        for number, size in enumerate(batches):
            if rooms is not None:
                disk.room += rooms[number]
            for _ in range(size):
                sink.emit(a_fact(index))
                index += 1
            sink.flush()
        sink.close()
        return sink, index

    sink, emitted = asyncio.run(main())
    return sink, emitted, logged


def test_a_fact_orjson_cannot_write_costs_itself_only(tmp_path, monkeypatch):
    """An integer past 64 bits (the meter refuses such counts; this is the sink's own guard) makes
    orjson refuse the fact: the rest of its batch is written, and it is counted and logged."""
    from egress import facts

    logged: list[dict] = []
    monkeypatch.setattr(facts, "log_event", lambda event, **fields: logged.append({"event": event, **fields}))
    path = tmp_path / "usage.jsonl"

    async def main():
        sink = facts.FactSink(str(path), rotate_bytes=1 << 30, keep_files=2, queue_size=100)
        sink.emit(a_fact(1))
        sink.emit({**a_fact(2), "input_tokens": 1 << 64})
        sink.emit(a_fact(3))
        sink.flush()
        sink.close()
        return sink

    sink = asyncio.run(main())
    assert [fact["request_id"] for fact in whole_facts(path)] == ["req-1", "req-3"]
    assert sink.dropped == 1
    assert [(entry["event"], entry["request_id"]) for entry in logged] == [("usage_fact_unwritable", "req-2")]


def test_facts_the_broker_never_took_are_counted_and_logged_at_exit(start_egress, fake_provider, ca_file, tmp_path):
    """NATS down through the whole run: at SIGTERM the queued facts are counted as dropped and
    logged (`usage_facts_lost`), never lost without a word. The JSONL file has every one."""
    usage_file = tmp_path / "usage.jsonl"
    with socket.socket() as closed:  # a port nothing listens on: the broker is down
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    config = provider_config(
        fake_provider,
        ca_file,
        extra=f"""
[nats]
url = "nats://127.0.0.1:{port}"
snapshot = "{tmp_path / "revocations.snapshot"}"

[usage]
jsonl = "{usage_file}"
nats_publish = true
""",
    )
    egress = start_egress(config)
    assert statuses(egress.port, 5) == [200] * 5
    egress.signal(signal.SIGTERM)
    assert egress.wait(timeout=15) == 0
    lost = [orjson.loads(line) for line in egress.stderr_path.read_bytes().splitlines() if b"usage_facts_lost" in line]
    assert [(event["sink"], event["dropped"]) for event in lost] == [("nats", 5)], egress.logs()
    assert len(whole_lines(usage_file.read_bytes())) == 5


def whole_facts(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]  # raises on a torn line


def test_short_writes_are_finished(tmp_path, monkeypatch):
    path = tmp_path / "usage.jsonl"
    sink, emitted, logged = run_sink(path, FullDisk(room=1 << 30, chunk=7), [1, 5, 40], monkeypatch)
    assert [fact["request_id"] for fact in whole_facts(path)] == [f"req-{i}" for i in range(emitted)]
    assert sink.dropped == 0 and logged == []


@pytest.mark.parametrize("chunk", [1 << 30, 13])
def test_every_fact_is_written_whole_or_counted_as_dropped(tmp_path, monkeypatch, chunk):
    batch = b"".join(orjson.dumps(a_fact(i)) + b"\n" for i in range(8))
    for room in range(len(batch) + 1):  # the disk fills at every byte of the batch in turn
        path = tmp_path / f"usage-{chunk}-{room}.jsonl"
        # Then a little room comes back, twice: the writes after a torn one start on a fresh line.
        sink, emitted, logged = run_sink(path, FullDisk(room, chunk), [8, 3, 3], monkeypatch, rooms=[0, 150, 400])
        written = whole_facts(path)
        ids = [fact["request_id"] for fact in written]
        assert len(ids) == len(set(ids))
        assert len(written) + sink.dropped == emitted, (room, len(written), sink.dropped)
        assert [fact for fact in written if fact != a_fact(int(fact["request_id"][4:]))] == []
        assert len([entry for entry in logged if entry["event"] == "usage_write_failed"]) <= 1


def test_write_failures_are_logged_at_most_once_a_window(tmp_path, monkeypatch):
    path = tmp_path / "usage.jsonl"
    sink, emitted, logged = run_sink(path, FullDisk(room=0), [2] * 100, monkeypatch)
    assert sink.dropped == emitted == 200
    assert len(logged) == 1
    assert logged[0]["event"] == "usage_write_failed" and logged[0]["error"] == "No space left on device"
    assert logged[0]["dropped"] == 2


def test_throttle_counts_what_it_held_back():
    from egress.facts import Throttle

    throttle = Throttle(10.0)
    assert throttle.due(100.0) == 0
    assert [throttle.due(now) for now in (100.5, 101.0, 109.9)] == [None, None, None]
    assert throttle.due(110.0) == 3  # logged again, saying three failures went unlogged
    assert throttle.due(115.0) is None and throttle.due(120.0) == 1


def test_a_torn_tail_left_by_a_crash_is_not_glued_to_the_next_fact(tmp_path, monkeypatch):
    path = tmp_path / "usage.jsonl"
    path.write_bytes(orjson.dumps(a_fact(100)) + b'\n{"provider":"ope')
    run_sink(path, FullDisk(room=1 << 30), [2], monkeypatch)
    lines = path.read_bytes().splitlines()
    assert lines[1] == b'{"provider":"ope'
    assert [orjson.loads(line)["request_id"] for line in lines[:1] + lines[2:]] == ["req-100", "req-0", "req-1"]


def test_a_failed_rotation_never_writes_to_a_reused_descriptor(tmp_path, monkeypatch):
    from egress import facts

    path = tmp_path / "usage.jsonl"
    elsewhere = tmp_path / "unrelated.txt"
    logged: list[dict] = []
    monkeypatch.setattr(facts, "log_event", lambda event, **fields: logged.append({"event": event, **fields}))

    class NoRename(FullDisk):
        def replace(self, src, dst):
            raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(facts, "os", NoRename(room=1 << 30))

    async def main():
        sink = facts.FactSink(str(path), rotate_bytes=10, keep_files=2, queue_size=100)
        sink.emit(a_fact(0))
        sink.flush()  # past rotate_bytes: the rotation fails
        # The descriptor number the sink closed is the next one handed out: here, another file's.
        unrelated = os.open(elsewhere, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            sink.emit(a_fact(1))
            sink.flush()
        finally:
            os.close(unrelated)
        sink.close()
        return sink

    sink = asyncio.run(main())
    assert elsewhere.read_bytes() == b""
    assert len(whole_facts(path)) + sink.dropped == 2
    assert any(entry["event"] == "usage_rotate_failed" for entry in logged)


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(data.partition(b"\r\n\r\n")[2].decode()):
        for sample in family.samples:
            key = sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items()) if k == "sink")
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def test_a_real_file_size_limit_loses_no_fact_silently(start_egress, fake_provider, ca_file, tmp_path):
    """RLIMIT_FSIZE makes the kernel do what a full disk does (a short write, then EFBIG), no root needed."""
    usage_file = tmp_path / "usage.jsonl"
    config = provider_config(
        fake_provider, ca_file, server='access_log = "off"', extra=f'[usage]\njsonl = "{usage_file}"\n'
    )
    egress = start_egress(config)
    resource.prlimit(egress.pid, resource.RLIMIT_FSIZE, (8192, 8192))  # stderr stays well below it
    sent = 60

    def traffic(count: int) -> None:
        for _ in range(count):
            with RawClient(egress.port) as client:
                client.send(request_bytes("GET", "/openai/v1/models"))
                assert client.read_response().status == 200

    threads = [threading.Thread(target=traffic, args=(10,)) for _ in range(sent // 10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert wait_until(lambda: scrape(egress.admin_port).get("egress_usage_facts_total") == sent, timeout=5)
    metrics = scrape(egress.admin_port)
    written = whole_facts(usage_file)
    dropped = metrics["egress_usage_facts_dropped_total,sink=jsonl"]
    assert dropped > 0 and usage_file.stat().st_size <= 8192
    assert len(written) + dropped == sent
    assert len({fact["request_id"] for fact in written}) == len(written)
    failures = [line for line in egress.stderr_path.read_bytes().splitlines() if b"usage_write_failed" in line]
    assert len(failures) == 1 and orjson.loads(failures[0])["error"] == "File too large"


def test_report_skips_and_counts_lines_it_cannot_read(tmp_path):
    from egress.report import aggregate

    def fact(index: int, **changes) -> bytes:
        base = {"ts": time.time(), "request_id": f"r{index}", "provider": "openai", "input_tokens": 1}
        return orjson.dumps({**base, **changes})

    unreadable = [
        fact(0)[:20],  # torn
        fact(1)[:30] + fact(2),  # torn, with the next fact glued on (what egress wrote before)
        b'{"ts": 1, "x": "\xff"}',  # not UTF-8
        b"[1, 2]",
        b"5",
        b"null",
        fact(3, ts="yesterday"),
        fact(4, ts=None),
        fact(5, request_id=[1]),
        fact(6, request_id={"a": 1}),
        fact(7, request_id=None),
        fact(8, input_tokens="5"),
        fact(9, input_tokens=[5]),
        fact(10, input_tokens=True),
        fact(11, input_tokens=-3),
        b'{"ts": 1e300, "request_id": "r12", "input_tokens": 123456789012345678901234567890}',
        fact(13, provider=["openai"]),
    ]
    path = tmp_path / "usage.jsonl"
    path.write_bytes(b"\n".join([fact(100), *unreadable, b"", fact(101) + b"\r", fact(100)]) + b"\n")
    (tmp_path / "usage.jsonl.1.gz").write_bytes(b"\x1f\x8b compressed by logrotate")
    skipped: dict[str, int] = {}
    totals = aggregate([str(path)], 0, "provider", skipped)
    assert totals == {"openai": {**totals["openai"], "requests": 2, "input_tokens": 2}}
    assert skipped == {str(path): len(unreadable)}
    result = run_egress_cli("usage", "report", "--file", str(path), "--json")
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["openai"]["requests"] == 2
    assert f"skipped {len(unreadable)} unreadable lines in {path}" in result.stderr


def test_report_files_stay_in_their_own_directory(tmp_path):
    from egress.facts import worker_path
    from egress.report import files_of

    ours, other = tmp_path / "state-w0", tmp_path / "state-w1"
    ours.mkdir()
    other.mkdir()
    base = str(ours / "usage.jsonl")
    for path in (base, worker_path(base, 1), str(other / "usage-w0.jsonl")):
        Path(path).write_bytes(b"")
    assert sorted(files_of(base)) == sorted([base, worker_path(base, 1)])


# -- metering real wire shapes: compressed bodies, Responses streams --------------------------------


@pytest.fixture
def scripted_metered(start_egress, tmp_path):
    """An egress whose openai row goes to a ScriptedUpstream, writing usage facts."""
    from tests.support import ScriptedUpstream

    started = []

    def start(replies: list, extra: str = "", provider: str = "openai") -> tuple:
        upstream = ScriptedUpstream(replies)
        started.append(upstream)
        usage_file = tmp_path / "usage.jsonl"
        egress = start_egress(
            f'[providers.{provider}]\nbase_url = "{upstream.base_url}"\n[usage]\njsonl = "{usage_file}"\n{extra}'
        )
        egress.usage_file = usage_file
        return egress, upstream

    yield start
    for upstream in started:
        upstream.stop()


def test_a_gzip_json_response_is_metered_and_relayed_as_the_same_gzip_bytes(scripted_metered):
    import gzip

    document = {"id": "c", "model": "gpt-4o", "usage": {"prompt_tokens": 21, "completion_tokens": 4}}
    body = gzip.compress(orjson.dumps(document))
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
    egress, upstream = scripted_metered([head + b"content-length: %d\r\n\r\n" % len(body) + body])
    with RawClient(egress.port) as client:
        client.send(
            request_bytes(
                "POST", "/openai/v1/chat/completions", {"Accept-Encoding": "gzip, deflate, br, zstd"}, b'{"model":"m"}'
            )
        )
        response = client.read_response("POST")
    assert response.status == 200 and response.headers["content-encoding"] == "gzip"
    assert response.body == body  # the compressed bytes, untouched
    # Upstream, egress asked only for the codings it can decode.
    assert b"\r\naccept-encoding: gzip, deflate\r\n" in upstream.requests[0].lower()
    fact = facts_of(egress, 1)[0]
    assert (fact["usage"], fact["input_tokens"], fact["output_tokens"], fact["model"]) == ("complete", 21, 4, "gpt-4o")


def test_asking_for_stream_usage_asks_for_an_uncompressed_stream(scripted_metered):
    # The usage filter edits the stream's bytes: it can't inside gzip, so egress asks for identity.
    stream = (
        b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"hi"}}],"usage":null}\n\n'
        b'data: {"model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
        b"data: [DONE]\n\n"
    )
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(stream)
    egress, upstream = scripted_metered([reply + stream])
    body = b'{"model":"m","messages":[],"stream":true}'
    with RawClient(egress.port) as client:
        client.send(request_bytes("POST", "/openai/v1/chat/completions", {"Accept-Encoding": "gzip"}, body))
        response = client.read_response("POST")
    # identity, asked for: without the header any coding would be acceptable (RFC 9110 §12.5.3)
    head = upstream.requests[0].split(b"\r\n\r\n", 1)[0].lower()
    assert head.count(b"accept-encoding") == 1 and b"\r\naccept-encoding: identity" in head
    assert b'"include_usage":true' in upstream.requests[0]
    assert response.body == b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
    assert facts_of(egress, 1)[0]["input_tokens"] == 3


def test_a_responses_stream_feeds_the_token_limit(scripted_metered):
    events = [
        {"type": "response.created", "response": {"id": "resp_1", "model": "gpt-5", "usage": None}},
        {"type": "response.output_text.delta", "delta": "Hello"},
        {
            "type": "response.completed",
            "response": {"id": "resp_1", "model": "gpt-5", "usage": {"input_tokens": 80, "output_tokens": 40}},
        },
    ]
    stream = b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), orjson.dumps(e)) for e in events)
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    reply += b"%x\r\n%s\r\n0\r\n\r\n" % (len(stream), stream)
    egress, _ = scripted_metered([reply, reply], extra="[limits]\ntokens_per_minute = 100\n")
    body = b'{"model":"gpt-5","input":"hi","stream":true}'
    statuses = []
    for _ in range(2):
        with RawClient(egress.port) as client:
            client.send(request_bytes("POST", "/openai/v1/responses", {"Content-Type": "application/json"}, body))
            response = client.read_response("POST")
            statuses.append((response.status, response.headers.get("x-ratelimit-limit-tokens")))
        if len(statuses) == 1:
            assert facts_of(egress, 1)[0]["input_tokens"] == 80
    # 120 tokens metered from the first stream's response.completed: the second request is over 100.
    assert statuses == [(200, None), (429, "100")]


def test_a_stream_cut_before_its_usage_still_spends_the_token_limit_on_its_prompt(scripted_metered):
    # Cut after one delta, before any usage: its output is estimated (1), and its prompt, never
    # reported, is estimated for the limit from the body (about 4 bytes a token): 1,000 bytes of
    # input pass a limit of 100. Counting the output alone let a caller that cuts its streams go on.
    events = [{"type": "response.output_text.delta", "delta": "Hello"}]
    stream = b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), orjson.dumps(e)) for e in events)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    cut = (head + b"%x\r\n%s\r\n" % (len(stream), stream), "close")
    egress, _ = scripted_metered([cut, cut], extra="[limits]\ntokens_per_minute = 100\n")
    body = orjson.dumps({"model": "gpt-5", "input": "x" * 1000, "stream": True})
    statuses = []
    for _ in range(2):
        with RawClient(egress.port) as client:
            client.send(request_bytes("POST", "/openai/v1/responses", {"Content-Type": "application/json"}, body))
            statuses.append(client.read_response("POST").status)
        if len(statuses) == 1:
            fact = facts_of(egress, 1)[0]
            assert (fact["usage"], fact["input_tokens"], fact["estimated_output_tokens"]) == ("partial", None, 1)
    assert statuses == [200, 429]


@pytest.mark.parametrize(("provider", "reason"), [("together", "not_requested"), ("mistral", "not_reported")])
def test_a_stream_is_asked_for_usage_only_where_the_provider_documents_the_option(scripted_metered, provider, reason):
    # together: what asking adds is undocumented, so egress doesn't ask and says why usage is
    # missing. mistral: usage comes unasked, and the option would be refused (422 extra_forbidden).
    stream = b'data: {"model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(stream)
    egress, upstream = scripted_metered([reply + stream], provider=provider)
    body = b'{"model":"m","messages":[],"stream":true}'
    with RawClient(egress.port) as client:
        client.send(
            request_bytes("POST", f"/{provider}/v1/chat/completions", {"Content-Type": "application/json"}, body)
        )
        response = client.read_response("POST")
    assert response.body == stream
    assert upstream.requests[0].endswith(body), "the request body went upstream unchanged"
    fact = facts_of(egress, 1)[0]
    assert (fact["usage"], fact["usage_reason"]) == ("missing", reason)


def test_a_stored_response_read_back_is_not_billed_again(scripted_metered):
    """POST bills the tokens; a GET of the same response (polling, or a retrieve after the POST)
    carries the same usage, and is recorded as not metered rather than billed a second time."""
    document = {
        "id": "resp_1",
        "object": "response",
        "status": "completed",
        "model": "gpt-5",
        "usage": {"input_tokens": 80, "output_tokens": 40},
    }
    body = orjson.dumps(document)
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body
    egress, _ = scripted_metered([reply, reply, reply])
    with RawClient(egress.port) as client:
        client.send(
            request_bytes("POST", "/openai/v1/responses", {"Content-Type": "application/json"}, b'{"model":"gpt-5"}')
        )
        assert client.read_response("POST").body == body
        for _ in range(2):
            client.send(request_bytes("GET", "/openai/v1/responses/resp_1"))
            assert client.read_response().body == body  # relayed as ever
    facts = facts_of(egress, 3)
    assert [(f["path"], f["usage"], f["input_tokens"]) for f in facts] == [
        ("/openai/v1/responses", "complete", 80),
        ("/openai/v1/responses/resp_1", "missing", None),
        ("/openai/v1/responses/resp_1", "missing", None),
    ]
    assert [f["usage_reason"] for f in facts[1:]] == ["not_metered", "not_metered"]
    report = run_egress_cli("usage", "report", "--config", str(egress.config_path), "--json")
    assert report.returncode == 0, report.stderr
    totals = orjson.loads(report.stdout)["openai"]
    assert (totals["requests"], totals["input_tokens"], totals["output_tokens"]) == (3, 80, 40), totals


def _json_reply(document: dict) -> bytes:
    body = orjson.dumps(document)
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body


@pytest.mark.parametrize(
    ("facts", "billed"),
    [
        # A cut background stream (partial, estimated), then the GET that found it done: the complete one.
        ([("partial", 900, None, 40), ("complete", 900, 7000, None), ("complete", 900, 7000, None)], (900, 7000, 0)),
        # Never read again: the cut stream's own counts stand.
        ([("missing", None, None, None), ("partial", 900, None, 40)], (900, 0, 40)),
        # Queued and never read: nothing to bill.
        ([("missing", None, None, None)], (0, 0, 0)),
    ],
)
def test_the_report_bills_a_background_response_once_from_its_best_fact(tmp_path, facts, billed):
    path = tmp_path / "usage.jsonl"
    lines = [
        {"ts": time.time(), "request_id": f"r{index}", "provider": "openai", "usage": state,
         "input_tokens": given, "output_tokens": made, "estimated_output_tokens": guessed,
         "background_response_id": "resp_bg"}
        for index, (state, given, made, guessed) in enumerate(facts)
    ]  # fmt: skip
    ordinary = {"ts": time.time(), "request_id": "other", "provider": "openai", "usage": "complete", "input_tokens": 5}
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in [*lines, ordinary]))
    from egress.report import aggregate

    row = aggregate([str(path)], 0, "provider")["openai"]
    assert row["requests"] == len(facts) + 1
    assert (row["input_tokens"] - 5, row["output_tokens"], row["estimated_output_tokens"]) == billed


def test_a_background_response_is_billed_from_the_get_that_finds_it_done(scripted_metered):
    """`background: true` answers at once, queued; the tokens come in the GET that finds the response
    done, or in a stream resumed by GET. Every fact of it carries its id, and the usage report bills
    the id once, however many times it is read (https://platform.openai.com/docs/guides/background)."""
    shell = {"id": "resp_bg", "object": "response", "model": "gpt-5", "background": True, "usage": None}
    done = {**shell, "status": "completed", "usage": {"input_tokens": 900, "output_tokens": 7000}}
    events = [
        {"type": "response.in_progress", "sequence_number": 5, "response": {**shell, "status": "in_progress"}},
        {"type": "response.completed", "sequence_number": 6, "response": done},
    ]
    stream = b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), orjson.dumps(e)) for e in events)
    resumed = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n" % len(stream)
    replies = [
        _json_reply({**shell, "status": "queued"}),
        _json_reply({**shell, "status": "in_progress"}),
        _json_reply(done),
        _json_reply(done),  # read again later
        resumed + stream,  # a stream resumed by GET after the response ended
        _json_reply({**done, "id": "resp_fg", "background": False}),  # an ordinary response read back
    ]
    egress, _ = scripted_metered(replies)
    with RawClient(egress.port) as client:
        request = b'{"model":"gpt-5","input":"hi","background": true}'
        client.send(request_bytes("POST", "/openai/v1/responses", {"Content-Type": "application/json"}, request))
        assert client.read_response("POST").status == 200
        for target in ["/openai/v1/responses/resp_bg"] * 3 + [
            "/openai/v1/responses/resp_bg?stream=true&starting_after=4",
            "/openai/v1/responses/resp_fg",
        ]:
            client.send(request_bytes("GET", target))
            assert client.read_response().status == 200
    facts = facts_of(egress, 6)
    assert [(f["usage"], f["usage_reason"], f["input_tokens"], f["output_tokens"]) for f in facts] == [
        ("missing", "background", None, None),
        ("missing", "background", None, None),
        ("complete", None, 900, 7000),
        ("complete", None, 900, 7000),
        ("complete", None, 900, 7000),
        ("missing", "not_metered", None, None),
    ]
    assert [f["background_response_id"] for f in facts] == ["resp_bg"] * 5 + [None]
    report = run_egress_cli("usage", "report", "--config", str(egress.config_path), "--json")
    assert report.returncode == 0, report.stderr
    totals = orjson.loads(report.stdout)["openai"]
    assert (totals["requests"], totals["input_tokens"], totals["output_tokens"]) == (6, 900, 7000), totals


def test_a_responses_stream_with_a_huge_final_event_is_metered(scripted_metered):
    """An image_generation_call's base64 result makes response.completed megabytes long: its usage
    is still read, whatever the reads (before, it was dropped and labelled not_requested)."""
    image = "A" * (3 << 20)
    response = {
        "id": "resp_3",
        "model": "gpt-5",
        "output": [{"type": "image_generation_call", "id": "ig_1", "result": image}],
        "usage": {"input_tokens": 2000, "output_tokens": 1500},
    }
    events = [
        {"type": "response.created", "response": {"id": "resp_3", "model": "gpt-5", "usage": None}},
        {"type": "response.completed", "response": response},
    ]
    stream = b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), orjson.dumps(e)) for e in events)
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(stream[i : i + 16384]), stream[i : i + 16384]) for i in range(0, len(stream), 16384)
    )
    reply = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    egress, _ = scripted_metered([reply + chunks + b"0\r\n\r\n"])
    with RawClient(egress.port) as client:
        body = b'{"model":"gpt-5","input":"draw","stream":true}'
        client.send(request_bytes("POST", "/openai/v1/responses", {"Content-Type": "application/json"}, body))
        assert client.read_response("POST").body == stream
    fact = facts_of(egress, 1)[0]
    assert (fact["usage"], fact["input_tokens"], fact["output_tokens"]) == ("complete", 2000, 1500)


def _lines(*paths: Path) -> list[dict]:
    return [orjson.loads(line) for path in paths if path.exists() for line in whole_lines(path.read_bytes())]


@pytest.mark.parametrize("workers", [1, 2])
def test_sigusr1_reopens_the_access_log_and_usage_files_after_logrotate(
    start_egress, fake_provider, ca_file, tmp_path, workers
):
    access = tmp_path / "access.log"
    config = provider_config(
        fake_provider, ca_file, server=f'access_log = "{access}"', extra=f'[usage]\njsonl = "{tmp_path}/usage.jsonl"\n'
    )
    egress = start_egress(config, workers=workers)
    pids = worker_pids(egress)
    usage = sorted(tmp_path.glob("usage*.jsonl"))
    assert statuses(egress.port, 6) == [200] * 6
    assert wait_until(lambda: len(_lines(access)) == 6 and len(_lines(*usage)) == 6, timeout=5)
    # logrotate's create mode: rename, then signal.
    for path in (access, *usage):
        path.rename(f"{path}.1")
    egress.signal(signal.SIGUSR1)
    assert wait_until(lambda: egress.stderr_path.read_bytes().count(b'"event":"logs_reopened"') == workers, timeout=5)
    assert statuses(egress.port, 6) == [200] * 6
    assert wait_until(lambda: len(_lines(access)) == 6 and len(_lines(*usage)) == 6, timeout=5)
    old_access = _lines(Path(f"{access}.1"))
    old_usage = _lines(*(Path(f"{path}.1") for path in usage))
    assert len(old_access) == 6 and len(old_usage) == 6  # nothing after the signal went to the old files
    # Every request once, in one file or the other.
    assert len({record["request_id"] for record in old_access + _lines(access)}) == 12
    assert len({fact["request_id"] for fact in old_usage + _lines(*usage)}) == 12
    assert worker_pids(egress) == pids and b"worker_restarted" not in egress.stderr_path.read_bytes()
    reopened = [orjson.loads(line) for line in egress.stderr_path.read_bytes().splitlines() if b"logs_reopened" in line]
    assert all(event["access_log"] and event["usage"] for event in reopened)


def test_a_reopen_that_fails_keeps_the_lines_and_counts_the_facts(start_egress, fake_provider, ca_file, tmp_path):
    access = tmp_path / "access.log"
    config = provider_config(
        fake_provider, ca_file, server=f'access_log = "{access}"', extra=f'[usage]\njsonl = "{tmp_path}/usage.jsonl"\n'
    )
    egress = start_egress(config)
    usage = tmp_path / "usage.jsonl"
    assert statuses(egress.port, 2) == [200] * 2
    access.rename(f"{access}.1")
    usage.rename(f"{usage}.1")
    access.mkdir()  # nothing can be opened for writing at either path now
    usage.mkdir()
    egress.signal(signal.SIGUSR1)
    assert wait_until(lambda: b'"event":"logs_reopened"' in egress.stderr_path.read_bytes(), timeout=5)
    logged = egress.stderr_path.read_bytes()
    assert b'"event":"access_log_reopen_failed"' in logged and b'"event":"usage_reopen_failed"' in logged
    assert statuses(egress.port, 3) == [200] * 3
    # The access log goes on in the file it had; the facts that found no file are counted, not lost.
    assert wait_until(lambda: len(_lines(Path(f"{access}.1"))) == 5, timeout=5)
    assert wait_until(lambda: b'"event":"usage_write_failed"' in egress.stderr_path.read_bytes(), timeout=5)
    assert value(samples(egress.admin_port), "egress_usage_facts_dropped_total", sink="jsonl") == 3


def test_the_deployed_logrotate_config_rotates_a_running_egress(start_egress, fake_provider, ca_file, tmp_path):
    """deploy/egress.logrotate, run by the real logrotate against a running two-worker egress."""
    logrotate = shutil.which("logrotate") or "/usr/sbin/logrotate"
    access = tmp_path / "access.log"
    egress = start_egress(provider_config(fake_provider, ca_file, server=f'access_log = "{access}"'), workers=2)
    assert statuses(egress.port, 4) == [200] * 4
    assert wait_until(lambda: len(_lines(access)) == 4, timeout=5)
    deployed = (Path(__file__).parent.parent / "deploy" / "egress.logrotate").read_text()
    signal_line = "systemctl kill --kill-whom=main --signal=USR1 egress.service"
    assert "/var/log/egress/access.log {" in deployed and signal_line in deployed
    # The same file, pointed at this test's log and its supervisor's pid.
    config = tmp_path / "logrotate.conf"
    config.write_text(
        deployed.replace("/var/log/egress/access.log", str(access)).replace(signal_line, f"kill -USR1 {egress.pid}")
    )
    rotated = subprocess.run(
        [logrotate, "--force", "--state", str(tmp_path / "logrotate.state"), str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert rotated.returncode == 0, rotated.stderr
    assert wait_until(lambda: egress.stderr_path.read_bytes().count(b'"event":"logs_reopened"') == 2, timeout=5)
    assert statuses(egress.port, 4) == [200] * 4
    assert wait_until(lambda: len(_lines(access)) == 4, timeout=5)
    assert len(_lines(Path(f"{access}.1"))) == 4
    assert access.stat().st_mode & 0o007 == 0  # created by egress itself (nocreate): 0640, never world-readable


def test_a_batch_is_billed_once_from_the_get_that_finds_it_done(scripted_metered):
    """OpenAI's Batch API: the POST answers with the batch queued, and its tokens come in the Batch
    object once it is done (`usage`), which every later GET repeats. Every fact of the batch carries
    its id, and the report bills the id once. Before, the GETs were not metered: a batch's tokens
    were never billed (https://platform.openai.com/docs/api-reference/batch/object)."""
    batch = {"id": "batch_1", "object": "batch", "endpoint": "/v1/chat/completions", "model": "gpt-4o-mini",
             "input_file_id": "file-1", "completion_window": "24h"}  # fmt: skip
    done = {**batch, "status": "completed", "usage": {"input_tokens": 1500, "output_tokens": 500}}
    replies = [
        _json_reply({**batch, "status": "validating"}),
        _json_reply({**batch, "status": "in_progress"}),
        _json_reply(done),
        _json_reply(done),  # read again later
        _json_reply({"object": "list", "data": [done], "has_more": False}),  # the list: billed by each GET
    ]
    egress, _ = scripted_metered(replies)
    with RawClient(egress.port) as client:
        request = b'{"input_file_id":"file-1","endpoint":"/v1/chat/completions","completion_window":"24h"}'
        client.send(request_bytes("POST", "/openai/v1/batches", {"Content-Type": "application/json"}, request))
        assert client.read_response("POST").status == 200
        for target in ["/openai/v1/batches/batch_1"] * 3 + ["/openai/v1/batches"]:
            client.send(request_bytes("GET", target))
            assert client.read_response().status == 200
    facts = facts_of(egress, 5)
    assert [(f["usage"], f["usage_reason"], f["input_tokens"], f["output_tokens"], f["batch_id"]) for f in facts] == [
        ("missing", "batch", None, None, "batch_1"),
        ("missing", "batch", None, None, "batch_1"),
        ("complete", None, 1500, 500, "batch_1"),
        ("complete", None, 1500, 500, "batch_1"),
        ("missing", "not_metered", None, None, None),
    ]
    report = run_egress_cli("usage", "report", "--config", str(egress.config_path), "--json")
    assert report.returncode == 0, report.stderr
    totals = orjson.loads(report.stdout)["openai"]
    assert (totals["requests"], totals["input_tokens"], totals["output_tokens"]) == (5, 1500, 500), totals


def test_an_anthropic_batch_is_billed_once_from_its_results(scripted_metered):
    """Anthropic's Message Batches: the batch object never carries tokens; its results (JSONL, a line
    per request) do, and every read of them repeats them. The results read is metered, summed, and
    billed once per batch id (https://docs.anthropic.com/en/api/retrieving-message-batch-results)."""
    counts = {"processing": 2, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
    batch = {"id": "msgbatch_1", "type": "message_batch", "processing_status": "in_progress", "request_counts": counts}
    lines = b"".join(
        orjson.dumps({"custom_id": name, "result": {"type": "succeeded", "message": {
            "id": f"msg_{name}", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": given, "output_tokens": made}}}}) + b"\n"
        for name, given, made in (("a", 11, 36), ("b", 10, 34))
    )  # fmt: skip
    results = b"HTTP/1.1 200 OK\r\ncontent-type: application/binary\r\ncontent-length: %d\r\n\r\n" % len(lines)
    replies = [
        _json_reply(batch),
        _json_reply({**batch, "processing_status": "ended"}),
        results + lines,
        results + lines,
    ]
    egress, _ = scripted_metered(replies, provider="anthropic")
    headers = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
    with RawClient(egress.port) as client:
        request = (
            b'{"requests":[{"custom_id":"a","params":{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[]}}]}'
        )
        client.send(
            request_bytes(
                "POST", "/anthropic/v1/messages/batches", {**headers, "Content-Type": "application/json"}, request
            )
        )
        assert client.read_response("POST").status == 200
        for target in ["/anthropic/v1/messages/batches/msgbatch_1"] + [
            "/anthropic/v1/messages/batches/msgbatch_1/results"
        ] * 2:
            client.send(request_bytes("GET", target, headers))
            response = client.read_response()
            assert response.status == 200
        assert response.body == lines  # relayed untouched
    facts = facts_of(egress, 4)
    assert [
        (f["usage"], f["usage_reason"], f["input_tokens"], f["output_tokens"], f["model"], f["batch_id"]) for f in facts
    ] == [
        ("missing", "batch", None, None, None, "msgbatch_1"),
        ("missing", "batch", None, None, None, "msgbatch_1"),  # a GET of it: its id, its tokens later
        ("complete", None, 21, 70, "claude-sonnet-4-5", "msgbatch_1"),
        ("complete", None, 21, 70, "claude-sonnet-4-5", "msgbatch_1"),
    ]
    report = run_egress_cli("usage", "report", "--config", str(egress.config_path), "--json")
    assert report.returncode == 0, report.stderr
    totals = orjson.loads(report.stdout)["anthropic"]
    assert (totals["requests"], totals["input_tokens"], totals["output_tokens"]) == (4, 21, 70), totals


def test_an_anthropic_batchs_results_are_billed_however_their_path_is_spelled(scripted_metered):
    """The results path as the provider routes it: `result%73` is `results` to a server that decodes
    the path (most do), `msgbatch_%31` is `msgbatch_1`, and the unified surface's drop-in route
    reaches the same results. Before, `result%73` was read as a batch object's GET: not metered, no
    batch id, the batch's tokens never billed; and `msgbatch_%31` made a second id, billed again."""
    line = orjson.dumps({"custom_id": "a", "result": {"type": "succeeded", "message": {
        "id": "msg_a", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
        "content": [{"type": "text", "text": "Hi"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 11, "output_tokens": 36}}}}) + b"\n"  # fmt: skip
    results = b"HTTP/1.1 200 OK\r\ncontent-type: application/binary\r\ncontent-length: %d\r\n\r\n" % len(line)
    targets = [
        "/anthropic/v1/messages/batches/msgbatch_1/results",
        "/anthropic/v1/messages/batches/msgbatch_1/result%73",
        "/anthropic/v1/messages/batches/msgbatch_%31/results?beta=true",
        "/v1/messages/batches/msgbatch_1/results",  # the drop-in default route
    ]
    egress, _ = scripted_metered([results + line] * len(targets), provider="anthropic")
    headers = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}
    with RawClient(egress.port) as client:
        for target in targets:
            client.send(request_bytes("GET", target, headers))
            response = client.read_response()
            assert (response.status, response.body) == (200, line)
    facts = facts_of(egress, len(targets))
    assert [(f["usage"], f["input_tokens"], f["output_tokens"], f["batch_id"]) for f in facts] == [
        ("complete", 11, 36, "msgbatch_1")
    ] * len(targets)
    report = run_egress_cli("usage", "report", "--config", str(egress.config_path), "--json")
    assert report.returncode == 0, report.stderr
    totals = orjson.loads(report.stdout)["anthropic"]
    assert (totals["requests"], totals["input_tokens"], totals["output_tokens"]) == (4, 11, 36), totals


def test_the_report_bills_a_batch_in_the_window_it_was_first_read_whole_and_never_again(tmp_path):
    """A batch's results read whole last week (billed then) and read again today: a report of
    today's window billed it again, since the earlier read was outside the window it looked at.
    And of two reads cut short, the longer is billed, not the first."""
    from egress.report import aggregate

    now = time.time()
    week_ago = now - 7 * 86400

    def fact(ts: float, number: int, state: str, given: int | None, batch: str) -> dict:
        return {"ts": ts, "request_id": f"r{number}", "provider": "anthropic", "usage": state,
                "input_tokens": given, "output_tokens": given, "batch_id": batch}  # fmt: skip

    path = tmp_path / "usage.jsonl"
    facts = [
        fact(week_ago, 1, "complete", 100, "msgbatch_old"),  # billed last week
        fact(now, 2, "complete", 100, "msgbatch_old"),  # read again today: not again
        fact(now, 3, "partial", 10, "msgbatch_cut"),  # two cut reads of another batch
        fact(now, 4, "partial", 90, "msgbatch_cut"),
    ]
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in facts))
    today = aggregate([str(path)], now - 86400, "provider")["anthropic"]
    assert (today["requests"], today["input_tokens"], today["output_tokens"]) == (3, 90, 90)
    last_week = aggregate([str(path)], week_ago - 1, "provider")["anthropic"]
    assert (last_week["requests"], last_week["input_tokens"]) == (4, 190)


def test_reading_a_batchs_tokens_does_not_spend_the_token_limit(scripted_metered):
    """A batch's tokens were generated over hours at the batch rate, and every read repeats them:
    charged to a per-minute limit when read, a batch of 1,500 tokens shut a caller with a limit of
    100 out of its next request (429) right after it read its own batch. It is billed, not limited."""
    batch = {"id": "batch_1", "object": "batch", "endpoint": "/v1/chat/completions", "model": "gpt-4o-mini"}
    done = {**batch, "status": "completed", "usage": {"input_tokens": 1000, "output_tokens": 500}}
    completion = {"id": "c", "object": "chat.completion", "model": "gpt-4o-mini", "choices": [],
                  "usage": {"prompt_tokens": 5, "completion_tokens": 1}}  # fmt: skip
    egress, _ = scripted_metered(
        [_json_reply(done), _json_reply(completion)], extra="[limits]\ntokens_per_minute = 100\n"
    )
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/openai/v1/batches/batch_1"))
        assert client.read_response().status == 200
    assert facts_of(egress, 1)[0]["input_tokens"] == 1000  # billed
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
    with RawClient(egress.port) as client:
        client.send(request_bytes("POST", "/openai/v1/chat/completions", {"Content-Type": "application/json"}, body))
        assert client.read_response("POST").status == 200


def test_the_report_bills_a_batch_in_the_window_of_its_earliest_whole_read_whatever_file_holds_it(tmp_path):
    """Each worker writes its own file, and the report reads them worker by worker, not by time: a
    batch read whole last week by worker 1 and again today by worker 0 was billed from today's read
    (worker 0's file is read first), so today's report billed it a second time."""
    from egress.report import aggregate, files_of

    now = time.time()
    week_ago = now - 7 * 86400

    def fact(ts: float, number: int) -> bytes:
        return orjson.dumps({"ts": ts, "request_id": f"r{number}", "provider": "openai", "usage": "complete",
                             "input_tokens": 100, "output_tokens": 50, "batch_id": "batch_1"}) + b"\n"  # fmt: skip

    (tmp_path / "usage-w1.jsonl").write_bytes(fact(week_ago, 1))  # billed last week
    (tmp_path / "usage-w0.jsonl").write_bytes(fact(now, 2))  # read again today
    paths = files_of(str(tmp_path / "usage.jsonl"))
    assert [Path(path).name for path in paths] == ["usage-w0.jsonl", "usage-w1.jsonl"]
    today = aggregate(paths, now - 86400, "provider")["openai"]
    assert (today["requests"], today["input_tokens"], today["output_tokens"]) == (1, 0, 0), today
    last_week = aggregate(paths, week_ago - 1, "provider")["openai"]
    assert (last_week["requests"], last_week["input_tokens"]) == (2, 100), last_week
    # Cut off exactly at the earliest read: that read is in the window, and billed in it.
    assert aggregate(paths, week_ago, "provider")["openai"]["input_tokens"] == 100
    assert aggregate(paths, week_ago + 1e-3, "provider")["openai"]["input_tokens"] == 0

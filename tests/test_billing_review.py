"""The billing contract under broker trouble and while the report reads: every fact published at
least once or counted, and nothing counted lost that the broker has."""

from __future__ import annotations

import asyncio
import selectors
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import orjson
import pytest

from tests.conftest import provider_config
from tests.support import NatsServer, RawClient, nats_server_binary, request_bytes, wait_until, whole_lines
from tests.test_workers import statuses


class NatsRelay:
    """A TCP relay to a real nats-server that misbehaves on the first connection publishing a fact
    (an `HPUB egress.usage.` line): `cut` drops that line and closes both sides, as a broker killed
    with the fact still unread in its socket buffer; `delay` holds the broker's answers on that
    connection for `delay` seconds from then on, as a slow JetStream ack."""

    def __init__(self, target_port: int, *, cut: bool = False, delay: float = 0.0) -> None:
        self.target_port = target_port
        self.cut = cut
        self.delay = delay
        self.published = threading.Event()  # a fact's HPUB went by (or was cut)
        self._tripped = False
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._relay, args=(client,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _relay(self, client: socket.socket) -> None:
        server = socket.create_connection(("127.0.0.1", self.target_port))
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, server)
        selector.register(server, selectors.EVENT_READ, client)
        slow = False
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.2):
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if key.fileobj is client and b"HPUB egress.usage." in data and not self._tripped:
                        self._tripped = True
                        self.published.set()
                        if self.cut:
                            return  # the broker never reads it
                        slow = self.delay > 0
                    if key.fileobj is server and slow:
                        time.sleep(self.delay)
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            client.close()
            server.close()

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        for thread in self._threads:
            thread.join(timeout=2)


def stream_messages(url: str, stream: str) -> int:
    import nats

    async def count() -> int:
        connection = await nats.connect(url)
        try:
            return (await connection.jetstream().stream_info(stream)).state.messages
        finally:
            await connection.close()

    return asyncio.run(count())


def add_stream(url: str, stream: str, subjects: list[str]) -> None:
    import nats

    async def add() -> None:
        connection = await nats.connect(url)
        try:
            await connection.jetstream().add_stream(name=stream, subjects=subjects)
        finally:
            await connection.close()

    asyncio.run(add())


def usage_config(fake_provider, ca_file, tmp_path, nats_url: str, stream: str | None) -> str:
    return provider_config(
        fake_provider,
        ca_file,
        extra=f"""
[nats]
url = "{nats_url}"
snapshot = "{tmp_path / "revocations.snapshot"}"

[usage]
jsonl = "{tmp_path / "usage.jsonl"}"
nats_publish = true
{f'nats_stream = "{stream}"' if stream else ""}
""",
    )


def logged(egress, event: str) -> list[dict]:
    lines = egress.stderr_path.read_bytes().splitlines()
    return [orjson.loads(line) for line in lines if f'"event":"{event}"'.encode() in line]


def test_a_core_nats_fact_the_broker_never_read_is_sent_again(
    start_egress, fake_provider, ca_file, tmp_path, nats_server
):
    """Without `nats_stream` facts go out on core NATS, which has no ack: a fact written to the
    socket of a broker that dies before reading it was counted as published and lost without a
    word. Now it counts only once the broker's PONG confirms it; else it is sent again."""
    add_stream(nats_server.url, "OPS_USAGE", ["egress.usage.>"])  # the operator's own stream keeps them
    relay = NatsRelay(nats_server.port, cut=True)
    try:
        egress = start_egress(usage_config(fake_provider, ca_file, tmp_path, relay.url, stream=None))
        assert wait_until(lambda: logged(egress, "usage_publisher_connected"), timeout=10)
        assert statuses(egress.port, 1) == [200]
        assert relay.published.wait(timeout=5)
        assert wait_until(lambda: stream_messages(nats_server.url, "OPS_USAGE") >= 1, timeout=15, interval=0.2), (
            egress.logs()
        )
        egress.signal(signal.SIGTERM)
        assert egress.wait(timeout=15) == 0
        assert logged(egress, "usage_facts_lost") == []
        assert stream_messages(nats_server.url, "OPS_USAGE") == 1
        assert len(whole_lines((tmp_path / "usage.jsonl").read_bytes())) == 1
    finally:
        relay.stop()


def test_a_stop_waits_for_the_ack_on_its_way_rather_than_count_the_fact_lost(
    start_egress, fake_provider, ca_file, tmp_path, nats_server
):
    """SIGTERM while a fact's JetStream ack is on its way (a slow broker): the shutdown flush saw an
    empty queue and cancelled the publish, logging `usage_facts_lost` for a fact the stream has."""
    relay = NatsRelay(nats_server.port, delay=0.6)
    try:
        egress = start_egress(usage_config(fake_provider, ca_file, tmp_path, relay.url, stream="EGRESS_USAGE_REVIEW"))
        assert wait_until(lambda: logged(egress, "usage_publisher_connected"), timeout=10)
        assert statuses(egress.port, 1) == [200]
        assert relay.published.wait(timeout=5)
        egress.signal(signal.SIGTERM)
        assert egress.wait(timeout=15) == 0
        assert logged(egress, "usage_facts_lost") == [], egress.logs()
        assert stream_messages(nats_server.url, "EGRESS_USAGE_REVIEW") == 1
    finally:
        relay.stop()


def test_a_broker_outage_is_one_line_not_one_per_retry(start_egress, fake_provider, ca_file, tmp_path, nats_server):
    """Every reconnect attempt logged `usage_publisher_unavailable`: a broker down for an hour was
    720 lines a worker at the default 5 s max_reconnect_wait (the revocation feed's were fixed so).
    Now one line per outage and reason, and the line that ends it counts the failed attempts."""
    config = usage_config(fake_provider, ca_file, tmp_path, nats_server.url, stream="EGRESS_USAGE_REVIEW")
    egress = start_egress(config.replace("[usage]", "max_reconnect_wait = 0.5\n\n[usage]"))
    assert wait_until(lambda: logged(egress, "usage_publisher_connected"), timeout=10)
    nats_server.kill()
    assert statuses(egress.port, 1) == [200]  # a fact to publish meets the dead broker
    time.sleep(3)  # attempts every 0.5 s at most: half a dozen or more
    unavailable = logged(egress, "usage_publisher_unavailable")
    assert [event["reason"] for event in unavailable] == ["broker unreachable"], unavailable
    nats_server.start()
    assert wait_until(lambda: len(logged(egress, "usage_publisher_connected")) == 2, timeout=10), egress.logs()
    assert logged(egress, "usage_publisher_connected")[-1]["failed_attempts"] >= 4
    assert wait_until(lambda: stream_messages(nats_server.url, "EGRESS_USAGE_REVIEW") == 1, timeout=5, interval=0.2)


def test_a_stream_whose_subjects_miss_ours_is_named_as_the_reason(
    start_egress, fake_provider, ca_file, tmp_path, nats_server
):
    """`nats_stream` names a stream that exists with other subjects: every publish gets no answer
    from JetStream. The log said `broker error (NoStreamResponseError)`, once per retry, between
    `usage_publisher_connected` lines; now it says no stream takes the subjects, once, and the
    facts that pile up past the queue are counted."""
    add_stream(nats_server.url, "BILLING", ["billing.>"])
    config = usage_config(fake_provider, ca_file, tmp_path, nats_server.url, stream="BILLING")
    config = config.replace("[usage]", "max_reconnect_wait = 0.5\n\n[usage]\nqueue_size = 2")
    egress = start_egress(config)
    assert statuses(egress.port, 5) == [200] * 5
    time.sleep(2)
    unavailable = logged(egress, "usage_publisher_unavailable")
    assert [event["reason"] for event in unavailable] == ["no JetStream stream takes egress.usage.<provider>"]
    assert len(logged(egress, "usage_publisher_connected")) == 1
    egress.signal(signal.SIGTERM)
    assert egress.wait(timeout=15) == 0
    lost = logged(egress, "usage_facts_lost")
    assert [(event["sink"], event["dropped"], event["dropped_total"]) for event in lost] == [("nats", 2, 5)]
    assert stream_messages(nats_server.url, "BILLING") == 0


def test_a_fact_another_streams_subjects_catch_is_refused_not_stored_there(
    start_egress, fake_provider, ca_file, tmp_path, nats_server
):
    """The named stream misses our subjects and another stream catches them: the fact was acked by
    the other stream, counted as published, and never reached the stream billing reads (nor its
    duplicate window). Now the publish names the stream it expects, and the refusal is logged."""
    add_stream(nats_server.url, "BILLING", ["billing.>"])
    add_stream(nats_server.url, "CATCH_ALL", ["egress.>"])
    config = usage_config(fake_provider, ca_file, tmp_path, nats_server.url, stream="BILLING")
    egress = start_egress(config.replace("[usage]", "max_reconnect_wait = 0.5\n\n[usage]"))
    assert statuses(egress.port, 1) == [200]
    assert wait_until(lambda: logged(egress, "usage_publisher_unavailable"), timeout=5), egress.logs()
    assert logged(egress, "usage_publisher_unavailable")[0]["reason"].startswith("JetStream refused: expected stream")
    assert stream_messages(nats_server.url, "CATCH_ALL") == 0


def a_fact(number: int) -> dict:
    return {"ts": time.time(), "request_id": f"req-{number}", "provider": "openai", "usage": "complete"}


def test_a_rotation_past_a_lowered_keep_files_says_what_it_deletes(tmp_path, monkeypatch):
    """keep_files lowered (10 to 2) across a restart: the first rotation deleted `usage.jsonl.3`,
    left by the larger setting, without the `usage_file_rotated_out` line every other deletion has."""
    from egress import facts

    logged: list[dict] = []
    monkeypatch.setattr(facts, "log_event", lambda event, **fields: logged.append({"event": event, **fields}))
    path = tmp_path / "usage.jsonl"
    for index in (1, 2, 3):
        Path(f"{path}.{index}").write_bytes(orjson.dumps(a_fact(100 + index)) + b"\n")

    async def main():
        sink = facts.FactSink(str(path), rotate_bytes=10, keep_files=2, queue_size=100)
        sink.emit(a_fact(0))
        sink.flush()  # over rotate_bytes: one rotation
        sink.close()

    asyncio.run(main())
    gone = sorted(entry["path"] for entry in logged if entry["event"] == "usage_file_rotated_out")
    assert gone == [f"{path}.2", f"{path}.3"], logged  # the oldest kept, replaced; the one past the setting
    assert [Path(f"{path}.{index}").exists() for index in (1, 2, 3)] == [True, True, False]
    assert orjson.loads(Path(f"{path}.1").read_bytes())["request_id"] == "req-0"


def test_a_fact_the_stream_will_never_take_is_counted_and_passed_over(
    start_egress, fake_provider, ca_file, tmp_path, nats_server
):
    """A fact over the stream's `max_msg_size` (an operator's stream; here a long request path) was
    put back at the head of the queue and sent again after every reconnect: every later fact waited
    behind it until the queue overflowed. Now it is counted as dropped and logged, and the facts
    behind it are stored."""
    import nats
    from nats.js import api

    async def add_small_stream() -> None:
        connection = await nats.connect(nats_server.url)
        try:
            config = api.StreamConfig(name="BILLING", subjects=["egress.usage.>"], max_msg_size=1500)
            await connection.jetstream().add_stream(config)
        finally:
            await connection.close()

    asyncio.run(add_small_stream())
    config = usage_config(fake_provider, ca_file, tmp_path, nats_server.url, stream="BILLING")
    egress = start_egress(config.replace("[usage]", "max_reconnect_wait = 0.5\n\n[usage]"))
    assert wait_until(lambda: logged(egress, "usage_publisher_connected"), timeout=10)
    assert statuses(egress.port, 1) == [200]
    with RawClient(egress.port) as client:
        client.send(request_bytes("GET", "/openai/v1/models/" + "m" * 2000))
        assert client.read_response().status == 404
    assert statuses(egress.port, 2) == [200, 200]
    assert wait_until(lambda: stream_messages(nats_server.url, "BILLING") == 3, timeout=10, interval=0.2), egress.logs()
    refused = logged(egress, "usage_fact_refused")
    assert len(refused) == 1, egress.logs()
    assert refused[0]["bytes"] > 1500 and refused[0]["dropped_total"] == 1
    assert "message size exceeds maximum allowed" in refused[0]["reason"]
    assert logged(egress, "usage_publisher_unavailable") == []
    egress.signal(signal.SIGTERM)
    assert egress.wait(timeout=15) == 0
    assert logged(egress, "usage_facts_lost") == []
    facts = [orjson.loads(line) for line in whole_lines((tmp_path / "usage.jsonl").read_bytes())]
    assert len(facts) == 4 and refused[0]["request_id"] == facts[1]["request_id"]  # the file keeps it


SMALL_PAYLOAD = 2048


class SmallPayloadNats(NatsServer):
    """A nats-server (JetStream on) whose `max_payload` is SMALL_PAYLOAD: only a config file sets it."""

    def start(self) -> SmallPayloadNats:
        config = self.log.parent / "small-payload.conf"
        config.write_text(f"max_payload: {SMALL_PAYLOAD}\n")
        with open(self.log, "ab") as log:
            command = [nats_server_binary(), "-c", str(config), "-js", "-a", "127.0.0.1", "-p", str(self.port)]
            self.process = subprocess.Popen(
                [*command, "-sd", str(self.store)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        assert wait_until(self._accepting, timeout=10, interval=0.05), self.log.read_text()
        return self


@pytest.fixture
def small_payload_nats(tmp_path):
    server = SmallPayloadNats(tmp_path)
    try:
        yield server.start()
    finally:
        server.kill()


def sized_fact(number: int, size: int) -> dict:
    """A fact whose JSON is `size` bytes."""
    fact = a_fact(number) | {"path": ""}
    fact["path"] = "p" * (size - len(orjson.dumps(fact)))
    assert len(orjson.dumps(fact)) == size
    return fact


@pytest.mark.parametrize("stream", [None, "BILLING"])
def test_a_fact_its_headers_push_over_max_payload_is_refused_not_sent_forever(small_payload_nats, monkeypatch, stream):
    """nats-py checks a message's payload against the server's `max_payload`, the server checks the
    payload and the headers (`Nats-Msg-Id`, `Nats-Expected-Stream`): a fact a few bytes under the
    limit passed the check, and the server closed the connection over it ("maximum payload
    exceeded"). It was logged as `broker unreachable` and sent again after every reconnect, with the
    facts before it in its batch (on core NATS, a copy each time), and every fact behind it waited.
    Now it is counted as dropped, logged once, and the facts around it go out once each."""
    import nats

    from egress import usage_nats
    from egress.config import NatsConfig, UsageConfig

    events: list[dict] = []
    monkeypatch.setattr(usage_nats, "log_event", lambda event, **fields: events.append({"event": event, **fields}))
    url = small_payload_nats.url
    facts = [
        a_fact(0),
        sized_fact(1, SMALL_PAYLOAD - 5),  # under the limit, the headers over it
        a_fact(2),
        sized_fact(3, SMALL_PAYLOAD + 1),  # over it alone: nats-py's MaxPayloadError
        a_fact(4),
    ]

    async def main() -> tuple[list[str], usage_nats.UsagePublisher]:
        reader = await nats.connect(url)
        received: list[str] = []

        async def receive(message) -> None:
            received.append(message.headers["Nats-Msg-Id"])

        await reader.subscribe("egress.usage.>", cb=receive)
        await reader.flush()
        usage = UsageConfig(nats_publish=True, nats_stream=stream)
        publisher = usage_nats.UsagePublisher(usage, NatsConfig(url=url, max_reconnect_wait=0.3))
        task = asyncio.create_task(publisher.run())
        try:
            publisher.enqueue(facts)
            give_up_at = time.monotonic() + 5
            while publisher.queued and time.monotonic() < give_up_at:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # a copy sent again would arrive by now
            await reader.flush()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await reader.close()
        return received, publisher

    received, publisher = asyncio.run(main())
    assert received == ["req-0", "req-2", "req-4"], events
    assert (publisher.queued, publisher.published, publisher.dropped) == (0, 3, 2)
    assert [event["event"] for event in events] == ["usage_publisher_connected", "usage_fact_refused"], events
    refused = events[1]
    assert refused["request_id"] == "req-1" and refused["bytes"] > SMALL_PAYLOAD, refused
    assert refused["reason"] == f"larger than the server's max_payload ({SMALL_PAYLOAD} bytes)"
    if stream is not None:
        assert stream_messages(url, stream) == 3

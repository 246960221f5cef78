"""Usage facts to NATS for billing: subject `<prefix>.<provider>`, JetStream when a stream is named.

Contract: `UsagePublisher.enqueue(batch)` is a FactSink listener: it never blocks. Facts wait in a
bounded queue; past it they are dropped and counted (`dropped`). `run()` is a task that connects
(with capped backoff, like the revocation feed), makes sure the stream exists when one is named,
and publishes each fact with `Nats-Msg-Id: <request id>`. JetStream drops a repeated id within its
duplicate window, so a fact republished after a reconnect is never billed twice.

A fact counts as published only once the broker has confirmed it: JetStream's ack, or, without a
stream (core NATS has no ack), the PONG to a PING sent after a batch of them, which the broker
answers only once it has read every message before it. Until then it is in flight: a failure (a
broker killed with the fact in its socket buffer, an ack that never comes) puts it back at the head
of the queue, sent again after the reconnect; the shutdown flush waits for it too. A JetStream
publish names the stream it expects, so a fact is never stored in another stream that happens to
take the subject. Trouble is logged once per outage and reason (`usage_publisher_unavailable`),
and the line that ends it (`usage_publisher_connected` or `_publishing`) counts the attempts.

A fact the broker refuses for itself, not for its state (larger than the server's `max_payload`,
or than the stream's `max_msg_size`: JetStream's err_code 10054), is never sendable: it is
counted as dropped and logged (`usage_fact_refused`, at most one line per FAILURE_LOG_INTERVAL,
with how many it held back), and the facts behind it go on. Retried, it was sent again after every
reconnect and held every later fact back until the queue overflowed. It stays in the JSONL file.
The server's `max_payload` counts the headers too, and nats-py checks the payload alone: a fact
the headers push over it is refused here, before it is sent, since the server answers it by
closing the connection (the facts before it on core NATS sent again, each time, for good).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from typing import Any

import orjson
from nats.errors import MaxPayloadError
from nats.js import api
from nats.js.errors import APIError, NoStreamResponseError, NotFoundError

from egress.accesslog import log_event
from egress.config import NatsConfig, UsageConfig
from egress.facts import FAILURE_LOG_INTERVAL, Throttle
from egress.revocations import connect, describe_failure
from egress.tally import Tally

_FIRST_BACKOFF = 0.2
# Seconds to wait for the broker's confirmation: nats-py's own default for a JetStream ack.
_ACK_TIMEOUT = 5.0
# Core NATS facts confirmed by one PING/PONG: a round trip per batch, not per fact.
_BATCH = 256
_DROPPED = ("usage_facts_dropped", "nats")  # its key in the worker's tally
# JetStream's "message size exceeds maximum allowed" (the stream's max_msg_size): this message
# will never be stored, however often it is sent. Other refusals (a full stream, a missing one)
# are the stream's state, and the fact waits for it to change.
_TOO_LARGE = 10054
# nats-py's header block around `key: value\r\n` lines: `NATS/1.0\r\n` before, a blank line after.
_HEADER_FRAME = len(b"NATS/1.0\r\n\r\n")


class UsagePublisher:
    __slots__ = (
        "_connected",
        "_dropped",
        "_failures",
        "_nats",
        "_publish_failed",
        "_queue",
        "_ready",
        "_refusals",
        "_reported",
        "_sending",
        "_tally",
        "_usage",
        "published",
    )

    @property
    def queued(self) -> int:
        """Facts not yet confirmed by the broker: waiting, or sent and waiting for its word."""
        return len(self._queue) + len(self._sending)

    def __init__(self, usage: UsageConfig, nats_config: NatsConfig, tally: Tally | None = None) -> None:
        self._usage = usage
        self._nats = nats_config
        self._queue: deque[dict[str, Any]] = deque()
        self._sending: list[dict[str, Any]] = []  # published, not yet confirmed
        self._ready = asyncio.Event()
        # Dropped facts are counted in the worker's tally: the count outlives a worker restart.
        self._tally = tally if tally is not None else Tally()
        self._dropped = self._tally.index(_DROPPED)
        self.published = 0
        self._connected = False  # this attempt got as far as publishing
        # The failure last logged, till facts flow again; whether it came after connecting (a stream
        # that refuses them); and the attempts that failed since facts last flowed.
        self._reported: str | None = None
        self._publish_failed = False
        self._failures = 0
        self._refusals = Throttle(FAILURE_LOG_INTERVAL)

    @property
    def dropped(self) -> int:
        return int(self._tally.get(_DROPPED))

    def enqueue(self, batch: list[dict[str, Any]]) -> None:
        room = self._usage.queue_size - self.queued
        if room < len(batch):
            self._tally.values[self._dropped] += len(batch) - max(room, 0)
            batch = batch[: max(room, 0)]
        self._queue.extend(batch)
        self._ready.set()

    async def run(self) -> None:
        backoff = _FIRST_BACKOFF
        while True:
            self._connected = False
            try:
                await self._publish_while_connected()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker trouble: facts wait in the bounded queue
                if self._connected:
                    backoff = _FIRST_BACKOFF  # it had connected: start over quickly
                reason = _describe(exc, self._usage.nats_subject_prefix)
                self._failures += 1
                # One line per outage and reason, not one per retry (720 an hour a worker at the
                # default 5 s max_reconnect_wait); the attempts are counted in the line that ends it.
                self._publish_failed = self._connected
                if reason != self._reported:
                    log_event(
                        "usage_publisher_unavailable",
                        error=type(exc).__name__,
                        reason=reason,
                        queued=self.queued,
                        retry_in_s=round(backoff, 2),
                        max_retry_wait_s=self._nats.max_reconnect_wait,
                    )
                    self._reported = reason
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._nats.max_reconnect_wait)

    def _recovered(self, event: str, **fields: Any) -> None:
        log_event(event, failed_attempts=self._failures, **fields)
        self._failures = 0
        self._reported = None

    async def _publish_while_connected(self) -> None:
        # Bounded: nats-py's own first connect retries a refused broker for about 120 s.
        client = await connect(self._nats)
        try:
            stream = self._usage.nats_stream
            js = client.jetstream() if stream else None
            if js is not None:
                try:
                    await js.stream_info(stream)
                except NotFoundError:
                    await js.add_stream(
                        api.StreamConfig(
                            name=stream, subjects=[f"{self._usage.nats_subject_prefix}.>"], storage=api.StorageType.FILE
                        )
                    )
            self._connected = True
            # After a failure to publish on a connection, connecting again is no news: the first
            # fact the broker takes is (`usage_publisher_publishing`).
            if self._reported is None or not self._publish_failed:
                self._recovered("usage_publisher_connected", jetstream=js is not None)
            while True:
                if not self._queue:
                    self._ready.clear()
                    await self._ready.wait()
                await self._send(client, js)
        finally:
            if not client.is_closed:
                await client.close()

    async def _send(self, client, js) -> None:
        """Publish the head of the queue: one fact through JetStream, which acks each, or up to
        _BATCH through core NATS, confirmed together. On any failure, or the task cancelled at
        shutdown, the unconfirmed facts go back to the head of the queue in their order."""
        sending = self._sending
        limit = 1 if js is not None else _BATCH
        try:
            while self._queue and len(sending) < limit:
                fact = self._queue.popleft()
                try:
                    data = orjson.dumps(fact)
                except (orjson.JSONEncodeError, TypeError) as exc:  # never sendable: counted, not retried
                    self._tally.values[self._dropped] += 1
                    log_event("usage_fact_unwritable", request_id=fact.get("request_id"), error=type(exc).__name__)
                    continue
                subject = f"{self._usage.nats_subject_prefix}.{fact['provider']}"
                headers = {"Nats-Msg-Id": fact["request_id"]}
                if js is not None:
                    headers[api.Header.EXPECTED_STREAM] = self._usage.nats_stream  # as js.publish adds it
                size = len(data) + _header_size(headers)
                # The server's limit counts the headers, nats-py's check does not: past it, the server
                # closes the connection (and a JetStream request's reply future leaks in nats-py).
                if size > client.max_payload:
                    self._refused(fact, size, f"larger than the server's max_payload ({client.max_payload} bytes)")
                    continue
                sending.append(fact)
                # Each wait bounded here too: nats-py's own timeouts run from its write, and a
                # connection closing under a write can leave that write waiting for good (seen under
                # load: the publisher wedged, every later fact queued until counted dropped).
                try:
                    if js is not None:
                        # Expected stream: a fact another stream's subjects caught would be stored where
                        # billing does not read, and its id deduplicated there, not in ours.
                        publish = js.publish(
                            subject, data, headers=headers, timeout=_ACK_TIMEOUT, stream=self._usage.nats_stream
                        )
                        await asyncio.wait_for(publish, _ACK_TIMEOUT + 1.0)
                    else:
                        await asyncio.wait_for(client.publish(subject, data, headers=headers), _ACK_TIMEOUT)
                except (MaxPayloadError, APIError) as exc:  # MaxPayloadError: the check above, in nats-py
                    if isinstance(exc, APIError) and exc.err_code != _TOO_LARGE:
                        raise
                    sending.pop()  # this fact, the last sent: the ones before it wait for their word
                    self._refused(fact, size, _describe(exc, self._usage.nats_subject_prefix))
            if js is None and sending:
                # Written to a socket is not received: a broker killed now loses what it had not read.
                await asyncio.wait_for(client.flush(timeout=_ACK_TIMEOUT), _ACK_TIMEOUT + 1.0)
        except BaseException:  # a failure, or the task cancelled at shutdown mid-publish
            self._queue.extendleft(reversed(sending))  # sent again after the reconnect, or counted by abandon()
            sending.clear()
            raise
        self.published += len(sending)
        sending.clear()
        if self._reported is not None:
            self._recovered("usage_publisher_publishing")

    def _refused(self, fact: dict[str, Any], size: int, reason: str) -> None:
        """A fact the broker will never take: counted as dropped, logged (throttled), passed over."""
        self._tally.values[self._dropped] += 1
        held = self._refusals.due(asyncio.get_running_loop().time())
        if held is not None:
            log_event(
                "usage_fact_refused",
                request_id=fact.get("request_id"),
                bytes=size,
                reason=reason,
                held_back=held,
                dropped_total=self.dropped,
            )

    def abandon(self) -> int:
        """At exit, after flush: what is still queued will never leave, and is counted as dropped and
        logged, never lost silently. Later facts (a connection aborted at the drain's end) too."""
        left = self.queued
        self._queue.clear()
        self._sending.clear()
        self._usage = dataclasses.replace(self._usage, queue_size=0)  # enqueue now counts them dropped
        if left:
            self._tally.values[self._dropped] += left
            log_event("usage_facts_lost", sink="nats", dropped=left, dropped_total=self.dropped)
        return left

    async def flush(self, timeout: float) -> None:
        """At shutdown: give queued facts, and those waiting for the broker's word, a bounded chance
        to be confirmed. Cancelling a publish whose ack is on its way would count a fact the broker
        has as lost."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + timeout
        while self.queued and loop.time() < give_up_at:
            await asyncio.sleep(0.02)


def _header_size(headers: dict[str, str]) -> int:
    """The bytes nats-py frames these headers in, which the server counts against max_payload."""
    return _HEADER_FRAME + sum(len(key) + len(value.encode()) + 4 for key, value in headers.items())


def _describe(exc: BaseException, prefix: str) -> str:
    """describe_failure, and what JetStream said when it refused a fact or the stream: its own
    words (never a URL or a credential), so a stream whose subjects miss ours, or a full one, is
    told from a broker that is down."""
    if isinstance(exc, NoStreamResponseError):
        return f"no JetStream stream takes {prefix}.<provider>"
    if isinstance(exc, MaxPayloadError):
        return "larger than the server's max_payload"
    if isinstance(exc, APIError) and exc.description:
        return f"JetStream refused: {exc.description[:200]}"
    return describe_failure(exc)

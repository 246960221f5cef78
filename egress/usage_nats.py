"""Usage facts to NATS for billing: subject `<prefix>.<provider>`, JetStream when a stream is named.

Contract: `UsagePublisher.enqueue(batch)` is a FactSink listener: it never blocks. Facts wait in a
bounded queue; past it they are dropped and counted (`dropped`). `run()` is a task that connects
(with capped backoff, like the revocation feed), makes sure the stream exists when one is named,
and publishes each fact with `Nats-Msg-Id: <request id>`. JetStream drops a repeated id within its
duplicate window, so a fact republished after a reconnect is never billed twice. A fact whose
publish failed goes back to the head of the queue and is sent again after the reconnect.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from typing import Any

import orjson
from nats.js import api
from nats.js.errors import NotFoundError

from egress.accesslog import log_event
from egress.config import NatsConfig, UsageConfig
from egress.revocations import connect, describe_failure
from egress.tally import Tally

_FIRST_BACKOFF = 0.2
_DROPPED = ("usage_facts_dropped", "nats")  # its key in the worker's tally


class UsagePublisher:
    __slots__ = ("_dropped", "_nats", "_queue", "_ready", "_tally", "_usage", "published")

    @property
    def queued(self) -> int:
        return len(self._queue)

    def __init__(self, usage: UsageConfig, nats_config: NatsConfig, tally: Tally | None = None) -> None:
        self._usage = usage
        self._nats = nats_config
        self._queue: deque[dict[str, Any]] = deque()
        self._ready = asyncio.Event()
        # Dropped facts are counted in the worker's tally: the count outlives a worker restart.
        self._tally = tally if tally is not None else Tally()
        self._dropped = self._tally.index(_DROPPED)
        self.published = 0

    @property
    def dropped(self) -> int:
        return int(self._tally.get(_DROPPED))

    def enqueue(self, batch: list[dict[str, Any]]) -> None:
        room = self._usage.queue_size - len(self._queue)
        if room < len(batch):
            self._tally.values[self._dropped] += len(batch) - max(room, 0)
            batch = batch[: max(room, 0)]
        self._queue.extend(batch)
        self._ready.set()

    async def run(self) -> None:
        backoff = _FIRST_BACKOFF
        while True:
            try:
                await self._publish_while_connected()
                backoff = _FIRST_BACKOFF
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker trouble: facts wait in the bounded queue
                log_event(
                    "usage_publisher_unavailable",
                    error=type(exc).__name__,
                    reason=describe_failure(exc),
                    queued=len(self._queue),
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._nats.max_reconnect_wait)

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
            log_event("usage_publisher_connected", jetstream=js is not None)
            while True:
                if not self._queue:
                    self._ready.clear()
                    await self._ready.wait()
                fact = self._queue.popleft()
                subject = f"{self._usage.nats_subject_prefix}.{fact['provider']}"
                try:
                    data = orjson.dumps(fact)
                except (orjson.JSONEncodeError, TypeError) as exc:  # never sendable: counted, not retried
                    self._tally.values[self._dropped] += 1
                    log_event("usage_fact_unwritable", request_id=fact.get("request_id"), error=type(exc).__name__)
                    continue
                headers = {"Nats-Msg-Id": fact["request_id"]}
                try:
                    if js is not None:
                        await js.publish(subject, data, headers=headers)
                    else:
                        await client.publish(subject, data, headers=headers)
                except BaseException:  # a failure, or the task cancelled at shutdown mid-publish
                    self._queue.appendleft(fact)  # sent again after the reconnect, or counted by abandon()
                    raise
                self.published += 1
        finally:
            if not client.is_closed:
                await client.close()

    def abandon(self) -> int:
        """At exit, after flush: what is still queued will never leave, and is counted as dropped and
        logged, never lost silently. Later facts (a connection aborted at the drain's end) too."""
        left = len(self._queue)
        self._queue.clear()
        self._usage = dataclasses.replace(self._usage, queue_size=0)  # enqueue now counts them dropped
        if left:
            self._tally.values[self._dropped] += left
            log_event("usage_facts_lost", sink="nats", dropped=left, dropped_total=self.dropped)
        return left

    async def flush(self, timeout: float) -> None:
        """At shutdown: give queued facts a bounded chance to leave."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + timeout
        while self._queue and loop.time() < give_up_at:
            await asyncio.sleep(0.02)

"""Revocations over NATS JetStream: every egress follows one stream of revoked key ids.

Contract:
  `RevocationFeed(config, denyset).run()` is a task for the life of the process. It connects,
  makes sure the stream exists, and subscribes from `denyset.last_sequence + 1`, so nothing
  published while this process was down or disconnected is ever skipped (gap-free). Each message
  is applied to the deny-set at once; the snapshot file follows, written atomically off the loop.
  When the broker is unreachable it retries with capped exponential backoff while requests keep
  flowing on the deny-set as last known; `denyset.age_seconds()` says how stale that is.
  `publish_revocation(...)` is what `egress keys revoke` uses.
The message body is the kid; `Nats-Msg-Id` makes a repeated revocation a no-op for the stream.
"""

from __future__ import annotations

import asyncio
import time

import nats
from nats.js import api
from nats.js.errors import NotFoundError

from egress.accesslog import log_event
from egress.config import NatsConfig
from egress.denyset import DenySet, write_snapshot

_FIRST_BACKOFF = 0.2


async def _quiet(_exc: Exception) -> None:
    """nats-py reports errors through this; egress reports them itself, once, in its own log."""


async def ensure_stream(js, config: NatsConfig) -> None:
    try:
        await js.stream_info(config.stream)
    except NotFoundError:
        await js.add_stream(
            api.StreamConfig(
                name=config.stream,
                subjects=[config.subject],
                storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.LIMITS,
            )
        )


async def publish_revocation(config: NatsConfig, kid: str) -> int:
    client = await nats.connect(
        config.url, allow_reconnect=False, connect_timeout=config.connect_timeout, error_cb=_quiet
    )
    try:
        js = client.jetstream()
        await ensure_stream(js, config)
        ack = await js.publish(config.subject, kid.encode(), headers={"Nats-Msg-Id": f"revoke-{kid}"})
        return ack.seq
    finally:
        await client.close()


class RevocationFeed:
    __slots__ = ("_config", "_denyset", "_dirty", "_writer")

    def __init__(self, config: NatsConfig, denyset: DenySet) -> None:
        self._config = config
        self._denyset = denyset
        self._dirty = False
        self._writer: asyncio.Task | None = None

    async def run(self) -> None:
        backoff = _FIRST_BACKOFF
        while True:
            try:
                await self._follow()
                backoff = _FIRST_BACKOFF  # it had connected: start over quickly
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any broker trouble: keep serving, retry later
                log_event("revocations_unavailable", error=type(exc).__name__, retry_in_s=round(backoff, 2))
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._config.max_reconnect_wait)

    async def _follow(self) -> None:
        config = self._config
        denyset = self._denyset
        lost = asyncio.Event()

        async def on_lost() -> None:
            lost.set()

        client = await nats.connect(
            config.url,
            allow_reconnect=False,
            connect_timeout=config.connect_timeout,
            error_cb=_quiet,
            disconnected_cb=on_lost,
            closed_cb=on_lost,
        )
        try:
            js = client.jetstream()
            await ensure_stream(js, config)
            info = await js.stream_info(config.stream)
            if info.state.last_seq < denyset.last_sequence:
                # The stream was recreated: its sequences restarted. Replay it whole; applying a kid
                # twice is harmless, missing one is not.
                log_event("revocations_stream_reset", stream_last=info.state.last_seq, ours=denyset.last_sequence)
                denyset.last_sequence = 0
            start = denyset.last_sequence + 1
            await js.subscribe(
                config.subject,
                stream=config.stream,
                cb=self._on_message,
                ordered_consumer=True,
                config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start),
            )
            denyset.connected = True
            denyset.synced_at = time.time()
            log_event("revocations_following", stream=config.stream, from_sequence=start, deny_set_size=len(denyset))
            await lost.wait()
            log_event("revocations_disconnected", last_sequence=denyset.last_sequence)
        finally:
            if denyset.connected:
                denyset.connected = False
                denyset.synced_at = time.time()
            if not client.is_closed:
                await client.close()

    async def _on_message(self, message) -> None:
        sequence = message.metadata.sequence.stream
        if self._denyset.apply_stream(message.data.decode("utf-8", "replace").strip(), sequence):
            self._dirty = True
            if self._writer is None or self._writer.done():
                self._writer = asyncio.get_running_loop().create_task(self._write_snapshots())

    async def _write_snapshots(self) -> None:
        # Coalesced: a burst of revocations costs one or two fsyncs, and none on the event loop.
        while self._dirty:
            self._dirty = False
            data = self._denyset.snapshot_bytes()
            try:
                await asyncio.to_thread(write_snapshot, self._config.snapshot, data)
            except OSError as exc:
                log_event("snapshot_write_failed", error=exc.strerror)

    async def flush(self) -> None:
        """Write the snapshot now (at shutdown), whatever the writer task is doing."""
        if self._writer is not None and not self._writer.done():
            await self._writer
        write_snapshot(self._config.snapshot, self._denyset.snapshot_bytes())

"""Revocations over NATS JetStream: every egress follows one stream of revoked key ids.

Contract:
  `start_feed(config, denyset)` starts `RevocationFeed.run()`, a task for the life of the process,
  and returns once the deny-set holds everything the stream held when first subscribed to (logged
  `revocations_caught_up`), or the broker proved unreachable, or `connect_timeout` + 1 s went by
  (`revocations_start_without_broker`: the snapshot loaded before is what applies). serve.py awaits
  it before accepting the first connection.
  The feed connects, makes sure the stream exists, and subscribes from `denyset.last_sequence + 1`,
  so nothing published while this process was down or disconnected is ever skipped (gap-free). A
  stream recreated under the same name (a broker back with an empty store, a stream deleted and
  re-added) starts its sequences again: it is recognised by its creation time, or by a last sequence
  below ours, and replayed whole into the deny-set, which never forgets a kid. That is checked on
  every subscription, on every stream advisory, and every `_CHECK_INTERVAL` while connected.
  Each message is applied to the deny-set at once; the snapshot file follows, written atomically
  off the loop. When the broker is unreachable it retries with capped exponential backoff while
  requests keep flowing on the deny-set as last known; `denyset.age_seconds()` says how stale that is.
  `publish_revocation(...)` is what `egress keys revoke` uses; it gives up after 2 x connect_timeout.
The message body is the kid; `Nats-Msg-Id` makes a repeated revocation a no-op for the stream.
No URL is ever logged or printed but as `public_url()` makes it: no user, password or token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from urllib.parse import urlsplit

from nats import errors
from nats.aio.client import Client
from nats.js import api
from nats.js.errors import NotFoundError

from egress.accesslog import log_event
from egress.config import NatsConfig
from egress.denyset import DenySet, stream_kid, write_snapshot

_FIRST_BACKOFF = 0.2
# While connected and no advisory said a word, how often the stream's identity and our consumer
# are looked at: nats-py's ordered consumer, finding its stream deleted, re-subscribes at the old
# sequence (skipping a re-added stream's first messages) or gives up without a sound.
_CHECK_INTERVAL = 5.0
# What start-up waits beyond connect_timeout for the first catch-up: a local replay of thousands
# of revocations takes milliseconds.
_CATCH_UP_SLACK = 1.0


async def _quiet(_exc: Exception) -> None:
    """nats-py reports errors through this; egress reports them itself, once, in its own log."""


def public_url(url: str) -> str:
    """scheme://host:port of a NATS URL, without the user, password or token it may carry."""
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    host = parts.hostname or "?"
    try:
        port = parts.port or 4222
    except ValueError:
        port = "?"
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def describe_failure(exc: BaseException) -> str:
    """One operator-facing phrase; never `str(exc)`, which may quote the URL it failed on."""
    # During the first connect nats-py raises a plain Error for the server's -ERR 'Authorization Violation'.
    if isinstance(exc, errors.AuthorizationError) or "authorization violation" in str(exc).lower():
        return "not authorized"
    if isinstance(exc, errors.NoRespondersError):
        return "no JetStream on that broker"
    if isinstance(exc, TimeoutError | OSError | errors.NoServersError | errors.ConnectionClosedError):
        return "broker unreachable"
    return f"broker error ({type(exc).__name__})"


async def connect(config: NatsConfig, **callbacks) -> Client:
    """One bounded attempt at the broker. nats-py's first connect, even with allow_reconnect=False,
    retries a refused server max_reconnect_attempts (60) times reconnect_time_wait (2 s) apart."""
    client = Client()
    callbacks.setdefault("error_cb", _quiet)
    try:
        async with asyncio.timeout(config.connect_timeout * 2):
            await client.connect(
                config.url,
                allow_reconnect=False,
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=config.connect_timeout,
                **callbacks,
            )
    except BaseException:
        with contextlib.suppress(Exception):
            await client.close()
        raise
    return client


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
    async with asyncio.timeout(config.connect_timeout * 2):
        client = await connect(config)
        try:
            js = client.jetstream(timeout=config.connect_timeout)
            await ensure_stream(js, config)
            ack = await js.publish(config.subject, kid.encode(), headers={"Nats-Msg-Id": f"revoke-{kid}"})
            return ack.seq
        finally:
            await client.close()


def _created(info: api.StreamInfo) -> str | None:
    return info.created.isoformat() if info.created is not None else None


async def start_feed(config: NatsConfig, denyset: DenySet) -> tuple[RevocationFeed, asyncio.Task]:
    feed = RevocationFeed(config, denyset)
    task = asyncio.get_running_loop().create_task(feed.run())
    began = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(config.connect_timeout + _CATCH_UP_SLACK):
            await feed.settled.wait()
    waited_ms = round((time.monotonic() - began) * 1000)
    if feed.caught_up.is_set():
        log_event(
            "revocations_caught_up",
            last_sequence=denyset.last_sequence,
            deny_set_size=len(denyset),
            waited_ms=waited_ms,
        )
    else:
        log_event(
            "revocations_start_without_broker",
            reason=(feed.last_failure or "unreachable") if feed.settled.is_set() else "timeout",
            last_sequence=denyset.last_sequence,
            deny_set_size=len(denyset),
            waited_ms=waited_ms,
        )
    return feed, task


class RevocationFeed:
    __slots__ = (
        "_config",
        "_denyset",
        "_dirty",
        "_failures",
        "_generation",
        "_reported",
        "_writer",
        "caught_up",
        "last_failure",
        "settled",
    )

    def __init__(self, config: NatsConfig, denyset: DenySet) -> None:
        self._config = config
        self._denyset = denyset
        self._dirty = False
        self._writer: asyncio.Task | None = None
        # Bumped whenever a subscription is given up, so a message it still delivers is dropped:
        # applied after a rewind to 0, an old stream's sequence would skip the new stream's messages.
        self._generation = 0
        # The deny-set holds everything the stream held at the first subscription.
        self.caught_up = asyncio.Event()
        # Start-up may go on: caught up, or the first attempt at the broker failed.
        self.settled = asyncio.Event()
        self.last_failure: str | None = None  # describe_failure of the last attempt that failed
        # One `revocations_unavailable` line per outage and reason, not one per retry (a broker down
        # for an hour was 720 lines a worker at a 5 s max_reconnect_wait); the attempts are counted
        # and `revocations_following` says how many failed once the broker is back.
        self._reported: str | None = None
        self._failures = 0

    async def run(self) -> None:
        backoff = _FIRST_BACKOFF
        while True:
            try:
                await self._follow()
                backoff = _FIRST_BACKOFF  # it had connected: start over quickly
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any broker trouble: keep serving, retry later
                reason = describe_failure(exc)  # "not authorized" tells a wrong password from a down broker
                self._failures += 1
                if reason != self._reported:
                    log_event(
                        "revocations_unavailable",
                        error=type(exc).__name__,
                        reason=reason,
                        retry_in_s=round(backoff, 2),
                        max_retry_wait_s=self._config.max_reconnect_wait,
                    )
                    self._reported = reason
                self.last_failure = reason
                self.settled.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._config.max_reconnect_wait)

    async def _follow(self) -> None:
        config = self._config
        denyset = self._denyset
        wake = asyncio.Event()
        lost = False

        async def on_lost() -> None:
            nonlocal lost
            lost = True
            wake.set()

        async def on_error(_exc: Exception) -> None:
            # Among others, nats-py reports here an ordered consumer it could not recreate: go and look.
            wake.set()

        async def on_advisory(_message) -> None:
            wake.set()

        client = await connect(config, error_cb=on_error, disconnected_cb=on_lost, closed_cb=on_lost)
        try:
            js = client.jetstream(timeout=config.connect_timeout)
            await ensure_stream(js, config)
            # CREATED, DELETED, UPDATED of our stream: a recreation is noticed at once, not at the next check.
            await client.subscribe(f"$JS.EVENT.ADVISORY.STREAM.*.{config.stream}", cb=on_advisory)
            subscription = await self._subscribe(js)
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_CHECK_INTERVAL):
                        await wake.wait()
                wake.clear()
                if lost:
                    log_event("revocations_disconnected", last_sequence=denyset.last_sequence)
                    return
                try:
                    info = await js.stream_info(config.stream)
                    if denyset.is_other_stream(_created(info), info.state.last_seq):
                        log_event("revocations_stream_replaced", stream=config.stream)
                        return  # the next subscription rewinds and replays it
                    consumer = await subscription.consumer_info()
                    if not denyset.connected:
                        self._caught_up_by(consumer)
                except NotFoundError:
                    log_event("revocations_stream_or_consumer_gone", stream=config.stream)
                    return  # the next connection re-adds the stream and subscribes again
        finally:
            self._generation += 1
            if denyset.connected:
                denyset.connected = False
                denyset.synced_at = time.time()
            if not client.is_closed:
                await client.close()

    async def _subscribe(self, js):
        config = self._config
        denyset = self._denyset
        info = await js.stream_info(config.stream)
        created = _created(info)
        if denyset.adopt_stream(created, info.state.last_seq):
            log_event("revocations_stream_reset", stream_created=created, stream_last=info.state.last_seq)
            self._snapshot_soon()
        target = info.state.last_seq
        start = denyset.last_sequence + 1
        if info.state.first_seq > start <= info.state.last_seq:
            # Purged, or aged out by the stream's limits: those revocations are gone for good.
            log_event("revocations_gap", from_sequence=start, stream_first=info.state.first_seq)
            denyset.count_lost(info.state.first_seq - start)  # a revoked key among them may still pass
        self._generation += 1
        subscription = await js.subscribe(
            config.subject,
            stream=config.stream,
            cb=self._handler(self._generation, target),
            ordered_consumer=True,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start),
        )
        log_event(
            "revocations_following",
            stream=config.stream,
            from_sequence=start,
            deny_set_size=len(denyset),
            failed_attempts=self._failures,  # since the last time it followed the stream
        )
        self._failures = 0
        self._reported = None  # the next outage is logged again
        if target <= denyset.last_sequence:
            self._mark_caught_up()
        else:
            self._caught_up_by(await subscription.consumer_info())
        return subscription

    def _handler(self, generation: int, target: int):
        denyset = self._denyset

        async def on_message(message) -> None:
            if generation != self._generation:
                return
            metadata = message.metadata
            sequence = metadata.sequence.stream
            kid = stream_kid(message.data)
            if denyset.apply_stream(kid, sequence):
                if kid is None:  # its body is never logged: it may be a whole key sent by mistake
                    log_event("revocation_message_ignored", sequence=sequence, size=len(message.data))
                self._snapshot_soon()
            if not denyset.connected and (sequence >= target or metadata.num_pending == 0):
                self._mark_caught_up()

        return on_message

    def _caught_up_by(self, consumer: api.ConsumerInfo) -> None:
        # Nothing left for us (the stream's last messages may be on other subjects) and all that was
        # delivered has been applied. Otherwise the last pending message will say so (num_pending 0).
        if consumer.num_pending == 0 and consumer.delivered.stream_seq <= self._denyset.last_sequence:
            self._mark_caught_up()

    def _mark_caught_up(self) -> None:
        self._denyset.connected = True
        self._denyset.synced_at = time.time()
        self.caught_up.set()
        self.settled.set()

    def _snapshot_soon(self) -> None:
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
                self._denyset.count_snapshot_failure()

    async def flush(self) -> None:
        """Write the snapshot now (at shutdown), whatever the writer task is doing."""
        if self._writer is not None and not self._writer.done():
            await self._writer
        write_snapshot(self._config.snapshot, self._denyset.snapshot_bytes())

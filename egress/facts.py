"""Usage facts: one record per relayed request, for billing, emitted after the response is written.

Contract: `FactSink.emit(fact)` never blocks and never raises. Facts wait in a bounded queue and
are written once per event-loop turn, one `write` for the whole batch, to a JSONL file rotated by
size (`usage.jsonl`, `.1`, `.2`, …). When the queue is full the fact is dropped and counted;
`counts` also tallies, per provider, the facts whose usage was complete, partial, missing or
unparseable, so metering gaps are visible. Every fact carries the request id: the idempotency key
that lets billing drop a fact it has seen before.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter, deque
from typing import Any

import orjson

from egress.accesslog import log_event


class FactSink:
    __slots__ = (
        "_fd",
        "_keep",
        "_loop",
        "_path",
        "_queue",
        "_queue_size",
        "_rotate_bytes",
        "_scheduled",
        "_size",
        "counts",
        "dropped",
        "listeners",
        "publisher",
    )

    def __init__(self, path: str | None, rotate_bytes: int, keep_files: int, queue_size: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._path = path
        self._rotate_bytes = rotate_bytes
        self._keep = keep_files
        self._queue: deque[dict[str, Any]] = deque()
        self._queue_size = queue_size
        self._scheduled = False
        self.dropped = 0
        self.counts: Counter[tuple[str, str]] = Counter()
        # Other consumers of every fact (the NATS publisher): called with the batch, must not block.
        self.listeners: list = []
        self.publisher = None  # the NATS publisher, when configured (for its dropped count)
        self._fd = -1
        self._size = 0
        if path is not None:
            self._open()

    def emit(self, fact: dict[str, Any]) -> None:
        self.counts[(fact["provider"], fact["usage"])] += 1
        if len(self._queue) >= self._queue_size:
            self.dropped += 1
            return
        self._queue.append(fact)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._queue:
            return
        batch = list(self._queue)
        self._queue.clear()
        for listener in self.listeners:
            listener(batch)
        if self._fd < 0:
            return
        data = b"".join(orjson.dumps(fact) + b"\n" for fact in batch)
        try:
            os.write(self._fd, data)
        except OSError as exc:
            self.dropped += len(batch)
            log_event("usage_write_failed", error=exc.strerror)
            return
        self._size += len(data)
        if self._size >= self._rotate_bytes:
            self._rotate()

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _open(self) -> None:
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._size = os.fstat(self._fd).st_size

    def _rotate(self) -> None:
        os.close(self._fd)
        for index in range(self._keep - 1, 0, -1):
            older = f"{self._path}.{index}"
            if os.path.exists(older):
                os.replace(older, f"{self._path}.{index + 1}")
        os.replace(self._path, f"{self._path}.1")
        stale = f"{self._path}.{self._keep + 1}"
        if os.path.exists(stale):
            os.remove(stale)
        self._open()


def worker_path(path: str, index: int) -> str:
    """`usage.jsonl` -> `usage-w1.jsonl`: each worker writes its own file, so rotation needs no lock."""
    stem, dot, suffix = path.rpartition(".")
    return f"{stem}-w{index}.{suffix}" if dot and "/" not in suffix else f"{path}-w{index}"

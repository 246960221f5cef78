"""Usage facts: one record per relayed request, for billing, emitted after the response is written.

Contract: `FactSink.emit(fact)` never blocks and never raises. Facts wait in a bounded queue and
are written once per event-loop turn, one `write` for the whole batch, to a JSONL file rotated by
size (`usage.jsonl`, `.1`, `.2`, …). When the queue is full the fact is dropped and counted;
`counts` also tallies, per provider, the facts whose usage was complete, partial, missing or
unparseable, so metering gaps are visible. Every fact carries the request id: the idempotency key
that lets billing drop a fact it has seen before.

Full disk (ENOSPC, or EFBIG past RLIMIT_FSIZE): the kernel writes what fits and returns a short
count, and the next write fails. Every fact is either in the file as a whole line or counted in
`dropped`: a short write is continued, and a torn last line is cut back off the file (or, if that
fails, the next write starts on a fresh line). A failing disk fails every batch, so
`usage_write_failed` is logged at most once per `FAILURE_LOG_INTERVAL`, with the count held back.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import time
from collections import deque
from typing import Any

import orjson

from egress.accesslog import log_event
from egress.tally import Tally

# Seconds between two failure lines: one line a batch would flood the log when the disk is full.
FAILURE_LOG_INTERVAL = 10.0
_DROPPED = ("usage_facts_dropped", "jsonl")  # its key in the worker's tally


# One fact as one JSONL line, the newline written by orjson itself (no second copy to append it).
_line = functools.partial(orjson.dumps, option=orjson.OPT_APPEND_NEWLINE)


class Throttle:
    """At most one report per `interval` seconds; `due` says how many it held back since the last."""

    __slots__ = ("_interval", "_next", "held")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._next = float("-inf")
        self.held = 0

    def due(self, now: float) -> int | None:
        """None: stay quiet. A number: report now, mentioning that many held back."""
        if now < self._next:
            self.held += 1
            return None
        self._next = now + self._interval
        held, self.held = self.held, 0
        return held


class FactSink:
    __slots__ = (
        "_dropped",
        "_failures",
        "_fd",
        "_keep",
        "_loop",
        "_path",
        "_queue",
        "_queue_size",
        "_rotate_bytes",
        "_scheduled",
        "_size",
        "_tally",
        "_torn",
        "listeners",
        "publisher",
    )

    def __init__(
        self, path: str | None, rotate_bytes: int, keep_files: int, queue_size: int, tally: Tally | None = None
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._path = path
        self._rotate_bytes = rotate_bytes
        self._keep = keep_files
        self._queue: deque[dict[str, Any]] = deque()
        self._queue_size = queue_size
        self._scheduled = False
        # Facts by usage state, and dropped ones, are counted in the worker's tally (tally.py).
        self._tally = tally if tally is not None else Tally()
        self._dropped = self._tally.index(_DROPPED)
        # Other consumers of every fact (the NATS publisher): called with the batch, must not block.
        self.listeners: list = []
        self.publisher = None  # the NATS publisher, when configured (for its dropped count)
        self._fd = -1
        self._size = 0
        self._torn = False  # the file ends inside a line: the next write starts with a newline
        self._failures = Throttle(FAILURE_LOG_INTERVAL)
        if path is not None:
            self._open()

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def dropped(self) -> int:
        return int(self._tally.get(_DROPPED))

    def emit(self, fact: dict[str, Any]) -> None:
        self._tally.add(("usage_facts", fact["provider"], fact["usage"]))
        if len(self._queue) >= self._queue_size:
            self._tally.values[self._dropped] += 1
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
        if self._path is None:
            return
        try:
            lines = list(map(_line, batch))
        except (orjson.JSONEncodeError, TypeError):
            lines = self._each_line(batch)  # one fact orjson can't write must not take the batch with it
        if self._fd < 0:  # a rotation failed half way: try the file again
            try:
                self._open()
            except OSError as exc:
                self._lost(len(lines), "usage_write_failed", exc)
                return
        whole, error = self._append(lines)
        if error is not None:
            self._lost(len(lines) - whole, "usage_write_failed", error)
            return
        if self._size >= self._rotate_bytes:
            try:
                self._rotate()
            except OSError as exc:
                self._lost(0, "usage_rotate_failed", exc)

    def reopen(self) -> bool:
        """After an outside rotation of the file (SIGUSR1, SIGHUP): facts go to the file now at the
        path. If it can't be opened, the next batch tries again, and what it can't write is counted
        as dropped, as on any failed write."""
        if self._path is None:
            return True
        self.flush()  # the facts before the signal go to the file they were meant for
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            self._open()
        except OSError as exc:
            log_event("usage_reopen_failed", path=self._path, error=exc.strerror)
            return False
        return True

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _append(self, lines: list[bytes]) -> tuple[int, OSError | None]:
        """Write the lines; returns how many reached the file whole, and the error that stopped the rest."""
        prefix = b"\n" if self._torn else b""
        data = memoryview(prefix + b"".join(lines))
        done = 0
        error = None
        try:
            while done < len(data):
                count = os.write(self._fd, data[done:])
                if count == 0:  # never for a regular file; a loop that can't end is worse than a drop
                    raise OSError(errno.EIO, "write wrote nothing")
                done += count
        except OSError as exc:
            error = exc
        self._size += done
        if done:
            self._torn = False
        if error is None:
            return len(lines), None
        body = max(done - len(prefix), 0)
        whole = end = 0
        for line in lines:
            if end + len(line) > body:
                break
            end += len(line)
            whole += 1
        if body > end:
            self._cut(body - end)
        return whole, error

    def _cut(self, torn: int) -> None:
        """Take a torn last line back off the file; failing that, start the next write on a fresh line."""
        try:
            os.ftruncate(self._fd, os.fstat(self._fd).st_size - torn)
            self._size -= torn
        except OSError:
            self._torn = True

    def _each_line(self, batch: list[dict[str, Any]]) -> list[bytes]:
        lines = []
        for fact in batch:
            try:
                lines.append(_line(fact))
            except (orjson.JSONEncodeError, TypeError) as exc:
                self._tally.values[self._dropped] += 1
                log_event("usage_fact_unwritable", request_id=fact.get("request_id"), error=type(exc).__name__)
        return lines

    def _lost(self, count: int, event: str, error: OSError) -> None:
        self._tally.values[self._dropped] += count
        held = self._failures.due(time.monotonic())
        if held is not None:
            log_event(event, error=error.strerror, dropped=count, dropped_total=self.dropped, not_logged=held)

    def _open(self) -> None:
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._fd, self._size = fd, os.fstat(fd).st_size
        # A crash mid-write (or an older egress on a full disk) can leave half a line at the end.
        self._torn = self._size > 0 and _last_byte(self._path, self._size) not in (b"\n", None)

    def _rotate(self) -> None:
        os.close(self._fd)
        self._fd = -1  # its number may be reused at once (a socket): never write to it again
        oldest = f"{self._path}.{self._keep}"
        if os.path.exists(oldest):
            _rotated_out(oldest, self._keep)
        for index in range(self._keep - 1, 0, -1):
            older = f"{self._path}.{index}"
            if os.path.exists(older):
                os.replace(older, f"{self._path}.{index + 1}")
        os.replace(self._path, f"{self._path}.1")
        stale = f"{self._path}.{self._keep + 1}"  # left by a larger keep_files before a restart
        if os.path.exists(stale):
            _rotated_out(stale, self._keep)
            os.remove(stale)
        self._open()


def _rotated_out(path: str, keep: int) -> None:
    # Retention (usage.keep_files) ends it now: said, so that facts never shipped elsewhere are
    # not deleted without a word.
    log_event("usage_file_rotated_out", path=path, bytes=os.path.getsize(path), keep_files=keep)


def _last_byte(path: str, size: int) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            fh.seek(size - 1)
            return fh.read(1)
    except OSError:  # unreadable (a FIFO, write-only): assume whole lines
        return None


def worker_path(path: str, index: int) -> str:
    """`usage.jsonl` -> `usage-w1.jsonl`: each worker writes its own file, so rotation needs no lock."""
    stem, dot, suffix = path.rpartition(".")
    return f"{stem}-w{index}.{suffix}" if dot and "/" not in suffix else f"{path}-w{index}"

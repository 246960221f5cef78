"""Access log and operational events: one JSON object per line.

Contract: `AccessLog.write(record)` queues one line; lines are written together once per event-loop
turn (one syscall for a burst of requests, nothing buffered across turns, so a crash loses nothing
already answered). Records carry only what the caller put in them; callers never put a token, key
or query string there. `reopen()` (SIGUSR1, SIGHUP) opens the file's path again after an outside
rotation (logrotate renames the file, then signals): later lines go to the new file, none is lost.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import orjson

_PIPE_BUF = 4096


class AccessLog:
    __slots__ = ("_fd", "_lines", "_loop", "_owned", "_path", "_scheduled")

    def __init__(self, destination: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._lines: list[bytes] = []
        self._scheduled = False
        self._owned = False
        self._path = destination
        if destination == "off":
            self._fd = -1
        elif destination == "stdout":
            self._fd = sys.stdout.fileno()
        elif destination == "stderr":
            self._fd = sys.stderr.fileno()
        else:
            self._fd = _open_log(destination)
            self._owned = True

    @property
    def enabled(self) -> bool:
        return self._fd >= 0

    def write(self, record: dict[str, Any]) -> None:
        self._lines.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        if self._owned:
            # A file opened O_APPEND: each write lands whole after the others, whatever its size.
            _write_all(self._fd, b"".join(self._lines))
            self._lines.clear()
            return
        # Writes of at most PIPE_BUF bytes are atomic on a pipe: workers sharing stdout never
        # interleave inside a line.
        batch: list[bytes] = []
        size = 0
        for line in self._lines:
            if batch and size + len(line) > _PIPE_BUF:
                _write_all(self._fd, b"".join(batch))
                batch, size = [], 0
            batch.append(line)
            size += len(line)
        _write_all(self._fd, b"".join(batch))
        self._lines.clear()

    def reopen(self) -> bool:
        """Write to the file now at the path (the old one was rotated away); False if it can't be
        opened, and the lines go on to the old file rather than nowhere."""
        if not self._owned:
            return True  # stdout, stderr: whoever reads them rotates them
        self.flush()  # what came before the signal goes to the file it was meant for
        try:
            fd = _open_log(self._path)
        except OSError as exc:
            log_event("access_log_reopen_failed", path=self._path, error=exc.strerror)
            return False
        os.close(self._fd)
        self._fd = fd
        return True

    def close(self) -> None:
        self.flush()
        if self._owned:
            os.close(self._fd)
            self._fd = -1


def _open_log(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)


WORKER: int | None = None  # this process's worker index under the supervisor


def log_event(event: str, **fields: Any) -> None:
    """Operational events (start, stop, unexpected errors) to stderr, as JSON lines."""
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    if WORKER is not None:
        record["worker"] = WORKER
    _write_all(sys.stderr.fileno(), orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            continue
        except OSError:
            return  # a closed log pipe must not take the gateway down
        view = view[written:]

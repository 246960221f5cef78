"""The deny-set: key ids (`kid`) that are revoked, from a local file and from the revocation stream.

Contract:
  `kid in denyset` is the per-request check (one set look-up).
  `replace_file_kids()` installs what the deny file says now (lines may be removed to un-revoke).
  `apply_stream(kid, sequence)` applies one stream message; sequences at or below the last one
      applied are ignored, so a redelivery changes nothing.
  `snapshot_bytes()` / `load_snapshot()` persist what came from the stream plus its last sequence;
      `write_snapshot()` is atomic (temp file, fsync, rename, fsync dir) and 0600.
No asyncio here: the watchers that feed it live in serve.py and revocations.py.
"""

from __future__ import annotations

import os
import re
import time

import orjson

_KID = re.compile(r"^[0-9a-f]{16}$")


def is_kid(text: str) -> bool:
    return _KID.match(text) is not None


class DenySet:
    __slots__ = ("_file_kids", "_stream_kids", "connected", "kids", "last_sequence", "synced_at")

    def __init__(self) -> None:
        self._file_kids: frozenset[str] = frozenset()
        self._stream_kids: set[str] = set()
        self.kids: set[str] = set()
        self.last_sequence = 0
        # Wall-clock time at which the stream part was last known complete: now while connected,
        # the disconnect time after that. None when no stream is configured.
        self.synced_at: float | None = None
        self.connected = False

    def __contains__(self, kid: str) -> bool:
        return kid in self.kids

    def __len__(self) -> int:
        return len(self.kids)

    def replace_file_kids(self, kids: frozenset[str]) -> None:
        self._file_kids = kids
        self.kids = set(kids) | self._stream_kids

    def apply_stream(self, kid: str, sequence: int) -> bool:
        if sequence <= self.last_sequence:
            return False
        self.last_sequence = sequence
        if is_kid(kid):
            self._stream_kids.add(kid)
            self.kids.add(kid)
        return True

    def age_seconds(self) -> float | None:
        if self.synced_at is None:
            return None
        return 0.0 if self.connected else max(0.0, time.time() - self.synced_at)

    def snapshot_bytes(self) -> bytes:
        document = {
            "version": 1,
            "last_sequence": self.last_sequence,
            "kids": sorted(self._stream_kids),
            "written_at": round(time.time(), 3),
        }
        return orjson.dumps(document)

    def load_snapshot(self, data: bytes) -> None:
        document = orjson.loads(data)
        if document.get("version") != 1:
            raise ValueError("unknown snapshot version")
        kids = {kid for kid in document["kids"] if isinstance(kid, str) and is_kid(kid)}
        self._stream_kids = kids
        self.kids = set(self._file_kids) | kids
        self.last_sequence = int(document["last_sequence"])
        self.synced_at = float(document.get("written_at", 0)) or None


def read_deny_file(path: str) -> frozenset[str]:
    """Key ids, one per line; blank lines and '#' comments ignored. A missing file is empty."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except FileNotFoundError:
        return frozenset()
    return frozenset(line.strip() for line in lines if is_kid(line.strip()))


def append_deny_file(path: str, kid: str) -> None:
    if kid in read_deny_file(path):
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{kid}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    temporary = f"{path}.tmp-{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

"""The deny-set: key ids (`kid`) that are revoked, from a local file and from the revocation stream.

Contract:
  `kid in denyset` is the per-request check (one set look-up).
  `replace_file_kids()` installs what the deny file says now (lines may be removed to un-revoke).
  `apply_stream(kid, sequence)` applies one stream message; sequences at or below the last one
      applied are ignored, so a redelivery changes nothing. A message that is no kid (`None`) still
      moves the sequence on, and is counted (`stream_messages_ignored`, the worker's tally).
  `adopt_stream(created, last_sequence)` is called on every subscription with the stream's identity:
      a stream recreated under the same name restarts its sequences, so the sequence held here means
      nothing there; it says so and rewinds to 0, and the replay merges (no kid is ever forgotten).
  `snapshot_bytes()` / `load_snapshot()` persist what came from the stream, its last sequence, the
      stream's identity and when it was last known complete (`synced_at`, so a restart during a broker
      outage keeps its age); `load_snapshot()` raises ValueError for anything else and then changes nothing.
      `write_snapshot()` is atomic (temp file, fsync, rename, fsync dir) and 0600.
  `count_lost(n)` and `count_snapshot_failure()` tally revocations purged from the stream before
      this worker read them, and snapshot writes that failed: both logged by the feed, and counted.
  `parse_deny_file()` never raises: a line that is not UTF-8 or not a kid is skipped and its number
      returned, never its text (an operator may paste a whole key there).
No asyncio here: the watchers that feed it live in serve.py and revocations.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import time

import orjson

from egress.secrets import BOM, read_regular_file
from egress.tally import Tally

_KID = re.compile(r"[0-9a-f]{16}")
_BAD_LINES = ("deny_file_bad_lines",)  # its key in the worker's tally
_IGNORED = ("revocation_messages_ignored",)  # stream messages that were no kid, in the worker's tally
_LOST = ("revocations_lost",)  # purged from the stream (or aged out) before this worker read them
_SNAPSHOT_FAILED = ("snapshot_write_failures",)


def is_kid(text: str) -> bool:
    return _KID.fullmatch(text) is not None


class DenySet:
    __slots__ = (
        "_bad_lines",
        "_file_kids",
        "_ignored",
        "_stream_kids",
        "_tally",
        "connected",
        "kids",
        "last_sequence",
        "stream_created",
        "synced_at",
    )

    def __init__(self, tally: Tally | None = None) -> None:
        self._file_kids: frozenset[str] = frozenset()
        self._stream_kids: set[str] = set()
        self.kids: set[str] = set()
        self.last_sequence = 0
        # The stream's creation time as the server states it: the identity `last_sequence` counts in.
        self.stream_created: str | None = None
        # Wall-clock time at which the stream part was last known complete: now while connected,
        # the disconnect time after that. None when no stream is configured.
        self.synced_at: float | None = None
        self.connected = False
        # Deny-file lines skipped, counted on every read of the file, in the worker's tally.
        self._tally = tally if tally is not None else Tally()
        self._bad_lines = self._tally.index(_BAD_LINES)
        self._ignored = self._tally.index(_IGNORED)

    def __contains__(self, kid: str) -> bool:
        return kid in self.kids

    def __len__(self) -> int:
        return len(self.kids)

    def replace_file_kids(self, kids: frozenset[str], bad_lines: tuple[int, ...] = ()) -> None:
        self._file_kids = kids
        self.kids = set(kids) | self._stream_kids
        self._tally.values[self._bad_lines] += len(bad_lines)

    @property
    def file_bad_lines(self) -> int:
        return int(self._tally.get(_BAD_LINES))

    def apply_stream(self, kid: str | None, sequence: int) -> bool:
        if sequence <= self.last_sequence:
            return False
        self.last_sequence = sequence
        if kid is not None and is_kid(kid):
            self._stream_kids.add(kid)
            self.kids.add(kid)
        else:
            self._tally.values[self._ignored] += 1  # logged by the feed too, by sequence, never by body
        return True

    @property
    def stream_messages_ignored(self) -> int:
        return int(self._tally.get(_IGNORED))

    def count_lost(self, count: int) -> None:
        self._tally.add(_LOST, count)

    def count_snapshot_failure(self) -> None:
        self._tally.add(_SNAPSHOT_FAILED)

    def is_other_stream(self, created: str | None, last_sequence: int) -> bool:
        """True when `last_sequence` held here cannot be a position in the stream described."""
        if created is not None and self.stream_created is not None and created != self.stream_created:
            return True
        return last_sequence < self.last_sequence  # sequences never go back within one stream

    def adopt_stream(self, created: str | None, last_sequence: int) -> bool:
        other = self.is_other_stream(created, last_sequence)
        if other:
            self.last_sequence = 0
        if created is not None:
            self.stream_created = created
        return other

    def age_seconds(self) -> float | None:
        if self.synced_at is None:
            return None
        return 0.0 if self.connected else max(0.0, time.time() - self.synced_at)

    def snapshot_bytes(self) -> bytes:
        now = time.time()
        # When the stream part was last known complete, not when this was written: the snapshot a
        # graceful stop writes an hour into a broker outage must not make the next start's
        # `age_seconds` (egress_deny_set_age_seconds) read 0 and clear a staleness alert.
        synced_at = now if self.connected else self.synced_at
        document = {
            "version": 1,
            "last_sequence": self.last_sequence,
            "stream_created": self.stream_created,
            "kids": sorted(self._stream_kids),
            "written_at": round(now, 3),
            "synced_at": round(synced_at, 3) if synced_at is not None else None,
        }
        return orjson.dumps(document)

    def load_snapshot(self, data: bytes) -> None:
        document = orjson.loads(data)  # orjson.JSONDecodeError is a ValueError
        if not isinstance(document, dict) or document.get("version") != 1:
            raise ValueError("not a version 1 snapshot")
        last_sequence = document.get("last_sequence")
        listed = document.get("kids")
        created = document.get("stream_created")
        written_at = document.get("written_at", 0)
        # Snapshots written before `synced_at` existed: their write time is the best guess there is.
        synced_at = document.get("synced_at", written_at)
        # `bool` is an `int`: a snapshot saying `true` was not written by egress.
        if type(last_sequence) is not int or last_sequence < 0:
            raise ValueError("last_sequence is not a sequence")
        if not isinstance(listed, list):
            raise ValueError("kids is not a list")
        if created is not None and not isinstance(created, str):
            raise ValueError("stream_created is not a timestamp")
        if isinstance(written_at, bool) or not isinstance(written_at, int | float):
            raise ValueError("written_at is not a time")
        if synced_at is not None and (isinstance(synced_at, bool) or not isinstance(synced_at, int | float)):
            raise ValueError("synced_at is not a time")
        kids = {kid for kid in listed if isinstance(kid, str) and is_kid(kid)}
        self._stream_kids = kids
        self.kids = set(self._file_kids) | kids
        self.last_sequence = last_sequence
        self.stream_created = created
        self.synced_at = float(synced_at) if synced_at else None  # None: never in step with the stream


def normalize_kid(text: str) -> str | None:
    """Kids are hex: a hand-typed one may come in capitals or with blanks around it."""
    kid = text.strip().lower()
    return kid if is_kid(kid) else None


def stream_kid(body: bytes) -> str | None:
    try:
        return normalize_kid(body.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def parse_deny_file(data: bytes) -> tuple[frozenset[str], tuple[int, ...]]:
    """Key ids, one per line; blank lines and '#' comments ignored. Returns (kids, bad line numbers)."""
    data = data.removeprefix(BOM)
    kids: set[str] = set()
    bad: list[int] = []
    # bytes.splitlines splits at \n, \r\n and \r only, so one bad byte spoils one line, not the file.
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(number)
            continue
        text = text.split("#", 1)[0]
        if not text.strip():
            continue
        kid = normalize_kid(text)
        if kid is None:
            bad.append(number)
        else:
            kids.add(kid)
    return frozenset(kids), tuple(bad)


def read_deny_file(path: str) -> tuple[frozenset[str], tuple[int, ...]]:
    """`parse_deny_file` of the file; a missing file is empty, other OSErrors are the caller's."""
    try:
        data = read_regular_file(path)  # a FIFO would block the loop: refused instead
    except FileNotFoundError:
        return frozenset(), ()
    return parse_deny_file(data)


def append_deny_file(path: str, kid: str) -> None:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        data = b""
    if kid in parse_deny_file(data)[0]:
        return
    # A last line typed without its newline would otherwise become `<old kid><new kid>`: neither.
    line = f"{kid}\n".encode()
    if data and not data.endswith((b"\n", b"\r")):
        line = b"\n" + line
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_snapshot(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    temporary = f"{path}.tmp-{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(temporary)  # a full disk or a directory in the way must not leave one per pid
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)

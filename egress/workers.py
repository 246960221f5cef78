"""The process model: a small supervisor and N workers, each its own uvloop and listener.

Contract: `supervise(config, config_path, workers)` forks the workers and returns the exit code
once they have all stopped.
- Every worker binds the same port with SO_REUSEPORT, so the kernel spreads connections over them;
  a port of 0 is resolved once, here, so that they all share it. The admin port likewise: any
  worker answers a scrape for the host.
- The rate limiter's sketches live in one anonymous shared mmap made before the fork, so a key's
  limit holds across the workers of the host; so do the accounts' table and the metrics' tally
  (a slab per worker, which a restarted worker takes over where the dead one left it).
- The supervisor tells systemd READY=1 once every worker listens, and STOPPING=1 on the way out.
- It forwards SIGTERM/SIGINT (drain; a second one aborts), SIGHUP (reload) and SIGUSR1 (reopen the
  access log and usage files after logrotate), and restarts a worker that dies unexpectedly,
  waiting at least a second between restarts of the same worker.
- A reload reads the config file once, in the supervisor: its bytes go to every worker through a
  shared buffer (ConfigBox), so all of them, and the supervisor's own copy that a restarted worker
  starts with, parse the same file even if it changes while the signal goes round.
- A worker whose supervisor dies (even by SIGKILL) gets SIGTERM and drains: none is left serving
  on its own.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import multiprocessing
import os
import select
import signal
import socket
import struct
import time
from dataclasses import dataclass

from egress.accesslog import log_event
from egress.accounts import table_bytes, worker_gone
from egress.config import MAX_CONFIG_BYTES, Config, ConfigError, parse_listen, read_config_bytes
from egress.errors import cannot_listen
from egress.limiter import shared_bytes_needed
from egress.sdnotify import notify
from egress.tally import slab_bytes

_PR_SET_PDEATHSIG = 1  # <sys/prctl.h>


@dataclass(frozen=True)
class WorkerContext:
    index: int
    count: int
    shared: memoryview  # the limiter's counters, shared by every worker
    accounts: memoryview  # the accounts' state (accounts.py), shared by every worker
    accounts_lock: object  # a process-shared lock for the accounts' read-modify-write updates
    tallies: memoryview  # the metrics' counters, a slab per worker (tally.py), kept across restarts
    ready_fd: int  # one byte written here once listening
    byo_hash_key: bytes  # one key for all workers, so a BYO caller is one identity everywhere
    config_box: ConfigBox | None = None  # the config file as the supervisor read it for a reload


class ConfigBox:
    """The config file's bytes as the supervisor read them for the last SIGHUP, in shared memory.

    Layout (little-endian u64 words, then the payload), written by the supervisor only:
      0  sequence: odd while the supervisor writes, even once the write is whole (a seqlock)
      8  kind: 0, the payload is the file's bytes; 1, it is why the file could not be read (UTF-8)
     16  the payload's length
     24  the payload, at most MAX_CONFIG_BYTES
    A worker reads it when its SIGHUP arrives, which the supervisor sends after the write. A read
    that overlaps the next write (a second SIGHUP already on its way) sees the sequence change and
    returns None: that worker takes the next signal's bytes instead. x86 and arm64 alike keep one
    process's stores to a MAP_SHARED page in the order they are made, as far as these aligned words
    and a later signal go.
    """

    _WORD = struct.Struct("<Q")
    _HEAD = 24

    def __init__(self) -> None:
        self.buffer = mmap.mmap(-1, self._HEAD + MAX_CONFIG_BYTES)  # untouched pages cost no memory

    def put(self, payload: bytes, error: bool = False) -> None:
        buffer, word = self.buffer, self._WORD
        sequence = word.unpack_from(buffer, 0)[0]
        word.pack_into(buffer, 0, sequence + 1)
        word.pack_into(buffer, 8, 1 if error else 0)
        word.pack_into(buffer, 16, len(payload))
        buffer[self._HEAD : self._HEAD + len(payload)] = payload
        word.pack_into(buffer, 0, sequence + 2)

    def take(self) -> tuple[bytes, bool] | None:
        """(payload, whether it is an error), or None before any put or when a write overlapped."""
        buffer, word = self.buffer, self._WORD
        sequence = word.unpack_from(buffer, 0)[0]
        if sequence == 0 or sequence % 2:
            return None
        error = word.unpack_from(buffer, 8)[0] == 1
        length = word.unpack_from(buffer, 16)[0]
        payload = bytes(buffer[self._HEAD : self._HEAD + min(length, MAX_CONFIG_BYTES)])
        if word.unpack_from(buffer, 0)[0] != sequence:
            return None
        return payload, error

    def read_file(self, path: str) -> bytes | None:
        """The supervisor's read for a reload, put for the workers; the bytes, or None when the file
        could not be read (the workers then refuse the reload with the same reason)."""
        try:
            raw = read_config_bytes(path)
        except ConfigError as exc:
            self.put(str(exc).encode(), error=True)
            return None
        self.put(raw)
        return raw


def supervise(config: Config, config_path: str | None, workers: int) -> int:
    # The serving code, imported now: a reload (SIGHUP) must not import it from disk later, after
    # an upgrade in place replaced the files under the running supervisor.
    import egress.serve  # noqa: F401

    placeholders = []
    for setting in ("listen", "admin_listen"):
        address = getattr(config.server, setting)
        if address == "off":
            continue
        if parse_listen(address)[1] != 0:
            ensure_free(setting, address)
            continue
        # Bound, never listening: it fixes the port for the workers and receives no connection.
        placeholder, address = _fix_port(address)
        placeholders.append(placeholder)
        config = dataclasses.replace(config, server=dataclasses.replace(config.server, **{setting: address}))
    shared = mmap.mmap(-1, shared_bytes_needed(config.limits))  # MAP_SHARED | MAP_ANONYMOUS
    tallies = mmap.mmap(-1, slab_bytes() * workers)  # untouched pages cost no memory
    accounts = mmap.mmap(-1, table_bytes(workers))  # a ledger per worker in each slot (accounts.py)
    accounts_lock = multiprocessing.Lock()  # a POSIX semaphore in shared memory: works across fork
    config_box = ConfigBox()
    byo_hash_key = os.urandom(32)
    ready_read, ready_write = os.pipe()
    children: dict[int, int] = {}
    last_start: dict[int, float] = {}
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, on_signal)

    supervisor = os.getpid()

    def spawn(index: int) -> None:
        last_start[index] = time.monotonic()
        pid = os.fork()
        if pid == 0:
            # SIGUSR1 keeps the supervisor's handler (it only notes the signal) until serve() ignores
            # it, then its loop takes it: its default would end the worker.
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            _stop_with(supervisor)
            os.close(ready_read)
            code = 1
            try:
                from egress.serve import serve

                context = WorkerContext(
                    index,
                    workers,
                    memoryview(shared),
                    memoryview(accounts),
                    accounts_lock,
                    memoryview(tallies),
                    ready_write,
                    byo_hash_key,
                    config_box,
                )
                code = serve(config, config_path, context)
            finally:
                os._exit(code)
        children[pid] = index

    for index in range(workers):
        spawn(index)
    ready = 0
    give_up_at = time.monotonic() + 30
    failed: list[tuple[int, int]] = []  # (worker, exit code) of workers that died before ready
    # A reload or reopen signal waits for the workers to be ready; a stop signal ends the wait.
    while ready < workers and time.monotonic() < give_up_at and not _stop_in(received) and not failed:
        readable, _, _ = select.select([ready_read], [], [], 0.2)
        if readable:
            ready += len(os.read(ready_read, 64))
        failed = _reap_failed(children)
    for placeholder in placeholders:
        placeholder.close()
    if ready < workers:
        # One line that says which worker and how; the worker's own line said why (bind, config).
        reason = "exited" if failed else "stopped" if _stop_in(received) else "timed out"
        log_event(
            "workers_failed_to_start",
            ready=ready,
            wanted=workers,
            reason=reason,
            failed=[{"worker": index, "exit_code": code} for index, code in failed],
        )
        _signal_all(children, signal.SIGTERM)
        _wait_all(children, 10)
        return 1
    log_event("supervisor_ready", workers=workers, pid=os.getpid())
    notify(b"READY=1\nSTATUS=serving")

    stopping = False
    while children:
        while received:
            signum = received.pop(0)
            if signum == signal.SIGHUP:
                # The file is read once, here, before any worker is told: they all parse these bytes.
                raw = config_box.read_file(config_path) if config_path is not None else None
                _signal_all(children, signal.SIGHUP)  # they reopen their logs even so
                if config_path is None:
                    from egress.serve import NO_CONFIG_FILE  # imported before the fork (supervise)

                    log_event("reload_skipped", reason=NO_CONFIG_FILE)  # once for the host, not once a worker
                else:
                    log_event("supervisor_reload", workers=len(children))
                # What a worker restarted from now on starts with: the config the others reloaded.
                config = _reload(config, config_path, raw)
            elif signum == signal.SIGUSR1:
                _signal_all(children, signal.SIGUSR1)
                log_event("supervisor_reopen_logs", workers=len(children))
            else:
                if not stopping:
                    notify(b"STOPPING=1")
                    log_event("supervisor_stopping", workers=len(children))
                stopping = True
                _signal_all(children, signal.SIGTERM)  # a second one makes workers abort their drain
        for index in _reap(children, stopping):
            # What it held (requests in flight, places in a line) goes back before its successor
            # starts: a killed worker never ran the code that gives them back (accounts.py).
            if worker_gone(memoryview(accounts), accounts_lock, index):
                log_event("accounts_lock_recovered", worker=index)
            wait = last_start[index] + 1.0 - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            spawn(index)
            log_event("worker_restarted", worker=index)
        # Drain readiness bytes from restarted workers, and sleep until something happens.
        readable, _, _ = select.select([ready_read], [], [], 0.1)
        if readable:
            os.read(ready_read, 64)
    log_event("supervisor_stopped")
    return 0


def _stop_with(supervisor: int) -> None:
    """This worker is told to stop (SIGTERM: it drains) when the supervisor dies, however it dies,
    so that no worker is left serving on its own (Linux's PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: systemd's KillMode=control-group still applies
        return
    if os.getppid() != supervisor:  # it died before the request took hold
        os.kill(os.getpid(), signal.SIGTERM)


def _fix_port(address: str) -> tuple[socket.socket, str]:
    """A socket bound (SO_REUSEPORT, not listening) to a free port of `address`'s host, and the
    address with that port: the workers all bind it."""
    host, _ = parse_listen(address)
    placeholder = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    placeholder.bind((host, 0))
    shown = f"[{host}]" if ":" in host else host
    return placeholder, f"{shown}:{placeholder.getsockname()[1]}"


def ensure_free(setting: str, address: str) -> None:
    """Raise StartupError if something already listens on `address`. The workers bind with
    SO_REUSEPORT, which would let them join another process's listeners on the port (a second
    egress of the same user): the kernel would then split connections between the two. A bind
    without it fails while anyone listens there, as a single process's bind does."""
    host, port = parse_listen(address)
    probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the workers: TIME_WAIT is no owner
        probe.bind((host, port))
    except OSError as exc:
        raise cannot_listen(setting, address, exc) from None
    finally:
        probe.close()


def _exited(children: dict[int, int]):
    """(worker, pid, exit code) of each worker that has exited, each taken out of `children`."""
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        index = children.pop(pid, None)
        if index is not None:
            yield index, pid, os.waitstatus_to_exitcode(status)


def _reap(children: dict[int, int], stopping: bool) -> list[int]:
    """Collect exited workers; returns the indexes to restart."""
    restart = []
    for index, pid, code in _exited(children):
        if not stopping:
            log_event("worker_exited", worker=index, pid=pid, status=code)
            restart.append(index)
    return restart


def _reap_failed(children: dict[int, int]) -> list[tuple[int, int]]:
    """Workers that exited while starting, as (worker, exit code): none should."""
    return [(index, code) for index, _, code in _exited(children)]


def _reload(config: Config, config_path: str | None, raw: bytes | None) -> Config:
    """The supervisor's copy of a reload, from the bytes the workers get; the running one when the
    file is refused or could not be read (the workers refuse it too, and say why)."""
    if config_path is None or raw is None:
        return config
    from egress.secrets import SecretSourceError
    from egress.serve import reloaded  # imported before the fork (supervise): never from disk here

    try:
        _, new, _ = reloaded(config, config_path, raw)
    except (ConfigError, SecretSourceError):
        return config
    except Exception as exc:  # whatever it is, the supervisor and its workers go on
        log_event("supervisor_reload_failed", error=type(exc).__name__)
        return config
    return new


def _stop_in(received: list[int]) -> bool:
    return signal.SIGTERM in received or signal.SIGINT in received


def _signal_all(children: dict[int, int], signum: int) -> None:
    for pid in list(children):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _wait_all(children: dict[int, int], timeout: float) -> None:
    give_up_at = time.monotonic() + timeout
    while children and time.monotonic() < give_up_at:
        _reap(children, stopping=True)
        time.sleep(0.05)

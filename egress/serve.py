"""Process lifecycle of one serving process: listen, serve, drain on SIGTERM/SIGINT, exit 0.

Contract: `serve(config, config_path, worker)` blocks until a stop signal has been handled and
returns the exit code. SIGHUP re-reads the config file (`reload_config`) and the deny file.
Without a supervisor the process tells systemd READY=1 and STOPPING=1 itself.
Start: the revocation snapshot and the deny file are loaded before the first connection is
accepted, so a revoked key is refused from the very first request, broker or not.
Drain: stop accepting, close idle keep-alive connections, let in-flight exchanges finish (their
connections close after the response), and after `drain_timeout` abort what is left. A second
signal during the drain aborts at once. Pool keys are overwritten before exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
import time

import uvloop

from egress import accesslog, doctor, status
from egress.accesslog import AccessLog, log_event
from egress.accounts import AccountTable
from egress.admin import start_admin
from egress.auth import Authenticator, load_pools, wipe_all_pool_keys
from egress.config import Config, ConfigError, check_metering, config_digest, load_config, parse_listen
from egress.denyset import DenySet, read_deny_file
from egress.errors import StartupError, cannot_listen
from egress.facts import FactSink, worker_path
from egress.limiter import RateLimiter
from egress.metrics import Metrics, config_loaded, publish_gauges
from egress.providers import Router
from egress.routes import ModelRoutes
from egress.sdnotify import notify
from egress.secrets import SecretSourceError
from egress.server import ClientConnection, ServerState
from egress.tally import Tally, slab_bytes, slab_of
from egress.upstream import UpstreamPool
from egress.workers import ConfigBox, WorkerContext

# A worker's exit code when it could not start: the supervisor stops at once rather than restart it.
STARTUP_FAILED = 3


async def _bound(setting: str, address: str, opening):
    """A listener, or a StartupError naming the setting, the address and the system's reason."""
    try:
        return await opening
    except OSError as exc:
        raise cannot_listen(setting, address, exc) from None


def serve(config: Config, config_path: str | None = None, worker: WorkerContext | None = None) -> int:
    """Run one serving process: the only one, or worker `worker.index` under the supervisor."""
    # SIGUSR1 (reopen the logs) would end the process until the loop takes it: ignored till then.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if worker is not None:
        accesslog.WORKER = worker.index
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_serve(config, config_path, worker))
    except StartupError as exc:
        if worker is None:
            raise  # the command line says it (cli.py), once, and exits non-zero
        log_event("worker_failed_to_start", worker=worker.index, error=str(exc))
        return STARTUP_FAILED
    except OSError as exc:  # a file it could not open: said as the command line says it (cli.py)
        if worker is None:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        log_event("worker_failed_to_start", worker=worker.index, error=f"{where}{exc.strerror or exc}")
        return STARTUP_FAILED


def _usage_path(config: Config, worker: WorkerContext | None) -> str | None:
    """Each worker writes its own usage file (`usage-w0.jsonl`, …), so rotation needs no lock. The
    config itself stays the host's: every worker's is the same, and so is its hash (/status)."""
    path = config.usage.jsonl
    if path is None or worker is None or worker.count == 1:
        return path
    return worker_path(path, worker.index)


# What a SIGHUP of an egress started without --config says: there is no file to read again (the
# supervisor says it once for its workers). Silence made `systemctl reload` look like it worked.
NO_CONFIG_FILE = "started without --config: the built-in config has no file to read again; restart with --config FILE"


def reload_config(state: ServerState, config_path: str | None, box: ConfigBox | None = None) -> bool:
    """SIGHUP: providers, pool keys, trusted issuers, limits and upstream settings, no connection dropped.

    Under a supervisor (`box`), the file's bytes as the supervisor read them for this signal, so
    that every worker reloads the same file; without one, the file itself. True if the new config
    took.
    """
    if config_path is None:
        if box is None:
            log_event("reload_skipped", reason=NO_CONFIG_FILE)
        return False
    raw = None
    if box is not None:
        taken = box.take()
        if taken is None:  # the supervisor is writing the next reload's bytes: its signal follows
            log_event("reload_deferred", reason="a newer reload is on its way")
            return False
        raw, error = taken
        if error:
            log_event("reload_failed", error=raw.decode("utf-8", "replace"))
            config_loaded(state.metrics.tally, ok=False)
            return False
    old = state.config
    try:
        written, new, pools = reloaded(old, config_path, raw)
        # Everything the new config needs is made before any of it is put in place: a reload takes
        # whole or not at all (a CA bundle that fails to load used to leave the new providers live
        # under the old config, reported as a success).
        auth = Authenticator(new, state.auth.denyset, pools, state.auth.accounts)
        router = Router(new.providers)
        model_routes = ModelRoutes(new.routes, dict(new.providers))
        pool = UpstreamPool(new.upstream, state.metrics.tally) if new.upstream != old.upstream else None
    except (ConfigError, SecretSourceError) as exc:
        log_event("reload_failed", error=str(exc))  # the running configuration stays
        config_loaded(state.metrics.tally, ok=False)
        return False
    except Exception as exc:  # a bug, or a library's refusal: the running configuration stays too
        log_event("reload_failed", error=f"{type(exc).__name__} while loading {config_path}")
        config_loaded(state.metrics.tally, ok=False)
        return False
    ignored = ignored_on_reload(old, written)
    if ignored:
        log_event("reload_ignored", settings=ignored, reason="these change only on restart")
    state.auth = auth
    state.router = router
    state.model_routes = model_routes
    state.limiter.set_tiers(new.limits)
    if pool is not None:
        retired_pool, state.pool = state.pool, pool
        retired_pool.close_idle()
    state.config = new
    state.catalog.start(state)  # after state.auth and state.config: it reads both
    # Requests already authenticated hold the old pool keys through their lease: the retired
    # rotations are wiped by a finalizer once the last of those requests is gone (auth.py).
    log_event(
        "reloaded",
        providers=len(new.providers),
        pooled_providers=sorted(state.auth.pools),
        config_digest=config_digest(new),
    )
    config_loaded(state.metrics.tally, ok=True, config=new)
    return True


def reloaded(running: Config, config_path: str, raw: bytes | None = None) -> tuple[Config, Config, dict]:
    """The file's config (`raw`, its bytes, when already read) as a reload of `running`: as written,
    as it will run (kept_on_reload), and its pools (loaded: a key source that fails refuses the
    reload). Raises ConfigError or SecretSourceError, with the words `config check` uses for the
    same fault. The workers' SIGHUP and the supervisor's (which keeps the config a restarted worker
    starts with) share it."""
    written = load_config(config_path, running=running, raw=raw)  # a half-written file must not reload as defaults
    new = kept_on_reload(running, written)
    try:
        check_metering(new.limits, new.usage)  # the file's limits with the start's [usage]
    except ConfigError as exc:
        raise ConfigError(f"{exc} ([usage] stays as it was at start until a restart)") from None
    doctor.preflight(new, doctor.RELOAD_CHECKS)
    return written, new, load_pools(new)


# What a reload cannot change in a running process, because it was made once at start: sockets,
# files, the shared memory's layout, the deny file's watcher, the usage sinks and the NATS
# connection. Kept from the running config; `reload_ignored` names those the file changed. A
# section given as None is kept whole.
RESTART_ONLY: dict[str, tuple[str, ...] | None] = {
    "server": ("listen", "admin_listen", "access_log", "workers"),
    "keys": ("deny_file", "deny_poll_interval"),
    "limits": ("sketch_width", "sketch_depth", "byo_hash_key"),
    "usage": None,
    "nats": None,
}


def kept_on_reload(old: Config, new: Config) -> Config:
    """`new` with what only a restart changes kept from `old` (RESTART_ONLY)."""
    sections = {}
    for section, names in RESTART_ONLY.items():
        running = getattr(old, section)
        if names is None:
            sections[section] = running
        else:
            sections[section] = dataclasses.replace(
                getattr(new, section), **{name: getattr(running, name) for name in names}
            )
    return dataclasses.replace(new, overrides=old.overrides, **sections)


def ignored_on_reload(old: Config, new: Config) -> list[str]:
    """The restart-only settings `new` (the file as written) sets otherwise than `old`, by name.
    Not those the command line sets (`old.overrides`: the flag wins at a restart too), nor a port 0
    the supervisor has fixed to the port it bound: the file did not change them, and every SIGHUP
    of `serve --listen` said they would change only on restart."""
    changed = []
    for section, names in RESTART_ONLY.items():
        running, written = getattr(old, section), getattr(new, section)
        for name in names or [each.name for each in dataclasses.fields(running)]:
            setting = f"{section}.{name}"
            was, now = getattr(running, name), getattr(written, name)
            if was == now or setting in old.overrides or _port_fixed(setting, was, now):
                continue
            changed.append(setting)
    return changed


def _port_fixed(setting: str, running: object, written: object) -> bool:
    """`written` is HOST:0 and `running` the same host on the port bound for it (workers.supervise)."""
    if setting not in ("server.listen", "server.admin_listen") or "off" in (running, written):
        return False
    try:
        return parse_listen(written)[1] == 0 and parse_listen(written)[0] == parse_listen(running)[0]
    except ConfigError:
        return False


def load_denyset(config: Config, tally: Tally | None = None) -> DenySet:
    denyset = DenySet(tally)
    snapshot = config.nats.snapshot
    if config.nats.url is not None and snapshot is not None and os.path.exists(snapshot):
        try:
            with open(snapshot, "rb") as fh:
                denyset.load_snapshot(fh.read())
        except (OSError, ValueError) as exc:
            # The stream is replayed from its start to rebuild it; until then the deny file applies.
            log_event("snapshot_unreadable", path=snapshot, error=type(exc).__name__)
    if config.keys.deny_file is not None:
        # Unreadable (a directory, no permission) is an OSError: the start stops with one line rather
        # than serve without the revocations the file holds.
        kids, bad_lines = read_deny_file(config.keys.deny_file)
        _report_bad_lines(config.keys.deny_file, bad_lines)
        denyset.replace_file_kids(kids, bad_lines)
    return denyset


def _report_bad_lines(path: str, bad_lines: tuple[int, ...]) -> None:
    if bad_lines:  # line numbers, never the text: a pasted key must not reach a log
        log_event("deny_file_bad_lines", path=path, count=len(bad_lines), lines=list(bad_lines[:20]))


# A file rewritten within one timestamp tick of our read, its size unchanged, looks unchanged: a
# file modified this recently is read again at the next poll (git calls such index entries "racily
# clean"). Two seconds covers the coarsest common mtime, FAT's.
_RACY_NS = 2_000_000_000


async def _watch_deny_file(path: str, interval: float, denyset: DenySet, reload_now: asyncio.Event) -> None:
    def signature() -> tuple | None:
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return None
        return (stat.st_ino, stat.st_mtime_ns, stat.st_size)

    try:
        seen = signature()
    except OSError:
        seen = None
    recheck = True
    failing: str | None = None  # the error last reported, so a broken file is reported once
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reload_now.wait(), interval)
        forced = reload_now.is_set()
        reload_now.clear()
        # Nothing one read can throw may end this loop: every later revocation through the file
        # would be ignored without a word. What the file said last stays in force meanwhile.
        try:
            current = signature()
            if not (forced or recheck or failing or current != seen):
                continue
            kids, bad_lines = read_deny_file(path)
        except Exception as exc:
            error = getattr(exc, "strerror", None) or type(exc).__name__
            if error != failing:
                log_event("deny_file_unreadable", path=path, error=error, deny_set_size=len(denyset))
            failing = error
            continue
        fresh = forced or failing is not None or current != seen
        seen = current
        failing = None
        recheck = current is not None and time.time_ns() - current[1] < _RACY_NS
        if fresh:
            _report_bad_lines(path, bad_lines)
            denyset.replace_file_kids(kids, bad_lines)
            log_event("deny_file_reloaded", size=len(denyset), forced=forced)
        else:
            denyset.replace_file_kids(kids)


async def _serve(config: Config, config_path: str | None, worker: WorkerContext | None) -> int:
    loop = asyncio.get_running_loop()
    # This worker's counters, in its slab of the host's tally: a restarted worker goes on from them.
    if worker is not None:
        slabs, workers = worker.tallies, worker.count
        tally = Tally(slab_of(slabs, workers, worker.index), os.getpid())
    else:
        slabs, workers = memoryview(bytearray(slab_bytes())), 1
        tally = Tally(slabs, os.getpid())
    status.started(tally)  # before anything else: a restarted worker's slab still says its predecessor's
    denyset = load_denyset(config, tally)
    accounts = (
        AccountTable(worker.accounts, worker.accounts_lock, worker.index) if worker is not None else AccountTable()
    )
    auth = Authenticator(config, denyset, load_pools(config), accounts)
    state = ServerState(
        config,
        Router(config.providers),
        UpstreamPool(config.upstream, tally),
        AccessLog(config.server.access_log),
        auth,
        RateLimiter(
            config.limits,
            worker.shared if worker is not None else None,
            worker.byo_hash_key if worker is not None else None,
        ),
        FactSink(
            _usage_path(config, worker),
            config.usage.rotate_bytes,
            config.usage.keep_files,
            config.usage.queue_size,
            tally,
        ),
        Metrics(tally),
    )
    config_loaded(tally, ok=True, config=config)
    admin = None
    if config.server.admin_listen != "off":
        admin_host, admin_port = parse_listen(config.server.admin_listen)
        # Every worker listens on the one admin port (SO_REUSEPORT): whichever a scrape reaches
        # answers for the whole host, from the shared tally.
        admin = await _bound(
            "admin_listen",
            config.server.admin_listen,
            start_admin(state, admin_host, admin_port, slabs, workers, reuse_port=worker is not None),
        )
        admin_bound = admin.sockets[0].getsockname()
        log_event("admin_listening", address=f"{admin_host}:{admin_bound[1]}")
    feed = feed_task = None
    if config.nats.url is not None:
        from egress.revocations import start_feed  # nats-py is imported only when configured

        # Revocations published while this process was down apply before the first request.
        feed, feed_task = await start_feed(config.nats, denyset)
    host, port = parse_listen(config.server.listen)
    server = await _bound(
        "listen",
        config.server.listen,
        loop.create_server(
            lambda: ClientConnection(state),
            host,
            port,
            backlog=4096,
            reuse_address=True,
            reuse_port=worker is not None,  # the workers share the port; the kernel balances
        ),
    )
    bound = server.sockets[0].getsockname()
    shown_host = f"[{host}]" if ":" in host else host
    log_event(
        "listening",
        address=f"{shown_host}:{bound[1]}",
        pid=os.getpid(),
        providers=sorted(config.providers),
        deny_set_size=len(denyset),
        pooled_providers=sorted(auth.pools),
    )
    says_for_host = worker is None or worker.index == 0  # the host's warnings, once, not once a worker
    if says_for_host:
        _warn_if_open_relay(config, state.limiter.enabled)

    state.catalog.start(state)
    background: list[asyncio.Task] = []
    reload_deny_file = asyncio.Event()
    if config.keys.deny_file is not None:
        background.append(
            loop.create_task(
                _watch_deny_file(config.keys.deny_file, config.keys.deny_poll_interval, denyset, reload_deny_file)
            )
        )
    if feed_task is not None:
        background.append(feed_task)
    background.append(loop.create_task(_publish_gauges(state)))

    publisher = None
    if config.usage.nats_publish:
        from egress.usage_nats import UsagePublisher

        publisher = UsagePublisher(config.usage, config.nats, tally)
        state.facts.listeners.append(publisher.enqueue)
        state.facts.publisher = publisher
        background.append(loop.create_task(publisher.run()))

    stop_requested = asyncio.Event()
    abort_requested = asyncio.Event()

    def on_signal() -> None:
        (abort_requested if stop_requested.is_set() else stop_requested).set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)

    def on_reopen() -> None:
        # logrotate's way (nginx's USR1): the files were renamed; write on at their paths.
        access_log, usage = state.access_log.reopen(), state.facts.reopen()
        log_event("logs_reopened", access_log=access_log, usage=usage)

    def on_hangup() -> None:
        if reload_config(state, config_path, worker.config_box if worker is not None else None) and says_for_host:
            _warn_if_open_relay(state.config, state.limiter.enabled)  # as at start: a reload may open it
        reload_deny_file.set()
        on_reopen()

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    loop.add_signal_handler(signal.SIGUSR1, on_reopen)
    # What startup made (modules, config, tables) lives as long as the process: out of the
    # collector's sight, a full collection walks only what requests make, a pause of microseconds
    # instead of milliseconds landing on some request's first token (gc.freeze, Python 3.7+).
    gc.collect()
    gc.freeze()
    if worker is not None:
        os.write(worker.ready_fd, b"1")
    else:
        notify(b"READY=1\nSTATUS=serving")

    await stop_requested.wait()
    if worker is None:
        notify(b"STOPPING=1")
    state.draining = True
    server.close()
    in_flight = [conn for conn in list(state.connections) if not conn.close_if_idle()]
    # The running config's, not the start's: a reload that changed drain_timeout used to be logged
    # as taken while the drain waited the old one.
    drain_timeout = state.config.server.drain_timeout
    log_event("draining", in_flight=len(in_flight), timeout_s=drain_timeout)
    give_up_at = loop.time() + drain_timeout
    while state.connections and loop.time() < give_up_at and not abort_requested.is_set():
        await asyncio.sleep(0.05)
        for conn in list(state.connections):
            conn.close_if_idle()
    forced = len(state.connections)
    for conn in list(state.connections):
        conn.transport.abort()
    await asyncio.sleep(0)  # their connection_lost runs now: each one's log phase, its fact included
    state.facts.flush()
    if publisher is not None:
        await publisher.flush(timeout=2.0)
    state.catalog.stop()
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    if feed is not None:
        try:
            await feed.flush()
        except OSError as exc:
            log_event("snapshot_write_failed", error=exc.strerror)
    if admin is not None:
        admin.close()
    state.pool.close_idle()
    state.access_log.close()
    state.facts.close()
    if publisher is not None:
        publisher.abandon()  # what the broker did not take in time: counted and logged, not lost silently
    wipe_all_pool_keys()  # the live rotations and any retired one still referenced
    tally.retire()  # its gauges are read no more; its counters stay in the host's sums
    log_event("stopped", forced_closed=forced)
    return 0


async def _publish_gauges(state: ServerState) -> None:
    """Open connections, waiters and the like, where the worker a scrape reaches can read them."""
    while True:
        publish_gauges(state)
        await asyncio.sleep(1.0)


def _warn_if_open_relay(config, limited: bool) -> None:
    """A reachable listener that passes BYO keys with no limits (doctor.py's rule): said at start,
    and at each reload that leaves it so (`keys.allow_byo` turned on, the limits taken off)."""
    from egress.doctor import check_open_relay

    for finding in check_open_relay(config):
        if finding.level == "warn" and not limited:
            log_event("open_relay", message=finding.message, listen=config.server.listen)

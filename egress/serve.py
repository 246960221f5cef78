"""Process lifecycle: listen, serve, drain on SIGTERM/SIGINT, exit 0.

Contract: `serve(config)` blocks until a stop signal has been handled and returns the exit code.
Drain: stop accepting, close idle keep-alive connections, let in-flight exchanges finish (their
connections close after the response), and after `drain_timeout` abort what is left. A second
signal during the drain aborts at once.
"""

from __future__ import annotations

import asyncio
import signal

import uvloop

from egress.accesslog import AccessLog, log_event
from egress.config import Config, parse_listen
from egress.providers import Router
from egress.server import ClientConnection, ServerState
from egress.upstream import UpstreamPool


def serve(config: Config) -> int:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_serve(config))


async def _serve(config: Config) -> int:
    loop = asyncio.get_running_loop()
    state = ServerState(
        config, Router(config.providers), UpstreamPool(config.upstream), AccessLog(config.server.access_log)
    )
    host, port = parse_listen(config.server.listen)
    server = await loop.create_server(lambda: ClientConnection(state), host, port, backlog=4096, reuse_address=True)
    bound = server.sockets[0].getsockname()
    shown_host = f"[{host}]" if ":" in host else host
    log_event("listening", address=f"{shown_host}:{bound[1]}", providers=sorted(config.providers))

    stop_requested = asyncio.Event()
    abort_requested = asyncio.Event()

    def on_signal() -> None:
        (abort_requested if stop_requested.is_set() else stop_requested).set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)

    await stop_requested.wait()
    state.draining = True
    server.close()
    in_flight = [conn for conn in list(state.connections) if not conn.close_if_idle()]
    log_event("draining", in_flight=len(in_flight), timeout_s=config.server.drain_timeout)
    give_up_at = loop.time() + config.server.drain_timeout
    while state.connections and loop.time() < give_up_at and not abort_requested.is_set():
        await asyncio.sleep(0.05)
        for conn in list(state.connections):
            conn.close_if_idle()
    forced = len(state.connections)
    for conn in list(state.connections):
        conn.transport.abort()
    state.pool.close_idle()
    state.access_log.close()
    log_event("stopped", forced_closed=forced)
    return 0

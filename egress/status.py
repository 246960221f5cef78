"""`GET /status` on the admin listener: what an operator asks first, from memory only.

Contract: `status_document(state, slabs)` -> a JSON-ready dict: build, config hash, the host's
uptime, the worker that answered, every worker of the host (pid, running, its own uptime, its open
connections, waiters, draining, its config's hash, its usage file's drops: from the host's tally,
`slabs`, tally.py), and per provider with pool keys its accounts (state, until, reason, quota and
reset, in flight, last error class and age: accounts.AccountTable.snapshot, the host's shared view),
the deny-set and its NATS feed, the usage sinks' queues (this worker's) and drops (the host's), and
the model lists. It never calls a provider, and never holds a secret: accounts appear by id or
operator name, NATS by whether it is configured.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING

from egress import __version__, accesslog
from egress.config import config_digest
from egress.metrics import alive, worker_digest

if TYPE_CHECKING:
    from egress.server import ServerState
    from egress.tally import Slab, Tally

# When egress started: the supervisor imports this module before it forks (workers.supervise), so
# the top-level `uptime_s` is the host's, whichever worker answers. Each worker's own start is in
# its slab (`started`), and its `uptime_s` under `workers` says when it was last restarted.
_STARTED = time.monotonic()
_WORKER_STARTED = ("worker_started",)  # a gauge of its slab: time.monotonic() at its start, one clock for the host


def started(tally: Tally) -> None:
    """This worker starts (or starts again, in its predecessor's slab): its uptime counts from now."""
    tally.set_gauge(_WORKER_STARTED, time.monotonic())


def status_document(state: ServerState, slabs: list[Slab] = ()) -> dict:
    now = time.monotonic()
    wall = time.time()
    table = state.accounts
    providers: dict[str, dict] = {}
    for name, pool in sorted(state.auth.pools.items()):
        providers[name] = {"accounts": [table.snapshot(account, now, wall) for account in pool.accounts]}
    for name, (gate, cap) in sorted(state.auth.gates.items()):
        # A capped provider: its cap, and the requests in flight to it from this host.
        providers.setdefault(name, {"accounts": []}).update(max_concurrent=cap, in_flight=table.in_flight(gate))
    denyset = state.auth.denyset
    age = denyset.age_seconds()
    facts = state.facts
    publisher = facts.publisher
    nats_dropped = None
    if publisher is not None:
        nats_dropped = _host_total(slabs, _NATS_DROPPED) if slabs else publisher.dropped
    return {
        "build": {"version": __version__, "python": sys.version.split()[0]},
        # Of the effective configuration as `egress config check` prints it (sources, never keys).
        "config_hash": config_digest(state.config),
        "uptime_s": round(now - _STARTED, 3),  # the host's, since egress started: each worker's is under `workers`
        "pid": os.getpid(),
        # As `workers` and the metrics' `worker` label name it: a lone worker is worker 0 there too.
        "worker": accesslog.WORKER if accesslog.WORKER is not None else 0,
        "draining": state.draining,
        "open_connections": len(state.connections),
        "waiting": len(state.waiting),
        "workers": [_worker(index, slab, now) for index, slab in enumerate(slabs)],
        "providers": providers,
        "deny_set": {
            "size": len(denyset),
            "nats_configured": state.config.nats.url is not None,
            "stream_connected": denyset.connected,
            "age_s": round(age, 3) if age is not None else None,
        },
        # The queues are this worker's; the drops the host's, whichever worker answers: each worker
        # has its own sinks, and one that can't write (its file gone) must not read 0 on a sibling.
        "usage": {
            "jsonl_queue": facts.queued,
            "jsonl_dropped": _host_total(slabs, _JSONL_DROPPED) if slabs else facts.dropped,
            "nats_queue": publisher.queued if publisher is not None else None,
            "nats_dropped": nats_dropped,
        },
        "model_lists": {name: len(models) for name, models in state.catalog.snapshot().items()},
    }


# The usage sinks' drops in a worker's tally (facts.py, usage_nats.py).
_JSONL_DROPPED = ("usage_facts_dropped", "jsonl")
_NATS_DROPPED = ("usage_facts_dropped", "nats")


def _count(slab: Slab, key: tuple) -> int:
    return int(slab.counters.get(key, (0,))[0])


def _host_total(slabs: list[Slab], key: tuple) -> int:
    """A counter summed over every slab: the host's, a dead or restarted worker's part included."""
    return sum(_count(slab, key) for slab in slabs)


def _worker(index: int, slab: Slab, now: float) -> dict:
    """One worker as its slab tells it: its gauges are at most a second old (metrics.publish_gauges)."""
    if not alive(slab.pid):
        return {"worker": index, "running": False}
    gauges = slab.gauges
    since = gauges.get(_WORKER_STARTED)
    return {
        "worker": index,
        "running": True,
        "pid": slab.pid,
        # Its own, since its last (re)start: the top-level uptime_s is the host's.
        "uptime_s": round(now - since, 3) if since is not None else None,
        "open_connections": int(gauges.get(("open_connections",), 0)),
        "waiting": int(gauges.get(("requests_waiting",), 0)),
        "draining": bool(gauges.get(("draining",), 0)),
        # The same as every other worker's once a reload has gone round (workers.ConfigBox).
        "config_hash": worker_digest(slab),
        # Facts its usage file could not take, since the host started (a restarted worker's slot
        # goes on from its predecessor's count).
        "jsonl_dropped": _count(slab, _JSONL_DROPPED),
    }

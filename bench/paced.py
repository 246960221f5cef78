"""Streaming concurrency: how many paced SSE streams one gateway worker sustains (onthebench.ai's method).

An upstream paces an OpenAI Chat Completions stream as a provider does: 64 delta events 20 ms
apart, each its own HTTP chunk and its own write (the first with the response head), then one chunk
with a `usage` event and `data: [DONE]`, and the terminating chunk (bench/paced/upstream.c). A load
generator (bench/paced/loadgen.c) holds N keep-alive connections to the target and runs streams back
to back on each for a bounded window; the N first streams start spread evenly over one pacing
interval, so each interval carries N evenly spread events, and, all streams being equally long,
the N requests come back in a herd every stream length. With spread "stream" the starts spread over
one stream's length instead: requests then arrive at an even rate. It stamps every SSE event
("\\n\\n" in the de-chunked body) as it arrives.

At a concurrency level N, the target sustains N streams when
  (a) every stream completes: 200, a clean end, `data: [DONE]`, no stall, none cut at the deadline;
  (b) no gap between two events of a stream, as the client sees them, exceeds 200 ms (10x pacing);
  (c) the time to first token it adds is under 1 ms at p99: the target's p99 TTFT less the p99 TTFT
      of the same load straight to the upstream, measured just before at the same N. TTFT is from
      writing the request to the first event's arrival, over every stream but the first of each
      TCP connection (which, through a gateway, also opens the gateway's upstream connection: its
      p99 is shown apart, as "cold").
Levels rise (64 ... 4096 for egress and nginx; 1 ... 64 for the peers, Portkey on to 512, LiteLLM
only to 16) and the sustained count is the last level of an unbroken run of passes. A failing level
is run again once (baseline and target) before it counts: other work shares this machine. The
search then goes on while only (c) fails, to the first level failing (a) or (b): the last level
before it is the "relayed" count. If the direct baseline fails (a) or (b), or its streams run late
(the upstream and the load generator can't keep pace on their core), the load side is the limit and
the search stops.

Pinning (taskset), on a 2-core machine: the target on CPU 0 (nginx's one worker, egress's one
worker, node, LiteLLM's process); the upstream and the load generator share CPU 1. Each run reports
how busy the target and the load side (upstream + load generator) were, in cores. The C programs
are built with `gcc -O2` into ~/.cache/egress-bench/paced/ when missing or older than their source.

Usage: python3 bench/paced.py [--peers] [--full] [--spread interval|stream|both] [--targets egress,nginx-proxy]
                              [--levels 64,128] [--egress-tree PATH]
Writes bench/results/paced.md. Needs gcc, taskset and nginx; --peers uses run.py's LiteLLM install and
a Portkey install of its own (start_portkey_streaming). Everything listens on 127.0.0.1; every run
is bounded by its window and deadline, and every process started is stopped, whatever happens.
From bench/run.py: `report += "\\n" + paced.paced_section(peers=args.peers)`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from run import (  # bench/run.py, beside this file
    PEER_MASTER_KEY,
    PORTKEY_VERSION,
    _bench_issuer,
    egress_config,
    free_port,
    pinned,
    proxy_nginx_config,
    start_litellm,
    start_nginx,
    tree_cpu_seconds,
    wait_for_port,
)

ROOT = Path(__file__).resolve().parent.parent
SOURCES = Path(__file__).resolve().parent / "paced"
BUILD = Path.home() / ".cache" / "egress-bench" / "paced"
RESULTS_FILE = ROOT / "bench" / "results" / "paced.md"

EVENTS = 64
INTERVAL_MS = 20.0
GAP_LIMIT_MS = 10 * INTERVAL_MS
# The direct baseline keeps pace when its p99 stream lasts at most this much over the paced length;
# past it the upstream and the load generator can't keep up on their core, and the level says nothing.
LATE_SHARE = 1.1
ADDED_TTFT_LIMIT_MS = 1.0
# The first delta leaves with the head, the usage chunk one interval after the last delta.
STREAM_S = EVENTS * INTERVAL_MS / 1000
LEVELS = (64, 128, 256, 512, 1024, 2048, 3072, 4096)
PEER_LEVELS = (1, 2, 4, 8, 16, 32, 64)
# Portkey relays 64 streams on half a core: past them, only for the (a)+(b) count.
PORTKEY_LEVELS = (*PEER_LEVELS, 128, 256, 512)
# LiteLLM is expected to sustain very few: small levels, each run bounded like the others.
LITELLM_LEVELS = (1, 2, 4, 8, 16)
TTFT_FAILURE = "TTFT"
SPREADS = {"interval": INTERVAL_MS, "stream": STREAM_S * 1000}
GATEWAY_CPU = "0"
LOAD_CPUS = "1"
STALL_S = 10.0
BYO_KEY = "bench-byo-key"
BODY = json.dumps(
    {"model": "gpt-bench", "messages": [{"role": "user", "content": "hi"}], "stream": True}, separators=(",", ":")
)
# Portkey's gateway as run.py installs it (start_portkey) answers every streamed chat completion
# with a 500: @hono/node-server >= 1.14 builds the response Portkey adds its x-portkey-* headers to
# on the fetch response's own, immutable, headers ("TypeError: immutable", Portkey-AI/gateway#1389
# and #1550). The same Portkey release with @hono/node-server 1.13.8, which copies them, streams.
PORTKEY_STREAMING_DIR = Path.home() / ".cache" / "egress-bench" / "portkey-paced"
HONO_NODE_SERVER = "1.13.8"
# onthebench.ai's figures for the peers, on 4 pinned cores (not this machine).
PUBLISHED = {"bifrost": 128, "portkey": 32, "litellm": 1}


def build() -> dict[str, Path]:
    """The upstream and the load generator, compiled when missing or older than their source."""
    BUILD.mkdir(parents=True, exist_ok=True)
    binaries = {}
    for name in ("upstream", "loadgen"):
        source, binary = SOURCES / f"{name}.c", BUILD / name
        if not binary.exists() or binary.stat().st_mtime < source.stat().st_mtime:
            partial = binary.with_suffix(f".{os.getpid()}")
            subprocess.run(["gcc", "-O2", "-Wall", "-o", str(partial), str(source)], check=True, timeout=120)
            partial.replace(binary)  # atomic: a concurrent run never sees half a binary
        binaries[name] = binary
    return binaries


def start_upstream(binary: Path, port: int, cpus: str | None = LOAD_CPUS) -> subprocess.Popen:
    return subprocess.Popen(
        pinned([str(binary), "-p", str(port), "-n", str(EVENTS), "-i", str(INTERVAL_MS)], cpus),
        stdout=subprocess.DEVNULL,
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def pin_running(pid: int, cpus: str) -> None:
    """Every thread of a running process, and of its children, onto `cpus` (for the peers' launchers,
    which run.py starts unpinned)."""
    from run import children_of

    for each in (pid, *children_of(pid)):
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(each)], stdout=subprocess.DEVNULL, check=False)


def window_for(level: int) -> float:
    """Seconds of stream starts: longer at low levels, so a p99 rests on a few hundred streams."""
    return 10.0 if level < 256 else 5.0


def load(
    loadgen: Path,
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    body: str,
    connections: int,
    window_s: float,
    spread_ms: float,
    streams_per_connection: int = 0,
) -> dict:
    """One bounded load generator run; its JSON line, with its wall time and CPU seconds."""
    deadline = window_s + 2 * STREAM_S + 20
    command = [
        str(loadgen),
        *("-a", host, "-p", str(port), "-c", str(connections), "-u", path, "-d", body),
        *("-i", str(INTERVAL_MS), "-S", str(spread_ms), "-w", str(window_s), "-k", str(streams_per_connection)),
        *("-s", str(STALL_S), "-T", str(deadline), "-g", str(GAP_LIMIT_MS)),
    ]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(pinned(command, LOAD_CPUS), capture_output=True, text=True, timeout=deadline + 15)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the load generator is the only child reaped
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"loadgen exited with {done.returncode}: {done.stderr.strip()[:300]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["wall_s"] = wall
    row["loadgen_cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return row


def measure(
    loadgen: Path,
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    body: str,
    level: int,
    spread_ms: float,
    watch: dict[str, tuple[int, ...]],
) -> dict:
    """`load`, and how busy each watched group of processes was meanwhile, in cores."""
    before = {name: sum(tree_cpu_seconds(pid) for pid in pids) for name, pids in watch.items()}
    row = load(loadgen, host, port, path, headers, body, level, window_for(level), spread_ms)
    # Over the streams' own time (first request to last event) rather than the run's, which adds
    # the handshakes before and the reaping after.
    seconds = row["elapsed_s"] if row["elapsed_s"] > 0.5 else row["wall_s"]
    for name, pids in watch.items():
        row[f"{name}_cores"] = (sum(tree_cpu_seconds(pid) for pid in pids) - before[name]) / seconds
    row["load_cores"] = row.get("upstream_cores", 0.0) + row["loadgen_cpu_s"] / seconds
    return row


def ttft_p99(row: dict) -> float:
    """The warm p99 (a run with one stream per connection has only cold ones)."""
    return row["ttft_p99_ms"] if row["ttft_samples"] else row["ttft_cold_p99_ms"]


def failures(row: dict, direct: dict | None) -> list[str]:
    """What fails (a), (b) and, given the direct baseline, (c); empty when the level is sustained."""
    found = []
    if row["failed"] or not row["completed"]:
        found.append(f"{row['failed']} of {row['completed'] + row['failed']} streams failed")
    if row["gap_max_ms"] > GAP_LIMIT_MS:
        found.append(f"gap {row['gap_max_ms']:.0f} ms")
    if direct is not None:
        added = ttft_p99(row) - ttft_p99(direct)
        if added >= ADDED_TTFT_LIMIT_MS:
            found.append(f"{TTFT_FAILURE} +{added:.2f} ms p99")
    return found


def baseline_failures(row: dict) -> list[str]:
    """The direct run's (a) and (b), and whether it kept pace: if not, the load side is the limit."""
    found = failures(row, None)
    paced_ms = STREAM_S * 1000
    if row["completed"] and row["stream_p99_ms"] > paced_ms * LATE_SHARE:
        found.append(f"streams late, p99 {row['stream_p99_ms']:.0f} ms for {paced_ms:.0f} paced")
    return found


def relay_failures(found: list[str]) -> list[str]:
    """Those of `failures` that are (a) or (b): the streams themselves broke or stalled."""
    return [failure for failure in found if not failure.startswith(TTFT_FAILURE)]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def sustained_streams(
    target_name: str,
    host: str,
    port: int,
    path: str,
    headers: dict[str, str],
    body: str,
    upstream_port: int,
    levels: tuple[int, ...],
    *,
    gateway_pids: tuple[int, ...] = (),
    upstream_pid: int | None = None,
    spread: str = "interval",
    attempts: int = 2,
    past_ttft: bool = True,
    log: Callable[[str], None] = _stderr,
) -> dict:
    """The highest level of `levels` at which the target sustains that many paced streams.

    The upstream (start_upstream) must be listening on `upstream_port`, and the target relaying to it.
    Each level runs the load straight to the upstream (the baseline), then through the target; a
    failing level is run again, up to `attempts` times in all. `gateway_pids` and `upstream_pid` are
    only watched for CPU. With `past_ttft`, the search goes on past the first failing level while
    only (c) fails, to find how many streams the target relays without breaking or stalling one.

    Returns {"target", "spread", "rows": [one per level], "sustained": the last level of an unbroken
    run of passes, "limit": what failed next, "relayed": the last level before one failing (a) or (b),
    "relay_limit": what failed there}; a limit is "" when every level passed.
    """
    loadgen = build()["loadgen"]
    spread_ms = SPREADS[spread]
    watch = {"gateway": gateway_pids, "upstream": (upstream_pid,) if upstream_pid else ()}
    baseline_watch = {"upstream": watch["upstream"]}
    rows: list[dict] = []
    sustained = relayed = 0
    limit = relay_limit = ""
    for level in levels:
        for attempt in range(1, attempts + 1):
            direct = measure(
                loadgen, host, upstream_port, "/v1/chat/completions", headers, body, level, spread_ms, baseline_watch
            )
            target = measure(loadgen, host, port, path, headers, body, level, spread_ms, watch)
            direct_failed, failed = baseline_failures(direct), failures(target, direct)
            verdict = ", ".join(failed) or "sustained"
            if direct_failed:
                verdict = "baseline failed: " + ", ".join(direct_failed)
            log(
                f"  {target_name:14} {spread:8} {level:5} streams, try {attempt}: "
                f"TTFT p99 {ttft_p99(target):8.3f} ms (direct {ttft_p99(direct):.3f}), "
                f"max gap {target['gap_max_ms']:7.1f} ms, {target['events_per_s']:9.0f} events/s, "
                f"gateway {target.get('gateway_cores', 0):.2f} cores, load {target['load_cores']:.2f} cores: {verdict}"
            )
            if not (direct_failed or failed) or (limit and not relay_failures(failed)):
                break  # passed; or fails (c) only, past the level that decided `sustained`
        rows.append(
            {
                "level": level,
                "attempts": attempt,
                "direct": direct,
                "target": target,
                "failed": failed,
                "direct_failed": direct_failed,
            }
        )
        if direct_failed:
            relay_limit = f"the load side: the direct baseline failed at {level} ({', '.join(direct_failed)})"
            limit = limit or relay_limit
            break
        if failed:
            limit = limit or f"{level}: {', '.join(failed)}"
        elif not limit:
            sustained = level
        if relay_failures(failed):
            relay_limit = f"{level}: {', '.join(relay_failures(failed))}"
            break
        relayed = level
        if failed and not past_ttft:
            break
    return {
        "target": target_name,
        "spread": spread,
        "rows": rows,
        "sustained": sustained,
        "limit": limit,
        "relayed": relayed,
        "relay_limit": relay_limit,
    }


def check_stream(host: str, port: int, path: str, headers: dict[str, str], body: str, name: str) -> None:
    """One stream before the search: a target that answers but does not stream fails here, clearly."""
    row = load(build()["loadgen"], host, port, path, headers, body, 1, 0.001, INTERVAL_MS, streams_per_connection=1)
    if row["completed"] != 1:
        raise RuntimeError(f"paced: {name} did not complete one stream: {json.dumps(row)}")
    _stderr(f"  {name}: one stream, {row['events_per_stream_max']} events")


def start_portkey_streaming(workdir: Path, port: int) -> subprocess.Popen:
    """run.py's start_portkey, from an install of its own with @hono/node-server pinned (see above)."""
    binary = PORTKEY_STREAMING_DIR / "node_modules" / ".bin" / "gateway"
    if not binary.exists():
        _stderr(f"paced: installing @portkey-ai/gateway {PORTKEY_VERSION} into {PORTKEY_STREAMING_DIR}")
        PORTKEY_STREAMING_DIR.mkdir(parents=True, exist_ok=True)
        package = {
            "private": True,
            "dependencies": {"@portkey-ai/gateway": PORTKEY_VERSION},
            "overrides": {"@hono/node-server": HONO_NODE_SERVER},
        }
        (PORTKEY_STREAMING_DIR / "package.json").write_text(json.dumps(package, indent=2) + "\n")
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund"], cwd=PORTKEY_STREAMING_DIR, check=True, timeout=600
        )
    return subprocess.Popen(
        [str(binary), f"--port={port}", "--headless"],
        stdout=(workdir / "portkey.log").open("wb"),
        stderr=subprocess.STDOUT,
    )


class Target:
    """A gateway under test: how to start it, where to send the streams, what to watch."""

    def __init__(self, name: str, port: int, path: str, headers: dict[str, str], levels: tuple[int, ...]) -> None:
        self.name, self.port, self.path, self.headers, self.levels = name, port, path, headers, levels
        self.process: subprocess.Popen | None = None

    def start(self, workdir: Path, upstream_port: int, egress_tree: Path) -> subprocess.Popen:
        raise NotImplementedError


class Egress(Target):
    def __init__(self, name: str, mode: str, issuer: str = "", key: str = BYO_KEY) -> None:
        super().__init__(name, free_port(), "/bench/v1/chat/completions", {"Authorization": f"Bearer {key}"}, LEVELS)
        self.mode, self.issuer = mode, issuer

    def start(self, workdir: Path, upstream_port: int, egress_tree: Path) -> subprocess.Popen:
        config = workdir / f"egress-{self.mode}.toml"
        config.write_text(egress_config(self.mode, self.port, upstream_port, workdir, self.issuer, self.mode))
        command = [sys.executable, "-m", "egress", "serve", "--config", str(config), "--workers", "1"]
        log = (workdir / f"egress-{self.mode}.log").open("wb")
        return subprocess.Popen(pinned(command, GATEWAY_CPU), cwd=egress_tree, stdout=log, stderr=subprocess.STDOUT)


class NginxProxy(Target):
    def __init__(self) -> None:
        super().__init__(
            "nginx-proxy", free_port(), "/v1/chat/completions", {"Authorization": f"Bearer {BYO_KEY}"}, LEVELS
        )

    def start(self, workdir: Path, upstream_port: int, egress_tree: Path) -> subprocess.Popen:
        return start_nginx(proxy_nginx_config(workdir, self.port, upstream_port), GATEWAY_CPU)


class Portkey(Target):
    def __init__(self) -> None:
        super().__init__("portkey", free_port(), "/v1/chat/completions", {}, PORTKEY_LEVELS)

    def start(self, workdir: Path, upstream_port: int, egress_tree: Path) -> subprocess.Popen:
        self.headers = {
            "Authorization": f"Bearer {BYO_KEY}",
            "x-portkey-provider": "openai",
            "x-portkey-custom-host": f"http://127.0.0.1:{upstream_port}/v1",
        }
        return start_portkey_streaming(workdir, self.port)


class LiteLLM(Target):
    def __init__(self) -> None:
        super().__init__(
            "litellm",
            free_port(),
            "/v1/chat/completions",
            {"Authorization": f"Bearer {PEER_MASTER_KEY}"},
            LITELLM_LEVELS,
        )

    def start(self, workdir: Path, upstream_port: int, egress_tree: Path) -> subprocess.Popen:
        return start_litellm(workdir, upstream_port, self.port)


def search(
    target: Target, workdir: Path, upstream: subprocess.Popen, upstream_port: int, spreads: list[str], egress_tree: Path
) -> list[dict]:
    """Start the target, check one stream, run the search once per spread, stop it (whatever happens)."""
    process = target.start(workdir, upstream_port, egress_tree)
    try:
        try:
            wait_for_port(target.port, timeout=120 if target.name == "litellm" else 30)
        except RuntimeError:
            raise RuntimeError(
                f"paced: {target.name} did not start (exit {process.poll()}); see {workdir} "
                "(for egress: --egress-tree PATH runs a git worktree of HEAD instead of this tree)"
            ) from None
        pin_running(process.pid, GATEWAY_CPU)  # the peers start unpinned; the others are already
        check_stream("127.0.0.1", target.port, target.path, target.headers, BODY, target.name)
        return [
            sustained_streams(
                target.name,
                "127.0.0.1",
                target.port,
                target.path,
                target.headers,
                BODY,
                upstream_port,
                target.levels,
                gateway_pids=(process.pid,),
                upstream_pid=upstream.pid,
                spread=spread,
            )
            for spread in spreads
        ]
    finally:
        stop(process)


def paced_section(
    peers: bool = False,
    full: bool = False,
    spreads: tuple[str, ...] = ("interval",),
    only: tuple[str, ...] = (),
    egress_tree: Path = ROOT,
    levels: tuple[int, ...] = LEVELS,
) -> str:
    """Everything, standalone: build, start the upstream, search each target in turn; the markdown."""
    for tool in ("gcc", "taskset", "nginx"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"paced: {tool} is not installed")
    binaries = build()
    workdir = Path(tempfile.mkdtemp(prefix="egress-paced-"))
    workdir.chmod(0o755)  # nginx's worker runs unprivileged
    targets: list[Target] = [Egress("egress", "bare")]
    if full:
        issuer, virtual_key = _bench_issuer()
        (workdir / "pool.keys").write_text("sk-bench-pool-key\n")
        targets.append(Egress("egress, full", "full", issuer, virtual_key))
    targets.append(NginxProxy())
    if peers:
        targets += [Portkey(), LiteLLM()]
    if only:
        targets = [target for target in targets if target.name in only]
    for target in targets:
        if target.levels is LEVELS:
            target.levels = levels
    upstream_port = free_port()
    upstream = start_upstream(binaries["upstream"], upstream_port)
    results: list[dict] = []
    started = time.monotonic()
    try:
        wait_for_port(upstream_port)
        check_stream("127.0.0.1", upstream_port, "/v1/chat/completions", {}, BODY, "upstream")
        for target in targets:
            results += search(target, workdir, upstream, upstream_port, list(spreads), egress_tree)
    finally:
        stop(upstream)
        shutil.rmtree(workdir, ignore_errors=True)
    return render(results, time.monotonic() - started)


def render(results: list[dict], seconds: float) -> str:
    figures = ", ".join(f"{name} {count}" for name, count in PUBLISHED.items())
    spread_text = {"interval": "one interval (20 ms)", "stream": f"one stream ({STREAM_S:.2f} s)"}
    lines = [
        f"# Paced SSE streams: concurrency one gateway worker sustains ({os.cpu_count()} cores, loopback)",
        "",
        f"Upstream (bench/paced/upstream.c): {EVENTS} chat.completion.chunk deltas {INTERVAL_MS:.0f} ms apart, each "
        "its own HTTP chunk, then usage and `data: [DONE]`. Load (bench/paced/loadgen.c): N keep-alive connections, "
        "streams back to back on each, the N first spread evenly over the time the spread column gives; "
        f"{window_for(64):.0f} s of stream starts below 256 streams, {window_for(256):.0f} s from 256 on.",
        "",
        f"Sustained = (a) every stream completes, (b) no inter-event gap over {GAP_LIMIT_MS:.0f} ms, (c) TTFT p99 "
        f"less the direct p99 at the same N under {ADDED_TTFT_LIMIT_MS:.0f} ms (streams after the first of each "
        "connection; the first, which also opens the gateway's upstream connection, is `cold`). Levels rise until "
        "one fails (run twice before it counts), then on while only (c) fails, to the level where (a) or (b) does: "
        "`relayed` is the last level before that.",
        "",
        f"Pinned with taskset: the target on CPU {GATEWAY_CPU} (one worker: egress `--workers 1`, nginx "
        f"`worker_processes 1`, Portkey's node process, LiteLLM `--num_workers 1`); the upstream and the load "
        f"generator on CPU {LOAD_CPUS}. `gateway` and `load` columns: cores busy during the run (load = upstream + "
        f"load generator; near 1.0 the load side is the limit). Search took {seconds / 60:.0f} min. Published: "
        f"onthebench.ai's figures on 4 pinned cores, not this machine ({figures}).",
        "",
        "| target | starts spread over | sustained streams, (a)+(b)+(c) | stopped by | relayed streams, (a)+(b) "
        "| stopped by | published, 4 cores |",
        "|---|---|---:|---|---:|---|---:|",
    ]
    for result in results:
        published = PUBLISHED.get(result["target"], "")
        lines.append(
            f"| {result['target']} | {spread_text[result['spread']]} | **{result['sustained']}** "
            f"| {result['limit'] or 'every level passed'} | {result['relayed']} "
            f"| {result['relay_limit'] or 'every level passed'} | {published} |"
        )
    if any(result["target"] == "portkey" for result in results):
        lines += [
            "",
            f"Portkey: @portkey-ai/gateway {PORTKEY_VERSION} with @hono/node-server {HONO_NODE_SERVER} (as run.py "
            "installs it, every streamed request is a 500: TypeError: immutable). Its stream reader holds the first "
            "chunk 25 ms (a setTimeout), so its TTFT is ~30 ms at any level.",
        ]
    lines += [
        "",
        "| target | spread | streams | tries | completed | failed | TTFT p99 direct ms | TTFT p99 ms "
        "| added p99 ms | cold TTFT p99 ms | max gap ms | p99 gap ms | stream p99 s | events/s | gateway cores "
        "| load cores | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        for row in result["rows"]:
            direct, target = row["direct"], row["target"]
            if row["direct_failed"]:
                verdict = "baseline failed: " + ", ".join(row["direct_failed"])
            else:
                verdict = ", ".join(row["failed"]) or "sustained"
            lines.append(
                f"| {result['target']} | {result['spread']} | {row['level']} | {row['attempts']} "
                f"| {target['completed']} | {target['failed']} | {ttft_p99(direct):.3f} | {ttft_p99(target):.3f} "
                f"| {ttft_p99(target) - ttft_p99(direct):.3f} | {target['ttft_cold_p99_ms']:.3f} "
                f"| {target['gap_max_ms']:.1f} | {target['gap_p99_ms']:.1f} | {target['stream_p99_ms'] / 1000:.2f} "
                f"| {target['events_per_s']:.0f} "
                f"| {target.get('gateway_cores', 0):.2f} | {target['load_cores']:.2f} | {verdict} |"
            )
    return "\n".join(lines) + "\n"


_ALIASES = {"egress-full": "egress, full"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", action="store_true", help="also Portkey's gateway and LiteLLM (run.py's installs)")
    parser.add_argument("--full", action="store_true", help="also egress with the `full` config (virtual key, meter)")
    parser.add_argument("--spread", choices=("interval", "stream", "both"), default="interval")
    parser.add_argument(
        "--targets", default="", help="comma-separated subset, e.g. egress,egress-full,nginx-proxy,portkey,litellm"
    )
    parser.add_argument("--egress-tree", type=Path, default=ROOT, help="run `python3 -m egress` from this tree")
    parser.add_argument("--levels", default="", help="levels for egress and nginx, e.g. 64,128 (default: 64 ... 4096)")
    args = parser.parse_args()
    spreads = ("interval", "stream") if args.spread == "both" else (args.spread,)
    # `egress-full` names the row "egress, full", whose comma the list can't carry.
    only = tuple(_ALIASES.get(name.strip(), name.strip()) for name in args.targets.split(",") if name.strip())
    levels = tuple(int(level) for level in args.levels.split(",") if level) or LEVELS
    report = paced_section(args.peers, args.full or "egress, full" in only, spreads, only, args.egress_tree, levels)
    print(report)
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

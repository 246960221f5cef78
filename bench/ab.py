"""Interleaved A/B of egress builds: which of two source trees costs less CPU per request.

On a small shared VM, where the scheduler places egress, wrk and nginx moves one run by ±30 %, so
two builds measured in separate runs can't be compared. Here every build runs at once behind the
same nginx upstream, and wrk drives them in rounds whose order alternates; each round records
req/s and egress's CPU-µs per request (from /proc). Compare the medians.

Usage: bench/ab [--rounds 8] [--duration 2] [--sse] [--pin] SPEC [SPEC ...]
  SPEC is MODE:SOURCE_TREE, MODE one of
    bare   BYO key, limiter and meter off, no access log (bench/run's `egress` row)
    full   virtual key, limiter, meter, usage file and access log (bench/run's `egress, full`)
  and SOURCE_TREE a directory holding an `egress/` package, such as a `git worktree` of another
  commit. `nginx-proxy` is also a SPEC, for reference.
--sse relays bench/run's 500-event SSE body instead of the small JSON completion.
--pin puts the proxies (egress builds, nginx-proxy) on CPU 0 and wrk and the upstream on CPU 1:
each proxy then has a core to itself, and the figures move far less from run to run.
--tls sends every proxy's upstream traffic over TLS (HTTPS to the upstream nginx, its certificate
verified; made with trustme), as traffic to a real provider goes.
Example: git worktree add /tmp/before HEAD~1 && bench/ab bare:/tmp/before bare:.
Needs nginx and wrk, like bench/run. Loopback only; every load run is bounded by --duration.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # bench/run.py, beside this file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--duration", type=int, default=2)
    parser.add_argument("--sse", action="store_true", help="the 500-event SSE body instead of small JSON")
    parser.add_argument("--pin", action="store_true", help="proxies on CPU 0, wrk and the upstream on CPU 1")
    parser.add_argument("--tls", action="store_true", help="the proxies reach the upstream over TLS")
    parser.add_argument("specs", nargs="+")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="egress-ab-"))
    workdir.chmod(0o755)
    issuer, virtual_key = bench._bench_issuer()
    if args.sse:
        (workdir / "stream.txt").write_text(bench.sse_body())
        (workdir / "byo.lua").write_text('wrk.headers["Authorization"] = "Bearer bench-byo-key"\n')
        (workdir / "virtual.lua").write_text(f'wrk.headers["Authorization"] = "Bearer {virtual_key}"\n')
    else:
        (workdir / "byo.lua").write_text(bench.POST_LUA % "bench-byo-key")
        (workdir / "virtual.lua").write_text(bench.POST_LUA % virtual_key)
    path = "/v1/stream" if args.sse else "/v1/chat/completions"
    (workdir / "pool.keys").write_text("sk-bench-pool-key\n")
    upstream_port, proxy_port = bench.free_port(), bench.free_port()
    tls_port = bench.free_port() if args.tls else None
    ca_file = bench.tls_files(workdir) if args.tls else None
    upstream = bench.upstream_nginx_config(workdir, upstream_port, tls_port)
    proxy = bench.proxy_nginx_config(workdir, proxy_port, tls_port or upstream_port, tls=args.tls)
    proxy_cpus, load_cpus = ("0", "1") if args.pin else (None, None)
    processes = [bench.start_nginx(upstream, load_cpus), bench.start_nginx(proxy, proxy_cpus)]
    urls, scripts, pids, ports = {}, {}, {}, [upstream_port, proxy_port]
    try:
        for index, spec in enumerate(args.specs):
            if spec == "nginx-proxy":
                urls[spec], scripts[spec] = f"http://127.0.0.1:{proxy_port}{path}", "byo.lua"
                continue
            mode, _, tree = spec.partition(":")
            if mode not in ("bare", "full") or not (Path(tree) / "egress").is_dir():
                parser.error(f"{spec}: expected bare:TREE or full:TREE, TREE holding an egress/ package")
            port = bench.free_port()
            config = workdir / f"egress-{index}.toml"
            text = bench.egress_config(mode, port, upstream_port, workdir, issuer, f"-{index}")
            config.write_text(bench.over_tls(text, upstream_port, tls_port, ca_file) if args.tls else text)
            process = subprocess.Popen(
                bench.pinned(
                    [sys.executable, "-m", "egress", "serve", "--config", str(config), "--workers", "1"], proxy_cpus
                ),
                # Run from the tree itself: `python -m` puts the working directory first on sys.path,
                # ahead of PYTHONPATH, so from any other checkout every spec would run that one.
                cwd=Path(tree).resolve(),
                env={**os.environ, "PYTHONPATH": str(Path(tree).resolve())},
                stdout=subprocess.DEVNULL,
                stderr=(workdir / f"egress-{index}.log").open("wb"),
            )
            processes.append(process)
            pids[spec] = process.pid
            ports.append(port)
            urls[spec] = f"http://127.0.0.1:{port}/bench{path}"
            scripts[spec] = "byo.lua" if mode == "bare" else "virtual.lua"
        for port in ports:
            bench.wait_for_port(port)
        if "nginx-proxy" in urls:  # its worker's CPU per request, for scale
            pids["nginx-proxy"] = bench.children_of(processes[1].pid)[0]
        for spec in args.specs:  # warm-up: pools and caches
            bench.run_wrk(urls[spec], workdir / scripts[spec], 1, 50, cpus=load_cpus)
        rates: dict[str, list[float]] = {spec: [] for spec in args.specs}
        cpu: dict[str, list[float]] = {spec: [] for spec in args.specs}
        for round_index in range(args.rounds):
            order = args.specs if round_index % 2 == 0 else args.specs[::-1]
            for spec in order:
                before = bench.cpu_seconds(pids[spec]) if spec in pids else 0.0
                result = bench.run_wrk(urls[spec], workdir / scripts[spec], args.duration, 50, cpus=load_cpus)
                if result["non_2xx"]:  # errors answered fast would pass for speed
                    raise SystemExit(f"ab: {spec} answered {result['non_2xx']} non-2xx responses")
                rates[spec].append(result["rps"])
                if spec in pids:
                    requests = result["rps"] * args.duration
                    cpu[spec].append((bench.cpu_seconds(pids[spec]) - before) / requests * 1e6)
        print(f"{'build':40} {'req/s':>9} {'CPU-µs/req':>11}  rounds")
        for spec in args.specs:
            spent = f"{statistics.median(cpu[spec]):11.1f}" if cpu[spec] else f"{'':11}"
            shown = ", ".join(f"{value:.0f}" for value in cpu[spec])
            print(f"{spec:40} {statistics.median(rates[spec]):9.0f} {spent}  {shown}")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

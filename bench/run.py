"""Side-by-side throughput and latency on loopback: direct upstream vs nginx as a proxy vs egress.

One run starts a fast real upstream (nginx, one worker, serving an OpenAI-shaped JSON body and a
500-event SSE body), nginx configured as a plain keep-alive reverse proxy in front of it, and egress
(one process) in front of it too; then wrk drives each target in turn, round after round, so drift
on the machine hits all three alike. Reported: medians over the rounds, and the ratios
egress/nginx-proxy and egress/direct. With --peers, LiteLLM's proxy and Portkey's open-source
gateway (routed by its x-portkey-provider and x-portkey-custom-host headers) take the small JSON row too.

Translated rows: the same nginx also serves an Anthropic Messages JSON body and a 500-event
Anthropic stream (bench/anthropic_bodies.py); egress's unified surface translates a chat request
for a Claude model to them and back. Reported: req/s against egress's own passthrough (and LiteLLM
doing the same translation, with --peers), events/s, and the time to first token it adds.

Paced streams (--paced, on by default with --peers): how many concurrent streams, paced as a
provider paces them (64 deltas 20 ms apart), one worker of each gateway sustains; see bench/paced.py.

Usage: bench/run [--rounds 3] [--duration 5] [--connections 50] [--peers] [--[no-]paced]
Needs nginx and wrk (Debian packages `nginx`, `wrk`), and h2load (`nghttp2-client`) for the
open-loop latency rows; installs nothing itself.
Everything listens on 127.0.0.1 only; every load run is bounded by --duration.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anthropic_bodies  # bench/anthropic_bodies.py, beside this file

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1795400000,
        "model": "gpt-bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
    },
    separators=(",", ":"),
)
SSE_EVENTS = 500
POST_LUA = """
wrk.method = "POST"
wrk.body = '{"model":"gpt-bench","messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""
POST_BODY_LUA = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""
# The unified surface's rows: a chat request for a Claude model, translated to Anthropic and back.
TRANSLATED_JSON = "translated JSON"
TRANSLATED_SSE = f"translated SSE {anthropic_bodies.STREAM_EVENTS} events"
# The same stream asked for through the Responses API (POST /v1/responses), translated likewise.
TRANSLATED_RESPONSES = f"translated Responses SSE {anthropic_bodies.STREAM_EVENTS} events"
TRANSLATED = (TRANSLATED_JSON, TRANSLATED_SSE, TRANSLATED_RESPONSES)
STREAM_REQUEST = anthropic_bodies.CHAT_STREAM_REQUEST
RESPONSES_STREAM_REQUEST = anthropic_bodies.RESPONSES_STREAM_REQUEST
MESSAGES_STREAM_REQUEST = anthropic_bodies.MESSAGES_STREAM_REQUEST
# Time to first token: requests a round, one at a time (a p99 is then the 3rd worst, not the worst).
TTFT_REQUESTS = 700
# LiteLLM takes ~0.4 s of its one worker per translated 500-event stream (~3 streams/s at any
# concurrency): 50 connections would keep every stream waiting past the end of the run, so its
# stream row runs with a few, and its time to first token is taken over fewer requests.
LITELLM_STREAM_CONNECTIONS = 5
LITELLM_TTFT_REQUESTS = 50
# The translated rows' targets, one worker: JSON >= 0.5 x egress passthrough and >= 100 x LiteLLM
# (req/s), the transcoded stream >= 100k events/s, added time to first token <= 1 ms at p99.
TARGETS = {"passthrough_share": 0.5, "litellm_multiple": 100, "events_per_s": 100_000, "ttft_p99_added_ms": 1.0}


def verification_costs(samples: int = 2000) -> dict[str, float]:
    """Microseconds per virtual-key check: cold (signature verified) and warm (cached), in process."""
    import timeit

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from egress.auth import Authenticator
    from egress.config import parse_config
    from egress.denyset import DenySet
    from egress.vkeys import mint, public_key_text

    issuer = Ed25519PrivateKey.generate()
    config = parse_config({"keys": {"trusted_issuers": [public_key_text(issuer.public_key())]}})
    tokens = [mint(issuer, f"app-{index}")[0].encode() for index in range(samples)]
    auth = Authenticator(config, DenySet(), {})
    cold = iter(tokens)
    cold_s = timeit.timeit(lambda: auth.claims_for(next(cold)), number=samples) / samples
    warm_s = timeit.timeit(lambda: auth.claims_for(tokens[0]), number=samples * 10) / (samples * 10)
    # Forged keys: well formed, the trusted issuer's id, another key's signature, each one new, all
    # from one client address. Past the address's burst they are refused without a verification.
    impostor = Ed25519PrivateKey.generate()
    forged = [_forge(impostor, issuer, index) for index in range(samples)]
    fresh = iter(forged)
    forged_s = timeit.timeit(lambda: _refused(auth, next(fresh)), number=samples) / samples
    again_s = timeit.timeit(lambda: _refused(auth, forged[-1]), number=samples) / samples
    return {
        "cold_us": cold_s * 1e6,
        "warm_us": warm_s * 1e6,
        "forged_us": forged_s * 1e6,
        "forged_again_us": again_s * 1e6,
    }


def _forge(impostor, issuer, index: int) -> bytes:
    import base64

    from egress.vkeys import SIGNING_DOMAIN, issuer_id

    document = {"iat": 1, "iss": issuer_id(issuer.public_key()), "kid": f"{index:016x}", "sub": "x", "v": 1}
    payload = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    signature = impostor.sign(SIGNING_DOMAIN + payload)
    b64 = base64.urlsafe_b64encode
    return b"bai_" + b64(payload).rstrip(b"=") + b"." + b64(signature).rstrip(b"=")


def _refused(auth, token: bytes) -> None:
    from egress.errors import EgressError

    try:
        auth.claims_for(token, "203.0.113.9:4000")
    except EgressError:
        return
    raise AssertionError("a forged key verified")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    give_up_at = time.monotonic() + timeout
    while time.monotonic() < give_up_at:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def sse_body() -> str:
    chunk = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}}]}
    events = []
    for index in range(SSE_EVENTS):
        chunk["choices"][0]["delta"] = {"content": f"token{index} "}
        events.append("data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n")
    return "".join(events) + "data: [DONE]\n\n"


def nginx_config(workdir: Path, name: str, server_block: str) -> Path:
    path = workdir / f"{name}.conf"
    path.write_text(
        f"""
worker_processes 1;
pid {workdir}/{name}.pid;
error_log {workdir}/{name}.error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    client_body_temp_path {workdir}/{name}-body;
    proxy_temp_path {workdir}/{name}-proxy;
    {server_block}
}}
"""
    )
    return path


def pinned(command: list[str], cpus: str | None) -> list[str]:
    """`command` run on the given CPUs only (taskset), or anywhere when `cpus` is None."""
    return ["taskset", "-c", cpus, *command] if cpus is not None else command


def upstream_nginx_config(workdir: Path, port: int, tls_port: int | None = None) -> Path:
    """The fast upstream: the small JSON completion, and the SSE body from `workdir/stream.txt`;
    as Anthropic, a Messages JSON body at /v1/messages and the Anthropic SSE body from
    `workdir/anthropic-stream.txt` at /stream/v1/messages (the base path of a second provider row).
    With `tls_port`, the same over TLS there too, with the certificate `tls_files` made.
    """
    tls = (
        f"listen 127.0.0.1:{tls_port} ssl;\n        ssl_certificate {workdir}/upstream.pem;\n"
        f"        ssl_certificate_key {workdir}/upstream.pem;\n        ssl_session_cache shared:bench:1m;"
        if tls_port is not None
        else ""
    )
    return nginx_config(
        workdir,
        "upstream",
        f"""server {{
        listen 127.0.0.1:{port};
        {tls}
        location = /v1/chat/completions {{ default_type application/json; return 200 '{COMPLETION}'; }}
        location = /v1/stream {{ default_type text/event-stream; alias {workdir}/stream.txt; }}
        location = /v1/messages {{ default_type application/json; return 200 '{anthropic_bodies.MESSAGE}'; }}
        # A static file answers POST with 405; error_page serves it again as a GET, with a 200.
        location = /stream/v1/messages {{
            default_type text/event-stream;
            alias {workdir}/anthropic-stream.txt;
            error_page 405 =200 $uri;
        }}
    }}""",
    )


def proxy_nginx_config(workdir: Path, port: int, upstream_port: int, tls: bool = False) -> Path:
    """nginx as a plain keep-alive reverse proxy in front of the upstream, unbuffered like egress;
    with `tls`, to the upstream's TLS port, verifying its certificate as egress does."""
    verify = (
        f"proxy_ssl_verify on;\n            proxy_ssl_trusted_certificate {workdir}/ca.pem;\n"
        "            proxy_ssl_name localhost;\n            proxy_ssl_session_reuse on;"
        if tls
        else ""
    )
    return nginx_config(
        workdir,
        "proxy",
        f"""upstream provider {{ server 127.0.0.1:{upstream_port}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass {"https" if tls else "http"}://provider;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            {verify}
        }}
    }}""",
    )


def tls_files(workdir: Path) -> Path:
    """A CA (workdir/ca.pem) and the upstream's certificate and key for 127.0.0.1 (upstream.pem),
    made with trustme (a test dependency); returns the CA file egress's `[upstream] ca_file` names."""
    import trustme

    authority = trustme.CA()
    # An IP address for egress (Python checks IP SANs), a name for nginx (its check matches names only).
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    certificate.private_key_and_cert_chain_pem.write_to_path(str(workdir / "upstream.pem"))
    authority.cert_pem.write_to_path(str(workdir / "ca.pem"))
    return workdir / "ca.pem"


def over_tls(config: str, upstream_port: int, tls_port: int, ca_file: Path) -> str:
    """An egress config (egress_config's) sending the bench provider's traffic over TLS."""
    config = config.replace(f'"http://127.0.0.1:{upstream_port}"', f'"https://127.0.0.1:{tls_port}"')
    return config + f'\n[upstream]\nca_file = "{ca_file}"\n'


def egress_config(mode: str, port: int, upstream_port: int, workdir: Path, issuer: str, name: str = "") -> str:
    """egress in front of the bench upstream, as `bare` or `full`.

    bare: BYO key, limiter and meter off, no access log; it also serves the unified surface's
    translated rows (`translated_rows`), which passthrough requests never look at. full:
    everything on: virtual key (pool key in workdir/pool.keys), limiter (high enough never to
    refuse), meter, usage file, access log. `name` tells apart the files of several egress
    processes sharing one workdir.
    """
    server = f'[server]\nlisten = "127.0.0.1:{port}"\nadmin_listen = "off"\nmax_connections = 50000\n'
    provider = f'[providers.bench]\nbase_url = "http://127.0.0.1:{upstream_port}"\n'
    if mode == "bare":
        return server + 'access_log = "off"\n\n[usage]\nenabled = false\n\n' + provider + translated_rows(upstream_port)
    return (
        server
        + f'access_log = "{workdir}/access{name}.log"\n\n[keys]\ntrusted_issuers = ["{issuer}"]\n\n'
        + "[limits]\nrequests_per_minute = 1000000000\ntokens_per_minute = 1000000000\n\n"
        + f'[usage]\njsonl = "{workdir}/usage{name}.jsonl"\n\n'
        + provider
        + f'pool_keys = ["file:{workdir}/pool.keys"]\n'
    )


def translated_rows(upstream_port: int) -> str:
    """Two Anthropic rows for the unified surface, told apart by model: the JSON body and the stream.

    The surface always sends a translated request to base path + /v1/messages, so the stream row's
    base URL carries a path prefix nginx serves the SSE body under.
    """
    origin = f"http://127.0.0.1:{upstream_port}"
    return (
        f'\n[providers.anthropic]\nbase_url = "{origin}"\n'
        f'\n[providers.anthropic_stream]\nbase_url = "{origin}/stream"\ndialect = "anthropic"\nauth = "x-api-key"\n'
        'stream_usage = "always"\n'
        f'\n[[routes]]\nmatch = "{anthropic_bodies.JSON_MODEL}"\nprovider = "anthropic"\n'
        f'\n[[routes]]\nmatch = "{anthropic_bodies.STREAM_MODEL}"\nprovider = "anthropic_stream"\n'
    )


def start_nginx(config: Path, cpus: str | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        pinned(["nginx", "-c", str(config), "-g", "daemon off;"], cpus),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def run_wrk(
    url: str,
    lua: Path,
    duration: int,
    connections: int,
    watch: dict[str, int] | None = None,
    cpus: str | None = None,
    timeout: int | None = None,
) -> dict:
    """One closed-loop wrk run; also how busy wrk itself and each `watch`ed process were (cores).

    `timeout`: seconds before wrk gives up on a response (its default is 2); a slow target's
    responses past it are not counted at all.
    """
    before = {name: cpu_seconds(pid) for name, pid in (watch or {}).items()}
    reaped_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    process = subprocess.Popen(
        pinned(
            ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(lua), url]
            + (["--timeout", f"{timeout}s"] if timeout else []),
            cpus,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    output, _ = process.communicate(timeout=duration + 30)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped meanwhile
    busy = {name: (cpu_seconds(pid) - before[name]) / duration for name, pid in (watch or {}).items()}
    busy["wrk"] = (reaped.ru_utime + reaped.ru_stime - reaped_before.ru_utime - reaped_before.ru_stime) / duration
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", output)
    scale = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3}[transfer.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return {
        "rps": rate,
        "p50_ms": _latency(output, "50%"),
        "p99_ms": _latency(output, "99%"),
        "bytes_per_s": float(transfer.group(1)) * scale,
        "non_2xx": int(errors.group(1)) if errors else 0,
        **{f"busy_{name}": value for name, value in busy.items()},
    }


OPEN_LOOP_CLIENTS = 10


def open_loop_latency(
    url: str, body: Path, headers: dict[str, str], rate: int, seconds: int, log: Path, arrivals: str
) -> dict:
    """Latency at a fixed request rate (h2load --rps): a server that stalls can't slow the load down
    and hide its tail, as a closed loop like wrk's would. Percentiles come from h2load's per-request log.

    The clients of one h2load process fire on the same timer tick, so its ten connections deliver
    ten requests at once (`bursts`). `spread` runs ten h2load processes of one connection each,
    started one after another, so their timers run out of phase and requests arrive one by one,
    as independent callers' requests do.
    """
    per_connection = max(1, rate // OPEN_LOOP_CLIENTS)
    processes = 1 if arrivals == "bursts" else OPEN_LOOP_CLIENTS
    connections = OPEN_LOOP_CLIENTS // processes
    command = ["h2load", "--h1", "-c", str(connections), "--rps", str(per_connection), "-D", str(seconds)]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    logs = [log.with_suffix(f".{index}.log") for index in range(processes)]
    running: list[subprocess.Popen] = []
    try:
        for path in logs:
            arguments = [*command, "-d", str(body), "--log-file", str(path), url]
            running.append(subprocess.Popen(arguments, stdout=subprocess.DEVNULL))
            # A tenth of one connection's interval apart; exec time scatters the phases further.
            time.sleep(1 / per_connection / processes)
        for process in running:
            if process.wait(timeout=seconds + 30) != 0:
                raise RuntimeError(f"h2load exited with {process.returncode}")
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.wait()
    durations = sorted(
        int(line.split("\t")[2]) for path in logs for line in path.read_text().splitlines() if line.count("\t") >= 2
    )
    if not durations:
        return {"rate": rate, "p50_ms": float("nan"), "p99_ms": float("nan"), "requests": 0}
    return {
        "rate": rate,
        "p50_ms": durations[len(durations) // 2] / 1000,
        "p99_ms": durations[min(len(durations) - 1, int(len(durations) * 0.99))] / 1000,
        "requests": len(durations),
    }


def _latency(output: str, percentile: str) -> float:
    match = re.search(rf"^\s+{re.escape(percentile)}\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    value, unit = float(match.group(1)), match.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


PEER_VENV = Path.home() / ".cache" / "egress-bench" / "litellm-venv"
PEER_MASTER_KEY = "sk-bench-master-0123456789abcdef0123456789abcdef"


def start_litellm(workdir: Path, upstream_port: int, port: int) -> subprocess.Popen:
    """LiteLLM's proxy, from its own virtualenv (made once, then reused), in front of the same upstream."""
    binary = PEER_VENV / "bin" / "litellm"
    if not binary.exists():
        print("bench: installing litellm[proxy] into", PEER_VENV, file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run(
            [str(PEER_VENV / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"], check=True, timeout=900
        )
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: gpt-bench\n"
        "    litellm_params:\n"
        "      model: openai/gpt-bench\n"
        f"      api_base: http://127.0.0.1:{upstream_port}/v1\n"
        "      api_key: sk-bench-upstream\n"
        # The same translation as egress's: LiteLLM appends /v1/messages to an Anthropic api_base.
        f"  - model_name: {anthropic_bodies.JSON_MODEL}\n"
        "    litellm_params:\n"
        f"      model: anthropic/{anthropic_bodies.JSON_MODEL}\n"
        f"      api_base: http://127.0.0.1:{upstream_port}\n"
        "      api_key: sk-bench-upstream\n"
        f"  - model_name: {anthropic_bodies.STREAM_MODEL}\n"
        "    litellm_params:\n"
        f"      model: anthropic/{anthropic_bodies.STREAM_MODEL}\n"
        f"      api_base: http://127.0.0.1:{upstream_port}/stream\n"
        "      api_key: sk-bench-upstream\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {PEER_MASTER_KEY}\n"  # it refuses to start without one
    )
    # Local cost map: no request may leave the machine.
    environment = {
        **os.environ,
        "LITELLM_LOG": "ERROR",
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    return subprocess.Popen(
        [str(binary), "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        stdout=(workdir / "litellm.log").open("wb"),
        stderr=subprocess.STDOUT,
        env=environment,
    )


PORTKEY_DIR = Path.home() / ".cache" / "egress-bench" / "portkey"
PORTKEY_VERSION = "1.15.2"


def start_portkey(workdir: Path, port: int) -> subprocess.Popen:
    """Portkey's open-source gateway (the @portkey-ai/gateway npm package) under node, installed once
    into its own directory; it routes each request by its x-portkey-provider and
    x-portkey-custom-host headers, here to the same upstream."""
    binary = PORTKEY_DIR / "node_modules" / ".bin" / "gateway"
    if not binary.exists():
        print("bench: installing @portkey-ai/gateway into", PORTKEY_DIR, file=sys.stderr)
        PORTKEY_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", f"@portkey-ai/gateway@{PORTKEY_VERSION}"],
            cwd=PORTKEY_DIR,
            check=True,
            timeout=600,
        )
    return subprocess.Popen(
        [str(binary), f"--port={port}", "--headless"],
        stdout=(workdir / "portkey.log").open("wb"),
        stderr=subprocess.STDOUT,
    )


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return sorted(found)


def tree_cpu_seconds(pid: int) -> float:
    """A process and its children (the supervisor's workers)."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children_of(pid))


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))


def idle_connection_memory(port: int, pid: int, count: int) -> dict[str, float]:
    """Resident memory egress needs per idle keep-alive connection, each having served a request."""
    request = b"GET /healthz HTTP/1.1\r\nHost: bench\r\n\r\n"
    before = rss_kib(pid)
    sockets = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(request)
            sockets.append(sock)
        for sock in sockets:
            sock.recv(4096)
        time.sleep(0.5)
        after = rss_kib(pid)
    finally:
        for sock in sockets:
            sock.close()
    return {"count": count, "total_mib": (after - before) / 1024, "per_connection_kib": (after - before) / count}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--idle-connections", type=int, default=10_000)
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also measure LiteLLM's proxy (its own venv) and Portkey's gateway (npm, under node)",
    )
    parser.add_argument(
        "--paced",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the paced-streams concurrency search (bench/paced.py) after the rest: ~10 min, ~25 with "
        "--peers; on by default with --peers",
    )
    args = parser.parse_args()
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is not installed (apt-get install -y nginx wrk)", file=sys.stderr)
            return 2

    workdir = Path(tempfile.mkdtemp(prefix="egress-bench-"))
    workdir.chmod(0o755)  # nginx workers run unprivileged and must read the SSE body
    (workdir / "stream.txt").write_text(sse_body())
    (workdir / "anthropic-stream.txt").write_text(anthropic_bodies.stream_body())
    (workdir / "post.lua").write_text(POST_LUA % "bench-byo-key")
    issuer, virtual_key = _bench_issuer()
    (workdir / "post-virtual.lua").write_text(POST_LUA % virtual_key)
    (workdir / "pool.keys").write_text("sk-bench-pool-key\n")
    upstream_port, proxy_port, egress_port = free_port(), free_port(), free_port()
    upstream_conf = upstream_nginx_config(workdir, upstream_port)
    proxy_conf = proxy_nginx_config(workdir, proxy_port, upstream_port)
    full_port = free_port()
    bare_conf = workdir / "egress-bare.toml"
    bare_conf.write_text(egress_config("bare", egress_port, upstream_port, workdir, issuer))
    full_conf = workdir / "egress-full.toml"
    full_conf.write_text(egress_config("full", full_port, upstream_port, workdir, issuer))
    two_port = free_port()
    processes = [start_nginx(upstream_conf), start_nginx(proxy_conf)]
    egress_pids = {}
    for name, conf, workers, listen in (
        ("egress", bare_conf, 1, None),
        ("egress, full", full_conf, 1, None),
        ("egress, 2 workers", bare_conf, 2, f"127.0.0.1:{two_port}"),
    ):
        command = [sys.executable, "-m", "egress", "serve", "--config", str(conf), "--workers", str(workers)]
        process = subprocess.Popen(
            command + (["--listen", listen] if listen else []),
            cwd=ROOT,  # `python -m` imports from the working directory first: this tree's egress
            stdout=subprocess.DEVNULL,
            stderr=(workdir / f"{conf.stem}-{workers}.log").open("wb"),
        )
        processes.append(process)
        egress_pids[name] = process.pid
    try:
        peer_port = portkey_port = None
        if args.peers:
            peer_port = free_port()
            processes.append(start_litellm(workdir, upstream_port, peer_port))
            portkey_port = free_port()
            processes.append(start_portkey(workdir, portkey_port))
        for port in (upstream_port, proxy_port, egress_port, full_port, two_port):
            wait_for_port(port)
        if peer_port is not None:
            wait_for_port(peer_port, timeout=120)  # LiteLLM takes a while to import
            wait_for_port(portkey_port, timeout=60)
        watch = {"upstream": children_of(processes[0].pid)[0]}
        scenarios = {
            "small JSON": {
                "direct": f"http://127.0.0.1:{upstream_port}/v1/chat/completions",
                "nginx-proxy": f"http://127.0.0.1:{proxy_port}/v1/chat/completions",
                "egress": f"http://127.0.0.1:{egress_port}/bench/v1/chat/completions",
                "egress, full": f"http://127.0.0.1:{full_port}/bench/v1/chat/completions",
                "egress, 2 workers": f"http://127.0.0.1:{two_port}/bench/v1/chat/completions",
                **({"litellm": f"http://127.0.0.1:{peer_port}/v1/chat/completions"} if peer_port else {}),
                **({"portkey": f"http://127.0.0.1:{portkey_port}/v1/chat/completions"} if portkey_port else {}),
            },
            f"SSE {SSE_EVENTS} events": {
                "direct": f"http://127.0.0.1:{upstream_port}/v1/stream",
                "nginx-proxy": f"http://127.0.0.1:{proxy_port}/v1/stream",
                "egress": f"http://127.0.0.1:{egress_port}/bench/v1/stream",
                "egress, full": f"http://127.0.0.1:{full_port}/bench/v1/stream",
            },
            # The unified surface: a chat request for a Claude model, translated to Anthropic
            # Messages and back. `direct` is the Anthropic body straight from nginx (no translation).
            TRANSLATED_JSON: {
                "direct": f"http://127.0.0.1:{upstream_port}/v1/messages",
                "egress": f"http://127.0.0.1:{egress_port}/v1/chat/completions",
                **({"litellm": f"http://127.0.0.1:{peer_port}/v1/chat/completions"} if peer_port else {}),
            },
            TRANSLATED_SSE: {
                "direct": f"http://127.0.0.1:{upstream_port}/stream/v1/messages",
                "egress": f"http://127.0.0.1:{egress_port}/v1/chat/completions",
                **({"litellm": f"http://127.0.0.1:{peer_port}/v1/chat/completions"} if peer_port else {}),
            },
            # LiteLLM bridges /v1/responses for an Anthropic model through its chat translation.
            TRANSLATED_RESPONSES: {
                "direct": f"http://127.0.0.1:{upstream_port}/stream/v1/messages",
                "egress": f"http://127.0.0.1:{egress_port}/v1/responses",
                **({"litellm": f"http://127.0.0.1:{peer_port}/v1/responses"} if peer_port else {}),
            },
        }
        bodies = {
            TRANSLATED_JSON: anthropic_bodies.CHAT_REQUEST,
            TRANSLATED_SSE: STREAM_REQUEST,
            TRANSLATED_RESPONSES: RESPONSES_STREAM_REQUEST,
        }
        for scenario, body in bodies.items():
            (workdir / f"{scenario}.lua").write_text(POST_BODY_LUA % (body, "bench-byo-key"))
            (workdir / f"{scenario}-peer.lua").write_text(POST_BODY_LUA % (body, PEER_MASTER_KEY))
            for target, url in scenarios[scenario].items():
                token = PEER_MASTER_KEY if target == "litellm" else "bench-byo-key"
                check_translated(scenario, target, url, body, token)
        results: dict[str, dict[str, list[dict]]] = {name: {t: [] for t in urls} for name, urls in scenarios.items()}
        egress_cpu: dict[tuple[str, str], list[float]] = {}
        for scenario, urls in scenarios.items():
            if scenario in TRANSLATED:
                lua, virtual, peer = (workdir / f"{scenario}.lua", None, workdir / f"{scenario}-peer.lua")
            else:
                lua = workdir / "post.lua" if scenario == "small JSON" else workdir / "get.lua"
                if not lua.exists():
                    lua.write_text('wrk.headers["Authorization"] = "Bearer bench-byo-key"\n')
                virtual = workdir / "post-virtual.lua" if scenario == "small JSON" else workdir / "get-virtual.lua"
                if not virtual.exists():
                    virtual.write_text(f'wrk.headers["Authorization"] = "Bearer {virtual_key}"\n')
                peer = workdir / "post-peer.lua"
                peer.write_text((POST_LUA % PEER_MASTER_KEY) if scenario == "small JSON" else "")
            scripts = {
                target: virtual if target == "egress, full" else peer if target == "litellm" else lua for target in urls
            }
            if "portkey" in urls:
                scripts["portkey"] = workdir / "post-portkey.lua"
                scripts["portkey"].write_text(
                    (POST_LUA % "bench-byo-key")
                    + 'wrk.headers["x-portkey-provider"] = "openai"\n'
                    + f'wrk.headers["x-portkey-custom-host"] = "http://127.0.0.1:{upstream_port}/v1"\n'
                )
            connections = {target: args.connections for target in urls}
            if scenario in (TRANSLATED_SSE, TRANSLATED_RESPONSES) and "litellm" in urls:
                connections["litellm"] = LITELLM_STREAM_CONNECTIONS
            for target, url in urls.items():  # warm-up: pools, caches
                run_wrk(url, scripts[target], 1, connections[target])
            for round_index in range(args.rounds):
                for target, url in urls.items():
                    pid = egress_pids.get(target)
                    before = tree_cpu_seconds(pid) if pid else 0.0
                    # A LiteLLM stream under load outlasts wrk's default 2 s timeout: give it time.
                    timeout = 30 if scenario in TRANSLATED else None
                    result = run_wrk(url, scripts[target], args.duration, connections[target], watch, timeout=timeout)
                    if pid:
                        requests = result["rps"] * args.duration
                        spent = (tree_cpu_seconds(pid) - before) / requests * 1000
                        egress_cpu.setdefault((scenario, target), []).append(spent)
                    results[scenario][target].append(result)
                    print(
                        f"  {scenario:14} round {round_index + 1} {target:12} {result['rps']:>10.0f} req/s "
                        f"p50 {result['p50_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms",
                        file=sys.stderr,
                    )
        latency: dict[str, dict[str, dict]] = {}
        if shutil.which("h2load") is not None:
            body = workdir / "body.json"
            body.write_text('{"model":"gpt-bench","messages":[{"role":"user","content":"hi"}]}')
            egress_max = statistics.median(run["rps"] for run in results["small JSON"]["egress"])
            rate = int(egress_max / 2)
            for arrivals in ("spread", "bursts"):
                rows = latency[arrivals] = {}
                for target in ("direct", "nginx-proxy", "egress"):
                    rounds = [
                        open_loop_latency(
                            scenarios["small JSON"][target],
                            body,
                            {"Authorization": "Bearer bench-byo-key", "Content-Type": "application/json"},
                            rate,
                            args.duration,
                            workdir / f"h2load-{arrivals}-{target}-{index}",
                            arrivals,
                        )
                        for index in range(args.rounds)
                    ]
                    rows[target] = {
                        key: statistics.median(run[key] for run in rounds) for key in ("rate", "p50_ms", "p99_ms")
                    }
        sse_timing = sse_event_timing(workdir)
        stream_targets = first_token_targets(upstream_port, egress_port)
        ttft = {
            "nginx": first_token_rounds(stream_targets, args.rounds),
            "paced": paced_first_token(workdir, args.rounds),
        }
        if peer_port is not None:
            # LiteLLM in rounds of its own: its work after each response (logging, spend tracking)
            # runs on while the next request is timed, and would be charged to whoever came next.
            peer = {"direct": stream_targets["direct"]}
            peer["litellm"] = (
                peer_port,
                "/v1/chat/completions",
                STREAM_REQUEST,
                PEER_MASTER_KEY,
                LITELLM_TTFT_REQUESTS,
            )
            ttft["nginx"]["litellm"] = first_token_rounds(peer, args.rounds)["litellm"]
        idle = idle_connection_memory(egress_port, egress_pids["egress"], args.idle_connections)
        report = render(results, egress_cpu, args, verification_costs(), idle, latency, sse_timing, ttft)
        print(report)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "latest.md").write_text(report)
        chart(results, latency.get("spread", {}), RESULTS / "latest.png")
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.paced if args.paced is not None else args.peers:
        # Alone on the machine, after the rest has stopped: it pins the gateway and the load apart.
        import paced  # bench/paced.py; imported here, since it imports this module itself

        section = paced.paced_section(peers=args.peers, full=True, spreads=("interval", "stream"))
        print(section)
        (RESULTS / "latest.md").write_text((RESULTS / "latest.md").read_text() + "\n" + section)
    return 0


def sse_event_timing(workdir: Path) -> dict[str, float]:
    """Added time to first event and inter-event jitter, with a chunk-per-event upstream (1 ms pacing)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import sse_timing

    upstream_port, egress_port = free_port(), free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-c", sse_timing.UPSTREAM_CODE, str(upstream_port), str(sse_timing.EVENTS), "0.001"]
    )
    config = workdir / "egress-sse.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{egress_port}"\naccess_log = "off"\nadmin_listen = "off"\n\n'
        f'[providers.sse]\nbase_url = "http://127.0.0.1:{upstream_port}"\n'
    )
    egress = subprocess.Popen(
        [sys.executable, "-m", "egress", "serve", "--config", str(config), "--workers", "1"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(upstream_port)
        wait_for_port(egress_port)
        return sse_timing.compare(egress_port, upstream_port)
    finally:
        for process in (upstream, egress):
            process.terminate()
            process.wait(timeout=10)


def check_translated(scenario: str, target: str, url: str, body: str, token: str) -> None:
    """One request before the load: each target answers 200 with the body its row stands for."""
    import urllib.request

    request = urllib.request.Request(
        url, body.encode(), {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        status, data = response.status, response.read()
    marks = {
        (TRANSLATED_JSON, "direct"): b'"type":"message"',
        (TRANSLATED_SSE, "direct"): b"event: message_stop",
    }
    marks[(TRANSLATED_RESPONSES, "direct")] = b"event: message_stop"
    default = {TRANSLATED_JSON: b'"chat.completion"', TRANSLATED_RESPONSES: b"response.completed"}
    mark = marks.get((scenario, target), default.get(scenario, b"data: [DONE]"))
    if status != 200 or mark not in data:
        raise RuntimeError(f"bench: {scenario}, {target}: {status} {data[:300]!r}")
    if scenario in (TRANSLATED_SSE, TRANSLATED_RESPONSES):
        print(f"  {scenario}: {target} sends {data.count(b'data:')} data lines per stream", file=sys.stderr)


class FirstTokenClient:
    """One keep-alive connection that sends a streamed request and times its first token: seconds
    from sending to the arrival of the first token's text (the same in either dialect)."""

    def __init__(self, port: int, path: str, body: str, token: str) -> None:
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}"
        ).encode()
        self.where = f"127.0.0.1:{port}{path}"
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def once(self) -> float:
        import httptools

        class Response:
            done = False

            def on_message_complete(self) -> None:
                self.done = True

        mark = anthropic_bodies.FIRST_TOKEN_MARK
        response = Response()
        parser = httptools.HttpResponseParser(response)
        first, tail = None, b""
        started = time.perf_counter()
        self.sock.sendall(self.request)
        while not response.done:
            data = self.sock.recv(262144)
            now = time.perf_counter()
            if not data:
                raise RuntimeError(f"bench: {self.where} closed mid-response")
            if first is None:
                if mark in tail + data:
                    first = now - started
                tail = data[-len(mark) :]
            parser.feed_data(data)
        if parser.get_status_code() != 200 or first is None:
            raise RuntimeError(f"bench: {self.where}: status {parser.get_status_code()}, no first token")
        return first

    def close(self) -> None:
        self.sock.close()


def first_token_targets(upstream_port: int, egress_port: int) -> dict[str, tuple[int, str, str, str, int]]:
    """The translated stream, direct from the upstream and through egress as chat and as Responses."""
    return {
        "direct": (upstream_port, "/stream/v1/messages", MESSAGES_STREAM_REQUEST, "bench-byo-key", TTFT_REQUESTS),
        "egress": (egress_port, "/v1/chat/completions", STREAM_REQUEST, "bench-byo-key", TTFT_REQUESTS),
        "egress, responses": (egress_port, "/v1/responses", RESPONSES_STREAM_REQUEST, "bench-byo-key", TTFT_REQUESTS),
    }


def first_token_rounds(targets: dict[str, tuple[int, str, str, str, int]], rounds: int) -> dict[str, list[list[float]]]:
    """Time to first token of each target (port, path, body, token, requests), request by request:
    the targets take turns on every request (in an order that rotates), one keep-alive connection
    each per round, so a moment of noise on the machine falls on all of them alike. The first
    request of each connection (it opens egress's upstream connection) is not counted.
    """
    found: dict[str, list[list[float]]] = {name: [] for name in targets}
    names = list(targets)
    for _ in range(rounds):
        clients = {name: FirstTokenClient(*targets[name][:4]) for name in names}
        try:
            times: dict[str, list[float]] = {name: [] for name in names}
            for client in clients.values():
                client.once()
            for index in range(max(targets[name][4] for name in names)):
                shift = index % len(names)
                for name in names[shift:] + names[:shift]:
                    if index < targets[name][4]:
                        times[name].append(clients[name].once())
            for name in names:
                found[name].append(times[name])
        finally:
            for client in clients.values():
                client.close()
    return found


def paced_first_token(workdir: Path, rounds: int) -> dict[str, list[list[float]]]:
    """Time to first token with a paced Anthropic upstream (one event per chunk, 1 ms after each
    token), direct and through a one-worker egress configured as the `egress` row.
    """
    upstream_port, egress_port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, anthropic_bodies.__file__, str(upstream_port), "0.001"])
    config = workdir / "egress-paced.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{egress_port}"\naccess_log = "off"\nadmin_listen = "off"\n\n'
        "[usage]\nenabled = false\n" + translated_rows(upstream_port)
    )
    egress = subprocess.Popen(
        [sys.executable, "-m", "egress", "serve", "--config", str(config), "--workers", "1"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(upstream_port)
        wait_for_port(egress_port)
        return first_token_rounds(first_token_targets(upstream_port, egress_port), rounds)
    finally:
        for process in (upstream, egress):
            process.terminate()
            process.wait(timeout=10)


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def chart(results: dict, latency: dict[str, dict], path: Path) -> None:
    """Throughput per scenario and target, and open-loop latency, as one PNG (needs `.[bench]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: no chart (pip install -e '.[bench]' for matplotlib)", file=sys.stderr)
        return
    panels = len(results) + (1 if latency else 0)
    figure, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    for axis, (scenario, targets) in zip(axes, results.items(), strict=False):
        names = list(targets)
        rates = [statistics.median(run["rps"] for run in targets[name]) for name in names]
        bars = axis.bar(
            range(len(names)), rates, color=["#888" if not n.startswith("egress") else "#2a6" for n in names]
        )
        axis.bar_label(bars, labels=[f"{rate / 1000:.1f}k" for rate in rates], fontsize=8)
        axis.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
        axis.set_title(f"{scenario}: requests/s (median)", fontsize=10)
    if latency:
        axis = axes[-1]
        names = list(latency)
        positions = range(len(names))
        axis.bar([p - 0.2 for p in positions], [latency[n]["p50_ms"] for n in names], width=0.4, label="p50")
        axis.bar([p + 0.2 for p in positions], [latency[n]["p99_ms"] for n in names], width=0.4, label="p99")
        axis.set_xticks(list(positions), names, fontsize=8)
        axis.set_title(f"latency at {latency['direct']['rate']:.0f} req/s, arrivals spread (ms)", fontsize=10)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _bench_issuer() -> tuple[str, str]:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from egress.vkeys import mint, public_key_text

    issuer = Ed25519PrivateKey.generate()
    return public_key_text(issuer.public_key()), mint(issuer, "bench")[0]


def _translated_ratios(scenario: str, medians: dict[str, dict], passthrough_rps: float) -> list[str]:
    """The ratio rows of a translated scenario: against egress's own passthrough, LiteLLM and direct."""
    rps = medians["egress"]["rps"]
    peer = medians.get("litellm")
    versus = ""
    if peer:  # none of LiteLLM's responses may have finished within the run
        versus = f", /litellm **{rps / peer['rps']:.0f}**" if peer["rps"] else ", /litellm (none finished)"
    if scenario == TRANSLATED_JSON:
        return [
            f"| {scenario} | **ratio, egress** | /egress passthrough (small JSON) **{rps / passthrough_rps:.2f}**"
            f"{versus}, /direct **{rps / medians['direct']['rps']:.2f}** | | | | |"
        ]
    events = anthropic_bodies.STREAM_EVENTS
    per_target = ", ".join(f"{target} **{row['rps'] * events:,.0f}**" for target, row in medians.items())
    return [
        f"| {scenario} | **events/s** | {per_target} | | | | |",
        f"| {scenario} | **ratio, egress** | /direct **{rps / medians['direct']['rps']:.2f}**{versus} | | | | |",
    ]


def _translated_summary(
    translated: dict[str, dict[str, dict]], passthrough_rps: float, ttft: dict[str, dict[str, list[list[float]]]]
) -> list[str]:
    """Time to first token through the translation, and the acceptance targets, met or not."""
    events = anthropic_bodies.STREAM_EVENTS
    lines = [
        f"Translated rows: `POST /v1/chat/completions` for a Claude model, BYO key, through the `egress` process "
        f"(one worker), to nginx serving an Anthropic Messages body (JSON, or a {events}-event SSE stream: "
        "message_start, content_block_start, ping, text deltas, content_block_stop, message_delta, message_stop); "
        "`litellm` does the same translation. `direct` is nginx's Anthropic body itself, untranslated. "
        f"events/s = {events} upstream events x req/s. LiteLLM's stream row runs with "
        f"{LITELLM_STREAM_CONNECTIONS} connections (at 50 its streams outlast the run), its time to first token "
        f"over {LITELLM_TTFT_REQUESTS} requests a round, in rounds of its own after the others (what it does "
        "after each response runs on into the next request's time).",
        "",
        f"Time to first token, translated stream: {TTFT_REQUESTS} requests a round, one at a time over one "
        "keep-alive connection per target, the targets taking turns request by request (bench/run.py "
        "first_token_rounds), the first token's text found in the response as it arrives; percentiles over "
        "every round's requests together, and the added time is egress's percentile less direct's, measured "
        "side by side. `nginx`: the stream above, sent whole at once, so through a proxy the first token waits "
        "for the first read's first events to be transcoded. `paced`: an upstream sending "
        f"{anthropic_bodies.PACED_EVENTS} events one per chunk, 1 ms after each token (bench/anthropic_bodies.py), "
        "as a provider streams, through a second one-worker egress configured as the `egress` row.",
        "",
        "| upstream | target | requests | p50 ms | p99 ms | added p50 ms | added p99 ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    added_p99: dict[str, float] = {}
    for upstream, rows in ttft.items():
        pooled = {target: [time for times in rounds for time in times] for target, rounds in rows.items()}
        cuts = {
            target: (statistics.median(times) * 1000, _percentile(times, 0.99) * 1000)
            for target, times in pooled.items()
        }
        direct = cuts["direct"]
        for target, (p50, p99) in cuts.items():
            count = len(pooled[target])
            if target == "direct":
                lines.append(f"| {upstream} | {target} | {count} | {p50:.3f} | {p99:.3f} | | |")
                continue
            more_p50, more_p99 = p50 - direct[0], p99 - direct[1]
            if target.startswith("egress"):
                added_p99[f"{upstream} upstream, {'chat' if target == 'egress' else 'responses'}"] = more_p99
            lines.append(
                f"| {upstream} | {target} | {count} | {p50:.3f} | {p99:.3f} | {more_p50:.3f} | {more_p99:.3f} |"
            )
    json_rows, sse_rows = translated[TRANSLATED_JSON], translated[TRANSLATED_SSE]
    share = json_rows["egress"]["rps"] / passthrough_rps
    rate = sse_rows["egress"]["rps"] * events
    checks = [
        (
            f"translated JSON >= {TARGETS['passthrough_share']} x egress passthrough req/s",
            f"{share:.2f} x",
            share >= TARGETS["passthrough_share"],
        ),
    ]
    if "litellm" in json_rows:
        multiple = json_rows["egress"]["rps"] / json_rows["litellm"]["rps"]
        checks.append(
            (
                f"translated JSON >= {TARGETS['litellm_multiple']} x LiteLLM req/s",
                f"{multiple:.0f} x",
                multiple >= TARGETS["litellm_multiple"],
            )
        )
    checks.append(
        (f"transcoded SSE >= {TARGETS['events_per_s']:,} events/s", f"{rate:,.0f}", rate >= TARGETS["events_per_s"])
    )
    responses_rows = translated.get(TRANSLATED_RESPONSES, {})
    if "litellm" in responses_rows and responses_rows["litellm"]["rps"]:
        multiple = responses_rows["egress"]["rps"] / responses_rows["litellm"]["rps"]
        checks.append(
            (
                f"translated Responses SSE >= {TARGETS['litellm_multiple']} x LiteLLM's /v1/responses",
                f"{multiple:.0f} x",
                multiple >= TARGETS["litellm_multiple"],
            )
        )
    checks += [
        *(
            (
                f"added time to first token <= {TARGETS['ttft_p99_added_ms']} ms p99, {upstream}",
                f"{added:.3f} ms",
                added <= TARGETS["ttft_p99_added_ms"],
            )
            for upstream, added in added_p99.items()
        ),
    ]
    lines += ["", "| target (one worker) | measured | |", "|---|---:|---|"]
    lines += [f"| {name} | {value} | {'met' if met else '**missed**'} |" for name, value, met in checks]
    return lines


def render(
    results: dict,
    egress_cpu: dict[tuple[str, str], list[float]],
    args: argparse.Namespace,
    verification: dict,
    idle: dict[str, float],
    latency: dict[str, dict],
    sse: dict[str, float],
    ttft: dict[str, dict[str, list[list[float]]]],
) -> str:
    lines = [
        f"# egress bench: {args.rounds} rounds x {args.duration}s, {args.connections} connections, wrk -t1, "
        f"loopback, {os.cpu_count()} cores",
        "",
        "Medians over rounds. `egress`: BYO key, limiter and meter off, no access log. `egress, full`:",
        "virtual key, limiter, usage meter and JSONL facts, access log to a file. Every process shares",
        "the same cores: with wrk, the upstream and the proxy on two cores, the proxied rows are partly",
        "limited by the load generator and the upstream.",
        "",
        "| scenario | target | req/s | p50 ms | p99 ms | MB/s | egress CPU-s per 1k req | limited by |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    passthrough_rps = statistics.median(run["rps"] for run in results["small JSON"]["egress"])
    translated: dict[str, dict[str, dict]] = {}
    for scenario, targets in results.items():
        medians = {}
        for target, runs in targets.items():
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            medians[target] = median
            spent = egress_cpu.get((scenario, target))
            cpu = f"{statistics.median(spent):.3f}" if spent else ""
            # A process near one full core (wrk and the upstream nginx run one thread each) is the cap.
            limits = [name for name in ("wrk", "upstream") if median.get(f"busy_{name}", 0) >= 0.9]
            limited = ", ".join({"wrk": "load generator", "upstream": "upstream"}[name] for name in limits)
            lines.append(
                f"| {scenario} | {target} | {median['rps']:.0f} | {median['p50_ms']:.3f} | {median['p99_ms']:.3f} "
                f"| {median['bytes_per_s'] / 1024**2:.1f} | {cpu} | {limited} |"
            )
            if median["non_2xx"]:
                lines.append(f"| | ({target}: {median['non_2xx']:.0f} non-2xx responses) | | | | | |")
        if scenario in TRANSLATED:
            translated[scenario] = medians
            lines += _translated_ratios(scenario, medians, passthrough_rps)
            continue
        for target in (name for name in medians if name.startswith("egress")):
            rps = medians[target]["rps"]
            peer = f", /litellm **{rps / medians['litellm']['rps']:.0f}**" if "litellm" in medians else ""
            if "portkey" in medians:
                peer += f", /portkey **{rps / medians['portkey']['rps']:.2f}**"
            lines.append(
                f"| {scenario} | **ratio, {target}** | /nginx-proxy **{rps / medians['nginx-proxy']['rps']:.2f}**, "
                f"/direct **{rps / medians['direct']['rps']:.2f}**{peer} | | | | |"
            )
    lines += ["", *_translated_summary(translated, passthrough_rps, ttft)]
    lines += [
        "",
        "Virtual-key check, in process (signature verification is skipped once a key is cached):",
        "",
        "| verification | µs per request |",
        "|---|---:|",
        f"| cold (first use: Ed25519 verify) | {verification['cold_us']:.1f} |",
        f"| warm (cached) | {verification['warm_us']:.2f} |",
        f"| forged, a new one each time, one address past its burst | {verification['forged_us']:.2f} |",
        f"| forged, the same one again | {verification['forged_again_us']:.2f} |",
        "",
    ]
    if latency:
        rate = latency["spread"]["direct"]["rate"]
        lines += [
            f"Open-loop latency, small JSON at {rate:.0f} req/s (half of egress's closed-loop maximum), h2load --rps "
            "over 10 connections. `spread`: ten h2load processes, requests arriving one by one; `bursts`: one "
            "h2load process, whose ten connections send together on each tick.",
            "",
            "| arrivals | target | p50 ms | p99 ms | added p50 ms | added p99 ms |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for arrivals, rows in latency.items():
            direct = rows["direct"]
            for target, row in rows.items():
                lines.append(
                    f"| {arrivals} | {target} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} "
                    f"| {row['p50_ms'] - direct['p50_ms']:.3f} | {row['p99_ms'] - direct['p99_ms']:.3f} |"
                )
        lines.append("")
    else:
        lines += ["Open-loop latency: skipped, h2load is not installed (apt-get install -y nghttp2-client).", ""]
    lines += [
        f"SSE timing, chunk-per-event upstream pacing 1 ms, {sse['streams']:.0f} streams and {sse['events']:.0f} "
        f"events in all over one keep-alive connection (meter on): egress adds {sse['ttft_p50_added_ms']:.3f} ms p50 / "
        f"{sse['ttft_p99_added_ms']:.3f} ms p99 to the first event, and {sse['gap_p99_added_ms']:.3f} ms to the "
        f"p99 gap between events ({sse['gap_p99_direct_ms']:.3f} ms direct, {sse['gap_p99_egress_ms']:.3f} ms "
        "through egress).",
        "",
        f"Idle keep-alive connections (each served one request, then held): {idle['count']:.0f} connections "
        f"cost egress {idle['total_mib']:.1f} MiB resident, {idle['per_connection_kib']:.1f} KiB each.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

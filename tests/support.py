"""Test support: start the real `egress` process as an operator would, and talk raw HTTP to it.

Every response read here goes through h11, an HTTP parser independent of egress's own, so each
raw-socket test also proves egress's output is well-formed HTTP/1.1 (status line, framing,
keep-alive).
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h11
import orjson
from prometheus_client.parser import text_string_to_metric_families


def egress_command() -> list[str]:
    """The installed console script, as an operator runs it; the module if it isn't on PATH."""
    script = Path(sys.executable).with_name("egress")
    if script.exists():
        return [str(script)]
    found = shutil.which("egress")
    return [found] if found else [sys.executable, "-m", "egress"]


def run_egress_cli(*args: str) -> subprocess.CompletedProcess:
    """One `egress …` command, as an operator types it, with its output captured."""
    return subprocess.run([*egress_command(), *args], capture_output=True, text=True, timeout=30)


def cut_into(stream: bytes, sizes: list[int]) -> list[bytes]:
    """`stream` in pieces of `sizes` bytes, then the rest: how a socket may hand it over."""
    pieces, position = [], 0
    for size in sizes:
        pieces.append(stream[position : position + size])
        position += size
    pieces.append(stream[position:])
    return pieces


def whole_lines(data: bytes) -> list[bytes]:
    """The lines of a log or usage file that egress has finished writing (a read may land mid-write)."""
    return data[: data.rfind(b"\n") + 1].splitlines()


class EgressProcess:
    def __init__(self, workdir: Path, config_text: str, name: str = "egress", workers: int = 1) -> None:
        self.workers = workers
        self.workdir = workdir
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(config_text)
        self.stdout_path = workdir / f"{name}.stdout.log"
        self.stderr_path = workdir / f"{name}.stderr.log"
        self.port = 0
        self.admin_port = 0
        self.process: subprocess.Popen | None = None

    def serve_args(self) -> list[str]:
        """What follows `egress serve` besides the admin address and the worker count."""
        return ["--config", str(self.config_path), "--listen", "127.0.0.1:0"]

    def start(self, timeout: float = 15.0) -> EgressProcess:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [
                    *egress_command(),
                    "serve",
                    *self.serve_args(),
                    "--admin-listen",
                    "127.0.0.1:0",
                    "--workers",
                    str(self.workers),
                ],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
            )
        give_up_at = time.monotonic() + timeout
        while time.monotonic() < give_up_at:
            logged = self.stderr_path.read_bytes()
            match = re.search(rb'"event":"listening","address":"[^"]*:(\d+)"', logged)
            ready = self.workers == 1 or b'"event":"supervisor_ready"' in logged
            if match and ready:
                self.port = int(match.group(1))
                admin = re.search(rb'"event":"admin_listening","address":"[^"]*:(\d+)"', logged)
                self.admin_port = int(admin.group(1))
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"egress exited with {self.process.returncode}:\n{self.logs()}")
            time.sleep(0.02)
        raise RuntimeError(f"egress did not start within {timeout}s:\n{self.logs()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def logs(self) -> str:
        out = self.stdout_path.read_text(errors="replace") if self.stdout_path.exists() else ""
        err = self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""
        return f"--- stdout ---\n{out}\n--- stderr ---\n{err}"

    def access_records(self) -> list[dict]:
        return [orjson.loads(line) for line in whole_lines(self.stdout_path.read_bytes()) if line.strip()]

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool
    informational: list[int] = field(default_factory=list)
    header_list: list[tuple[str, str]] = field(default_factory=list)  # in order, repeats kept

    def json(self) -> dict:
        return orjson.loads(self.body)

    @property
    def error_code(self) -> str | None:
        document = self.json()
        return document["error"].get("code")


class RawClient:
    """A socket that sends whatever bytes a test likes and parses the answers with h11."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.parser = h11.Connection(h11.CLIENT)
        self.eof = False

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_response(self, method: str = "GET") -> RawResponse:
        """Parse the next response; `method` tells h11 how the request it answers was framed."""
        parser = self.parser
        if parser.our_state is h11.DONE and parser.their_state is h11.DONE:
            parser.start_next_cycle()
        # h11 only parses a response to a request it saw sent; the real bytes went out raw.
        parser.send(h11.Request(method=method, target="/", headers=[("host", "egress")]))
        parser.send(h11.EndOfMessage())
        informational: list[int] = []
        response = None
        body = bytearray()
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError:
                if self.eof and response is not None:
                    return _raw(response, body, False, informational)  # cut mid-body: incomplete
                raise
            if event is h11.NEED_DATA:
                data = b"" if self.eof else self.sock.recv(65536)
                self.eof = not data
                parser.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                informational.append(event.status_code)
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return _raw(response, body, True, informational)
            elif isinstance(event, h11.ConnectionClosed):
                return _raw(response, body, False, informational)

    def server_closed(self, timeout: float = 3.0) -> bool:
        """True when the server closes the connection (EOF or reset) within `timeout`."""
        if self.eof:
            return True
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def keeps_alive(self) -> bool:
        return self.parser.our_state is h11.DONE and self.parser.their_state is h11.DONE


def _raw(response, body: bytearray, complete: bool, informational: list[int]) -> RawResponse:
    assert response is not None, "the connection closed before a response"
    header_list = [(name.decode().lower(), value.decode("latin-1")) for name, value in response.headers]
    return RawResponse(response.status_code, dict(header_list), bytes(body), complete, informational, header_list)


# Of no provider's known key form (providers.KeyFormats): every route takes it as the caller's own.
BYO_TEST_KEY = "byo-raw-test-key"


def request_bytes(
    method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b"", credential: bool = True
) -> bytes:
    """One HTTP/1.1 request; carries a BYO key unless `credential` is false or the caller sets one."""
    headers = dict(headers or {})
    if credential and not any(name.lower() in ("authorization", "x-api-key") for name in headers):
        headers["Authorization"] = f"Bearer {BYO_TEST_KEY}"
    lines = [f"{method} {target} HTTP/1.1", "Host: egress.test"]
    for name, value in headers.items():
        lines.append(f"{name}: {value}")
    if body and not any(name.lower() in ("content-length", "transfer-encoding") for name in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def wait_until(predicate, timeout: float, interval: float = 0.01) -> bool:
    give_up_at = time.monotonic() + timeout
    while time.monotonic() < give_up_at:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def nats_server_binary() -> str:
    found = shutil.which("nats-server") or shutil.which("nats-server", path="/usr/sbin:/usr/bin")
    if found is None:
        raise RuntimeError("nats-server is not installed (.ci/run installs it: apt-get install -y nats-server)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class NatsServer:
    """A real JetStream server on loopback; its store survives a restart, like a deployed one."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.store = workdir / "jetstream"
        self.log = workdir / "nats-server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [nats_server_binary(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.store)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        ready = wait_until(self._accepting, timeout=10, interval=0.05)
        assert ready, self.log.read_text()
        return self

    def _accepting(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
            return True
        except OSError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


class LoopbackServer:
    """A thread-per-connection TCP server on 127.0.0.1 for test upstreams; `_serve(conn)` is theirs.

    Every wait is bounded (0.2 s socket timeouts, checked against `stopping`), and `stop()` closes
    every connection and joins every thread, so a test never leaves one behind.
    """

    def __init__(self, backlog: int = 16) -> None:
        self.connections = 0
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(backlog)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._open: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _requests(self, conn: socket.socket, parse):
        """Each request `parse(buffer) -> (request, rest) | None` finds on `conn`, until it closes or
        the server stops."""
        try:
            conn.settimeout(0.2)
        except OSError:  # closed by stop() before this thread got to it
            return
        buffer = b""
        while not self._stop.is_set():
            parsed = parse(buffer)
            if parsed is None:
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                continue
            request, buffer = parsed
            yield request

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        for conn in list(self._open):
            try:
                conn.close()
            except OSError:
                pass
        for thread in [self._accepter, *self._threads]:
            thread.join(timeout=2)


class ScriptedUpstream(LoopbackServer):
    """A plain-HTTP upstream on loopback that answers the Nth request with the Nth scripted reply.

    For upstream behaviour no real provider shows on purpose (a 101, a spoofed egress header, an
    odd Transfer-Encoding, no answer at all): each reply is raw bytes written as they are, or
    `HANG` (read the request, never answer). A tuple `(bytes, after)` says what follows the bytes:
    `True` or `"close"` an orderly close, `"reset"` a TCP reset, `"hang"` silence with the
    connection open. Requests are recorded as received.
    """

    HANG = object()

    def __init__(self, replies: list) -> None:
        self.replies = list(replies)
        self.requests: list[bytes] = []
        super().__init__()

    def _serve(self, conn: socket.socket) -> None:
        for request in self._requests(conn, _split_request):
            self.requests.append(request)
            reply = self.replies.pop(0) if self.replies else self.HANG
            if reply is self.HANG:
                while not self._stop.is_set():
                    time.sleep(0.05)
                return
            data, after = reply if isinstance(reply, tuple) else (reply, False)
            try:
                conn.sendall(data)
            except OSError:
                return
            if after == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                return
            if after == "hang":
                while not self._stop.is_set():
                    time.sleep(0.05)
                return
            if after:
                conn.close()
                return


def _split_request(buffer: bytes) -> tuple[bytes, bytes] | None:
    """One Content-Length-framed request off the front of `buffer` (its raw bytes), or None for more."""
    head_end = buffer.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    length = re.search(rb"(?im)^content-length:\s*(\d+)", buffer[: head_end + 4])
    total = head_end + 4 + (int(length.group(1)) if length else 0)
    return (buffer[:total], buffer[total:]) if len(buffer) >= total else None


def admin_get(port: int, path: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def samples(port: int) -> dict[tuple[str, frozenset], float]:
    status, body = admin_get(port, "/metrics")
    assert status == 200
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found, name: str, **labels: str) -> float:
    """The sum of `name`'s samples that carry `labels` (and any others), as PromQL's sum() would."""
    wanted = frozenset(labels.items())
    return sum(sample for (sample_name, have), sample in found.items() if sample_name == name and wanted <= have)


def run_node_script(script: Path, args: list[str], env: dict[str, str]) -> dict:
    """Run one scenario of a tests/node script, as a Node app runs it: its last line out is JSON."""
    node = shutil.which("node")
    assert node is not None, "node is not on PATH: `.ci/run` installs it"
    done = subprocess.run(
        [node, str(script), *args], cwd=script.parent, env=env, capture_output=True, text=True, timeout=30, check=False
    )
    shown = f"node {' '.join(args)} exited {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    print(shown)
    assert done.returncode == 0 and done.stdout.strip(), shown
    return orjson.loads(done.stdout.strip().splitlines()[-1])

"""The HTTP health probe against real servers on loopback: a real haproxy with a monitor-uri,
Python http.server for ordinary answers, raw sockets for servers that misbehave (silent,
trickling, not HTTP), TLS with a self-signed certificate, and IPv6 on ::1."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from lbwatch.config import Health
from lbwatch.health import Prober
from tests.conftest import free_port, haproxy_config, needs, reap, server_tls
from tests.util import wait_for

# A correctness bound, not a benchmark: the probe must give up at its deadline, and a shared
# machine may take a while to schedule the thread that notices.
MARGIN = 1.5


def probe(url: str, timeout: float = 1.0) -> tuple[bool, str, float]:
    """(ok, detail, seconds taken) of one probe of ``url``."""
    prober = Prober(Health(url=url, timeout=timeout))
    t0 = time.monotonic()
    result = prober.probe()
    return result.ok, result.detail, time.monotonic() - t0


# ---------------------------------------------------------------------------------------------
# Servers


class Answers(http.server.BaseHTTPRequestHandler):
    """GET /status/NNN answers NNN (302 with a Location from the query); everything else 200.
    Each request's line and headers are recorded on the server."""

    server: HttpServer

    def do_GET(self) -> None:
        self.server.seen.append((self.path, dict(self.headers.items())))
        status, headers = 200, {"Content-Length": "3"}
        if self.path.startswith("/status/"):
            status = int(self.path.split("/")[2].split("?")[0])
        if status == 302:
            headers["Location"] = self.path.split("?", 1)[1]
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


class HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        host: str = "127.0.0.1",
        family: int = socket.AF_INET,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.address_family = family
        self.tls = tls
        self.seen: list[tuple[str, dict[str, str]]] = []
        super().__init__((host, 0), Answers)
        self.port = int(self.server_address[1])

    def get_request(self) -> tuple[socket.socket, object]:
        conn, addr = super().get_request()
        if self.tls is not None:
            # The handshake happens on the handler's thread, at its first read.
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, addr

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that refused our certificate


@contextlib.contextmanager
def serving(server: HttpServer) -> Iterator[HttpServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class RawServer:
    """A TCP listener on 127.0.0.1 that runs ``behave(conn, stop)`` for each connection on its
    own thread; ``stop`` is set when the test ends, so no thread outlives it."""

    def __init__(self, behave: Callable[[socket.socket, threading.Event], None]) -> None:
        self.behave = behave
        self.stop = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.05)
        self.port = int(self.listener.getsockname()[1])
        self.accepted = 0
        self.threads = [threading.Thread(target=self._accept)]
        self.threads[0].start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            self.accepted += 1
            t = threading.Thread(target=self._serve, args=(conn,))
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            with contextlib.suppress(OSError):
                self.behave(conn, self.stop)

    def close(self) -> None:
        self.stop.set()
        for t in list(self.threads):
            t.join(5)
        self.listener.close()


@contextlib.contextmanager
def raw_server(behave: Callable[[socket.socket, threading.Event], None]) -> Iterator[RawServer]:
    server = RawServer(behave)
    try:
        yield server
    finally:
        server.close()


def read_head(conn: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head:
        data = conn.recv(4096)
        if not data:
            break
        head += data
    return head


def silent(conn: socket.socket, stop: threading.Event) -> None:
    """Read the request, never answer."""
    read_head(conn)
    stop.wait(30)


def trickle(answer: bytes, pause: float) -> Callable[[socket.socket, threading.Event], None]:
    """Read the request, then send ``answer`` one byte every ``pause`` seconds."""

    def behave(conn: socket.socket, stop: threading.Event) -> None:
        read_head(conn)
        for i in range(len(answer)):
            conn.sendall(answer[i : i + 1])
            if stop.wait(pause):
                return

    return behave


SLOW_HEAD = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"x" * 200 + b"\r\nContent-Length: 0\r\n\r\n"
SLOW_BODY = b"HTTP/1.1 200 OK\r\nContent-Length: 200\r\n\r\n"


# ---------------------------------------------------------------------------------------------
# A real haproxy


@pytest.fixture
def haproxy(tmp_path: Path, subreaper: None) -> Iterator[tuple[int, int]]:
    """A real haproxy -W as our child, with ``monitor-uri /health``: (monitor port, master
    PID)."""
    monitor = free_port()
    cfg_file = haproxy_config(tmp_path / "haproxy.cfg", free_port(), monitor)
    master = subprocess.Popen(
        ["haproxy", "-W", "-f", str(cfg_file)],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: accepts(monitor), 5, what="haproxy's monitor port")
        yield monitor, master.pid
    finally:
        master.send_signal(signal.SIGTERM)  # -W: the master stops its workers
        try:
            master.wait(5)
        except subprocess.TimeoutExpired:
            master.kill()
            master.wait(5)
        reap()


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs("haproxy")
def test_haproxy_monitor_uri_is_healthy(haproxy: tuple[int, int]) -> None:
    """A real haproxy's monitor-uri answers 200 and the probe reports it as today's detail."""
    url = f"http://127.0.0.1:{haproxy[0]}/health"
    ok, detail, _ = probe(url)
    assert (ok, detail) == (True, f"GET {url}: HTTP 200")


@needs("haproxy")
def test_stopped_haproxy_times_out_and_recovers(haproxy: tuple[int, int]) -> None:
    """haproxy's worker frozen by SIGSTOP (the kernel still accepts connections for it) fails
    the probe at its deadline; after SIGCONT the next probe passes."""
    port, master = haproxy
    url = f"http://127.0.0.1:{port}/health"
    workers = [p.pid for p in psutil.Process(master).children()]
    assert workers and probe(url)[0]
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        ok, detail, took = probe(url, timeout=1.0)
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    assert (ok, detail) == (False, f"GET {url}: no answer within 1 s")
    assert 0.9 <= took < 1.0 + MARGIN, took
    assert probe(url)[:2] == (True, f"GET {url}: HTTP 200")


@needs("haproxy")
def test_probes_leave_no_connection_open(haproxy: tuple[int, int]) -> None:
    """Many probes, passing and failing, leave no file descriptor behind: each closes its own
    connection."""
    good = Prober(Health(url=f"http://127.0.0.1:{haproxy[0]}/health"))
    refused = Prober(Health(url=f"http://127.0.0.1:{free_port()}/health"))
    good.probe()
    before = open_fds()
    for _ in range(25):
        assert good.probe().ok
        assert not refused.probe().ok
    assert open_fds() == before


# ---------------------------------------------------------------------------------------------
# Answers that are not a 2xx


def test_503_is_a_failure() -> None:
    """A 503 fails the probe with its status in the detail; the same server's 200 passes."""
    with serving(HttpServer()) as server:
        base = f"http://127.0.0.1:{server.port}"
        assert probe(f"{base}/health")[:2] == (True, f"GET {base}/health: HTTP 200")
        assert probe(f"{base}/status/503")[:2] == (False, f"GET {base}/status/503: HTTP 503")


def test_redirect_is_a_failure_and_not_followed() -> None:
    """A 302 fails the probe, and the place it points to is never asked."""
    with serving(HttpServer()) as target, serving(HttpServer()) as server:
        elsewhere = f"http://127.0.0.1:{target.port}/health"
        assert probe(elsewhere)[0]  # the target itself would pass
        assert len(target.seen) == 1
        url = f"http://127.0.0.1:{server.port}/status/302?{elsewhere}"
        assert probe(url)[:2] == (False, f"GET {url}: HTTP 302")
        assert len(server.seen) == 1
        assert len(target.seen) == 1


# ---------------------------------------------------------------------------------------------
# The request


def test_request_target_host_header_and_credentials() -> None:
    """The path and query go out as given (spaces percent-encoded), Host names the address and
    port, user:password in the URL becomes Basic auth, and the connection is not kept."""
    with serving(HttpServer()) as server:
        url = f"http://stats:s%40cret@127.0.0.1:{server.port}/haproxy stats/;csv?scope=web&x=1"
        assert probe(url)[0]
        [(target, headers)] = server.seen
    assert target == "/haproxy%20stats/;csv?scope=web&x=1"
    assert headers["Host"] == f"127.0.0.1:{server.port}"
    assert headers["Authorization"] == "Basic c3RhdHM6c0BjcmV0"  # stats:s@cret
    assert headers["Connection"] == "close"


def test_ipv6_literal() -> None:
    """A URL with an IPv6 literal (http://[::1]:PORT/health) reaches the server on ::1, with
    the brackets in the Host header."""
    try:
        server = HttpServer("::1", socket.AF_INET6)
    except OSError as exc:
        pytest.skip(f"cannot bind ::1 on this machine: {exc}")
    with serving(server):
        url = f"http://[::1]:{server.port}/health"
        assert probe(url)[:2] == (True, f"GET {url}: HTTP 200")
        [(_, headers)] = server.seen
    assert headers["Host"] == f"[::1]:{server.port}"


def test_proxy_from_the_environment_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """With http_proxy and all_proxy set, urllib goes through the proxy, the probe does not."""
    with serving(HttpServer()) as proxy, serving(HttpServer()) as server:
        for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{proxy.port}")
        for name in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
        url = f"http://127.0.0.1:{server.port}/health"
        urllib.request.urlopen(url, timeout=5).close()
        assert len(proxy.seen) == 1 and not server.seen  # the environment is in effect
        assert probe(url)[0]
        assert len(proxy.seen) == 1 and len(server.seen) == 1


# ---------------------------------------------------------------------------------------------
# Deadlines


def test_silent_server_times_out_at_the_deadline() -> None:
    """A server that accepts and reads the request but never answers fails the probe after
    about ``timeout`` seconds, not later."""
    with raw_server(silent) as server:
        url = f"http://127.0.0.1:{server.port}/health"
        ok, detail, took = probe(url, timeout=1.0)
    assert (ok, detail) == (False, f"GET {url}: no answer within 1 s")
    assert 0.9 <= took < 1.0 + MARGIN, took


@pytest.mark.parametrize(
    ("answer", "where"), [(SLOW_HEAD, "head"), (SLOW_BODY + b"x" * 200, "body")]
)
def test_trickling_server_cannot_stretch_the_deadline(answer: bytes, where: str) -> None:
    """A 200 sent one byte every 0.2 s (in its head, or in its body) fails at the deadline,
    although every single read gets a byte well within the timeout; given the time, the
    same trickle passes."""
    with raw_server(trickle(answer, 0.2)) as server:
        url = f"http://127.0.0.1:{server.port}/health"
        ok, detail, took = probe(url, timeout=1.0)
    assert (ok, detail) == (False, f"GET {url}: no answer within 1 s"), where
    assert took < 1.0 + MARGIN, took
    short = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    with raw_server(trickle(short, 0.02)) as server:
        ok, detail, took = probe(f"http://127.0.0.1:{server.port}/health", timeout=10.0)
    assert ok, detail


def test_connection_refused_fails_at_once() -> None:
    """Nothing listening: the probe fails with "connection failed" without waiting."""
    url = f"http://127.0.0.1:{free_port()}/health"
    ok, detail, took = probe(url, timeout=5.0)
    assert (ok, detail) == (False, f"GET {url}: connection failed")
    assert took < 1.0


def test_not_http_fails_at_once() -> None:
    """A server that answers something other than HTTP (an SSH banner) and stays open fails
    the probe as soon as its first line is in, not at the deadline."""

    def banner(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
        stop.wait(30)

    with raw_server(banner) as server:
        url = f"http://127.0.0.1:{server.port}/health"
        ok, detail, took = probe(url, timeout=5.0)
    assert (ok, detail) == (False, f"GET {url}: not an HTTP answer")
    assert took < 1.0


def test_closed_without_answer_is_connection_failed() -> None:
    """A server that reads the request and closes without a word: "connection failed"."""
    with raw_server(lambda conn, _stop: read_head(conn) and None) as server:
        url = f"http://127.0.0.1:{server.port}/health"
        assert probe(url)[:2] == (False, f"GET {url}: connection failed")


# ---------------------------------------------------------------------------------------------
# TLS


def test_https_verifies_the_certificate(
    self_signed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """https with a self-signed certificate passes once the certificate is trusted
    (SSL_CERT_FILE) and fails verification otherwise."""
    cert, key = self_signed
    with serving(HttpServer(tls=server_tls(cert, key))) as server:
        url = f"https://127.0.0.1:{server.port}/health"
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert probe(url)[:2] == (True, f"GET {url}: HTTP 200")
        monkeypatch.delenv("SSL_CERT_FILE")
        ok, detail, _ = probe(url)
    assert not ok
    assert detail.startswith(f"GET {url}: TLS failed (")
    assert "self-signed" in detail or "self signed" in detail, detail


def test_https_handshake_is_under_the_deadline() -> None:
    """A server that never answers the TLS handshake fails the probe at the deadline."""
    with raw_server(silent) as server:
        url = f"https://127.0.0.1:{server.port}/health"
        ok, detail, took = probe(url, timeout=1.0)
    assert (ok, detail) == (False, f"GET {url}: no answer within 1 s")
    assert 0.9 <= took < 1.0 + MARGIN, took


# ---------------------------------------------------------------------------------------------
# Configuration and imports


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:99999/health", "http://a..b/health", "https://:8404/health"]
)
def test_invalid_url_fails_every_probe_without_raising(url: str) -> None:
    """A URL the probe cannot use (port out of range, empty label, no host) is reported by
    each probe; neither building the prober nor probing raises, so the agent keeps running."""
    prober = Prober(Health(url=url))
    for _ in range(2):
        result = prober.probe()
        assert not result.ok
        assert result.detail.startswith(f"GET {url}: invalid URL ("), result.detail


IMPORTS = """
import json, sys
from lbwatch.config import Health
from lbwatch.health import Prober
Prober(Health(url=sys.argv[1], timeout=0.5)).probe()
heavy = ("requests", "urllib3", "ssl", "http.client")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


@pytest.mark.parametrize(
    ("url", "loaded"),
    [("http://127.0.0.1:1/health", []), ("https://127.0.0.1:1/health", ["ssl"])],
)
def test_probe_imports_no_http_library(url: str, loaded: list[str]) -> None:
    """Building and running a prober loads neither requests nor urllib3 nor http.client; ssl
    only for an https URL."""
    out = subprocess.run(
        [sys.executable, "-c", IMPORTS, url],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert json.loads(out.stdout) == loaded

"""The metrics listener on its own, in this process (lbwatch/metrics/listener.py): any bytes a
client sends get an HTTP answer and never an exception; a client that never reads its answer
is cut off at the deadline; at the cap with every connection being answered, a new one is
refused at once; a slow client gives way to a new one. The attacks on a running agent are in
tests/test_adversarial_metrics.py."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lbwatch.metrics import listener
from lbwatch.metrics.listener import Listener, answer, parse_head
from tests.conftest import free_port
from tests.util import wait_for


class Big(Collector):
    """One gauge whose help text is ``size`` bytes: an answer larger than the kernel's socket
    buffers (4 MiB for the sender at most, net.ipv4.tcp_wmem), so a client that does not read
    leaves the listener with bytes still to send."""

    def __init__(self, size: int) -> None:
        self.size = size

    def collect(self) -> list[Metric]:
        return [GaugeMetricFamily("big", "x" * self.size, value=1.0)]


def registry(size: int = 0) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Big(size))
    return reg


@pytest.fixture
def serve() -> Iterator[list[Listener]]:
    """Listeners started in the test, closed at its end."""
    started: list[Listener] = []
    yield started
    for one in started:
        one.close()


def start(serve: list[Listener], size: int = 0) -> int:
    port = free_port()
    one = Listener("127.0.0.1", port, registry(size))
    one.start()
    serve.append(one)
    return port


def mute(port: int) -> socket.socket:
    """A client that asks for /metrics with the smallest receive buffer and never reads."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    return s


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def answered(s: socket.socket) -> bool:
    """The server has begun sending ``s`` its answer."""
    try:
        return bool(s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


def read_all(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    chunks = []
    try:
        while chunk := s.recv(1 << 20):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


@given(st.binary(max_size=600))
def test_any_request_head_gets_an_http_answer(head: bytes) -> None:
    """Whatever bytes make up a request head, the listener answers it with an HTTP/1.1 status
    line and a Content-Length, and raises nothing."""
    out = answer(parse_head(head), registry())
    status, _, rest = out.partition(b"\r\n")
    assert status.startswith(b"HTTP/1.1 ")
    assert b"\r\nContent-Length: " in b"\r\n" + rest


def test_parse_head_takes_the_path_and_accept_header() -> None:
    """The request line gives method and path (the query dropped); Accept is found whatever its
    case; anything that is not HTTP/1.x is None."""
    req = parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\naccept: text/plain\r\n")
    assert req == listener.Request("GET", "/metrics", "text/plain")
    assert parse_head(b"GET /metrics") is None
    assert parse_head(b"GET metrics HTTP/1.1") is None
    assert parse_head(b"\x16\x03\x01\x02\x00") is None  # a TLS hello


def test_a_client_that_never_reads_is_cut_off_at_the_deadline(
    serve: list[Listener], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An answer far larger than the socket buffers, to a client that never reads: the
    listener stops sending and closes at the deadline, so the client finds its answer cut
    short when it finally reads."""
    monkeypatch.setattr(listener, "DEADLINE", 1.0)
    port = start(serve, size=16 << 20)
    s = mute(port)
    with s:
        time.sleep(2.0)  # past the deadline, reading nothing
        got = read_all(s, timeout=5.0)
    assert got.startswith(b"HTTP/1.1 200 ")
    assert len(got) < 16 << 20


def test_at_the_cap_with_every_client_being_answered_a_new_one_is_refused_at_once(
    serve: list[Listener], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two connections allowed, both stuck sending an answer their clients do not read: a third
    is answered 503 and closed at once, not left waiting for a slot."""
    monkeypatch.setattr(listener, "MAX_CLIENTS", 2)
    port = start(serve, size=16 << 20)
    stuck = [mute(port), mute(port)]
    try:
        wait_for(lambda: all(answered(s) for s in stuck), 5, what="both being answered")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            began = time.monotonic()
            got = read_all(s, timeout=5.0)
            took = time.monotonic() - began
        assert got.startswith(b"HTTP/1.1 503 "), got[:80]
        assert took < listener.DEADLINE / 2
    finally:
        for s in stuck:
            s.close()


def test_a_slow_client_gives_way_to_a_new_one(
    serve: list[Listener], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two connections allowed, both taken by clients that have sent half a request: a new
    client's scrape is answered, and the oldest slow client is the one let go."""
    monkeypatch.setattr(listener, "MAX_CLIENTS", 2)
    port = start(serve)
    slow: list[socket.socket] = []
    base = fds()
    for _ in range(2):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
        # Accepted (ours and the listener's end) before the next one comes.
        wait_for(lambda: fds() >= base + 2 * len(slow), 5, what="accepted")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert read_all(s, timeout=5.0).startswith(b"HTTP/1.1 200 ")
        assert read_all(slow[0], timeout=5.0) == b""  # closed
        slow[1].setblocking(False)
        with pytest.raises(BlockingIOError):
            slow[1].recv(1)  # still open, still waited for
    finally:
        for s in slow:
            s.close()


def test_close_releases_every_descriptor(serve: list[Listener]) -> None:
    """A listener started and closed with clients connected leaves no descriptor behind, and
    holds what its docstring counts while it runs (listening socket, selector, wake-up pipe)."""
    before = fds()
    port = free_port()
    one = Listener("127.0.0.1", port, registry())
    one.start()
    assert fds() == before + 4
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    wait_for(lambda: fds() == before + 4 + 3 + 3, 5, what="three connections accepted")
    one.close()
    for s in clients:
        s.close()
    assert fds() == before

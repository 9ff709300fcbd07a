"""Adversarial test of the HTTP health probe: is ``health.timeout`` a bound on one probe?

It failed on the requests-based probe of 7e01421 (a 0.5 s timeout, a 6 s probe: requests
bounds each read, not the answer) and passes on the socket probe of 4bcc290, which keeps one
deadline over connect, request and answer; kept as the regression test.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from lbwatch.config import Health
from lbwatch.health import Prober


@pytest.fixture
def trickle() -> Iterator[int]:
    """A server on loopback that answers the probe's GET with a 200 whose 30-byte body comes
    one byte every 0.2 s (6 s in all): what a haproxy stuck behind a slow path, or a monitor
    URL proxied to a struggling backend, looks like. Its port."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    stop = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = srv.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n")
                for _ in range(30):
                    if stop.wait(0.2):
                        return
                    conn.sendall(b"x")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield srv.getsockname()[1]
    stop.set()
    srv.close()
    thread.join(10)


def test_one_probe_ends_within_its_timeout(trickle: int) -> None:
    """A probe is one GET bounded by health.timeout ("no answer within N s"), so that a hung
    haproxy counts as down after `fall` probes. requests' timeout bounds each read, not the
    whole answer: a body that trickles keeps one probe running as long as it trickles, and
    while it runs no other probe starts (the agent runs one at a time), so the health state
    stays what it was, UP included, and keepalived keeps the VIP."""
    prober = Prober(Health(url=f"http://127.0.0.1:{trickle}/health", timeout=0.5))
    try:
        started = time.monotonic()
        result = prober.probe()
        took = time.monotonic() - started
    finally:
        prober.close()
    assert took < 0.5 + 1.0, f"one probe took {took:.1f} s with timeout 0.5 s: {result}"

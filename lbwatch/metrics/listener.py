"""Trust boundary: ``[metrics] listen``, the agent's HTTP listener for Prometheus.

Who can reach it: every local user, unprivileged or not (a TCP port has no owner), and, when
the address is not loopback, anyone who can route to it. What they may do: read the metrics,
``GET /metrics`` (and ``GET /``), the same facts ``lbwatch status`` shows any local user. No
other method or path does anything. What they cannot do, however they connect, send or read:
delay supervision, or make the status or the metrics lie.

- One thread (``lbwatch-metrics``) drives a selector over the listening socket and every
  connection. The agent's loop never waits for it: it hands over each frozen snapshot by
  reference (``output.Exporter.update``) and shares no lock with it.
- At most ``MAX_CLIENTS`` connections at once. At the cap, a new connection displaces the one
  that has spent longest on its request (still sending it, accepted in an earlier turn), so
  clients that send slowly give way to new ones and cannot keep scrapes out; when every
  connection is being answered, the new one is refused at once (503, closed).
- At most ``ACCEPT_RATE`` connections accepted a second. Past that, connections wait in the
  kernel's backlog (no descriptor of the agent's), so a flood of connects costs a bounded
  amount of CPU, and an accepted client has time to send its request before it can be
  displaced (it is read at once: a request is usually there when the connection is taken).
- ``DEADLINE`` seconds for the whole exchange, from accept to the last byte of the answer,
  however slowly the client sends or reads; then the connection is closed.
- A request is its head alone (request line and headers, at most ``MAX_HEAD`` bytes); a body
  is never read. One request per connection (``Connection: close``).
- accept() failing for want of a descriptor (EMFILE, ENFILE) rests the listener for ``PAUSE``
  seconds instead of spinning on a socket that stays readable.

So it holds at most ``DESCRIPTORS`` descriptors: the listening socket, the selector, its wake-up
pipe, the connections, and the one being refused or displacing another.

One thread and a selector, not a pool of threads: a pool of N is unavailable to everyone while
N clients send slowly, and bounding the whole exchange, not each read, needs the same
bookkeeping a selector loop keeps anyway; a connection in the selector costs a descriptor and
a few hundred bytes, no stack. Not the agent's own loop either: a render of /metrics is CPU
work (about a millisecond), and on the loop a client asking over and over would delay every
pidfd wake-up by as much each time; on a thread of its own, the interpreter hands the loop the
GIL within ``sys.getswitchinterval()`` (5 ms) whenever the loop has work. The thread blocks in
the selector with the nearest deadline as its timeout, and for ever when no client is
connected: no polling.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MAX_CLIENTS = 16  # Prometheus servers (an HA pair), an operator's curl, and room to spare
DEADLINE = 5.0  # seconds from accept to the last byte of the answer
MAX_HEAD = 8192  # bytes of request line and headers
BACKLOG = 64
# Connections accepted per second at most (in bursts of MAX_CLIENTS): a flood of connects costs
# the agent that many accept()s a second, and a connection accepted is displaced no sooner than
# MAX_CLIENTS / ACCEPT_RATE seconds (80 ms) later, time enough for any client to send its request.
ACCEPT_RATE = 200.0
PAUSE = 1.0  # seconds the listener rests after accept() ran out of descriptors
# The listening socket, the selector, the wake-up pipe (2), the connections, and one more for
# the moment a new connection is refused or displaces another.
DESCRIPTORS = 4 + MAX_CLIENTS + 1

_SHORT_OF = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_LISTENER, _WAKE = "listener", "wake"


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    accept: str  # the Accept header, "" without one


def parse_head(head: bytes) -> Request | None:
    """The request in ``head`` (the request line and headers, without the blank line that ends
    them); None when it is not an HTTP/1.x request."""
    lines = head.decode("latin-1").split("\n")
    parts = lines[0].rstrip("\r").split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        return None
    accept = ""
    for line in lines[1:]:
        name, sep, text = line.partition(":")
        if sep and name.strip().lower() == "accept":
            accept = text.strip()
    return Request(parts[0], parts[1].split("?", 1)[0], accept)


def response(code: int, kind: str, body: bytes, extra: str = "") -> bytes:
    """A whole HTTP/1.1 answer that closes the connection."""
    head = (
        f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\nContent-Type: {kind}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    )
    return head.encode("latin-1") + body


REFUSED = response(503, "text/plain", b"busy: too many connections\n")
TOO_BIG = response(431, "text/plain", b"request head too large\n")


def answer(request: Request | None, registry: Collector) -> bytes:
    """What the listener says to ``request``: the metrics, in the format the scraper asks for
    (OpenMetrics, or Prometheus's text format), a pointer to them, or a refusal."""
    if request is None:
        return response(400, "text/plain", b"not an HTTP/1.x request\n")
    if request.method != "GET":
        return response(405, "text/plain", b"only GET\n", "Allow: GET\r\n")
    if request.path == "/metrics":
        encode, kind = choose_encoder(request.accept)
        return response(200, kind, encode(registry))
    if request.path == "/":
        return response(200, "text/plain", b"lbwatch: metrics at /metrics\n")
    return response(404, "text/plain", b"not found\n")


def _head_end(data: bytearray) -> tuple[int, int]:
    """Where the head in ``data`` ends and its blank line, or (-1, 0) while it goes on."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        at = data.find(sep)
        if at >= 0:
            return at, len(sep)
    return -1, 0


class _Client:
    """One connection: its request as far as it came, then the answer still to send."""

    __slots__ = ("born", "data", "out", "sock", "turn")

    def __init__(self, sock: socket.socket, born: float, turn: int) -> None:
        self.sock = sock
        self.born = born  # monotonic: the deadline is born + DEADLINE
        self.turn = turn  # the selector turn that accepted it
        self.data = bytearray()
        self.out: memoryview | None = None  # None while the request is being read


class Listener:
    """Serves ``registry`` on (host, port); ``OSError`` from the constructor when it cannot
    bind. ``start`` runs the thread, ``close`` stops it and closes every descriptor."""

    def __init__(self, host: str, port: int, registry: Collector) -> None:
        self.registry = registry
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind((host, port))
            self._sock.listen(BACKLOG)
            self._sock.setblocking(False)
            self._sel = selectors.DefaultSelector()
        except OSError:
            self._sock.close()
            raise
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._sock, selectors.EVENT_READ, _LISTENER)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._clients: dict[int, _Client] = {}  # by descriptor
        self._resting_until: float | None = None  # the listener out of the selector until then
        self._tokens, self._filled = float(MAX_CLIENTS), time.monotonic()
        self._short = False  # accept() ran out of descriptors (said once per episode)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="lbwatch-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread.ident is None:
            self._release()  # never started
        else:
            self._thread.join(5.0)
        if not self._thread.is_alive():  # else it still selects on the pipe: leave it open
            os.close(self._wake_r)
            os.close(self._wake_w)

    # -- the thread -----------------------------------------------------------------------------

    def _run(self) -> None:
        turn = 0
        try:
            while not self._stopping:
                turn += 1
                self._turn(turn)
        except Exception:
            # A bug in the loop itself (each client's handling is guarded): the metrics stop
            # being served, supervision is not affected.
            log.exception("metrics: internal error; the listener has stopped")
        finally:
            self._release()

    def _turn(self, turn: int) -> None:
        ready = self._sel.select(self._timeout(time.monotonic()))
        now = time.monotonic()
        accept = False
        for key, _ in ready:
            if key.data == _LISTENER:
                accept = True
            elif isinstance(key.data, _Client):
                self._step(key.data)
        # Clients first, then new ones: a connection accepted in the last turn has had its
        # request read before anything can displace it.
        if accept:
            self._accept(turn, now)
        self._expire(now)
        if self._resting_until is not None and now >= self._resting_until:
            self._resting_until = None
            self._sel.register(self._sock, selectors.EVENT_READ, _LISTENER)

    def _timeout(self, now: float) -> float | None:
        """Until the nearest deadline; None (for ever) with no client and no rest."""
        times = [c.born + DEADLINE for c in self._clients.values()]
        if self._resting_until is not None:
            times.append(self._resting_until)
        return max(0.0, min(times) - now) if times else None

    def _accept(self, turn: int, now: float) -> None:
        """Take the connections waiting in the kernel's backlog, as many as the tokens allow
        (``ACCEPT_RATE``); past that the listener rests until the next token is due, and
        what waits stays in the backlog, at no cost to the agent."""
        self._tokens = min(float(MAX_CLIENTS), self._tokens + (now - self._filled) * ACCEPT_RATE)
        self._filled = now
        while self._tokens >= 1.0:
            try:
                sock, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _SHORT_OF:
                    if not self._short:
                        self._short = True
                        log.warning("metrics: cannot accept a connection: %s", exc)
                    self._rest(now + PAUSE)
                    return
                self._tokens -= 1.0
                continue  # ECONNABORTED and the like: that client is gone already
            self._short = False
            self._tokens -= 1.0
            self._admit(sock, turn, now)
        self._rest(now + (1.0 - self._tokens) / ACCEPT_RATE)

    def _rest(self, until: float) -> None:
        self._sel.unregister(self._sock)
        self._resting_until = until

    def _admit(self, sock: socket.socket, turn: int, now: float) -> None:
        sock.setblocking(False)
        if len(self._clients) >= MAX_CLIENTS and not self._displace(turn):
            with contextlib.suppress(OSError):
                sock.send(REFUSED)
            sock.close()
            return
        client = _Client(sock, now, turn)
        self._clients[sock.fileno()] = client
        self._sel.register(sock, selectors.EVENT_READ, client)
        # A client's request is usually there by the time the kernel hands the connection
        # over: read it now, so it is being answered (no longer displaceable) at once.
        self._step(client)

    def _displace(self, turn: int) -> bool:
        """Close the connection that has spent longest on its request, of those accepted
        before this turn; False when there is none (all are being answered)."""
        reading = [c for c in self._clients.values() if c.out is None and c.turn < turn]
        if not reading:
            return False
        self._drop(min(reading, key=lambda c: c.born))
        return True

    def _expire(self, now: float) -> None:
        for client in [c for c in self._clients.values() if now >= c.born + DEADLINE]:
            self._drop(client)

    def _step(self, client: _Client) -> None:
        try:
            if client.out is None:
                self._read(client)
            else:
                self._write(client)
        except Exception:  # a bug must cost one connection, never the listener
            log.exception("metrics: internal error answering a client; closing its connection")
            self._drop(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            self._drop(client)  # gone before its request was whole
            return
        client.data += data
        end, _ = _head_end(client.data)
        if end < 0:
            if len(client.data) > MAX_HEAD:
                self._send(client, TOO_BIG)
            return
        if end > MAX_HEAD:
            self._send(client, TOO_BIG)
            return
        self._send(client, answer(parse_head(bytes(client.data[:end])), self.registry))

    def _send(self, client: _Client, out: bytes) -> None:
        client.data = bytearray()
        client.out = memoryview(out)
        self._sel.modify(client.sock, selectors.EVENT_WRITE, client)
        self._write(client)

    def _write(self, client: _Client) -> None:
        assert client.out is not None
        try:
            sent = client.sock.send(client.out)
        except BlockingIOError:
            return
        except OSError:
            self._drop(client)
            return
        client.out = client.out[sent:]
        if not client.out:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        fd = client.sock.fileno()
        if self._clients.pop(fd, None) is not None:
            self._sel.unregister(client.sock)
        client.sock.close()

    def _release(self) -> None:
        """Close the connections, the selector and the listening socket (the wake-up pipe is
        ``close``'s)."""
        for client in list(self._clients.values()):
            self._drop(client)
        self._sel.close()
        self._sock.close()

"""The lab client's kept connection (tests/lab/client.py ``Kept``, used by bench/drain.py),
against a real HTTP/1.1 server on loopback that answers each request as scripted: what counts
as a failure, what as "retried" (RFC 9112 9.3.1), and when a new connection is opened."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from tests.lab.client import Kept, fresh

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-LB: t\r\n\r\nok"
CLOSING = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\nX-LB: t\r\n\r\nok"


class Server:
    """Answers the n-th request it reads, on whatever connection, as ``script[n]`` says:
    "ok"; "close-header" (Connection: close, then closes); "fin" (answers, then closes
    without saying so); "eof" (closes without a reply); "rst" (resets, no reply).
    ``connections`` counts the connections accepted."""

    def __init__(self, script: list[str]) -> None:
        self.script = list(script)
        self.connections = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            while True:
                if not reader.readline():
                    return
                while reader.readline() not in (b"\r\n", b""):
                    pass
                how = self.script.pop(0) if self.script else "ok"
                if how == "eof":
                    return
                if how == "rst":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    return
                conn.sendall(CLOSING if how == "close-header" else OK)
                if how in ("close-header", "fin"):
                    return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Server]:
    srv = Server(request.param)
    yield srv
    srv.close()


def gets(srv: Server, n: int) -> list[tuple[str, str]]:
    kept = Kept("127.0.0.1", srv.port, "/", 2.0)
    out = []
    for _ in range(n):
        outcome, _, conn = kept.get()
        out.append((outcome, conn))
    kept._drop()
    return out


@pytest.mark.parametrize("server", [["ok", "ok", "ok"]], indirect=True)
def test_one_connection_serves_every_get(server: Server) -> None:
    """A server that keeps the connection: one connection for every GET, all "ok"."""
    assert gets(server, 3) == [("ok", "new"), ("ok", "reused"), ("ok", "reused")]
    assert server.connections == 1


@pytest.mark.parametrize("server", [["ok", "eof", "ok"]], indirect=True)
def test_a_graceful_close_under_a_request_is_retried_not_failed(server: Server) -> None:
    """The server closes the reused connection with no byte of reply: the GET is sent again on
    a new connection, answered, and counted as "retried"."""
    assert gets(server, 2) == [("ok", "new"), ("retried", "new")]
    assert server.connections == 2


@pytest.mark.parametrize("server", [["ok", "rst", "ok"]], indirect=True)
def test_a_reset_is_a_failure_and_the_next_get_reconnects(server: Server) -> None:
    """A reset on the reused connection is a failure, not retried; the next GET goes on a new
    connection."""
    assert gets(server, 3) == [("ok", "new"), ("reset", "reused"), ("ok", "new")]


@pytest.mark.parametrize("server", [["fin", "ok"]], indirect=True)
def test_a_connection_closed_while_idle_is_replaced_before_the_get(server: Server) -> None:
    """The server closed the connection after its reply, without saying so: the FIN is seen
    before the next GET, which goes on a new connection: neither failed nor retried."""
    kept = Kept("127.0.0.1", server.port, "/", 2.0)
    assert kept.get()[::2] == ("ok", "new")
    sock = kept.conn.sock if kept.conn is not None else None
    assert sock is not None
    sock.settimeout(2.0)
    assert sock.recv(1, socket.MSG_PEEK) == b""  # the FIN has arrived
    assert kept.get()[::2] == ("ok", "new")
    kept._drop()


@pytest.mark.parametrize("server", [["close-header", "ok"]], indirect=True)
def test_connection_close_in_a_reply_ends_the_connection(server: Server) -> None:
    """A reply with "Connection: close" ends the connection: the next GET opens another."""
    assert gets(server, 2) == [("ok", "new"), ("ok", "new")]


@pytest.mark.parametrize("server", [["eof"]], indirect=True)
def test_a_new_connection_closed_without_a_reply_is_empty(server: Server) -> None:
    """No reply on a connection of its own is a failure ("empty"), for either client."""
    assert fresh("127.0.0.1", server.port, "/", 2.0)[0] == "empty"

"""A slow-client attacker for lbwatch's ``[metrics] listen``: many connections, each sending one
more byte of a request that never ends every few seconds (issue 23, item 4). Used by
tests/test_adversarial_metrics.py and bench/descriptors.py, and runnable on its own (inside a lab
node, say) until killed or ``--seconds`` have passed:

    python tests/slowclients.py PORT [--count 1100] [--gap 3] [--seconds 60]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import select
import socket
import sys
import threading
import time

WINDOW = 16  # connects in flight at once
# A slow client's request: a real request line, then a header whose value never ends.
SLOW_START = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


class SlowClients:
    """``count`` connections to the listener, each sending one more byte of a request that never
    ends every ``gap`` seconds, driven by one thread. Connects are made WINDOW at a time without
    waiting for each (a burst of a thousand would only overflow the listener's backlog, and
    the kernel would reset most of them), counted in ``opened`` once made, or in ``failed``
    after 10 s. A connection the server closes (or answers, as a refusal) is counted in
    ``dropped``; with ``persist`` it is opened again on the next round, as an attacker keeping
    up the pressure would. The thread ends after ``limit`` seconds whatever happens."""

    def __init__(
        self, port: int, count: int, gap: float, persist: bool = True, limit: float = 110.0
    ) -> None:
        self.port, self.count, self.gap, self.persist = port, count, gap, persist
        self.limit = limit
        self.socks: list[socket.socket] = []
        self.opened = self.dropped = self.failed = self.rounds = 0
        self._pending: dict[socket.socket, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def attempted(self) -> int:
        """Connections tried so far: made, failed, or still being made."""
        return self.opened + self.failed + len(self._pending)

    def __enter__(self) -> SlowClients:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in [*self.socks, *self._pending]:
            s.close()

    def _start_connects(self) -> None:
        made = len(self.socks) if self.persist else self.opened + self.failed
        for _ in range(min(self.count - made, WINDOW) - len(self._pending)):
            s = socket.socket()
            s.setblocking(False)
            if s.connect_ex(("127.0.0.1", self.port)) not in (0, errno.EINPROGRESS):
                s.close()
                self.failed += 1
                continue
            self._pending[s] = time.monotonic()

    def _finish_connects(self) -> None:
        poller = select.poll()
        for s in self._pending:
            poller.register(s, select.POLLOUT)
        ready = {fd for fd, _ in poller.poll(0)}
        for s, began in list(self._pending.items()):
            if s.fileno() in ready:
                del self._pending[s]
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    with contextlib.suppress(OSError):
                        s.send(SLOW_START)
                        self.opened += 1
                        self.socks.append(s)
                        continue
            elif time.monotonic() - began < 10:
                continue
            else:
                del self._pending[s]
            s.close()
            self.failed += 1

    @staticmethod
    def _let_go(s: socket.socket) -> bool:
        """The server closed ``s``, or answered it (a refusal): either way it lets go of it."""
        try:
            s.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True

    def _dribble(self) -> None:
        kept = []
        for s in self.socks:
            if not self._let_go(s):
                try:
                    s.send(b"a")
                    kept.append(s)
                    continue
                except BlockingIOError:
                    kept.append(s)
                    continue
                except OSError:
                    pass
            self.dropped += 1
            s.close()
        self.socks = kept

    def _run(self) -> None:
        end = time.monotonic() + self.limit
        dribble = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < end:
            self._start_connects()
            self._finish_connects()
            if time.monotonic() >= dribble:
                self._dribble()
                self.rounds += 1
                dribble = time.monotonic() + self.gap
            self._stop.wait(0.01)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("port", type=int)
    ap.add_argument("--count", type=int, default=1100)
    ap.add_argument("--gap", type=float, default=3.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args(argv)
    with SlowClients(args.port, args.count, args.gap, limit=args.seconds) as slow:
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            time.sleep(1.0)
            print(
                f"opened {slow.opened} failed {slow.failed} dropped {slow.dropped} "
                f"held {len(slow.socks)}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The mechanics of the one event loop: a selector over file descriptors, a self-pipe that wakes
it when a worker thread finishes, signal numbers delivered through ``signal.set_wakeup_fd`` (the
handlers only record), and a small pool of daemon worker threads for blocking work.

Worker threads are daemons on purpose: on SIGTERM lbwatch exits at once and leaves a running
``systemctl`` to finish on its own, rather than waiting up to a command timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import signal
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def _nonblocking_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    return r, w


def drain(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


class Workers:
    """Runs blocking callables on daemon threads; results come back through ``results()`` after
    the loop is woken by the readable ``fileno()``."""

    def __init__(self, count: int = 4) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], Any] | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._r, self._w = _nonblocking_pipe()
        self._closed = False
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"lbwatch-worker-{i}", daemon=True)
            for i in range(count)
        ]
        for t in self._threads:
            t.start()

    def fileno(self) -> int:
        return self._r

    def submit(self, job: Callable[[], Any]) -> None:
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                result = job()
            except Exception as exc:  # a bug in a job must not kill the worker
                log.exception("worker job failed")
                result = exc
            if not self.post(result):
                return

    def post(self, result: Any) -> bool:
        """Hand ``result`` to the loop from any thread (a job's, or one the caller owns);
        False once closed."""
        self._results.put(result)
        with self._lock:
            if self._closed:
                return False
            with contextlib.suppress(BlockingIOError):
                os.write(self._w, b"x")
        return True

    def results(self) -> list[Any]:
        drain(self._r)
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        with self._lock:
            # A worker still busy finds _closed set and never writes to a reused descriptor.
            self._closed = True
            os.close(self._r)
            os.close(self._w)


class SignalPipe:
    """Signal handlers that only record: the kernel-side wakeup fd carries the signal numbers."""

    def __init__(self, signums: tuple[int, ...]) -> None:
        self._r, self._w = _nonblocking_pipe()
        self._old_fd = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        self._signums = signums
        self._old = {s: signal.signal(s, self._record) for s in signums}

    @staticmethod
    def _record(signum: int, frame: object) -> None:
        """Nothing to do here: Python writes ``signum`` to the wakeup fd before calling us."""

    def fileno(self) -> int:
        return self._r

    def received(self) -> list[int]:
        return list(drain(self._r))

    def close(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        signal.set_wakeup_fd(self._old_fd)
        os.close(self._r)
        os.close(self._w)


class Selector:
    """A thin wrapper: register a callback per descriptor, wait with a timeout, dispatch."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()

    def add(self, fd: int, callback: Callable[[], None]) -> None:
        self._sel.register(fd, selectors.EVENT_READ, callback)

    def remove(self, fd: int) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(fd)

    def wait(self, timeout: float) -> list[Callable[[], None]]:
        return [key.data for key, _ in self._sel.select(max(0.0, timeout))]

    def close(self) -> None:
        self._sel.close()

"""The mechanics of the one event loop: a selector over file descriptors, a self-pipe that wakes
it when a worker thread finishes, signal numbers delivered through ``signal.set_wakeup_fd`` (the
handlers only record), and daemon worker threads for blocking work whose results come back typed.

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
from typing import Generic, TypeVar

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


R = TypeVar("R")


class Mailbox(Generic[R]):
    """Results handed to the loop from other threads: ``post`` from any thread wakes the loop
    through the readable ``fileno()``, and ``results()`` on the loop takes them."""

    def __init__(self) -> None:
        self._results: queue.SimpleQueue[R] = queue.SimpleQueue()
        self._r, self._w = _nonblocking_pipe()
        self._closed = False
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._r

    def post(self, result: R) -> bool:
        """Hand ``result`` to the loop; False once closed."""
        self._results.put(result)
        with self._lock:
            if self._closed:
                return False
            with contextlib.suppress(BlockingIOError):
                os.write(self._w, b"x")
        return True

    def results(self) -> list[R]:
        drain(self._r)
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        with self._lock:
            # A thread still busy finds _closed set and never writes to a reused descriptor.
            self._closed = True
            os.close(self._r)
            os.close(self._w)


class Workers(Mailbox[R]):
    """Runs each blocking job on a thread of its own; its result comes back through the mailbox.

    A job that raises still produces a result: ``on_error`` turns the exception into the failed
    result its submitter waits for (an action that failed, a probe that could not run), so no
    slot stays taken for ever. A thread per job, not a fixed pool, so that a job stuck in the
    kernel cannot starve the others; at most a handful run at once (one action per service, one
    probe)."""

    def submit(self, job: Callable[[], R], on_error: Callable[[Exception], R]) -> None:
        threading.Thread(
            target=self._run, args=(job, on_error), name="lbwatch-worker", daemon=True
        ).start()

    def _run(self, job: Callable[[], R], on_error: Callable[[Exception], R]) -> None:
        try:
            result = job()
        except Exception as exc:  # a bug or an OSError in a job must not lose its result
            log.exception("internal error in a worker job")
            result = on_error(exc)
        self.post(result)


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

"""Shared fixtures: a child subreaper so that daemons the tests start are reaped by this process
(PID 1 on these machines does not reap), and real haproxy configs on loopback."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(scope="session")
def subreaper() -> Iterator[None]:
    """Orphans of processes this session starts (haproxy -D's master, start-stop-daemon's
    background children) become our children, so they can be reaped and never linger."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    reap()


def reap() -> None:
    """Collect exited children that nobody waits for."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def needs(*tools: str) -> pytest.MarkDecorator:
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


def haproxy_config(path: Path, port: int, monitor_port: int) -> Path:
    path.write_text(
        f"""global
    log stderr format raw local0 err

defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s

frontend web
    bind 127.0.0.1:{port}
    http-request return status 200 content-type text/plain string ok

frontend monitor
    bind 127.0.0.1:{monitor_port}
    monitor-uri /health
"""
    )
    return path

"""The notify FIFO that keepalived (``global_defs { notify_fifo PATH }``) and ``lbwatch notify``
write to.

keepalived opens the FIFO O_RDWR|O_NONBLOCK and drops a line when the pipe is full (vrrp_notify.c
ignores write errors), so the reader drains it at once. The reader opens it O_RDWR too: with no
writer left the stream never reaches end-of-file, so writers coming and going end nothing.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not at run time: `lbwatch notify`'s hand-off writes with a str and no pathlib
    from pathlib import Path

PIPE_BUF = 4096  # POSIX: writes up to this size are atomic on a pipe


class FifoError(Exception):
    """The FIFO cannot be used; the message says why and what to do."""


def ensure_fifo(path: Path) -> str | None:
    """Create ``path`` as a FIFO (mode 0600) if missing; refuse anything unsafe that is there;
    a FIFO of lbwatch's open to others is made 0600 again, and the returned notice says so."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkfifo(path, 0o600)
    st = os.lstat(path)
    if not stat.S_ISFIFO(st.st_mode):
        raise FifoError(f"{path} exists and is not a FIFO; remove it or set notify.fifo")
    if st.st_uid != os.geteuid():
        raise FifoError(f"{path} is owned by uid {st.st_uid}, not by lbwatch (uid {os.geteuid()})")
    if st.st_mode & 0o077:
        # Anyone who may open it could forge keepalived's events, or read them and steal them
        # from lbwatch. It is lbwatch's own FIFO: made private again, and said.
        os.chmod(path, 0o600)  # a FIFO, not a symlink: checked above
        return (
            f"{path} was open to group or others (mode {stat.S_IMODE(st.st_mode):04o}); made 0600"
        )
    return None


class FifoReader:
    """Reads whole lines from the FIFO. keepalived and `lbwatch notify` write each line whole,
    newline included, in one write below PIPE_BUF, which a pipe keeps in one piece: what is left
    without a newline once the pipe is drained is garbage (a writer that was not keepalived, or
    one cut off), dropped and counted, never glued to the next line, which is a real one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self.notice: str | None = None  # what opening it had to fix
        self.fragments = 0  # pieces without a newline dropped, since last taken by the hub
        self.last_fragment = b""

    def open(self) -> None:
        self.notice = ensure_fifo(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
        st = os.fstat(fd)
        self.close()
        self.fd, self._ident = fd, (st.st_dev, st.st_ino)

    @property
    def ident(self) -> tuple[int, int] | None:
        """(device, inode) of the FIFO open now."""
        return self._ident if self.fd is not None else None

    def fileno(self) -> int:
        assert self.fd is not None
        return self.fd

    def replaced(self) -> bool:
        """The path now names another file (or none): the FIFO was removed or recreated."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != self._ident

    def read_lines(self) -> list[bytes]:
        """Everything that is in the pipe now, as complete lines without their newline."""
        assert self.fd is not None
        chunks = []
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        data = b"".join(chunks)
        *lines, rest = data.split(b"\n")
        if rest:
            self.fragments += 1
            self.last_fragment = rest[:200]
        return [line for line in lines if line]

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def fifo_ident(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the FIFO at ``path``; None if there is none."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISFIFO(st.st_mode) else None


def write_line(path: str | os.PathLike[str], line: str) -> bool:
    """Hand one line to a reader of the FIFO without blocking: False if nobody reads it or the
    pipe is full (the caller then spools the event itself)."""
    data = (line.rstrip("\n") + "\n").encode()
    if len(data) > PIPE_BUF:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:  # ENXIO: no reader; ENOENT; ELOOP: a symlink
        return False
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        return os.write(fd, data) == len(data)
    except OSError:  # EAGAIN: full
        return False
    finally:
        os.close(fd)

"""Small durable-file helpers shared by the status file, the spool and config installs: the one
atomic-write rule of the project, and an exchange of two paths in one step."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import os
import signal
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Owner:
    """Who a written file belongs to and its permission bits (taken from the file it stands
    for: a config holding passwords stays 0600 or 0640 in every copy)."""

    uid: int
    gid: int
    mode: int

    @classmethod
    def of(cls, st: os.stat_result) -> Owner:
        return cls(st.st_uid, st.st_gid, st.st_mode & 0o7777)


def read_small(path: Path, limit: int) -> bytes:
    """At most ``limit`` + 1 bytes of the regular file ``path`` (more than ``limit``: the caller
    sees it is too big). Opened without blocking, so that a FIFO or a device put in a file's
    place never hangs the reader (open(2) of a FIFO waits for a writer); OSError for anything
    that is not a regular file, FileNotFoundError when there is nothing."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(path: Path, data: bytes, mode: int = 0o644, owner: Owner | None = None) -> Path:
    """A new file beside ``path`` holding ``data``, on disk, with ``owner``'s ids and mode (or
    ``mode``); the caller renames it into place or removes it. Created 0600, so the content is
    never readable by others before its final mode is set."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if owner is not None:
                os.fchown(f.fileno(), owner.uid, owner.gid)
            os.fchmod(f.fileno(), owner.mode if owner is not None else mode)
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, owner: Owner | None = None) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new file, never half."""
    tmp = write_temp(path, data, mode, owner)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


_RENAME_EXCHANGE = 2  # linux/fs.h
_F_SETSIG = getattr(fcntl, "F_SETSIG", 10)  # linux/fcntl.h
_AT_FDCWD = -100
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)  # glibc >= 2.28 (RHEL 8, Debian 10)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (renameat2 RENAME_EXCHANGE); False when the kernel,
    the C library or the filesystem cannot, and nothing was changed."""
    if _renameat2 is None:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def being_written(path: Path) -> bool:
    """Some process holds ``path`` open for writing (a save in progress, an scp, a cp of a big
    file). A read lease is refused exactly then (fcntl(2), F_SETLEASE; root may take one on any
    file); False where leases are not supported."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        # Should a writer open the file while the lease is held, the kernel tells the holder
        # with a signal, SIGIO by default, which ends a process that does not handle it:
        # SIGURG instead, which is ignored unless handled.
        fcntl.fcntl(fd, _F_SETSIG, signal.SIGURG)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        return exc.errno == errno.EAGAIN
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)

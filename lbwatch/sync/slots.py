"""What the receivers of one staging directory share across their processes: a session slot
per receiver, and the share of the staging quota each one's body in flight holds.

sshd starts one receiver per session, and nothing else counts them: its ``MaxSessions`` limits
the sessions of one connection, not the connections of one key, and does not apply to a forced
command's processes. So each receiver takes a **slot**, a file in ``STAGING/.receiver`` that it
holds an ``flock`` on for its whole life: ``peer-NAME.I`` for the key of peer NAME (its
authorized_keys line says ``--peer NAME``), ``shared.I`` for key lines without it; I below the
pool's size. A receiver that finds every slot of its pool locked is refused. The kernel drops
a process's locks when it ends, however it ends (SIGKILL, OOM killer), so a slot is never lost
to a dead receiver, and no PID, which could be reused, is ever read or trusted.

The slot file also holds its receiver's **reservation**: the size of the body it is storing,
written before the first byte is, cleared once the version is linked into staging. The quota
check (``Slot.reserve``) adds what staging holds to the reservations of every slot whose file
is locked (a live receiver's), so sessions storing at once cannot pass the quota together; a
dead receiver's reservation is not counted, since its slot is unlocked. (Where a body is
stored in a named temporary file, no O_TMPFILE, it is counted twice while in flight: in
staging and in its reservation; the quota errs on the side of refusing.) Taking a slot and
checking the quota are done under an exclusive ``flock`` of the directory itself, held for a
few system calls: the check's trial locks of other slots could otherwise make a receiver
taking a slot at that instant find it busy.

Stdlib only: imported by the receiver before anything heavy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator

from lbwatch.sync.limits import DIR, Limits, Usage, over

# What lbwatch itself keeps in staging, not counted in the quota: the files the peers read
# (written by the agent), and this directory.
OWN = frozenset({"status.json", "node.json", DIR})
_PREFIXES = ("peer-", "shared.")


class Unusable(Exception):
    """The receivers' directory cannot be made or opened; the message says why, ``errno``
    the error's number (``unready.kind_of``)."""

    def __init__(self, message: str, code: int | None) -> None:
        super().__init__(message)
        self.errno = code


def control(staging: int) -> int:
    """The receivers' directory in staging (its descriptor), made if missing. Never through a
    symlink; anything but a directory there is Unusable."""
    try:
        os.mkdir(DIR, 0o700, dir_fd=staging)
    except FileExistsError:
        pass
    except OSError as exc:  # a user who may not write staging, a read-only filesystem
        raise Unusable(f"cannot make {DIR} in it: {exc.strerror}", exc.errno) from None
    try:
        fd = os.open(
            DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=staging
        )
    except OSError as exc:
        raise Unusable(f"cannot open {DIR} in it: {exc.strerror}", exc.errno) from None
    return fd


@contextlib.contextmanager
def _exclusive(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _open_slot(ctl: int, name: str, create: bool) -> int:
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    fd = os.open(name, flags, 0o600, dir_fd=ctl)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", name)
    return fd


def _locked(fd: int, how: int) -> bool:
    """Whether ``how | LOCK_NB`` on ``fd`` succeeded (False: another holds it)."""
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class Slot:
    """This receiver's session slot, held until the process ends."""

    def __init__(self, ctl: int, fd: int, name: str) -> None:
        self.ctl = ctl
        self.fd = fd
        self.name = name

    @classmethod
    def take(cls, ctl: int, peer: str | None, size: int) -> Slot | None:
        """A free slot of the pool of ``peer``'s key (None: the shared pool), or None when all
        ``size`` of them are held."""
        pool = f"peer-{peer}" if peer is not None else "shared"
        with _exclusive(ctl):
            for i in range(size):
                name = f"{pool}.{i}"
                fd = _open_slot(ctl, name, create=True)
                if _locked(fd, fcntl.LOCK_EX):
                    os.ftruncate(fd, 0)  # a dead holder's reservation, if it left one
                    return cls(ctl, fd, name)
                os.close(fd)
        return None

    def reserve(self, staging: int, size: int, limits: Limits) -> str | None:
        """Hold ``size`` bytes and one file of the quota for a body about to be stored; why
        not, when staging (with every body in flight) has no room for it."""
        with _exclusive(self.ctl):
            used = held(staging)
            flight = in_flight(self.ctl)
            total = Usage(used.bytes + flight.bytes, used.files + flight.files)
            why = over(total, size, limits)
            if why is None:
                self._write(b"%d\n" % size)
            return why

    def release(self) -> None:
        """The body is linked into staging (counted there now), or was dropped."""
        self._write(b"")

    def _write(self, data: bytes) -> None:
        # The file is empty but while a body is in flight (``take`` empties it), so a
        # reservation is one write and its release one truncation.
        if data:
            os.pwrite(self.fd, data, 0)
        else:
            os.ftruncate(self.fd, 0)


def held(staging: int) -> Usage:
    """What staging holds, lbwatch's own files aside: every entry counts as a file, a regular
    file's size as its bytes."""
    size = files = 0
    with os.scandir(staging) as entries:
        for entry in entries:
            if entry.name in OWN:
                continue
            files += 1
            with contextlib.suppress(OSError):  # gone meanwhile (taken by the sync job)
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    size += st.st_size
    return Usage(size, files)


def in_flight(ctl: int) -> Usage:
    """The reservations of the live receivers (their slots locked), this one's included."""
    size = files = 0
    for name in os.listdir(ctl):
        if not name.startswith(_PREFIXES):
            continue
        try:
            if os.stat(name, dir_fd=ctl, follow_symlinks=False).st_size == 0:
                continue  # no body in flight: no need to ask whether a receiver holds it
            fd = _open_slot(ctl, name, create=False)
        except OSError:
            continue
        try:
            if _locked(fd, fcntl.LOCK_SH):
                continue  # no receiver holds it: whatever it says is a dead one's
            word = os.pread(fd, 32, 0).strip()
        finally:
            os.close(fd)  # also drops the trial lock
        if word.isdigit():
            size += int(word)
            files += 1
    return Usage(size, files)

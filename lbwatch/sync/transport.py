"""Moving files to and from peers: rsync over ssh, argv only, with timeouts, over one persistent
ssh connection per peer (ControlMaster/ControlPersist), so a push after the first costs a few
milliseconds rather than a new handshake.

On the peer the sync key is forced into rrsync, confined to its staging directory (see
``authorized_keys_line``): the key can put files into staging and read them back (the peer's
status file lives there), and nothing else, no command, no other path.

Blocking; for worker threads.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lbwatch.events import Outcome
from lbwatch.services import CommandResult, run_command


@dataclass(frozen=True)
class Peer:
    name: str
    host: str
    port: int = 22
    user: str = "root"


def authorized_keys_line(staging: Path, public_key: str) -> str:
    """The peer's authorized_keys entry for the sync key.

    ``restrict`` turns off forwarding, pty and user rc; the forced command runs rrsync (from
    rsync >= 3.2.4), which refuses anything but an rsync server confined to ``staging``:
    ``-munge`` keeps symlinks from leading out of it, ``-no-del`` forbids deletions.
    """
    return f'restrict,command="rrsync -munge -no-del {staging}" {public_key.strip()}'


class Carrier(Protocol):
    """What peer delivery needs from a transport (the real one below; a fake in the tests)."""

    def push(self, peer: Peer, local: Path, remote_name: str) -> CommandResult: ...

    def fetch(self, peer: Peer, remote_name: str, local: Path) -> CommandResult: ...


class Transport:
    def __init__(
        self,
        key: Path,
        control_dir: Path,
        known_hosts: Path | None = None,
        timeout: float = 10.0,
        persist: float = 300.0,
    ) -> None:
        self.key = key
        self.control_dir = control_dir
        self.known_hosts = known_hosts
        self.timeout = timeout
        self.persist = persist

    def ssh_argv(self, peer: Peer) -> list[str]:
        argv = [
            "ssh",
            "-i",
            str(self.key),
            "-p",
            str(peer.port),
            "-l",
            peer.user,
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"ConnectTimeout={max(1, int(self.timeout))}",
            "-o",
            "ServerAliveInterval=5",
            "-o",
            "ServerAliveCountMax=2",
            "-o",
            "ControlMaster=auto",
            # %C: a hash of host, port and user, short enough for a socket path.
            "-o",
            f"ControlPath={self.control_dir}/%C",
            "-o",
            f"ControlPersist={int(self.persist)}",
        ]
        if self.known_hosts is not None:
            argv += [
                "-o",
                f"UserKnownHostsFile={self.known_hosts}",
                "-o",
                "StrictHostKeyChecking=yes",
            ]
        return argv

    def _rsync(self, peer: Peer, *args: str) -> CommandResult:
        # %C expands to 40 hex digits, and ssh adds a temporary suffix while it binds; a unix
        # socket path holds at most 107 bytes, and past that ssh only says exit 255.
        if len(str(self.control_dir)) + 1 + 40 + 17 > 107:
            return CommandResult(
                Outcome.FAILED,
                f"control_dir {self.control_dir} is too long for ssh's control socket "
                "(keep it under 50 characters)",
                0.0,
            )
        self.control_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        rsh = " ".join(shlex.quote(a) for a in self.ssh_argv(peer))
        argv = ["rsync", "--timeout", str(max(1, int(self.timeout))), "-e", rsh, *args]
        # The command's own timeout covers connecting too; rsync's --timeout only idle I/O.
        return run_command(argv, self.timeout * 2)

    def push(self, peer: Peer, local: Path, remote_name: str) -> CommandResult:
        """Copy ``local`` to ``remote_name`` inside the peer's staging directory. rsync writes
        a temporary file and renames it, so the peer never sees half a file. Give every version
        a new name: rrsync from rsync 3.4 on pins paths through /proc/self/fd and refuses to
        replace an existing file."""
        return self._rsync(
            peer, "--checksum", "--chmod=F600", str(local), f"{peer.host}:{remote_name}"
        )

    def fetch(self, peer: Peer, remote_name: str, local: Path) -> CommandResult:
        """Copy ``remote_name`` from the peer's staging directory to ``local``."""
        return self._rsync(peer, f"{peer.host}:{remote_name}", str(local))

    def close(self, peer: Peer) -> CommandResult:
        """End the persistent connection to ``peer``."""
        return run_command([*self.ssh_argv(peer), "-O", "exit", peer.host], self.timeout)

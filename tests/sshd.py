"""A private sshd on loopback for the sync transport tests, with the sync key restricted by the
authorized_keys entry the test gives (lbwatch's receiver, or rrsync as older peers have it)."""

from __future__ import annotations

import pwd
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lbwatch.sync import limits
from tests.conftest import free_port, needs
from tests.lab.ssh import keygen, known_hosts_line, write_sshd_config
from tests.util import wait_for

# The marks of a test module that runs this sshd and ssh, rsync and rrsync against it.
NEEDS_SSHD = [
    needs("ssh", "ssh-keygen", "rsync", "rrsync"),
    pytest.mark.skipif(not Path("/usr/sbin/sshd").exists(), reason="needs sshd"),
]


TREE = Path(__file__).resolve().parents[1]


def tree_lbwatch(directory: Path, user: str | None = None) -> str:
    """A command running this source tree's lbwatch, for a forced command's program. The venv's
    entry point imports the package it was installed from, which for an editable install of
    another checkout (a git worktree of it) is not the code under test; sshd clears the
    environment, so the tree is named in the script. ``user``: the receiver runs as that user
    (setpriv), standing for a sync key authorized for a user other than root, with the
    system's Python (a pyenv one may be readable by root alone)."""
    script = directory / (f"lbwatch-as-{user}" if user else "lbwatch-here")
    if user is None:
        run = f"exec {sys.executable} -m lbwatch"
    else:
        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
        gid = pwd.getpwnam(user).pw_gid
        drop = f"setpriv --reuid={user} --regid={gid} --clear-groups"
        run = f"exec {drop} {python} -m lbwatch"
    script.write_text(f'#!/bin/sh\nPYTHONPATH={TREE} {run} "$@"\n')
    script.chmod(0o755)
    return str(script)


class Sshd:
    """A private sshd on 127.0.0.1 whose only authorized key is the restricted sync key."""

    def __init__(self, base: Path, line: Callable[[Path, str], str]) -> None:
        self.base = base
        self.port = free_port()
        self.staging = base / "staging"
        self.staging.mkdir(parents=True)
        # What the peer's agent writes for its receivers when it starts: it syncs haproxy.cfg.
        limits.publish(self.staging, limits.Limits("haproxy.cfg"))
        self.client_key = base / "sync_key"
        pub = keygen(self.client_key)
        host_key = base / "host_key"
        host_pub = keygen(host_key)
        auth = base / "authorized_keys"
        auth.write_text(line(self.staging, pub) + "\n")
        self.auth = auth
        auth.chmod(0o600)
        self.known_hosts = base / "known_hosts"
        self.known_hosts.write_text(known_hosts_line("127.0.0.1", self.port, host_pub) + "\n")
        config = write_sshd_config(base, "127.0.0.1", self.port, host_key, auth, base / "sshd.pid")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        with (base / "sshd.log").open("ab") as log:
            self.proc = subprocess.Popen(
                ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stderr=log,
            )
        wait_for(self._listening, 10, what="sshd listening")

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

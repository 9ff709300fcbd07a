"""PID 1 of a lab node: private /run, the node's /etc/haproxy and /etc/keepalived bound in, a host
name, then reap every orphan until told to stop.

Run as ``unshare --pid --mount --uts --fork --mount-proc python3 nodeinit.py NODE_DIR HOSTNAME``
inside the node's network namespace. Daemons that fork (haproxy -D, keepalived) are re-parented
to this process when their parent exits; without reaping, a killed haproxy worker would stay a
zombie for good.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def main() -> int:
    node_dir, hostname = Path(sys.argv[1]), sys.argv[2]
    # Keep mount events from leaking back to the host, whatever unshare's default is.
    mount("--make-rprivate", "/")
    mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run")
    (Path("/run") / "lock").mkdir()
    (Path("/run") / "haproxy").mkdir()  # its stats socket, where Debian puts it
    mount("--bind", str(node_dir / "haproxy"), "/etc/haproxy")
    mount("--bind", str(node_dir / "keepalived"), "/etc/keepalived")
    # sshd runs the sync key's forced command through root's shell, and Debian's bash sources
    # ~/.bashrc for ssh sessions: the host's may do anything (pyenv init waits up to a minute
    # on a lock left by another pyenv). The node's root starts from empty dotfiles.
    empty = node_dir / "empty-dotfile"
    empty.write_text("")
    for dotfile in (Path("/root/.bashrc"), Path("/root/.profile")):
        if dotfile.is_file():
            mount("--bind", str(empty), str(dotfile))
    socket.sethostname(hostname)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM})
    (node_dir / "ready").write_text("1")
    while True:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
        info = signal.sigtimedwait({signal.SIGCHLD, signal.SIGTERM}, 5.0)
        if info is not None and info.si_signo == signal.SIGTERM:
            # Leaving PID 1 makes the kernel SIGKILL everything else in this PID namespace.
            return 0


if __name__ == "__main__":
    sys.exit(main())

"""Keys and a private sshd for config-sync tests: the loopback transport tests and the lab nodes.

The only authorized key is the sync key, behind lbwatch's restricted authorized_keys entry
(``sync.transport.authorized_keys_line``): exactly what an operator installs on a peer.
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def keygen(path: Path) -> str:
    """An ed25519 key pair at ``path`` (+ ``.pub``); returns the public key line."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    return path.with_suffix(".pub").read_text().strip()


def known_hosts_line(host: str, port: int, host_pub: str) -> str:
    kind, key = host_pub.split()[:2]
    name = host if port == 22 else f"[{host}]:{port}"
    return f"{name} {kind} {key}"


def write_sshd_config(
    base: Path, listen: str, port: int, host_key: Path, authorized_keys: Path, pidfile: Path
) -> Path:
    """``StrictModes no``: the test directories live under /tmp, which sshd's ownership walk
    would refuse; the files themselves are 0600 and root's."""
    config = base / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress {listen}
HostKey {host_key}
AuthorizedKeysFile {authorized_keys}
PidFile {pidfile}
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
LogLevel ERROR
""")
    return config


def put_request(name: str, content: bytes) -> bytes:
    """One PUT in lbwatch's receiver protocol, written here from its description (``sink``)."""
    return f"PUT {name} {len(content)}\n".encode() + content


def by_hand(ssh_argv: list[str], requests: bytes, timeout: float = 20) -> tuple[int, bytes, str]:
    """Speak to a peer's receiver as a holder of the sync key could, without lbwatch's sender:
    ``ssh_argv`` ends with the host; the requests go whole, the answers are read until the
    receiver closes. Returns ssh's exit code, the answers and ssh's stderr."""
    proc = subprocess.run(
        [*ssh_argv, "lbwatch-sync 1"],
        input=requests,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace")

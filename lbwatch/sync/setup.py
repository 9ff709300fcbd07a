"""``lbwatch sync setup [PEER...]``: the sync key, each peer's host key and the peer's
authorized_keys entry, then the sync part of ``lbwatch doctor``.

1. The key (``[sync] ssh_key``) is created if missing (ed25519, no passphrase: the agent uses it
   unattended; it is confined on the peers by the entry below).
2. Each peer's host key is fetched (ssh-keyscan) and its fingerprint shown. It is added to
   ``[sync] known_hosts`` with ``--accept``, or after a "yes" at the terminal; otherwise the
   command stops there, since a host key taken unseen is what an attacker in the middle wants.
3. The exact restricted entry for each peer is printed (``lbwatch receive --peer THIS_NODE
   STAGING``: the peer counts this key's sessions by that name); with ``--install`` it is put
   into the peer's authorized_keys over the operator's own ssh login (not the sync key, which
   can do nothing there yet): any earlier entry of the same key (rrsync's, an older path, one
   without --peer) is replaced, and the same entry twice is one entry. This node's own
   receivers are told what it syncs (``limits``), as its agent tells them at each start.
4. The sync checks of ``lbwatch doctor`` run, so the command ends with the proof that the key
   works and is confined, or with what the peer lacks for it (``doctor.remote``). Nothing above
   needs the peer's lbwatch to be set up for sync: a peer that is not yet (no staging directory
   there) is a warning here, naming the step to take on it, and nothing needs running again
   here once it is taken.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lbwatch.config import Config, SyncPeer
from lbwatch.sync import limits
from lbwatch.sync.transport import authorized_keys_line, known_hosts_name

TIMEOUT = 30.0


@dataclass(frozen=True)
class Options:
    peers: tuple[str, ...]  # names from [sync] peers; none: all of them
    install: bool = False
    accept: bool = False
    identity: Path | None = None  # the operator's login key for --install (default: ssh's own)
    authorized_keys: str = "~/.ssh/authorized_keys"  # on the peer
    program: str = "lbwatch"  # the forced command's program, as sshd there finds it
    staging: Path | None = None  # the peer's staging directory (default: this node's)


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def ensure_key(key: Path, node: str) -> tuple[str, bool]:
    """The public key's line, and whether the key was created now."""
    pub = key.with_name(key.name + ".pub")
    created = False
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        done = _run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"lbwatch-sync@{node}",
             "-f", str(key)]
        )  # fmt: skip
        if done.returncode != 0:
            raise SetupError(f"ssh-keygen failed: {done.stderr.strip()}")
        created = True
    if not pub.exists():
        done = _run(["ssh-keygen", "-y", "-f", str(key)])
        if done.returncode != 0:
            raise SetupError(f"cannot read {key}: {done.stderr.strip()}")
        pub.write_text(done.stdout)
    return pub.read_text().strip(), created


def peer_name(node: str) -> str | None:
    """This node's name as its peers' receivers count its sessions by (``--peer``): the name
    [sync] peers gives a node takes the same characters; None for a name that does not fit
    (the entry then goes without it, into the shared pool)."""
    return node if limits.peer_named(node) else None


def tell_receivers(cfg: Config) -> str:
    """Write what this node's own receivers may take (the agent does too, at each start), so a
    node set up before its agent first runs already takes its peers' versions."""
    from lbwatch.sync.fileset import FileSet

    staging = cfg.staging_path()
    unit = FileSet(cfg.sync.config, tuple(cfg.sync.extra_files)).unit
    try:
        limits.publish(staging, limits.for_config(cfg, unit))
    except OSError as exc:
        return f"this node's receivers: cannot write their limits in {staging}: {exc}"
    return f"this node's receivers: take versions of {unit} into {staging}"


class SetupError(Exception):
    """A step that cannot go on; the message says what to do."""


def _host(peer: SyncPeer) -> str:
    return known_hosts_name(peer.host, peer.port)


def host_keys(peer: SyncPeer) -> list[str]:
    done = _run(["ssh-keyscan", "-T", "10", "-p", str(peer.port), peer.host])
    lines = [ln for ln in done.stdout.splitlines() if ln and not ln.startswith("#")]
    if not lines:
        raise SetupError(f"{peer.name}: no host key from {peer.host}:{peer.port} (is sshd up?)")
    return lines


def fingerprints(lines: list[str]) -> list[str]:
    done = _run(["ssh-keygen", "-l", "-f", "-"], stdin="\n".join(lines) + "\n")
    return [ln for ln in done.stdout.splitlines() if ln]


def known(peer: SyncPeer, known_hosts: Path) -> bool:
    if not known_hosts.exists():
        return False
    return _run(["ssh-keygen", "-F", _host(peer), "-f", str(known_hosts)]).returncode == 0


def trust(peer: SyncPeer, known_hosts: Path, accept: bool, out: list[str]) -> None:
    if known(peer, known_hosts):
        out.append(f"{peer.name}: host key already in {known_hosts}")
        return
    lines = host_keys(peer)
    out.append(f"{peer.name}: {peer.host}:{peer.port} presents:")
    out += [f"    {fp}" for fp in fingerprints(lines)]
    if not accept:
        if not sys.stdin.isatty():
            raise SetupError(
                f"{peer.name}: check the fingerprints above against the peer's own "
                f"(`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` there), then run again "
                "with --accept"
            )
        print("\n".join(out))
        out.clear()
        answer = input(f"Trust {peer.name}'s host key? [yes/no] ").strip().lower()
        if answer != "yes":
            raise SetupError(f"{peer.name}: host key not trusted; nothing written")
    if peer.port != 22:
        lines = [ln.replace(peer.host, _host(peer), 1) if not ln.startswith("[") else ln
                 for ln in lines]  # fmt: skip
    known_hosts.parent.mkdir(parents=True, exist_ok=True)
    with known_hosts.open("a") as f:
        f.write("".join(ln + "\n" for ln in lines))
    out.append(f"{peer.name}: host key added to {known_hosts}")


def install_script(line: str, blob: str, target: str) -> str:
    """A POSIX sh script that makes ``line`` the only entry of the key ``blob`` in ``target``
    (its mode 600, its directory's 700), replacing it whole, atomically."""
    path = target if not target.startswith("~/") else f'"$HOME"/{shlex.quote(target[2:])}'
    return f"""set -eu
umask 077
f={path}
mkdir -p "$(dirname "$f")"
touch "$f"
tmp="$f.lbwatch-$$"
grep -vF {shlex.quote(blob)} "$f" > "$tmp" || true
printf '%s\\n' {shlex.quote(line)} >> "$tmp"
chmod 600 "$tmp"
mv -f "$tmp" "$f"
"""


def install(peer: SyncPeer, line: str, blob: str, opts: Options, known_hosts: Path) -> str:
    argv = ["ssh", "-p", str(peer.port), "-l", peer.user, "-o", "BatchMode=no",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "ControlPath=none"]  # fmt: skip
    if opts.identity is not None:
        argv += ["-i", str(opts.identity), "-o", "IdentitiesOnly=yes"]
    script = install_script(line, blob, opts.authorized_keys)
    done = _run([*argv, peer.host, "sh -s"], stdin=script)
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SetupError(f"{peer.name}: installing the entry over your ssh login failed: {said}")
    return f"{peer.name}: entry installed in {opts.authorized_keys}"


def main(cfg: Config, opts: Options) -> int:
    from lbwatch.doctor import checks, remote
    from lbwatch.doctor.run import LABEL
    from lbwatch.publish import node_name

    s = cfg.sync
    chosen = [p for p in s.peers if not opts.peers or p.name in opts.peers]
    unknown = set(opts.peers) - {p.name for p in s.peers}
    if unknown or not chosen:
        names = ", ".join(p.name for p in s.peers) or "none"
        print(f"no such peer in [sync] peers: {', '.join(sorted(unknown)) or '?'} "
              f"(configured: {names})", file=sys.stderr)  # fmt: skip
        return 2
    if s.known_hosts is None:
        print("[sync] known_hosts is not set: lbwatch checks host keys there", file=sys.stderr)
        return 2
    try:
        node = node_name(cfg)
        pub, created = ensure_key(s.ssh_key, node)
        print(f"sync key {s.ssh_key}: {'created' if created else 'present'}")
        blob = pub.split()[1]
        staging = opts.staging or cfg.staging_path()
        line = authorized_keys_line(staging, pub, opts.program, peer_name(node))
        print(tell_receivers(cfg))
        for peer in chosen:
            said: list[str] = []
            trust(peer, s.known_hosts, opts.accept, said)
            print("\n".join(said))
            if opts.install:
                print(install(peer, line, blob, opts, s.known_hosts))
            else:
                print(f"{peer.name}: add this line to {peer.user}'s authorized_keys there "
                      "(or run again with --install):")  # fmt: skip
                print(f"    {line}")
    except SetupError as exc:
        print(f"lbwatch sync setup: {exc}", file=sys.stderr)
        return 1
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"lbwatch sync setup: {exc}", file=sys.stderr)
        return 1
    print("checking (the sync part of `lbwatch doctor`):")
    picked = cfg.model_copy(update={"sync": s.model_copy(update={"peers": chosen})})
    # A peer not set up for sync yet is a warning here: this node's part is done (its entry
    # needs nothing of the peer's lbwatch), and what remains is the peer's own step.
    found = [*checks.sync_key(picked), *remote.peers(picked, pending="warn")]
    for f in found:
        print(f"{LABEL[f.level]} {f.area:<10} {f.what}")
        if f.fix:
            print(f"{'':16} fix: {f.fix}")
    return 1 if any(f.level == "error" for f in found) else 0

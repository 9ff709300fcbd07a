"""The checks of ``lbwatch doctor`` that ask other hosts: each sync peer (reachable, its key
running lbwatch's receiver, and a command the key must not run refused) and each notification
channel (its server answers; nothing is sent). A peer that does not answer is said with the fix
on the side where it lies: ssh's reason (sshd, host key, authorization), no such command there,
or the receiver's own word that it cannot serve (``sync.unready``: lbwatch there not set up for
sync, or a staging directory the key's user may not use)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lbwatch.config import Config, SyncPeer
from lbwatch.doctor import units
from lbwatch.doctor.checks import Finding, Level, Where, error, ok, warn
from lbwatch.doctor.unitpaths import UNIT
from lbwatch.notify.channels import DeliveryError, build_channels
from lbwatch.publish import node_name
from lbwatch.sync.channel import Channel, Waited
from lbwatch.sync.limits import DIR
from lbwatch.sync.sink import NODE, ONLY_OURS
from lbwatch.sync.transport import Failure, Peer, Transport, diagnose
from lbwatch.sync.unready import Kind, Unready, parse

# rrsync's refusal of a command that is not rsync (rsync >= 3.2.4's rrsync)
RRSYNC_REFUSAL = "does not run rsync"
PROBE = "id"  # the command a restricted key must not run


def peers(cfg: Config, pending: Level = "error") -> Iterator[Finding]:
    """``pending``: the level of a peer whose lbwatch is not set up for config sync yet. An
    error here (nothing reaches that peer); a warning for ``sync setup``, whose part on this
    node is done then, in whichever order the nodes are set up: what remains is the peer's."""
    s = cfg.sync
    if not s.active() or not s.peers or not s.ssh_key.exists():
        return  # no key: said by checks.sync_key; nothing to ask the peers with
    # A connection of its own, closed at the end: the agent's kept one (same control_dir) is
    # left alone, and none outlives the command.
    with tempfile.TemporaryDirectory(prefix="lbwd-", dir="/tmp") as own:
        yield from _peers(cfg, Path(own), pending)


def _peers(cfg: Config, control_dir: Path, pending: Level) -> Iterator[Finding]:
    area = "sync"
    s = cfg.sync
    node = node_name(cfg)
    transport = Transport(s.ssh_key, control_dir, s.known_hosts, s.timeout)
    channel = Channel(transport)
    for p in s.peers:
        peer = Peer(p.name, p.host, p.port, p.user)
        try:
            got = channel.wait(peer, NODE, None, 1)
        finally:
            channel.close(peer)
        if got.outcome == "failed":
            yield _failed(p, node, got, pending)
        elif got.outcome == "rrsync":
            yield warn(
                area,
                f"peer {p.name}: the sync key still runs rrsync there (slower, and no "
                "cluster view)",
                "authorize it for lbwatch's receiver (README, 'The sync key')",
            )
        else:
            yield ok(area, f"peer {p.name} ({p.host}) answers through lbwatch's receiver")
        # Also when the receiver did not answer: a key that runs any command fails that way.
        restricted = _restricted(transport, peer)
        if restricted is not None:
            yield restricted


def _failed(p: SyncPeer, node: str, got: Waited, pending: Level) -> Finding:
    """A peer whose receiver did not answer, and the fix on the side where it lies: the
    receiver's own word when it ran (``unready``), the peer's shell's when it found no such
    command, ssh's otherwise."""
    what = f"peer {p.name} ({p.host}): {got.message}"
    said = parse(got.output)
    if said is not None:
        level = pending if said.kind is Kind.NO_STAGING else "error"
        return Finding(level=level, area="sync", what=what, fix=_unready_fix(p, node, said))
    if diagnose(got.output)[0] is Failure.NO_COMMAND:
        fix = (
            f"install lbwatch on {p.name}; if it is installed, name the command as sshd there "
            f"finds it: `lbwatch sync setup {p.name} --install --program /usr/bin/lbwatch` "
            "(the package's; pip's is /usr/local/bin/lbwatch)"
        )
        return error("sync", what, fix)
    return error("sync", what, _reach_fix(got.message))


def _unready_fix(p: SyncPeer, node: str, said: Unready) -> str:
    staging = said.staging
    if said.kind is Kind.NO_STAGING:
        return (
            f"on {p.name}: add [sync] to lbwatch's config there, with {node} in its peers, and "
            "run `systemctl reload-or-restart lbwatch` there; nothing needs running again here "
            f"(if its [sync] staging_dir is not {staging}, name it: `lbwatch sync setup "
            f"{p.name} --install --staging DIR`)"
        )
    if said.kind is Kind.NO_ACCESS:
        return (
            f"the key runs as {said.user} on {p.name}, and lbwatch's agent there makes "
            f'{staging} root\'s: authorize it for root (user = "root" for {p.name} in '
            f"[sync] peers, the default), then `lbwatch sync setup {p.name} --install`"
        )
    return (
        f"on {p.name}: {staging} must be a directory on a writable filesystem, and {DIR} in it "
        "one lbwatch made (its agent makes both when config sync starts)"
    )


def _reach_fix(message: str) -> str:
    if "refused: busy" in message:
        return (
            "this node's sync key holds all the sessions the peer allows ([sync] "
            "receiver_sessions there): an old connection lingers; it ends within two minutes"
        )
    if "host key" in message.lower():
        return "add the peer's host key to sync.known_hosts"
    if "permission denied" in message.lower():
        return "authorize this node's sync key on the peer (README, 'The sync key')"
    return "check that the peer is up and its sshd reachable from here"


def _restricted(transport: Transport, peer: Peer) -> Finding | None:
    """A command the key must not run, asked for: refused by the receiver (or rrsync), or run.
    None when ssh itself failed (unreachable, not authorized: said already)."""
    # No kept connection: ssh takes the first value of an option, so these come first.
    solo = ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
    argv = ["ssh", *solo, *transport.ssh_argv(peer)[1:]]
    try:
        done = subprocess.run(
            [*argv, peer.host, PROBE],
            capture_output=True,
            text=True,
            timeout=transport.timeout + 5,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return warn("sync", f"peer {peer.name}: no answer to a forbidden command", "look again")
    said = done.stdout + done.stderr
    if done.returncode != 0 and (ONLY_OURS in said or RRSYNC_REFUSAL in said):
        return ok("sync", f"peer {peer.name}: the sync key runs nothing else (`{PROBE}` refused)")
    if "uid=" in done.stdout:
        return error(
            "sync",
            f"peer {peer.name}: the sync key runs any command there (`{PROBE}` ran)",
            'restrict its authorized_keys entry: restrict,command="lbwatch receive STAGING"',
        )
    if done.returncode == 255 or diagnose(said)[0] is Failure.NO_COMMAND:
        return None  # ssh's own failure, or no such command there: the peer check says why
    last = (said.strip().splitlines() or ["no output"])[-1][:200]
    return warn(
        "sync",
        f"peer {peer.name}: `{PROBE}` with the sync key was neither refused nor run: {last}",
        "check the key's authorized_keys entry on the peer",
    )


def notify(cfg: Config, where: Where | None = None) -> Iterator[Finding]:
    area = "notify"
    channels = build_channels(cfg.notify)
    if not channels:
        yield warn(area, "no notification channel configured", "add [notify.email] or a webhook")
        return
    with _unit_credentials(cfg, where or Where()) as said:
        yield from said
        for name, channel in sorted(channels.items()):
            try:
                yield ok(area, f"{name}: {channel.answer()}")
            except DeliveryError as exc:
                yield error(area, f"{name}: {exc}", f"check [notify] {name}'s settings")


@contextlib.contextmanager
def _unit_credentials(cfg: Config, where: Where) -> Iterator[list[Finding]]:
    """Run outside the unit (doctor from a shell), the SMTP password of ``password_credential``
    is taken as the unit would have it: from the file its ``LoadCredential=`` names (the unit
    and its drop-ins read as systemd reads them), shown to the channel as a credentials
    directory of its own for the time of the check."""
    email = cfg.notify.email
    name = email.password_credential if email is not None else None
    if name is None or os.environ.get("CREDENTIALS_DIRECTORY"):
        yield []
        return
    unit = units.load(UNIT, where.units)
    source = unit.credential(name)
    if unit.path is None or source is None:
        yield []  # the channel's own error says what is missing
        return
    with tempfile.TemporaryDirectory(prefix="lbwatch-doctor-") as tmp:
        (Path(tmp) / name).symlink_to(source)
        os.environ["CREDENTIALS_DIRECTORY"] = tmp
        try:
            yield [ok("notify", f"email: password from {source} ({UNIT}: LoadCredential={name})")]
        finally:
            del os.environ["CREDENTIALS_DIRECTORY"]

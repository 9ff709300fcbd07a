"""The checks of ``lbwatch doctor`` that ask other hosts: each sync peer (reachable, its key
running lbwatch's receiver, and a command the key must not run refused) and each notification
channel (its server answers; nothing is sent)."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from lbwatch.config import Config
from lbwatch.doctor.checks import Finding, error, ok, warn
from lbwatch.notify.channels import DeliveryError, build_channels
from lbwatch.sync.channel import Channel
from lbwatch.sync.sink import NODE, ONLY_OURS
from lbwatch.sync.transport import Peer, Transport

# rrsync's refusal of a command that is not rsync (rsync >= 3.2.4's rrsync)
RRSYNC_REFUSAL = "does not run rsync"
PROBE = "id"  # the command a restricted key must not run


def peers(cfg: Config) -> Iterator[Finding]:
    s = cfg.sync
    if not s.active() or not s.peers or not s.ssh_key.exists():
        return  # no key: said by checks.sync_key; nothing to ask the peers with
    # A connection of its own, closed at the end: the agent's kept one (same control_dir) is
    # left alone, and none outlives the command.
    with tempfile.TemporaryDirectory(prefix="lbwd-", dir="/tmp") as own:
        yield from _peers(cfg, Path(own))


def _peers(cfg: Config, control_dir: Path) -> Iterator[Finding]:
    area = "sync"
    s = cfg.sync
    transport = Transport(s.ssh_key, control_dir, s.known_hosts, s.timeout)
    channel = Channel(transport)
    for p in s.peers:
        peer = Peer(p.name, p.host, p.port, p.user)
        try:
            got = channel.wait(peer, NODE, None, 1)
        finally:
            channel.close(peer)
        if got.outcome == "failed":
            yield error(area, f"peer {p.name} ({p.host}): {got.message}", _reach_fix(got.message))
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
    if done.returncode == 255:
        return None  # ssh's own failure: the peer check above says why
    last = (said.strip().splitlines() or ["no output"])[-1][:200]
    return warn(
        "sync",
        f"peer {peer.name}: `{PROBE}` with the sync key was neither refused nor run: {last}",
        "check the key's authorized_keys entry on the peer",
    )


def notify(cfg: Config) -> Iterator[Finding]:
    area = "notify"
    channels = build_channels(cfg.notify)
    if not channels:
        yield warn(area, "no notification channel configured", "add [notify.email] or a webhook")
        return
    for name, channel in sorted(channels.items()):
        try:
            yield ok(area, f"{name}: {channel.answer()}")
        except DeliveryError as exc:
            yield error(area, f"{name}: {exc}", f"check [notify] {name}'s settings")

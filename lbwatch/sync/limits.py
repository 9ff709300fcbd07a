"""What this node's receivers may take, as its agent tells them: the one document lbwatch keeps
for them in staging, ``STAGING/.receiver/limits.json``, and the quota decision (pure).

    {"lbwatch-receiver": 1, "unit": "haproxy.cfg", "receiver_sessions": 8, "peers": 1,
     "staging_max_bytes": 268435456, "staging_max_files": 64, "idle": 120}

``unit`` is the name this node's versions travel under (``FileSet.unit``: ``haproxy.cfg``, or
``haproxy.cfg.bundle`` with ``[sync] extra_files``): a version of any other file is refused
before its body is stored. The others are ``[sync]``'s limits; ``idle`` is how long a session
may send nothing (or stall in a body) before its receiver ends.

**Why a document the agent writes, not the receiver reading lbwatch's config.** The receiver is
started by sshd for every session and must start in a few tens of milliseconds with the
standard library only (``cli._quick``); the config needs pydantic and TOML, and its path is the
agent's (``--config``), which sshd's forced command does not know. The agent, which has the
config, validated, writes the document when config sync starts and on every reload that
rebuilds it (``SyncService``); ``lbwatch sync setup`` writes it too, so a node set up but whose
agent has not started yet already takes its peers' versions. It stays when the agent stops: the
receiver keeps taking versions for it to apply at its next start, as before. Without the
document (a node whose agent never ran config sync) no version is taken at all: the receiver
cannot tell this node's files from others, and the sender retries with its backoff.

**Why nobody else can write it.** The sync key reaches staging only through the receiver,
which writes nothing but files named as versions (never a dot file, never into a directory),
and reads nothing but ``status.json`` and ``node.json``. (A key still on rrsync can write any
name in staging; such a peer is not confined by the receiver at all, see README.)

Readers are lenient: a value missing or out of its range takes its default; a document without
a valid ``unit`` is no document. The writer is strict.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the agent's side only: the receiver imports no pydantic
    from lbwatch.config import Config

DIR = ".receiver"  # in staging: this document and the receivers' session slots
DOC = "limits.json"
MAX_VERSION = 64 * 1024 * 1024  # one version, whatever the quota: haproxy.cfg, maps, certificates

# One sender holds two sessions (the sync link's and the cluster watch's), `lbwatch doctor` a
# third for a moment, and a sender that reconnected leaves its two old ones behind until they
# end (at once when it restarted; after ``IDLE`` when its host or the path to it went away):
# eight leave room for that twice over.
SESSIONS = 8
MAX_BYTES = 4 * MAX_VERSION  # four versions at the limit: one waiting, others in flight
MAX_FILES = 64  # versions (of any size) in staging at once, in flight included
# Longer than any pause a live sender makes between requests: the cluster watch asks every
# second, the sync link every ``retry_max`` (60 s by default) at the longest.
IDLE = 120


def peer_named(name: str) -> bool:
    """Whether ``name`` can name a peer's pool of sessions (``--peer``): a name as [sync] peers
    allows one, since it names a slot file."""
    return 0 < len(name) <= 64 and name.isascii() and all(c.isalnum() or c in "._-" for c in name)


@dataclass(frozen=True)
class Limits:
    unit: str  # the file this node's versions travel under
    sessions: int = SESSIONS  # per peer key, at once
    peers: int = 1  # this node's peers: key lines without --peer share sessions * peers
    max_bytes: int = MAX_BYTES  # in staging, bodies in flight included
    max_files: int = MAX_FILES
    idle: int = IDLE  # seconds a session may send nothing before it ends

    def pool(self, peer: str | None) -> int:
        """How many sessions the key of ``peer`` may hold at once (None: a key line without
        ``--peer``, written before there was one; all such keys share one pool)."""
        return self.sessions if peer is not None else self.sessions * max(1, self.peers)


# A node whose agent has not said what it syncs: no unit (so no version is taken), and the
# default sessions for its reads.
UNSAID = Limits("")


def parse(raw: bytes) -> Limits | None:
    """The limits a document says; None when it is no such document (no valid ``unit``)."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("lbwatch-receiver") != 1:
        return None
    unit = doc.get("unit")
    if not isinstance(unit, str) or not unit or "/" in unit or "@" in unit:
        return None

    def count(key: str, default: int) -> int:
        value = doc.get(key)
        return value if type(value) is int and 0 < value < 2**53 else default

    return Limits(
        unit,
        sessions=count("receiver_sessions", SESSIONS),
        peers=count("peers", 1),
        max_bytes=count("staging_max_bytes", MAX_BYTES),
        max_files=count("staging_max_files", MAX_FILES),
        idle=count("idle", IDLE),
    )


def render(limits: Limits) -> bytes:
    doc = {
        "lbwatch-receiver": 1,
        "unit": limits.unit,
        "receiver_sessions": limits.sessions,
        "peers": limits.peers,
        "staging_max_bytes": limits.max_bytes,
        "staging_max_files": limits.max_files,
        "idle": limits.idle,
    }
    return json.dumps(doc, sort_keys=True).encode() + b"\n"


def read(control: int) -> Limits | None:
    """The document in the receivers' directory (its descriptor), or None."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(DOC, flags, dir_fd=control)
    except OSError:
        return None
    try:
        return parse(os.read(fd, 4096)) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except OSError:
        return None
    finally:
        os.close(fd)


def for_config(cfg: Config, unit: str) -> Limits:
    s = cfg.sync
    return Limits(
        unit,
        sessions=s.receiver_sessions,
        peers=max(1, len(s.peers)),
        max_bytes=s.staging_max_bytes,
        max_files=s.staging_max_files,
    )


def publish(staging: Path, limits: Limits) -> None:
    """Write the document for this node's receivers (the agent, ``sync setup``), replacing the
    one there whole; OSError when staging cannot take it."""
    control = staging / DIR
    control.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = control / f".{DOC}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, render(limits))
    finally:
        os.close(fd)
    os.replace(tmp, control / DOC)


@dataclass(frozen=True)
class Usage:
    """What staging holds, bodies in flight in every session included."""

    bytes: int
    files: int


def over(used: Usage, size: int, limits: Limits) -> str | None:
    """Why one more version of ``size`` bytes would take staging past its quota, or None."""
    if used.files + 1 > limits.max_files:
        return (
            f"staging is full: it holds {used.files} versions, the most this node takes "
            f"([sync] staging_max_files = {limits.max_files}); try again once it has taken them"
        )
    if used.bytes + size > limits.max_bytes:
        return (
            f"staging is full: {used.bytes} bytes held and {size} more would pass "
            f"[sync] staging_max_bytes = {limits.max_bytes}; try again once it has taken them"
        )
    return None

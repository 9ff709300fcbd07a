"""Which version of a config wins, and how a version travels: pure functions.

A version is the file's content hash plus the wall-clock time of the edit that made it and the
node it was made on. The rule, the same on every node so that simultaneous edits converge
without a coordinator and without ping-pong:

    the later edit wins; at equal edit times the larger content hash wins.

A node that receives a version compares it with its current one: newer -> apply it; older ->
keep its own (the received one is kept as a backup and reported); the same hash -> nothing.
A received version is never pushed on: only local edits are pushed, so a loop cannot form.

Staged files carry the version in their names (``haproxy.cfg@lb1@<ns>@<sha256>``): every
version gets a new name, which rrsync needs (it will not replace a file) and which makes a
half-applied state impossible to confuse with a complete one.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

_NAME = re.compile(
    r"^(?P<file>[A-Za-z0-9._-]{1,200})@(?P<origin>[A-Za-z0-9._-]{1,64})"
    r"@(?P<edited>\d{1,20})@(?P<digest>[0-9a-f]{64})$"
)


@dataclass(frozen=True)
class Version:
    file: str  # the live file's name, e.g. haproxy.cfg
    origin: str  # the node where the edit was made
    edited_ns: int  # wall-clock nanoseconds of the edit (the file's mtime when it was seen)
    digest: str  # sha256 of the content

    def staged_name(self) -> str:
        return f"{self.file}@{self.origin}@{self.edited_ns}@{self.digest}"

    def key(self) -> tuple[int, str]:
        return (self.edited_ns, self.digest)


def parse_staged_name(name: str) -> Version | None:
    """The version a staged file name carries, or None for anything else (temporary files of
    rsync, junk, names from an older lbwatch)."""
    m = _NAME.match(name)
    if m is None:
        return None
    return Version(m["file"], m["origin"], int(m["edited"]), m["digest"])


def newer(a: Version, b: Version) -> bool:
    """``a`` wins over ``b``."""
    return a.key() > b.key()


class Verdict(str, enum.Enum):
    APPLY = "apply"  # the incoming version wins: validate, install, reload
    KEEP_LOCAL = "keep-local"  # ours is newer: keep it, keep theirs as a backup, report
    SAME = "same"  # same content: nothing to install, but remember the later of the two
    # versions (see ``current_after``), or a later same-content edit would lose to an older
    # different one


def judge(current: Version | None, incoming: Version) -> Verdict:
    """What a node does with a version it received."""
    if current is not None and current.digest == incoming.digest:
        return Verdict.SAME
    if current is None or newer(incoming, current):
        return Verdict.APPLY
    return Verdict.KEEP_LOCAL


def current_after(current: Version | None, incoming: Version) -> Version | None:
    """The version a node holds after ``incoming``, whatever the verdict."""
    verdict = judge(current, incoming)
    if verdict is Verdict.APPLY:
        return incoming
    if verdict is Verdict.SAME and current is not None and newer(incoming, current):
        return incoming
    return current

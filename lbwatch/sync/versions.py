"""Which version of a config wins, and how a version travels: pure functions.

A version is the file's content hash, an edit counter, the wall-clock time of the edit and the
node it was made on. The counter is a Lamport clock: each node remembers the highest counter it
has seen (``seen``: its own versions and every plausible one it received, applied or not), and
an edit made here takes ``seen + 1``. The rule, the same on every node so that edits converge
without a coordinator, without ping-pong and whatever the clocks say:

    the higher counter wins; at equal counters the later wall-clock time; then the larger hash.

An edit made after a node has seen version V has a higher counter than V, so it wins over V on
every node, even if this node's clock is hours behind. Two versions with the same counter were
made without either node having seen the other (truly concurrent edits): only then does wall
time decide, and any fixed order would do.

A node that receives a version compares it with its current one: newer -> apply it; older ->
keep its own (the received one is kept beside the live file and reported); the same hash ->
nothing. Every node delivers the version it holds to peers that lack it, whoever made it; no
loop can form, because a node's current version only ever moves up this order.

What a peer may claim is bounded by what this node can vouch for (``vouched``): the counters
of its own edits, and those its peers' status files show they hold. lbwatch writes those files
and this node reads them over its own connection to each peer, so someone holding a stolen
sync key, who can put any version into staging, cannot forge them. A version more than
``MAX_AHEAD`` beyond ``vouched`` is refused, unless the peers, asked at that moment, show they
hold a counter that high (``apply``); a refused claim counts for nothing. A claim within the
bound counts as seen, taken or not (an edit made here afterwards wins over it), but it never
raises ``vouched``: however many claims arrive, in whatever order, ``seen`` stays within
``MAX_AHEAD`` of what the group really holds, so the counter cannot be pushed to where real
edits could no longer exceed it, and this node's next edit is never more than one beyond what
a peer vouching as much takes at once. A peer that vouches for less asks, and finds the edit in
this node's status file, which shows the version it holds.

Staged files carry the version in their names (``haproxy.cfg@lb1@c<counter>@<ns>@<sha256>``):
every version gets a new name, so a name is never replaced (the receiver refuses to, as rrsync
from rsync 3.4 does), and a half-applied state cannot be confused with a complete one.
"""

from __future__ import annotations

import enum
import os
import re
import time
from dataclasses import dataclass

_NAME = re.compile(
    r"^(?P<file>[A-Za-z0-9._-]{1,200})@(?P<origin>[A-Za-z0-9._-]{1,64})"
    r"(?:@c(?P<counter>\d{1,16}))?@(?P<edited>\d{1,20})@(?P<digest>[0-9a-f]{64})$"
)
# A version may claim at most this many edits beyond the highest counter this node vouches for.
# Each real edit passes `haproxy -c` and a reload, so no partition ever holds a million of them.
MAX_AHEAD = 1_000_000
# Counters stay exact in JSON readers that use doubles, and far from the name's 16 digits.
MAX_COUNTER = 2**53


@dataclass(frozen=True)
class Version:
    file: str  # the live file's name, e.g. haproxy.cfg
    origin: str  # the node where the edit was made
    counter: int  # Lamport clock: higher than every version the origin had seen
    edited_ns: int  # wall-clock nanoseconds of the edit on the origin's clock (ties only)
    digest: str  # sha256 of the content

    def staged_name(self) -> str:
        return f"{self.file}@{self.origin}@c{self.counter}@{self.edited_ns}@{self.digest}"

    def key(self) -> tuple[int, int, str]:
        return (self.counter, self.edited_ns, self.digest)


def parse_staged_name(name: str) -> Version | None:
    """The version a staged file name carries, or None for anything else (temporary files of
    rsync, junk). A name without a counter (from lbwatch before counters) counts as counter 0,
    so every version made since wins over it."""
    m = _NAME.match(name)
    if m is None:
        return None
    counter = int(m["counter"] or 0)
    return Version(m["file"], m["origin"], counter, int(m["edited"]), m["digest"])


def newer(a: Version, b: Version) -> bool:
    """``a`` wins over ``b``."""
    return a.key() > b.key()


def edit(file: str, node: str, seen: int, edited_ns: int, digest: str) -> Version:
    """The version of an edit made on ``node`` after it has seen counters up to ``seen``."""
    return Version(file, node, min(seen + 1, MAX_COUNTER), edited_ns, digest)


def implausible(counter: int, vouched: int) -> str | None:
    """Why a version claiming edit ``counter`` claims more than any peer can honestly have, to a
    node that vouches for counters up to ``vouched``; or None."""
    if counter > MAX_COUNTER:
        return f"claims edit counter {counter}, beyond the maximum {MAX_COUNTER}"
    if counter > vouched + MAX_AHEAD:
        return (
            f"claims edit counter {counter}, more than {MAX_AHEAD} edits beyond "
            f"the {vouched} this node and its peers hold"
        )
    return None


class Verdict(str, enum.Enum):
    APPLY = "apply"  # the incoming version wins: validate, install, reload
    KEEP_LOCAL = "keep-local"  # ours is newer: keep it, keep theirs beside the live file, report
    SAME = "same"  # same content: nothing to install, but remember the later of the two
    # versions (see ``current_after``), or a later same-content edit would lose to an older
    # different one
    IMPLAUSIBLE = "implausible"  # claims too much (see ``implausible``): refused, not counted


def judge(current: Version | None, incoming: Version, vouched: int) -> Verdict:
    """What a node that holds ``current`` and vouches for counters up to ``vouched`` does with a
    version it received."""
    if implausible(incoming.counter, vouched) is not None:
        return Verdict.IMPLAUSIBLE
    if current is not None and current.digest == incoming.digest:
        return Verdict.SAME
    if current is None or newer(incoming, current):
        return Verdict.APPLY
    return Verdict.KEEP_LOCAL


def current_after(current: Version | None, incoming: Version, vouched: int) -> Version | None:
    """The version a node holds after ``incoming``, whatever the verdict (the installs
    succeeding)."""
    verdict = judge(current, incoming, vouched)
    if verdict is Verdict.APPLY:
        return incoming
    if verdict is Verdict.SAME and current is not None and newer(incoming, current):
        return incoming
    return current


def seen_after(seen: int, incoming: Version, vouched: int) -> int:
    """The high-water mark after receiving ``incoming``: a plausible claim counts whole,
    whether it was applied, kept beside the live file or refused by the checker; one refused
    as implausible counts for nothing (``vouched`` never moves here)."""
    if implausible(incoming.counter, vouched) is None:
        return max(seen, incoming.counter)
    return seen


def vouched_by(vouched: int, counter: int) -> int:
    """What a node vouches for once a peer's status file (lbwatch's own word, read over this
    node's connection) showed it holds edit ``counter``, or once it made an edit with that
    counter. Taken as it is, below the maximum: room is left above it for the edits that
    follow."""
    return max(vouched, min(counter, MAX_COUNTER - MAX_AHEAD))


def wall_ns() -> int:
    """The wall clock that stamps local edits (it only breaks ties between concurrent edits).
    ``LBWATCH_TEST_WALL_OFFSET`` (seconds) shifts it, for tests only: the lab's nodes share one
    kernel clock, and libfaketime breaks Python's time.sleep on Debian."""
    offset = os.environ.get("LBWATCH_TEST_WALL_OFFSET")
    return time.time_ns() + (int(float(offset) * 1e9) if offset else 0)

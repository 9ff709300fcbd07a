"""Why a node's receiver cannot serve a sync connection at all, in one line both ends read.

The receiver (``sink``) says it on stderr before its greeting, and exits 1:

    lbwatch receive: unready (KIND, as USER): STAGING: the system's words

and the sender finds it in what its ssh passed on (``transport.explain``, ``doctor.remote``):
the kind, the user the receiver runs as, the staging directory its entry names, and the
system's words. The kinds are what the receiver can tell from the error it met (pure,
``kind_of``); what to do about each is said on the sender's side, which knows the peer by name:

- ``no-staging``: the directory does not exist. lbwatch there is not set up for config sync:
  its agent makes it when config sync starts (``[sync]`` with peers, or ``enabled``), and
  ``lbwatch sync setup`` there does too. (Or the entry names a directory other than the one
  its ``[sync] staging_dir`` gives.)
- ``no-access``: the receiver's user may not use it (EACCES, EPERM): the key is authorized for
  a user other than root, and the agent makes staging root's.
- ``unusable``: anything else (not a directory, ``.receiver`` a symlink, a read-only or full
  filesystem).

An lbwatch older than this one, sending, shows the line as the receiver's refusal, as it showed
the line before it.

Stdlib only: imported by the receiver before anything heavy.
"""

from __future__ import annotations

import enum
import errno
import re
from dataclasses import dataclass


class Kind(str, enum.Enum):
    NO_STAGING = "no-staging"
    NO_ACCESS = "no-access"
    UNUSABLE = "unusable"


PREFIX = "lbwatch receive: unready"
# A staging path with ": " in it is cut short in the sender's message, nothing worse.
_LINE = re.compile(
    rf"^{re.escape(PREFIX)} \((?P<kind>[a-z-]+), as (?P<user>[^)]*)\): "
    r"(?P<staging>.+?): (?P<error>.*)$",
    re.MULTILINE,
)


@dataclass(frozen=True)
class Unready:
    kind: Kind
    user: str  # who the receiver runs as: the key's user on that node
    staging: str  # the directory its entry names
    error: str  # the system's words, one line

    def line(self) -> str:
        """What the receiver says."""
        return f"{PREFIX} ({self.kind.value}, as {self.user}): {self.staging}: {self.error}"

    def fact(self, host: str) -> str:
        """What it means, in one line about the node at ``host``."""
        if self.kind is Kind.NO_STAGING:
            return (
                f"lbwatch on {host} takes no config sync yet: {self.staging} does not exist "
                "there (its agent makes it once [sync] is configured there)"
            )
        if self.kind is Kind.NO_ACCESS:
            return (
                f"lbwatch's receiver on {host} runs as {self.user}, who may not use "
                f"{self.staging} there: {self.error}"
            )
        return f"lbwatch's receiver on {host} cannot use {self.staging}: {self.error}"


def kind_of(code: int | None, opening: bool) -> Kind:
    """The kind an error (its errno) makes; ``opening``: met opening staging itself, not
    what the receivers keep in it (``.receiver``, its slots), which the receiver makes."""
    if code == errno.ENOENT and opening:
        return Kind.NO_STAGING
    if code in (errno.EACCES, errno.EPERM):
        return Kind.NO_ACCESS
    return Kind.UNUSABLE


def parse(said: str) -> Unready | None:
    """The receiver's line in what ssh passed on (the last one, if more), or None."""
    lines = list(_LINE.finditer(said))
    if not lines:
        return None
    found = lines[-1]
    try:
        kind = Kind(found["kind"])
    except ValueError:
        kind = Kind.UNUSABLE  # a kind a newer receiver says: still not served
    return Unready(kind, found["user"], found["staging"], found["error"].strip())

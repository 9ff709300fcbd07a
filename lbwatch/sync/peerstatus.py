"""The status file a node keeps in its staging directory for its peers (``status.json``): for each
synced file, what the node did with the last version it received and which version it holds.

The receiving node writes it (``receive.write_status``); the senders read it back over the sync
key (``peers``) to learn whether their version was applied. It crosses the wire, so it is one
frozen model, written and parsed only here. Reading is lenient per entry: an entry that does not
validate (a damaged file, a newer lbwatch's extra result) reads as absent, which makes the
sender push again rather than trust it; unknown fields are ignored for the same reason.
"""

from __future__ import annotations

import json
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lbwatch.sync.versions import Version

STATUS = "status.json"  # its name in staging (``sink`` has its own copy: it imports no pydantic)

# What a node did with a version; "local-edit" and "current" record its own versions.
Result = Literal[
    "applied",
    "same",
    "kept-local",
    "rejected",
    "implausible",  # claims more edits than this node and its peers vouch for (see versions)
    "reload-failed",
    "local-edit",
    "current",
]


class Held(BaseModel):
    """A version as the status file names it (``versions.Version``'s fields). Files written
    before edit counters existed have none: counter 0."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    file: str
    origin: str
    counter: int = Field(0, ge=0)
    edited_ns: int
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")

    @classmethod
    def of(cls, v: Version) -> Held:
        return cls(
            file=v.file, origin=v.origin, counter=v.counter, edited_ns=v.edited_ns, digest=v.digest
        )

    def key(self) -> tuple[int, int, str]:
        """Its place in the rule's order (``Version.key``)."""
        return (self.counter, self.edited_ns, self.digest)


class FileStatus(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    result: Result
    message: str = ""
    received: Optional[Held] = None  # Optional, not "| None": pydantic evaluates it on 3.9
    current: Optional[Held] = None
    at: float = 0.0  # wall clock of the entry: tells a new answer from an old one


def parse(data: bytes) -> dict[str, FileStatus]:
    """The entries of a status file's content; nothing for a file that is not a JSON object."""
    try:
        raw = json.loads(data)
    except ValueError:
        return {}
    if not isinstance(raw, dict):
        return {}
    out = {}
    for name, entry in raw.items():
        try:
            out[str(name)] = FileStatus.model_validate(entry)
        except ValidationError:
            continue
    return out


def render(entries: dict[str, FileStatus]) -> bytes:
    return json.dumps(
        {name: e.model_dump(mode="json") for name, e in entries.items()}, indent=1, sort_keys=True
    ).encode()

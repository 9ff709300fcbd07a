"""keepalived's notify lines, as written to ``notify_fifo`` (keepalived 2.x, vrrp_notify.c and
check_notify.c) and as passed to notify scripts:

    INSTANCE "VI_1" MASTER 100          GROUP "G1" BACKUP 0
    VS [192.0.2.10]:tcp:80 UP           RS [192.0.2.20]:tcp:80 [192.0.2.10]:tcp:80 DOWN

``lbwatch notify`` (keepalived's notify script) writes the same lines with a leading ``SCRIPT``
so the router knows the source: keepalived writes its FIFO in order, while notify scripts are
forked and may arrive late and out of order.

States: MASTER, BACKUP, FAULT, STOP, DELETED, MASTER_RX_LOWER_PRI, MASTER_PRIORITY,
BACKUP_PRIORITY. Anything else is ``Malformed``: logged and skipped, never an exception.
The rules themselves are in ``grammar``, which ``lbwatch notify``'s hand-off checks lines with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from lbwatch.notify import grammar


@dataclass(frozen=True)
class VrrpEvent:
    """A VRRP instance or sync group entered ``state``."""

    kind: str  # "INSTANCE" or "GROUP"
    name: str
    state: str
    priority: Optional[int]
    source: str = "fifo"  # "fifo": keepalived's notify_fifo; "script": `lbwatch notify`

    def line(self) -> str:
        return grammar.vrrp_line(self.kind, self.name, self.state, self.priority, self.source)


@dataclass(frozen=True)
class LvsEvent:
    """An LVS virtual server (quorum) or real server went up or down."""

    kind: str  # "VS" or "RS"
    server: str  # the virtual server (VS) or the real server (RS)
    virtual_server: Optional[str]  # for RS: the virtual server it belongs to
    up: bool


@dataclass(frozen=True)
class Malformed:
    line: str  # printable, truncated
    why: str


Parsed = Union[VrrpEvent, LvsEvent, Malformed]


def printable(raw: bytes, limit: int = 200) -> str:
    """For log lines: decoded, control characters escaped, truncated."""
    text = raw[:limit].decode("utf-8", "backslashreplace")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text + ("..." if len(raw) > limit else "")


def parse_line(raw: bytes) -> Parsed:
    """One line without its newline."""
    head = grammar.split_source(raw)
    if isinstance(head, str):
        return Malformed(printable(raw), head)
    source, text = head
    if grammar.is_vrrp(text):
        fields = grammar.vrrp_fields(text)
        if isinstance(fields, str):
            return Malformed(printable(raw), fields)
        return VrrpEvent(*fields, source)
    if text.startswith(("VS ", "RS ")) and source == "fifo":
        return _parse_lvs(text, raw)
    return Malformed(printable(raw), "not a keepalived notify line")


def _parse_lvs(text: str, raw: bytes) -> Parsed:
    kind, _, rest = text.partition(" ")
    body, _, state = rest.rpartition(" ")
    if state not in ("UP", "DOWN") or not body or any(not c.isprintable() for c in body):
        return Malformed(printable(raw), f"expected {kind} ... UP|DOWN")
    if kind == "VS":
        return LvsEvent("VS", body, None, state == "UP")
    real, _, virtual = body.partition(" ")
    if not virtual:
        return Malformed(printable(raw), "expected RS REAL_SERVER VIRTUAL_SERVER UP|DOWN")
    return LvsEvent("RS", real, virtual, state == "UP")

"""keepalived's notify lines, as written to ``notify_fifo`` (keepalived 2.x, vrrp_notify.c and
check_notify.c) and as passed to notify scripts:

    INSTANCE "VI_1" MASTER 100          GROUP "G1" BACKUP 0
    VS [192.0.2.10]:tcp:80 UP           RS [192.0.2.20]:tcp:80 [192.0.2.10]:tcp:80 DOWN

``lbwatch notify`` (keepalived's notify script) writes the same lines with a leading ``SCRIPT``
so the router knows the source: keepalived writes its FIFO in order, while notify scripts are
forked and may arrive late and out of order.

States: MASTER, BACKUP, FAULT, STOP, DELETED, MASTER_RX_LOWER_PRI, MASTER_PRIORITY,
BACKUP_PRIORITY. Anything else is ``Malformed``: logged and skipped, never an exception.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

STATES = frozenset(
    {
        "MASTER",
        "BACKUP",
        "FAULT",
        "STOP",
        "DELETED",
        "MASTER_RX_LOWER_PRI",
        "MASTER_PRIORITY",
        "BACKUP_PRIORITY",
    }
)
MAX_LINE = 4096  # keepalived's lines are short; anything longer is not one of them
_VRRP = re.compile(r'^(INSTANCE|GROUP) "([^"\x00-\x1f\x7f]{1,255})" ([A-Z_]+)(?: (-?\d{1,4}))?$')


@dataclass(frozen=True)
class VrrpEvent:
    """A VRRP instance or sync group entered ``state``."""

    kind: str  # "INSTANCE" or "GROUP"
    name: str
    state: str
    priority: Optional[int]
    source: str = "fifo"  # "fifo": keepalived's notify_fifo; "script": `lbwatch notify`

    def line(self) -> str:
        prio = "" if self.priority is None else f" {self.priority}"
        mark = "SCRIPT " if self.source == "script" else ""
        return f'{mark}{self.kind} "{self.name}" {self.state}{prio}'


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
    if len(raw) > MAX_LINE:
        return Malformed(printable(raw), f"longer than {MAX_LINE} bytes")
    try:
        text = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        return Malformed(printable(raw), "not UTF-8")
    source = "fifo"
    if text.startswith("SCRIPT "):
        source, text = "script", text[len("SCRIPT ") :]
    if text.startswith(("INSTANCE ", "GROUP ")):
        m = _VRRP.match(text)
        if m is None:
            return Malformed(printable(raw), 'expected TYPE "NAME" STATE [PRIORITY]')
        kind, name, state, prio = m.groups()
        if not name.isprintable():
            # NEL, LINE SEPARATOR and friends: a name must never break a line or a header.
            return Malformed(printable(raw), "unprintable character in the name")
        if state not in STATES:
            return Malformed(printable(raw), f"unknown state {state}")
        return VrrpEvent(kind, name, state, int(prio) if prio is not None else None, source)
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

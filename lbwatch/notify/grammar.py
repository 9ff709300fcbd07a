"""The rules of keepalived's notify lines as plain strings and tuples, with no dataclasses: the
parser (``parse``) builds its frozen events from these, and ``lbwatch notify``'s hand-off
(``handoff``) checks the line it writes with the same rules in a fresh process, where importing
dataclasses (which loads inspect) alone would cost about 10 ms on each of keepalived's forks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional, Tuple

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
SCRIPT_MARK = "SCRIPT "  # what `lbwatch notify` puts before the line keepalived would write
_VRRP = re.compile(r'^(INSTANCE|GROUP) "([^"\x00-\x1f\x7f]{1,255})" ([A-Z_]+)(?: (-?\d{1,4}))?$')

Why = str  # why a line is refused, for the log
Source = str  # "fifo": keepalived's notify_fifo; "script": `lbwatch notify`
VrrpFields = Tuple[str, str, str, Optional[int]]  # kind, name, state, priority


def split_source(raw: bytes) -> tuple[Source, str] | Why:
    """A line without its newline -> its source and its text after the SCRIPT mark."""
    if len(raw) > MAX_LINE:
        return f"longer than {MAX_LINE} bytes"
    try:
        text = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        return "not UTF-8"
    if text.startswith(SCRIPT_MARK):
        return "script", text[len(SCRIPT_MARK) :]
    return "fifo", text


def is_vrrp(text: str) -> bool:
    return text.startswith(("INSTANCE ", "GROUP "))


def vrrp_fields(text: str) -> VrrpFields | Why:
    """``TYPE "NAME" STATE [PRIORITY]`` -> its fields."""
    m = _VRRP.match(text)
    if m is None:
        return 'expected TYPE "NAME" STATE [PRIORITY]'
    kind, name, state, prio = m.groups()
    if not name.isprintable():
        # NEL, LINE SEPARATOR and friends: a name must never break a line or a header.
        return "unprintable character in the name"
    if state not in STATES:
        return f"unknown state {state}"
    return kind, name, state, int(prio) if prio is not None else None


def vrrp_line(kind: str, name: str, state: str, priority: int | None, source: Source) -> str:
    """The fields written back as a line: what the agent reads them from."""
    prio = "" if priority is None else f" {priority}"
    mark = SCRIPT_MARK if source == "script" else ""
    return f'{mark}{kind} "{name}" {state}{prio}'


def script_text(words: Sequence[str]) -> str | None:
    """keepalived's notify-script arguments ``TYPE NAME STATE [PRIORITY]`` as a SCRIPT line, not
    yet checked; None when there are not three or four of them."""
    if len(words) not in (3, 4):
        return None
    kind, name, state = words[0].upper(), words[1], words[2].upper()
    prio = f" {words[3]}" if len(words) == 4 else ""
    return f'{SCRIPT_MARK}{kind} "{name}" {state}{prio}'


def script_line(words: Sequence[str]) -> str | None:
    """The line ``lbwatch notify`` hands the agent for these arguments, as the parser reads and
    writes it back (``parse_line(...).line()``); None when the parser would refuse it."""
    text = script_text(words)
    if text is None:
        return None
    try:
        raw = text.encode()
    except UnicodeEncodeError:  # an argument that was not UTF-8 (surrogate escapes)
        return None
    head = split_source(raw)
    if isinstance(head, str) or not is_vrrp(head[1]):
        return None
    fields = vrrp_fields(head[1])
    if isinstance(fields, str):
        return None
    return vrrp_line(*fields, head[0])

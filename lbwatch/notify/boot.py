"""At the agent's start: the VRRP transitions `lbwatch notify` spooled while no agent ran, which
keepalived's FIFO holds too (see ``rules.spooled``), and the record of those an agent's first
FIFO reading was already matched against, so that the next start never matches them again (a
report still waiting, its server down, had its FIFO copy read then: a line now is a transition
of its own)."""

from __future__ import annotations

import logging

from lbwatch.fsutil import write_atomic
from lbwatch.notify.spool import Spool

log = logging.getLogger(__name__)
# In the spool directory: the script reports an agent's first FIFO reading was matched against
# (the file names, one a line).
MATCHED = ".matched-at-start"


def script_reports(spool: Spool) -> tuple[list[tuple[str, str]], list[str]]:
    """The (instance key, state) transitions scripts spooled (one file per channel) that no
    earlier start was matched against, oldest first; and the file names of all those pending."""
    try:
        matched = set((spool.path / MATCHED).read_text().split())
    except OSError:
        matched = set()
    seen: set[tuple[float, str, str]] = set()
    out = []
    names = []
    for path in spool.pending():
        note = spool.load(path)
        f = note.fields if note is not None else {}
        if note is None or f.get("source") != "script" or not note.event.startswith("vrrp:"):
            continue
        names.append(path.name)
        if path.name in matched:
            continue
        key, state = f"{f.get('type')}:{f.get('name')}", str(f.get("state"))
        if (note.created, key, state) not in seen:
            seen.add((note.created, key, state))
            out.append((key, state))
    return out, names


def remember_matched(spool: Spool, names: list[str]) -> None:
    """The first FIFO reading is over: ``names`` were matched (or had their chance)."""
    if not names:
        return
    try:
        write_atomic(spool.path / MATCHED, "".join(f"{n}\n" for n in names).encode(), mode=0o600)
    except OSError as exc:
        log.warning("cannot write %s: %s", spool.path / MATCHED, exc)

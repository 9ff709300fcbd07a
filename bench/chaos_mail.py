"""The chaos soak's mail check: keepalived's own record of its MASTER and FAULT transitions
(its notify_STATE hooks) against what the SMTP server accepted from lbwatch.

Each transition must be mailed exactly once. A message is identified by its Message-ID, which
lbwatch fixes when it spools it: the same message accepted twice (the server died after taking
it, before lbwatch heard "250") is a duplicate delivery, counted on its own; two messages for
one transition are a transition mailed twice.
"""

from __future__ import annotations

import email
import email.policy
import json
import re
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path

SUBJECT = re.compile(r"^\[lbwatch\] (\S+): (VI_\S+) (?:(\S+) -> )?(MASTER|FAULT|BACKUP|STOP)\b")
MAILED = ("MASTER", "FAULT")  # what lbwatch's default routes mail
# lbwatch's agent:fifo_unread alert (lbwatch.notify.writer.problem): the soak never removes the
# FIFO, so each one is a false alarm.
FIFO_UNREAD = re.compile(r"keepalived \(pid \d+\) (writes a FIFO at|does not have) ")


@dataclass(frozen=True)
class Mail:
    subject: str
    ident: str  # Message-ID
    date: float  # its Date header: when lbwatch made it
    accepted: float  # when the server took it
    body: str


def read_mails(maildir: Path) -> list[Mail]:
    out = []
    for path in sorted(maildir.glob("*.eml")):
        meta = path.with_suffix(".json")
        if not meta.exists():
            continue
        msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        body = msg.get_body(("plain",))
        out.append(
            Mail(
                str(msg["Subject"]),
                str(msg["Message-ID"]),
                parsedate_to_datetime(str(msg["Date"])).timestamp(),
                float(json.loads(meta.read_text())["accepted"]),
                body.get_content() if body is not None else "",
            )
        )
    return out


@dataclass(frozen=True)
class MailCheck:
    transitions: int  # MASTER and FAULT transitions keepalived reported
    mailed: int  # distinct transition messages received
    not_mailed: list[tuple[float, str, str]]  # (time, node, state)
    mailed_twice: list[tuple[float, str, str]]  # (date, node, state): no transition left for it
    duplicate_deliveries: int  # the same Message-ID accepted again
    digests: int
    agent_alerts: int
    fifo_unread: list[tuple[float, str]]  # (date, subject)


def check(transitions: dict[str, list[tuple[float, str, str]]], mails: list[Mail]) -> MailCheck:
    """``transitions``: node -> (time, state, instance); each instance's own are matched."""
    seen: set[str] = set()
    dups = digests = alerts = 0
    fifo_unread = []
    got: dict[tuple[str, str, str], list[float]] = {}
    for m in mails:
        if m.ident in seen:
            dups += 1
            continue
        seen.add(m.ident)
        if "flapping" in m.subject:
            digests += 1
            continue
        match = SUBJECT.match(m.subject)
        if match is None:
            alerts += 1
            if FIFO_UNREAD.search(m.subject):
                fifo_unread.append((m.date, m.subject))
            continue
        node, instance, state = match.group(1), match.group(2), match.group(4)
        if state in MAILED:
            got.setdefault((node, instance, state), []).append(m.date)
    not_mailed, twice = [], []
    total = mailed = 0
    keys = {(n, inst, s) for n, ts in transitions.items() for _, s, inst in ts if s in MAILED}
    for node, instance, state in sorted(keys | set(got)):
        want = sorted(
            t for t, s, inst in transitions.get(node, []) if (inst, s) == (instance, state)
        )
        have = sorted(got.get((node, instance, state), []))
        total += len(want)
        mailed += len(have)
        # In time order, each transition takes the first mail made no earlier than a second
        # before it (the Date header has whole seconds).
        i = 0
        for t in want:
            while i < len(have) and have[i] < int(t) - 1:
                twice.append((have[i], node, f"{instance} {state}"))
                i += 1
            if i < len(have):
                i += 1
            else:
                not_mailed.append((t, node, f"{instance} {state}"))
        twice += [(d, node, f"{instance} {state}") for d in have[i:]]
    return MailCheck(total, mailed, not_mailed, twice, dups, digests, alerts, fifo_unread)

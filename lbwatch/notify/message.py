"""What a notification says: one frozen ``Notification`` with a subject, a body and the fields a
webhook receiver can use. Rendering is pure; the time comes in as an argument.

Everything that came from outside (instance names from the FIFO, reasons quoting commands'
output) passes ``one_line`` before it reaches a subject, so it can never add a header.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

_BREAKS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")


def one_line(text: str, limit: int = 200) -> str:
    """Collapse anything that could end a line (CR, LF, NEL, LS, PS, other controls), and break
    every RFC 2047 encoded word: ``=?utf-8?q?x=0D=0AInjected:...?=`` in a name would be decoded
    by the email package into a CR LF that Pythons without the fix for CVE-2024-6923 write out
    raw, a header of its own. ``=?`` becomes ``= ?``, which no decoder takes for one."""
    flat = _BREAKS.sub(" ", text).replace("=?", "= ?").strip()
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def stamp(wall: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(wall))


@dataclass(frozen=True)
class Notification:
    event: str  # the routing name: vrrp:MASTER, lvs:DOWN, agent:giveup, digest:flapping, test
    subject: str
    body: str
    node: str
    created: float  # wall-clock seconds
    fields: dict[str, Any] = field(default_factory=dict)
    # Fixed when the message is spooled (its spool name) and kept across retries: the
    # Message-ID of the mail and the "id" of the webhook post, so a receiver can de-duplicate.
    ident: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Notification:
        data = json.loads(text)
        return cls(
            event=str(data["event"]),
            subject=one_line(str(data["subject"]), 300),
            body=str(data["body"]),
            node=str(data["node"]),
            created=float(data["created"]),
            fields=dict(data.get("fields") or {}),
            ident=str(data.get("ident") or ""),
        )

    def with_note(self, note: str) -> Notification:
        return Notification(
            self.event,
            self.subject,
            f"{self.body}\n\n{note}",
            self.node,
            self.created,
            self.fields,
            self.ident,
        )


def vrrp(
    node: str,
    kind: str,
    name: str,
    old: str | None,
    new: str,
    priority: int | None,
    vips: list[str],
    wall: float,
    source: str = "fifo",
) -> Notification:
    """A VRRP instance or group changed state (or reported a priority event); ``source``:
    "fifo" (keepalived's notify_fifo) or "script" (`lbwatch notify`)."""
    what = "group" if kind == "GROUP" else "instance"
    arrow = f"{old} -> {new}" if old else new
    prio = f" (priority {priority})" if priority is not None else ""
    subject = one_line(f"[lbwatch] {node}: {name} {arrow}{prio}", 300)
    lines = [
        f"Node:        {one_line(node)}",
        f"VRRP {what}: {one_line(name)}",
        f"State:       {arrow}",
        f"Priority:    {priority if priority is not None else 'not given'}",
        f"VIPs:        {', '.join(vips) if vips else 'not configured in lbwatch.toml'}",
        f"Time:        {stamp(wall)}",
    ]
    if new == "MASTER":
        lines.append("\nThis node now holds the VIPs above.")
    elif new == "FAULT":
        lines.append("\nkeepalived reports a fault: this node cannot hold the VIPs.")
    return Notification(
        f"vrrp:{new}",
        subject,
        "\n".join(lines),
        node,
        wall,
        {
            "type": kind,
            "name": name,
            "old_state": old,
            "state": new,
            "priority": priority,
            "vips": vips,
            "source": source,
        },
    )


def lvs(
    node: str, kind: str, server: str, virtual: str | None, up: bool, wall: float
) -> Notification:
    state = "UP" if up else "DOWN"
    where = f"{server} in {virtual}" if virtual else server
    what = "real server" if kind == "RS" else "virtual server"
    subject = one_line(f"[lbwatch] {node}: {what} {where} {state}", 300)
    body = (
        f"Node:  {node}\n{what.capitalize()}: {one_line(where)}\nState: {state}\n"
        f"Time:  {stamp(wall)}"
    )
    return Notification(
        f"lvs:{state}",
        subject,
        body,
        node,
        wall,
        {"type": kind, "server": server, "virtual_server": virtual, "up": up},
    )


def agent(node: str, kind: str, text: str, wall: float) -> Notification:
    """lbwatch's own events: haproxy down and keepalived stopped, restarts, give-ups."""
    subject = one_line(f"[lbwatch] {node}: {text}", 300)
    body = f"Node:  {node}\nEvent: {kind}\nWhat:  {one_line(text, 2000)}\nTime:  {stamp(wall)}"
    return Notification(f"agent:{kind}", subject, body, node, wall, {"kind": kind, "text": text})


def digest(
    node: str, key: str, transitions: list[tuple[float, str]], window: float, wall: float
) -> Notification:
    """Many transitions of one instance within the flap window, as one message."""
    name = key.split(":", 1)[1]
    states = " -> ".join(s for _, s in transitions)
    subject = one_line(
        f"[lbwatch] {node}: {name} flapping, {len(transitions)} more transitions in "
        f"{window:.0f} s, now {transitions[-1][1]}",
        300,
    )
    lines = [f"Node:  {node}", f"VRRP:  {one_line(name)}", f"Window: {window:.0f} s", ""]
    lines += [f"  {stamp(t)}  {s}" for t, s in transitions]
    lines += ["", f"Sequence: {states}"]
    return Notification(
        "digest:flapping",
        subject,
        "\n".join(lines),
        node,
        wall,
        {"name": name, "transitions": [s for _, s in transitions]},
    )


def test(node: str, channel: str, wall: float) -> Notification:
    return Notification(
        "test",
        one_line(f"[lbwatch] {node}: test message via {channel}", 300),
        f"This is a test from lbwatch on {node} at {stamp(wall)}.\n"
        f"If you read it, {channel} works.",
        node,
        wall,
    )

"""What keepalived's track files (``trackfile``) must say for each instance, and the next
write that brings them there, with its sentence. Pure: the policy issues the write as a TRACK
action on keepalived's slot.

For each of this node's instances, in order of precedence:
- ``FAULT`` while it stands down in a split brain (``cluster.standdown``);
- ``DRAINED`` (priority 1: a peer takes the VIP over, keepalived and haproxy run on) while the
  operator's drain covers it;
- else ``OK`` (a missing file reads as OK, as keepalived reads it).

One write at a time, the stand-downs first (a split brain costs clients most), then their
ends, then the drain, then its end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lbwatch import trackfile
from lbwatch.events import Drain, InstanceFacts, StandDown


@dataclass(frozen=True)
class Write:
    cause: str
    doing: str
    track: tuple[tuple[str, int], ...]
    alert: str = ""


def wanted(name: str, stand: StandDown, drain: Drain | None) -> int:
    if name in stand.names():
        return trackfile.FAULT
    if drain is not None and drain.covers(name):
        return trackfile.DRAINED
    return trackfile.OK


def next_write(
    instances: Iterable[InstanceFacts],
    seen: Iterable[tuple[str, int | None]],
    stand: StandDown,
    drain: Drain | None,
) -> Write | None:
    values = dict(seen)
    groups: dict[str, list[str]] = {"fault": [], "unfault": [], "lower": [], "restore": []}
    for inst in instances:
        if not trackfile.fit(inst.name):
            continue  # no file can be its lever: writing could only fail, again and again
        want = wanted(inst.name, stand, drain)
        was = values.get(inst.name) or trackfile.OK
        if was == want:
            continue
        if want == trackfile.FAULT:
            groups["fault"].append(inst.name)
        elif want == trackfile.DRAINED:
            groups["lower"].append(inst.name)
        else:
            groups["unfault" if was == trackfile.FAULT else "restore"].append(inst.name)
    if groups["fault"]:
        names = groups["fault"]
        # The stand-down's whole sentence is the cluster service's line, logged just before:
        # the action names it, and does not say it a second time.
        cause = f"standing down in the split brain on {', '.join(names)}"
        doing = f"putting {', '.join(names)} in FAULT through keepalived's track files"
        return Write(cause, doing, _to(names, trackfile.FAULT))
    if groups["unfault"]:
        names = groups["unfault"]
        doing = f"bringing {', '.join(names)} back into VRRP through keepalived's track files"
        back = tuple((n, wanted(n, stand, drain)) for n in names)
        return Write("the split brain's stand-down is over", doing, back)
    if groups["lower"]:
        assert drain is not None
        names = groups["lower"]
        by = f" by {drain.by}" if drain.by else ""
        why = f": {drain.reason}" if drain.reason else ""
        doing = (
            f"lowering the priority of {', '.join(names)} to 1 through keepalived's track "
            "files, so that a peer takes the VIP over (keepalived and haproxy keep running)"
        )
        return Write(f"drain requested{by}{why}", doing, _to(names, trackfile.DRAINED), "drained")
    if groups["restore"]:
        names = groups["restore"]
        cause = "drain ended" if drain is None else "no longer drained"
        doing = f"restoring the priority of {', '.join(names)} through keepalived's track files"
        return Write(cause, doing, _to(names, trackfile.OK), "undrained")
    return None


def _to(names: list[str], value: int) -> tuple[tuple[str, int], ...]:
    return tuple((name, value) for name in names)

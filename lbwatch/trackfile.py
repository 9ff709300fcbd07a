"""keepalived's lever that needs no restart: one track file per VRRP instance, which keepalived
watches itself (keepalived.conf(5), "track_file"; 2.2.7 and later). lbwatch writes a number;
with the tracking ``weight 1`` keepalived adds it to the instance's priority (limited to
1..254), and a value below -253 puts the instance in FAULT. So:

- ``OK`` (0): the priority as configured;
- ``DRAINED`` (-253): priority 1, below any peer's: the instance stays a healthy BACKUP, its
  peer (with preemption, keepalived's default) takes the VIP over;
- ``FAULT`` (-254): the instance is in FAULT and holds no VIP whatever it hears.

What keepalived.conf needs, per instance (``lbwatch doctor`` checks it and prints it):

    track_file lbwatch_VI_1 {
        file "/var/lib/lbwatch/track/VI_1"
        weight 1
        init_file 0
    }
    vrrp_instance VI_1 {
        ...
        track_file {
            lbwatch_VI_1
        }
    }

Who writes: the agent alone (root), as an action of the policy (``Verb.TRACK``), atomically
(a rename over the file: keepalived reads whole numbers, never half a write). The directory is
root's; the files are under ``[keepalived] track_dir`` (the state directory's ``track``, so
that a drain survives a reboot even before lbwatch starts: keepalived reads the file itself).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from pathlib import Path

from lbwatch import kaconf
from lbwatch.fsutil import read_small, write_atomic

OK, DRAINED, FAULT = 0, -253, -254
NAME_PREFIX = "lbwatch_"  # the track_file block's name in keepalived.conf: lbwatch_VI_1
SAFE = re.compile(r"^[A-Za-z0-9_.@:+-]{1,64}$")  # an instance name fit for a file name
MAX_SIZE = 64


def fit(instance: str) -> bool:
    """Whether ``instance`` can name a track file: keepalived allows "/" in a name, and a long
    one; such an instance has no lever (the policy never writes for it, doctor says so)."""
    return bool(SAFE.match(instance)) and instance not in (".", "..")


def path(track_dir: Path, instance: str) -> Path | None:
    """The track file of ``instance``; None for a name unfit for a file name (no lever)."""
    return track_dir / instance if fit(instance) else None


def read(track_dir: Path, instances: Iterable[str]) -> tuple[tuple[str, int | None], ...]:
    """Each instance's value as keepalived would read it now; None: no file, or not a number
    (keepalived then reads 0)."""
    out = []
    for name in sorted(set(instances)):
        file = path(track_dir, name)
        value: int | None = None
        if file is not None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                value = int(read_small(file, MAX_SIZE)[:MAX_SIZE].split()[0])
        out.append((name, value))
    return tuple(out)


def write(track_dir: Path, instance: str, value: int) -> None:
    """Set ``instance``'s value; raises OSError (or ValueError for a name with no lever)."""
    file = path(track_dir, instance)
    if file is None:
        raise ValueError(f"{instance!r} cannot name a track file")
    track_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_atomic(file, f"{value}\n".encode(), mode=0o644)


def block(track_dir: Path, instance: str) -> str:
    """What keepalived.conf needs for ``instance``'s lever (``lbwatch doctor`` prints it)."""
    return (
        f'track_file {NAME_PREFIX}{instance} {{\n    file "{track_dir / instance}"\n'
        f"    weight 1\n    init_file 0\n}}\n"
        f"vrrp_instance {instance} {{\n    track_file {{\n        {NAME_PREFIX}{instance}\n"
        "    }\n}"
    )


def lever(conf: kaconf.Keepalived, instance: str, track_dir: Path) -> str:
    """What keeps ``instance`` from being moved through its track file, as keepalived.conf
    reads: "" when it tracks lbwatch's file with weight 1."""
    inst = next((i for i in conf.instances if i.name == instance), None)
    if inst is None:
        return f"keepalived.conf has no vrrp_instance {instance}"
    want = path(track_dir, instance)
    if want is None:
        return f"{instance}: the name cannot name a track file"
    for t in inst.tracks:
        if t.kind != "file" or t.name not in conf.track_files:
            continue
        file, _, where = conf.track_files[t.name]
        if Path(file) != want:
            continue
        if t.weight != 1:
            return (
                f"{instance} tracks {want} with weight {t.weight} ({where}); lbwatch's values "
                "need weight 1"
            )
        return ""
    return f"{instance} does not track {want} in keepalived.conf (track_file ... weight 1)"

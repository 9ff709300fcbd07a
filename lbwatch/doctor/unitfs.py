"""What a service's sandbox lets it write: the file system as systemd 252 sets up the unit's
mount namespace (src/core/namespace.c, systemd.exec(5)), judged from the unit's settings alone.
Pure: settings (or the unit's texts) and a path in, an outcome and the setting that decides it
out; ``lbwatch doctor`` reads the files (``units``) and resolves symlinks, as systemd does before
it mounts.

Each setting becomes rules on paths (namespace.c's tables):
  ProtectSystem=yes      /usr /boot /efi read-only, and /lib /lib64 /bin /sbin (Debian 12
                         builds systemd with split-usr); full: /etc too; strict: / read-only,
                         /proc /sys /dev left writable, /home /root /run/user left to
                         ProtectHome= (writable while it is no)
  ProtectHome=           yes: /home /root /run/user inaccessible; read-only; tmpfs: an empty
                         read-only directory over each
  PrivateTmp=yes         /tmp and /var/tmp the unit's own, writable, seen by no other process
  ReadWritePaths= ReadOnlyPaths= InaccessiblePaths=   each path ("+": below RootDirectory=,
                         the same here; "-": skipped when missing, counted here as there)
  RuntimeDirectory= StateDirectory= CacheDirectory= LogsDirectory= ConfigurationDirectory=
                         bind mounts of /run/X /var/lib/X /var/cache/X /var/log/X /etc/X, writable

Then, as namespace.c applies them: the rule on the longest path that holds the path decides
(each is a mount of its own, which a read-only remount of a shorter one skips). Of two rules on
the same path the kind first in namespace.c's MountMode order wins (``PRIORITY``), read-only if
either is. Nothing below an inaccessible path counts; below a directory systemd replaces (a
private /tmp, ProtectHome=tmpfs) ReadWritePaths= and ReadOnlyPaths= name paths that are not
there, and are skipped or fail the unit's start.

Not modelled: BindPaths=, TemporaryFileSystem=, DynamicUser=, RootDirectory=, the API trees'
own settings (ProtectKernelTunables=, PrivateDevices=, ...), and whether a file system is
mounted read-only on the host.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, NamedTuple

from lbwatch.doctor import units

Kind = Literal[
    "inaccessible", "bind", "private-tmp", "read-only", "read-write", "tmpfs", "implicit"
]
# namespace.c's MountMode, "ordered by priority": INACCESSIBLE, BIND_MOUNT_RECURSIVE (the
# directories of RuntimeDirectory= and the like), PRIVATE_TMP, READONLY, READWRITE, TMPFS,
# READWRITE_IMPLICIT ("Should have the lowest priority").
PRIORITY: Mapping[Kind, int] = {
    "inaccessible": 0,
    "bind": 4,
    "private-tmp": 5,
    "read-only": 12,
    "read-write": 13,
    "tmpfs": 16,
    "implicit": 21,
}
# A new directory over the old: the paths below it are not there when later rules are applied.
REPLACES: frozenset[Kind] = frozenset({"private-tmp", "tmpfs"})
VANISH: frozenset[Kind] = frozenset({"read-only", "read-write", "implicit"})

Outcome = Literal["writable", "private", "read-only", "inaccessible"]


class Rule(NamedTuple):
    path: str
    kind: Kind
    setting: str  # as written: "ReadWritePaths=-/etc/haproxy", "ProtectSystem=strict"

    def read_only(self) -> bool:
        return self.kind in ("read-only", "inaccessible", "tmpfs")


class Access(NamedTuple):
    outcome: Outcome
    why: str
    rule: Rule | None  # the one that decides; None: no rule holds the path


YES = frozenset({"1", "yes", "y", "true", "t", "on"})  # systemd's parse_boolean
SYSTEM: Mapping[str, tuple[str, ...]] = {
    "yes": ("/usr", "/boot", "/efi", "/lib", "/lib64", "/bin", "/sbin"),
    "full": ("/usr", "/boot", "/efi", "/etc", "/lib", "/lib64", "/bin", "/sbin"),
}
HOME = ("/home", "/run/user", "/root")
PRIVATE_TMP = ("/tmp", "/var/tmp")  # noqa: S108 - names of the directories, nothing made there
HOME_KIND: Mapping[str, Kind] = {"yes": "inaccessible", "read-only": "read-only", "tmpfs": "tmpfs"}
# strict: "/" read-only, the kernel's API trees and ProtectHome='s three left writable.
STRICT_LEFT = ("/proc", "/sys", "/dev", *HOME)
LISTED: Mapping[str, Kind] = {
    "InaccessiblePaths": "inaccessible",
    "ReadOnlyPaths": "read-only",
    "ReadWritePaths": "read-write",
}
# systemd.exec(5), "Automatic directory creation": below these for system units.
DIRECTORIES: Mapping[str, str] = {
    "RuntimeDirectory": "/run",
    "StateDirectory": "/var/lib",
    "CacheDirectory": "/var/cache",
    "LogsDirectory": "/var/log",
    "ConfigurationDirectory": "/etc",
}


def _choice(service: Mapping[str, Sequence[str]], key: str) -> tuple[str, str]:
    """A setting that is a boolean or a word, as meant ("yes", "no" or the word; empty resets
    to no) and as written, for the reasons given."""
    values = service.get(key)
    written = values[-1].strip() if values else ""
    value = written.lower()
    if value in YES:
        return "yes", f"{key}={written}"
    return value or "no", f"{key}={written}"


def rules(service: Mapping[str, Sequence[str]]) -> list[Rule]:
    """The unit's [Service] settings (``units.parse``) as rules on paths."""
    out: list[Rule] = []
    system, said = _choice(service, "ProtectSystem")
    if system == "strict":
        out.append(Rule("/", "read-only", said))
        out += [Rule(p, "implicit", said) for p in STRICT_LEFT]
    out += [Rule(p, "read-only", said) for p in SYSTEM.get(system, ())]
    home, said = _choice(service, "ProtectHome")
    if home in HOME_KIND:
        out += [Rule(p, HOME_KIND[home], said) for p in HOME]
    private, said = _choice(service, "PrivateTmp")
    if private == "yes":
        out += [Rule(p, "private-tmp", said) for p in PRIVATE_TMP]
    for key, kind in LISTED.items():
        for word in _words(service.get(key, ())):
            path = word.removeprefix("-").removeprefix("+")
            if path.startswith("/"):  # systemd ignores a relative one ("not absolute")
                out.append(Rule(_normal(path), kind, f"{key}={word}"))
    for key, base in DIRECTORIES.items():
        for word in _words(service.get(key, ())):
            name = word.partition(":")[0]  # "NAME:LINK": LINK is a symlink to it
            if name and not name.startswith("/") and ".." not in name.split("/"):
                out.append(Rule(_normal(f"{base}/{name}"), "bind", f"{key}={word}"))
    return out


def _words(lines: Iterable[str]) -> list[str]:
    """Whitespace-separated words, double or single quotes around one allowed."""
    out: list[str] = []
    for line in lines:
        out += [w[1:-1] if len(w) > 1 and w[0] == w[-1] and w[0] in "\"'" else w
                for w in line.split()]  # fmt: skip
    return out


def _normal(path: str) -> str:
    return posixpath.normpath(path).replace("//", "/")


def _holds(outer: str, path: str) -> bool:
    return outer in ("/", path) or path.startswith(outer + "/")


def _depth(path: str) -> int:
    return 0 if path == "/" else path.count("/")


def access(ruleset: Sequence[Rule], path: str) -> Access:
    """How the unit sees ``path`` (absolute): whether it may write there, and why."""
    target = _normal(path)
    at: dict[str, list[Rule]] = {}
    for rule in ruleset:
        if _holds(rule.path, target):
            at.setdefault(rule.path, []).append(rule)
    decided: Rule | None = None
    read_only: Rule | None = None
    for where in sorted(at, key=_depth):  # from / down to the path itself
        same = sorted(at[where], key=lambda r: PRIORITY[r.kind])
        if decided is not None and decided.kind == "inaccessible":
            break
        if decided is not None and decided.kind in REPLACES and same[0].kind in VANISH:
            continue
        decided = same[0]
        read_only = next((r for r in same if r.read_only()), None)
    return _outcome(decided, read_only)


def _outcome(decided: Rule | None, read_only: Rule | None) -> Access:
    if decided is None:
        return Access("writable", "no setting of the unit restricts it", None)
    if decided.kind == "inaccessible":
        return Access("inaccessible", f"{decided.setting} makes {decided.path} inaccessible",
                      decided)  # fmt: skip
    if decided.kind == "tmpfs":
        return Access("read-only", f"{decided.setting} puts an empty read-only directory over "
                      f"{decided.path}", decided)  # fmt: skip
    if read_only is not None:
        return Access("read-only", f"{read_only.setting} makes {read_only.path} read-only",
                      read_only)  # fmt: skip
    if decided.kind == "private-tmp":
        return Access("private", f"{decided.setting} gives the unit a {decided.path} of its "
                      "own: no other process sees it, and it is emptied when the unit stops",
                      decided)  # fmt: skip
    if decided.kind == "implicit":
        return Access("writable", f"{decided.setting} leaves {decided.path} writable", decided)
    return Access("writable", f"writable through {decided.setting}", decided)


def access_in(texts: Sequence[str], path: str) -> Access:
    """``access`` for a unit given as its file's text followed by its drop-ins' texts, in the
    order they apply (``units.dropins``)."""
    return access(rules(units.parse(texts)), path)


def opens(ruleset: Sequence[Rule], path: str) -> bool:
    """Whether a drop-in's ``ReadWritePaths=`` of ``path`` would make it writable, asked of
    ``access`` itself: not below an inaccessible or replaced directory, nor where a stronger
    rule holds the path itself."""
    added = Rule(_normal(path), "read-write", f"ReadWritePaths=-{_normal(path)}")
    return access([*ruleset, added], path).outcome == "writable"

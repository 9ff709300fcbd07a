"""A systemd service unit as systemd would load it, read from the files (PID 1 need not be
systemd, and no D-Bus is needed): the unit file found first on the search path, then its
drop-ins (``NAME.service.d/*.conf``, in name order), a later setting replacing an earlier one
and an empty assignment resetting a list (systemd.unit(5)). Only [Service] is kept."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

SEARCH = (
    Path("/etc/systemd/system"),
    Path("/run/systemd/system"),
    Path("/usr/local/lib/systemd/system"),
    Path("/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
)
LISTS = {"ExecStart", "ExecReload", "Environment", "ExecStartPre", "ExecStop"}


@dataclass
class Unit:
    name: str
    path: Path | None  # None: no such unit
    service: dict[str, list[str]] = field(default_factory=dict)

    def get(self, key: str) -> str | None:
        values = self.service.get(key)
        return values[-1] if values else None

    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for line in self.service.get("Environment", []):
            for word in shlex.split(line):
                name, sep, value = word.partition("=")
                if sep:
                    env[name] = value
        return env

    def exec_start(self) -> list[str]:
        """The main ExecStart's argv, $VAR and ${VAR} from Environment= expanded (a $VAR alone
        as a word splits into words, as systemd does); prefixes (-@:+!) dropped."""
        line = self.get("ExecStart")
        if not line:
            return []
        env = self.environment()
        argv: list[str] = []
        for word in shlex.split(line):
            alone = re.fullmatch(r"\$(\w+)", word)
            if alone:
                argv += env.get(alone.group(1), "").split()
                continue
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word))
        if argv:
            argv[0] = argv[0].lstrip("-@:+!")
        return argv


def _read(path: Path, into: dict[str, list[str]]) -> None:
    section = ""
    pending = ""
    for raw in path.read_text(errors="replace").splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section != "Service" or "=" not in line:
            continue
        key, _, value = (p.strip() for p in line.partition("="))
        if key in LISTS:
            into[key] = [] if value == "" else [*into.get(key, []), value]
        else:
            into[key] = [value]


def load(name: str, search: tuple[Path, ...] = SEARCH) -> Unit:
    unit = Unit(name, None)
    for base in search:
        path = base / name
        if path.is_file():
            unit.path = path
            _read(path, unit.service)
            break
    if unit.path is None:
        return unit
    dropins = sorted(
        (conf for base in search for conf in (base / f"{name}.d").glob("*.conf")),
        key=lambda p: p.name,
    )
    for conf in dropins:
        _read(conf, unit.service)
    return unit

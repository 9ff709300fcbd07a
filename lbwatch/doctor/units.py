"""A systemd service unit as systemd 252 loads it, read from the files (PID 1 need not be
systemd, and no D-Bus is needed). Only [Service] is kept.

Where (systemd.unit(5), "Unit File Load Path"; src/shared/dropin.c): the unit file is the one
found first on the search path (``SEARCH``). Its drop-ins are the ``*.conf`` files of the
directories ``NAME.d`` (and, for a name with dashes, ``foo-bar-.service.d`` and
``foo-.service.d``) in every directory of the search path, then of the top-level ``service.d``
in every one; of two drop-ins with the same file name, the one in the directory listed first
wins and the other is not read at all (a same-named file masks, an empty one or a link to
/dev/null included). The drop-ins left apply after the unit file in the lexical order of their
file names, whatever directory each is in.

How (``parse``, a pure function of the texts): a later assignment replaces an earlier one; for
the settings that are lists (``LISTS``) it adds to them, and an empty assignment (``KEY=``)
empties the list.

Not read: templates (``foo@.service`` for ``foo@bar.service``), aliases, specifiers (``%h``).
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# `systemd-analyze unit-paths` on Debian 12 (systemd 252), highest priority first. Debian 12
# builds systemd with split-usr, hence /lib/systemd/system before /usr/lib/systemd/system;
# on a merged-/usr system both are one directory, and a file found twice is read once (the
# first wins by name). RHEL 9 lists the same without /lib, where /lib is a link into /usr too.
SEARCH = (
    Path("/etc/systemd/system.control"),
    Path("/run/systemd/system.control"),
    Path("/run/systemd/transient"),
    Path("/run/systemd/generator.early"),
    Path("/etc/systemd/system"),
    Path("/etc/systemd/system.attached"),
    Path("/run/systemd/system"),
    Path("/run/systemd/system.attached"),
    Path("/run/systemd/generator"),
    Path("/usr/local/lib/systemd/system"),
    Path("/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
    Path("/run/systemd/generator.late"),
)
# Settings whose assignments add up (systemd.exec(5), systemd.service(5)); an empty one resets.
LISTS = frozenset(
    {
        "ExecStart",
        "ExecReload",
        "ExecStartPre",
        "ExecStop",
        "Environment",
        "ReadWritePaths",
        "ReadOnlyPaths",
        "InaccessiblePaths",
        "RuntimeDirectory",
        "StateDirectory",
        "CacheDirectory",
        "LogsDirectory",
        "ConfigurationDirectory",
    }
)


@dataclass(frozen=True)
class Unit:
    name: str
    path: Path | None  # None: no such unit
    dropins: tuple[Path, ...] = ()  # in the order they apply
    service: Mapping[str, Sequence[str]] = field(default_factory=dict)
    masked: bool = False  # the unit file is empty or a link to /dev/null (`systemctl mask`)

    def get(self, key: str) -> str | None:
        values = self.service.get(key)
        return values[-1] if values else None

    def credential(self, name: str) -> Path | None:
        """Where ``LoadCredential=NAME:PATH`` takes credential NAME from (the last such line, as
        systemd applies them); None when no line names it, or names no absolute path (systemd's
        credential store, or a socket, which doctor cannot stand in for)."""
        source = None
        for line in self.service.get("LoadCredential", []):
            cred, sep, path = line.partition(":")
            if cred == name:
                source = Path(path) if sep and path.startswith("/") else None
        return source

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


def parse(texts: Iterable[str]) -> dict[str, list[str]]:
    """The [Service] settings of a unit file's text followed by its drop-ins' texts, as
    systemd's parser reads them (src/shared/conf-parser.c): a line ending in a backslash goes
    on in the next one, comment lines inside it skipped; ``#`` and ``;`` start comments."""
    service: dict[str, list[str]] = {}
    for text in texts:
        section = ""
        pending: str | None = None
        for raw in text.splitlines():
            stripped = raw.strip()
            if pending is not None and stripped.startswith(("#", ";")):
                continue
            line = stripped if pending is None else pending + stripped
            pending = None
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            section = _assign(line, section, service)
        if pending is not None:
            _assign(pending.rstrip(), section, service)
    return service


def _assign(line: str, section: str, into: dict[str, list[str]]) -> str:
    """Apply one logical line; the section it leaves the parser in."""
    if not line or line.startswith(("#", ";")):
        return section
    if line.startswith("["):
        return line.strip("[]")
    if section != "Service" or "=" not in line:
        return section
    key, _, value = (p.strip() for p in line.partition("="))
    if key in LISTS:
        into[key] = [] if value == "" else [*into.get(key, []), value]
    else:
        into[key] = [value]
    return section


def dropin_dirs(name: str, search: Sequence[Path] = SEARCH) -> list[Path]:
    """Where systemd 252 looks for ``name``'s drop-ins, in the order that decides which of two
    same-named files wins (src/shared/dropin.c, unit_file_find_dropin_paths): in each directory
    of the search path the unit's own ``NAME.d`` and its dash prefixes, most specific first;
    then the top-level ``TYPE.d`` ("service.d") in each, added last "as it's the most generic
    and should be able to be overridden by more specific drop-ins"."""
    kind = name.rpartition(".")[2]
    names = [name, *_dash_prefixes(name)]
    own = [base / f"{n}.d" for base in search for n in names]
    return own + [base / f"{kind}.d" for base in search]


def _dash_prefixes(name: str) -> list[str]:
    """foo-bar-baz.service: foo-bar-.service, foo-.service (systemd.unit(5))."""
    stem, _, kind = name.rpartition(".")
    rest = stem.partition("@")[0]
    found: list[str] = []
    while True:
        rest = rest.removesuffix("-")
        cut = rest.rfind("-")
        if cut <= 0:  # none, or a leading dash
            return found
        rest = rest[: cut + 1]
        found.append(f"{rest}.{kind}")


def dropins(name: str, search: Sequence[Path] = SEARCH) -> list[Path]:
    """The drop-ins that apply, in the order they apply: each file name once (the first
    directory's), sorted by file name."""
    chosen: dict[str, Path] = {}
    for directory in dropin_dirs(name, search):
        try:
            entries = sorted(os.listdir(directory))
        except OSError:
            continue
        for entry in entries:
            path = directory / entry
            if entry.endswith(".conf") and entry not in chosen and not path.is_dir():
                chosen[entry] = path
    return [chosen[n] for n in sorted(chosen)]


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:  # a dangling link: masks its name, adds nothing
        return ""


def load(name: str, search: Sequence[Path] = SEARCH) -> Unit:
    found = next((base / name for base in search if os.path.lexists(base / name)), None)
    if found is None:
        return Unit(name, None)
    text = _text(found)
    masked = found.resolve() == Path("/dev/null") or text == ""
    if masked:
        return Unit(name, found, masked=True)
    confs = dropins(name, search)
    return Unit(name, found, tuple(confs), parse([text, *map(_text, confs)]))

"""What a version received from a peer may ask of this node's haproxy. Pure (the one look at the
file system, symlinks resolved, comes in as ``real``).

Who reaches this: whoever holds a peer's sync key (the peer's agent, or someone who stole the
key) can put any bytes into this node's staging as a version. Config sync exists so that such a
version changes what the load balancer serves. It must not do more: haproxy reads its config as
root, and some directives run code or commands (during ``haproxy -c`` itself for ``lua-load``,
at every start and reload for ``program`` and ``external-check``), create files and sockets as
root, or connect clients to this node's local sockets. A received version is read word by word
as haproxy reads it (``cfgscan``) and refused, before anything checks or installs it, when it
uses any of these that the node's own ``[sync.received] allow`` does not name:

    code      lua-load, lua-load-per-thread, lua-prepend-path, program sections and their
              command, external-check (global, command, path), option external-check,
              insecure-fork-wanted, insecure-setuid-wanted, setenv, presetenv, resetenv,
              unsetenv, ssl-engine, ssl-provider, ssl-provider-path, unix-bind, setcap
    write     a UNIX socket or file haproxy creates: stats socket, bind, dgram-bind, pidfile,
              a ring's backing-file (defaults: under haproxy's own run and state directories)
    connect   a server at a UNIX socket (a local FastCGI or container API would be exposed)

Every file a version names (certificates, maps, ACL lists, error files, Lua, state files) must
not lie in lbwatch's own directories (staging, state, run: where the key holder can put
files), wherever a relative path may be taken from; that is never allowed. A keyword, or a
path of the kinds above, taken from an environment variable cannot be checked and is refused.
What a version may read otherwise is bounded by the check, which runs as an unprivileged user
(``sandbox``): a file that user cannot read fails it.

Every branch of ``.if`` blocks is read: a directive is refused even where a condition would
leave it out.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from lbwatch.sync.cfgscan import Line, Word, scan

Kind = Literal["code", "write", "connect", "read"]

CODE_WITH_PATH = ("lua-load", "lua-load-per-thread", "lua-prepend-path", "ssl-provider-path")
CODE_BY_NAME = (
    "insecure-fork-wanted",
    "insecure-setuid-wanted",
    "setenv",
    "presetenv",
    "resetenv",
    "unsetenv",
    "ssl-engine",
    "ssl-provider",
    "unix-bind",
    "setcap",
)
# Directives an allow entry may name, each with whether it takes a path pattern.
ALLOWABLE: dict[str, bool] = {
    **dict.fromkeys(CODE_WITH_PATH, True),
    **dict.fromkeys(CODE_BY_NAME, False),
    "program": False,  # the section's name
    "command": True,  # a program section's command (its executable)
    "external-check": False,
    "external-check command": True,
    "external-check path": False,
    "option external-check": False,
    "stats socket": True,
    "bind": True,
    "dgram-bind": True,
    "pidfile": True,
    "backing-file": True,
    "server": True,
}
# haproxy's own run and state directories on Debian, Ubuntu and RHEL (their default configs
# put the stats socket there); the pidfile Debian's and RHEL's units pass with -p.
_OWN_DIRS = ("/run/haproxy/*", "/var/run/haproxy/*", "/var/lib/haproxy/*")
DEFAULT_ALLOW = (
    *(f"stats socket {d}" for d in _OWN_DIRS),
    *(f"bind {d}" for d in _OWN_DIRS),
    *(f"pidfile {d}" for d in ("/run/haproxy.pid", "/var/run/haproxy.pid", *_OWN_DIRS)),
)

# Options of bind, server and default-server lines that name a file (relative: to crt-base
# for crt and crt-list, to ca-base for the others).
SSL_FILES = ("crt", "crt-list", "ca-file", "crl-file", "ca-verify-file", "ca-sign-file")
# Global directives whose argument is a file or directory haproxy reads.
GLOBAL_FILES = (
    "ca-base",
    "crt-base",
    "ssl-dh-param-file",
    "issuers-chain-path",
    "server-state-base",
    "server-state-file",
    "h1-case-adjust-file",
    "51degrees-data-file",
    "deviceatlas-json-file",
    "wurfl-data-file",
    "chroot",
)
RETURN_FILES = ("file", "lf-file", "errorfile")  # http-request return ..., http-error ...
HTTP_RULES = ("http-request", "http-response", "http-after-response", "http-error")
# Converters and actions that name a map or ACL file: map(FILE), map_str(FILE,...), set-map(FILE)
_MAP_FILE = re.compile(
    r"(?:^|[\s,(])(?:map(?:_[a-z0-9_]+)?|set-map|del-map|add-acl|del-acl)\(([^,)]*)"
)
_ADDRESS_PREFIX = ("stream+", "dgram+")
KEYWORD_FROM_ENV = "(keyword)"
_UNIX_PREFIX = ("unix@", "uxst@", "uxdg@")


@dataclass(frozen=True)
class Use:
    """A directive of a policed kind, on one line, with the path or name it uses."""

    line: int
    directive: str
    kind: Kind
    arg: Word | None = None


@dataclass(frozen=True)
class Allow:
    """One ``[sync.received] allow`` entry: a directive and a pattern for its path or name
    (None: any). ``*`` in a pattern matches across ``/``."""

    directive: str
    pattern: str | None

    def admits(self, use: Use, candidates: Iterable[str]) -> bool:
        if use.directive != self.directive:
            return False
        if self.pattern is None:
            return True
        return all(fnmatch.fnmatchcase(c, self.pattern) for c in candidates)


def parse_allow(entry: str) -> Allow:
    """An allow entry, ``"DIRECTIVE [PATTERN]"``; ValueError naming what is wrong."""
    words = entry.split()
    for size in (2, 1):
        name = " ".join(words[:size])
        if len(words) >= size and name in ALLOWABLE:
            rest = words[size:]
            if len(rest) > 1:
                raise ValueError(f"{entry!r}: one pattern after {name!r}")
            if ALLOWABLE[name] and not rest:
                raise ValueError(f"{entry!r}: {name} needs a path pattern")
            if rest and ALLOWABLE[name] and not rest[0].startswith(("/", "$")):
                raise ValueError(
                    f"{entry!r}: the pattern must be an absolute path (or an environment "
                    "reference as written, such as ${IP}:80)"
                )
            return Allow(name, rest[0] if rest else None)
    known = ", ".join(sorted(ALLOWABLE))
    raise ValueError(f"{entry!r}: not a directive lbwatch polices (one of: {known})")


@dataclass(frozen=True)
class Rules:
    allow: tuple[Allow, ...]
    hidden: tuple[str, ...]  # directories no received version may name (absolute, resolved)
    config_dir: str  # the live config's directory: a relative path may be taken from there


@dataclass(frozen=True)
class Refusal:
    line: int
    directive: str
    arg: str
    why: str

    def __str__(self) -> str:
        what = f"{self.directive} {self.arg}" if self.arg else self.directive
        return f"line {self.line}: {what}: {self.why}"


WHY = {
    "code": "runs code or commands",
    "write": "makes haproxy create a file or socket there, as root",
    "connect": "sends clients to a local socket",
}


def refusals(
    content: bytes, rules: Rules, real: Callable[[str], str] = posixpath.normpath
) -> list[Refusal]:
    """Why this config may not be taken from a peer, one entry per use (empty: admitted).
    ``real``: a path with its symlinks resolved (``os.path.realpath``)."""
    lines = list(scan(content))
    bases = _bases(lines, rules.config_dir)
    found = []
    for use in (u for line in lines for u in uses(line)):
        why = _judge(use, bases, rules, real)
        if why is not None:
            arg = use.arg.text if use.arg is not None else ""
            found.append(Refusal(use.line, use.directive, arg[:120], why))
    return found


def _judge(
    use: Use, bases: tuple[str, ...], rules: Rules, real: Callable[[str], str]
) -> str | None:
    """Why ``use`` is refused, or None."""
    if use.directive == KEYWORD_FROM_ENV:
        return "a keyword taken from an environment variable cannot be checked"
    arg = use.arg
    takes_path = use.kind != "code" or use.directive in _PATHS
    candidates = _candidates(arg.text, bases) if arg is not None and takes_path else []
    for path in candidates:
        for hidden in rules.hidden:
            if _inside(path, hidden) or _inside(real(path), hidden):
                return f"names {hidden}, lbwatch's own directory: never allowed"
    if use.kind == "read":
        return (
            "a file named by an environment variable cannot be checked" if arg and arg.env else None
        )
    if arg is not None and (arg.env or not takes_path):
        targets = [arg.text]  # a name, or a path as written: only a pattern for it admits it
    else:
        targets = candidates
    if any(a.admits(use, targets) for a in rules.allow):
        return None
    env = ", from an environment variable" if arg is not None and arg.env else ""
    return f"{WHY[use.kind]}{env}: not in [sync.received] allow"


_PATHS = frozenset(d for d, path in ALLOWABLE.items() if path)


def _inside(path: str, directory: str) -> bool:
    path = posixpath.normpath(path)
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _candidates(path: str, bases: tuple[str, ...]) -> list[str]:
    """Where a path may point: itself when absolute, else against every base haproxy may take
    it from."""
    if path.startswith("/"):
        return [posixpath.normpath(path)]
    return sorted({posixpath.normpath(posixpath.join(b, path)) for b in bases})


def _bases(lines: list[Line], config_dir: str) -> tuple[str, ...]:
    """Where haproxy may take a relative path from: its working directory (/ under systemd),
    the config's directory (``default-path config``), and any base the config sets."""
    bases = {"/", config_dir}
    for line in lines:
        t = line.texts
        if t[0] in ("crt-base", "ca-base", "server-state-base") and len(t) > 1:
            bases.add(t[1])
        elif t[0] == "default-path" and len(t) > 2 and t[1] == "origin":
            bases.add(t[2])
        elif t[0] == "unix-bind" and "prefix" in t[:-1]:
            bases.add(t[t.index("prefix") + 1])
    return tuple(sorted(b for b in bases if b.startswith("/")))


def unix_path(address: str) -> str | None:
    """The file system path of a UNIX socket address (``/x``, ``unix@x``), or None."""
    for prefix in _ADDRESS_PREFIX:
        address = address.removeprefix(prefix)
    for prefix in _UNIX_PREFIX:
        if address.startswith(prefix):
            return address[len(prefix) :]
    return address if address.startswith("/") else None


def uses(line: Line) -> Iterator[Use]:
    """Every policed use on one line."""
    words = line.words
    if words[0].text == "no" and len(words) > 1:
        return  # turns something off ("no option external-check")
    if words[0].text == "default" and len(words) > 1:
        words = words[1:]
    if words[0].env:
        yield Use(line.number, KEYWORD_FROM_ENV, "code", words[0])
        return
    yield from _code(line, words)
    yield from _places(line.number, words)
    yield from _reads(line.number, words)


def _code(line: Line, words: tuple[Word, ...]) -> Iterator[Use]:
    n, t = line.number, [w.text for w in words]
    arg = words[1] if len(words) > 1 else None
    in_program = t[0] in ("program", "command") and line.section == "program"
    if t[0] in CODE_WITH_PATH or t[0] in CODE_BY_NAME or in_program:
        yield Use(n, t[0], "code", arg)
    elif t[0] == "external-check":
        if len(t) > 2 and t[1] in ("command", "path"):
            yield Use(n, f"external-check {t[1]}", "code", words[2])
        else:
            yield Use(n, "external-check", "code")
    elif t[0:2] == ["option", "external-check"]:
        yield Use(n, "option external-check", "code")


def _places(n: int, words: tuple[Word, ...]) -> Iterator[Use]:
    """The sockets and files haproxy creates, and the local sockets it connects to."""
    t = [w.text for w in words]
    if t[0:2] == ["stats", "socket"] and len(words) > 2:
        yield from _sockets(n, "stats socket", "write", words[2])
    elif t[0] in ("bind", "dgram-bind") and len(words) > 1:
        yield from _sockets(n, t[0], "write", words[1])
    elif t[0] in ("pidfile", "backing-file") and len(words) > 1:
        yield Use(n, t[0], "write", words[1])
    elif t[0] == "server" and len(words) > 2:
        yield from _sockets(n, "server", "connect", words[2])


def _sockets(n: int, directive: str, kind: Kind, addresses: Word) -> Iterator[Use]:
    if addresses.env:
        # "${CONFIG}" may be a path to an existing file: haproxy would put a socket in its place.
        yield Use(n, directive, kind, addresses)
        return
    for address in addresses.text.split(","):
        path = unix_path(address)
        if path is not None:
            yield Use(n, directive, kind, Word(path, addresses.env))


# Where the file is among a directive's words: errorfile CODE FILE, default-path origin DIR.
_FILE_AT = {**dict.fromkeys(GLOBAL_FILES, 1), "server-state-file-name": 1, "errorfile": 2}


def _reads(n: int, words: tuple[Word, ...]) -> Iterator[Use]:
    """The files a line names for haproxy to read."""
    t = [w.text for w in words]
    follow: tuple[str, ...] = ("-f",)
    if t[0] in ("bind", "server", "default-server", "server-template"):
        follow += SSL_FILES
    elif t[0] in HTTP_RULES:
        follow += RETURN_FILES
    elif t[0] == "filter":
        follow += ("config",)
    for i, text in enumerate(t[1:-1], 1):
        if text in follow:
            yield Use(n, text, "read", words[i + 1])
    at = 2 if t[0:2] == ["default-path", "origin"] else _FILE_AT.get(t[0], 0)
    if at and len(words) > at:
        yield Use(n, t[0], "read", words[at])
    for word in words:
        for match in _MAP_FILE.finditer(word.text):
            yield Use(n, "map", "read", Word(match.group(1), word.env))

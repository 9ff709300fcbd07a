"""What a version received from a peer may ask of this node's haproxy. Pure (the one look at the
file system, symlinks resolved, comes in as ``real``).

Who reaches this: whoever holds a peer's sync key (the peer's agent, or someone who stole the
key) can put any bytes into this node's staging as a version. Config sync exists so that such a
version changes what the load balancer serves. It must not do more: haproxy reads its config as
root, and some directives run code or commands (during ``haproxy -c`` itself for ``lua-load``,
at every start and reload for ``program`` and ``external-check``, a filter's plugin when the
live haproxy starts its filters), create files and sockets as root, or connect clients to this
node's local sockets. A received version is read word by word as haproxy reads it
(``cfgscan``) and refused, before anything checks, keeps or installs it, when it uses any of
these that the node's own ``[sync.received] allow`` does not name:

    code      lua-load, lua-load-per-thread, lua-prepend-path, program sections and any
              command, external-check (global, command, path), option external-check,
              insecure-fork-wanted, insecure-setuid-wanted, setenv, presetenv, resetenv,
              unsetenv, ssl-engine, ssl-provider, ssl-provider-path, unix-bind, setcap, a filter
              other than haproxy's own (opentracing loads a plugin)
    write     a UNIX socket or file haproxy creates: stats socket, bind, dgram-bind, a peer's
              address, pidfile, a ring's backing-file (defaults: haproxy's own run and state
              directories)
    connect   a UNIX or abstract socket haproxy connects to: a server, server-template, peer,
              log, check or ``connect addr`` address (a local API would be exposed)

and, never to be allowed: a NUL (``\\x00`` ends a word for haproxy, not for a reader of the
text), a file named in lbwatch's own directories (staging, state, run: where the key holder
can put files), wherever a relative path may be taken from. A keyword or a policed path taken
from an environment variable, and a condition (``.if``) the check may see otherwise than the
live haproxy (its environment differs: ``HAPROXY_MWORKER`` is set only in the live
master-worker), cannot be checked and are refused. A ``no`` or ``default`` before a keyword
hides nothing: haproxy 2.6 parses the rest of the line all the same. What a version may read
otherwise is bounded by the check, which runs as an unprivileged user (``sandbox``): a file
that user cannot read fails it. Every branch of ``.if`` blocks is read.

The lists are of haproxy 2.6's configuration manual; a directive a later haproxy adds that runs
code is not in them, and the confined check is the wall behind this one.
"""

from __future__ import annotations

import fnmatch
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from lbwatch.sync.cfgscan import Line, Word, scan

Kind = Literal["code", "write", "connect", "read", "never"]

MAX_CONFIG = 16 * 1024 * 1024  # a received haproxy config larger than this is refused unread
MAX_BASES = 16  # directories a relative path may be taken from (crt-base ...), at most

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
    "program",
)
# haproxy 2.6's own filters; any other (opentracing: a tracer's plugin, a shared object the live
# haproxy loads as root when it starts its filters, never during the check) is code.
FILTERS = ("cache", "compression", "fcgi-app", "spoe", "trace", "bwlim-in", "bwlim-out")
# Directives an allow entry may name, each with whether it takes a path pattern.
ALLOWABLE: dict[str, bool] = {
    **dict.fromkeys(CODE_WITH_PATH, True),
    **dict.fromkeys(CODE_BY_NAME, False),
    "command": True,  # a program section's command (its executable)
    "external-check": False,
    "external-check command": True,
    "external-check path": False,
    "option external-check": False,
    "filter": False,  # the filter's type
    ".if": False,  # a condition the check may read otherwise than the live haproxy
    "stats socket": True,
    "bind": True,
    "dgram-bind": True,
    "peer": True,
    "pidfile": True,
    "backing-file": True,
    "server": True,
    "server-template": True,
    "log": True,
    "addr": True,  # a check's address: a server's ``addr``, ``tcp-check connect addr``
}
# haproxy's own run and state directories on Debian, Ubuntu and RHEL (their default configs
# put the stats socket there); the pidfile Debian's and RHEL's units pass with -p; the syslog
# socket Debian's default config logs to.
_OWN_DIRS = ("/run/haproxy/*", "/var/run/haproxy/*", "/var/lib/haproxy/*")
DEFAULT_ALLOW = (
    *(f"stats socket {d}" for d in _OWN_DIRS),
    *(f"bind {d}" for d in _OWN_DIRS),
    "pidfile /run/haproxy.pid",
    "pidfile /var/run/haproxy.pid",
    "log /dev/log",
    "log /run/systemd/journal/syslog",
    "log /run/systemd/journal/dev-log",
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
# Where a directive's address is among its words (a socket haproxy creates, or connects to).
_ADDRESS_AT: dict[str, tuple[int, Kind]] = {
    "bind": (1, "write"),
    "dgram-bind": (1, "write"),
    "peer": (2, "write"),  # the local peer's address is bound, the others' connected to
    "server": (2, "connect"),
    "server-template": (3, "connect"),
    "log": (1, "connect"),
    "nameserver": (2, "connect"),
    "mailer": (2, "connect"),
}
_ADDRESS_AFTER = ("addr", "source", "usesrc", "socks4")  # options naming an address
_ADDRESS_PREFIX = ("stream+", "dgram+")
_UNIX_PREFIX = ("unix@", "uxst@", "uxdg@")
_SOCKET_PREFIX = re.compile(r"(?:^|[\s,])(?:stream\+|dgram\+)?(unix@|uxst@|uxdg@|abns@)")
# Conditions of .if/.elif that read nothing but the haproxy binary itself.
_SAME_EVERYWHERE = re.compile(r"^(?:!?(?:version_atleast|version_before|feature)\([^)$]*\)|[01])$")
KEYWORD_FROM_ENV = "(keyword)"
NUL = "(NUL)"


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
    for size in (3, 2, 1):
        name = " ".join(words[:size])
        if len(words) >= size and name in ALLOWABLE:
            rest = words[size:]
            if len(rest) > 1:
                raise ValueError(f"{entry!r}: one pattern after {name!r}")
            if ALLOWABLE[name] and not rest:
                raise ValueError(f"{entry!r}: {name} needs a path pattern")
            if rest and ALLOWABLE[name] and not rest[0].startswith(("/", "$", "abns@")):
                raise ValueError(
                    f"{entry!r}: the pattern must be an absolute path (or an abstract socket, "
                    "abns@NAME, or an environment reference as written, such as ${IP}:80)"
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
    "connect": "connects haproxy to a local socket",
}


def refusals(
    content: bytes, rules: Rules, real: Callable[[str], str] = posixpath.normpath
) -> list[Refusal]:
    """Why this config may not be taken from a peer, one entry per use (empty: admitted).
    ``real``: a path with its symlinks resolved (``os.path.realpath``)."""
    if len(content) > MAX_CONFIG:
        return [Refusal(1, "config", "", f"over {MAX_CONFIG // 2**20} MiB: not read")]
    nul = content.find(b"\0")
    if nul >= 0:
        line = content.count(b"\n", 0, nul) + 1
        return [Refusal(line, NUL, "", "a NUL byte: haproxy stops reading there; never allowed")]
    bases = _bases(scan(content), rules.config_dir)
    if len(bases) > MAX_BASES:
        return [Refusal(1, "crt-base", "", f"more than {MAX_BASES} base directories")]
    resolved: dict[str, str] = {}

    def cached(path: str) -> str:
        if path not in resolved:
            resolved[path] = real(path)
        return resolved[path]

    found = []
    for use in (u for line in scan(content) for u in uses(line)):
        why = _judge(use, bases, rules, cached)
        if why is not None:
            arg = use.arg.text if use.arg is not None else ""
            found.append(Refusal(use.line, use.directive, arg[:120], why))
    return found


def _judge(
    use: Use, bases: tuple[str, ...], rules: Rules, real: Callable[[str], str]
) -> str | None:
    """Why ``use`` is refused, or None."""
    if use.kind == "never":
        return "a NUL (\\x00) ends a word for haproxy, not for a reader of the text: never allowed"
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
    if arg is not None and (arg.env or not takes_path or arg.text.startswith("abns@")):
        targets = [arg.text]  # a name, or a path as written: only a pattern for it admits it
    else:
        targets = candidates
    if any(a.admits(use, targets) for a in rules.allow):
        return None
    if use.directive == ".if":
        return "a condition the check may read otherwise than the live haproxy (its environment)"
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


def _bases(lines: Iterable[Line], config_dir: str) -> tuple[str, ...]:
    """Where haproxy may take a relative path from: its working directory (/ under systemd),
    the config's directory (``default-path config``), and any base the config sets."""
    bases = {"/", config_dir}
    for line in lines:
        t = _directive(line.texts)
        if not t:
            continue
        if t[0] in ("crt-base", "ca-base", "server-state-base") and len(t) > 1:
            bases.add(t[1])
        elif t[0] == "default-path" and len(t) > 2 and t[1] == "origin":
            bases.add(t[2])
        elif t[0] == "unix-bind" and "prefix" in t[:-1]:
            bases.add(t[t.index("prefix") + 1])
    return tuple(sorted(b for b in bases if b.startswith("/")))


def _directive(words: tuple[str, ...]) -> tuple[str, ...]:
    """The words haproxy parses: without a leading ``no`` or ``default`` (haproxy 2.6 refuses
    them on most keywords with an alert, then parses the rest of the line all the same)."""
    while words and words[0] in ("no", "default"):
        words = words[1:]
    return words


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
    n = line.number
    if any("\0" in w.text for w in line.words):
        read = " ".join(w.text.split("\0", 1)[0] for w in line.words)  # as haproxy reads it
        yield Use(n, NUL, "never", Word(read[:120]))
        return
    if line.texts[:3] in (("no", "option", "external-check"), ("no", "insecure-fork-wanted")):
        return  # turns it off: these two take a "no" (cfgparse.c, readcfgfile)
    skip = len(line.words) - len(_directive(line.texts))
    words = line.words[skip:]
    if not words:
        return
    if words[0].env:
        yield Use(n, KEYWORD_FROM_ENV, "code", words[0])
        return
    t = [w.text for w in words]
    if t[0] in (".if", ".elif"):
        if not all(_SAME_EVERYWHERE.match(w) or w in ("&&", "||") for w in t[1:]) or any(
            w.env for w in words
        ):
            yield Use(n, ".if", "code", Word(" ".join(t[1:])[:80]))
        return
    yield from _code(n, words)
    yield from _places(n, words)
    yield from _reads(n, words)


def _code(n: int, words: tuple[Word, ...]) -> Iterator[Use]:
    t = [w.text for w in words]
    arg = words[1] if len(words) > 1 else None
    if t[0] in CODE_WITH_PATH or t[0] in CODE_BY_NAME or t[0] == "command":
        yield Use(n, t[0], "code", arg)
    elif t[0] == "external-check":
        if len(t) > 2 and t[1] in ("command", "path"):
            yield Use(n, f"external-check {t[1]}", "code", words[2])
        else:
            yield Use(n, "external-check", "code")
    elif t[0:2] == ["option", "external-check"]:
        yield Use(n, "option external-check", "code")
    elif t[0] == "filter" and arg is not None and t[1] not in FILTERS:
        yield Use(n, "filter", "code", arg)


def _places(n: int, words: tuple[Word, ...]) -> Iterator[Use]:
    """The sockets and files haproxy creates, and the local sockets it connects to: at a
    directive's address, after an option naming one, and any word in a socket's own form
    (``unix@``, ``abns@``), wherever it is."""
    t = [w.text for w in words]
    seen: set[int] = set()
    if t[0:2] == ["stats", "socket"] and len(words) > 2:
        seen.add(2)
        yield from _sockets(n, "stats socket", "write", words[2])
    elif t[0] in ("pidfile", "backing-file") and len(words) > 1:
        seen.add(1)
        yield Use(n, t[0], "write", words[1])
    elif t[0] in _ADDRESS_AT:
        at, kind = _ADDRESS_AT[t[0]]
        if len(words) > at:
            seen.add(at)
            yield from _sockets(n, t[0], kind, words[at])
    for i, text in enumerate(t[:-1]):
        if text in _ADDRESS_AFTER and i + 1 not in seen:
            seen.add(i + 1)
            yield from _sockets(n, "addr", "connect", words[i + 1])
    for i, word in enumerate(words):
        if i not in seen and _SOCKET_PREFIX.search(word.text):
            yield from _sockets(n, t[0], "connect", word, everywhere=True)


def _sockets(
    n: int, directive: str, kind: Kind, addresses: Word, everywhere: bool = False
) -> Iterator[Use]:
    if addresses.env:
        # "${CONFIG}" may be a path to an existing file: haproxy would put a socket in its place.
        yield Use(n, directive, kind, addresses)
        return
    for address in re.split(r"[,\s]", addresses.text):
        bare = address
        for prefix in _ADDRESS_PREFIX:
            bare = bare.removeprefix(prefix)
        if bare.startswith("abns@"):
            yield Use(n, directive, kind, Word(bare))
            continue
        path = unix_path(address) if not everywhere else _prefixed_path(address)
        if path is not None:
            yield Use(n, directive, kind, Word(path, addresses.env))


def _prefixed_path(address: str) -> str | None:
    """A socket path written in its own form (``unix@PATH``) anywhere in a word."""
    match = re.search(r"(?:unix|uxst|uxdg)@(\S*)", address)
    return match.group(1) if match else None


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


# Where the file is among a directive's words: errorfile CODE FILE, default-path origin DIR.
_FILE_AT = {**dict.fromkeys(GLOBAL_FILES, 1), "server-state-file-name": 1, "errorfile": 2}

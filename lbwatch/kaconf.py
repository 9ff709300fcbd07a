"""Just enough of keepalived.conf(5) to check a node's setup: its blocks with their includes
followed, and what lbwatch cares about in them (the notify FIFO and scripts, VRRP scripts and
process tracking, each instance's state, priority, advert_int, VRRP version, VIPs, interface,
virtual_router_id, authentication, unicast peers and what it tracks with which weight).

Syntax as keepalived 2.x reads it: keywords in blocks delimited by '{' and '}'; comments from
'#' or '!' to the end of the line; "quoted strings"; ``include FILE`` (and its variants
includer/includem/includew/includeb/includef) with wildcards and csh-style braces, relative to
the including file's directory; lines starting with '@ID ' (or '@^ID ') kept only for that
config id (by default the node name's first part). ``$NAME=value`` definitions are not
expanded: a value that uses one is taken as written.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

INCLUDES = {"include", "includer", "includem", "includew", "includeb", "includef"}
MAX_FILES = 200  # an include loop or a runaway glob stops here


class ConfError(Exception):
    """The file cannot be read as keepalived.conf; the message names the file and the line."""


@dataclass
class Node:
    words: list[str]
    children: list[Node] = field(default_factory=list)
    where: str = ""  # FILE:LINE, for findings

    @property
    def key(self) -> str:
        return self.words[0] if self.words else ""

    def find(self, key: str) -> list[Node]:
        return [c for c in self.children if c.key == key]

    def value(self, key: str) -> str | None:
        found = self.find(key)
        return " ".join(found[-1].words[1:]) if found else None


def _braces(pattern: str) -> list[str]:
    """csh-style brace expansion ({a,b}c -> ac bc), which Python's glob lacks."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    out = []
    for alt in m.group(1).split(","):
        out += _braces(pattern[: m.start()] + alt + pattern[m.end() :])
    return out


def _tokens(line: str) -> list[str]:
    """A line's words: comments cut, quoted strings kept whole, braces their own words."""
    words: list[str] = []
    lexer = shlex.shlex(line, posix=True, punctuation_chars="{}")
    lexer.commenters = "#!"
    lexer.whitespace_split = True
    lexer.quotes = '"'
    lexer.escape = ""
    try:
        words = list(lexer)
    except ValueError:  # an unclosed quote: the rest of the line is the word, as keepalived does
        words = line.split("#", 1)[0].split("!", 1)[0].split()
    return words


def _lines(path: Path, config_id: str, seen: list[Path]) -> list[tuple[list[str], str]]:
    if len(seen) >= MAX_FILES:
        raise ConfError(f"{path}: more than {MAX_FILES} files included (an include loop?)")
    seen.append(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise ConfError(f"{path}: {exc.strerror}") from None
    out: list[tuple[list[str], str]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("@"):
            tag, _, rest = line.partition(" ")
            negated = tag.startswith("@^")
            if (tag[2:] if negated else tag[1:]) == config_id:
                if negated:
                    continue
            elif not negated:
                continue
            line = rest
        head, _, rest = line.partition(" ")
        if head in INCLUDES:
            # Taken whole, not as words: a brace expression is a pattern here, not a block.
            base = path.parent
            given = re.split(r"[#!]", rest, maxsplit=1)[0].strip().strip('"')
            for pattern in _braces(given):
                full = pattern if os.path.isabs(pattern) else str(base / pattern)
                for name in sorted(glob.glob(full)):
                    out += _lines(Path(name), config_id, seen)
            continue
        words = _tokens(line)
        if words:
            out.append((words, f"{path}:{number}"))
    return out


def parse(path: Path, config_id: str | None = None, seen: list[Path] | None = None) -> Node:
    """The whole configuration, includes followed, as one tree whose root has no words;
    ``seen`` gets every file read."""
    cid = config_id if config_id is not None else os.uname().nodename.split(".")[0]
    root = Node([], where=str(path))
    stack = [root]
    for words, where in _lines(path, cid, [] if seen is None else seen):
        i = 0
        while i < len(words):
            if words[i] == "}":
                if len(stack) == 1:
                    raise ConfError(f"{where}: '}}' closes no block")
                stack.pop()
                i += 1
                continue
            j = i
            while j < len(words) and words[j] not in ("{", "}"):
                j += 1
            node = Node(words[i:j], where=where) if j > i else None
            if node is not None:
                stack[-1].children.append(node)
            if j < len(words) and words[j] == "{":
                if node is None:  # "{" on a line of its own opens the block of the last keyword
                    if not stack[-1].children:
                        raise ConfError(f"{where}: '{{' opens a block with no keyword")
                    node = stack[-1].children[-1]
                stack.append(node)
                j += 1
            i = j
    if len(stack) != 1:
        raise ConfError(f"{path}: a block opened at {stack[-1].where} is never closed")
    return root


@dataclass(frozen=True)
class Track:
    """A tracker of an instance (track_script, track_interface) and its weight: the instance's
    own ``NAME weight N`` when given, else the vrrp_script's ``weight`` (keepalived's default 0;
    0 means the tracker's failure puts the instance into FAULT)."""

    kind: str  # "script", "interface", "file"
    name: str
    weight: int


@dataclass(frozen=True)
class Instance:
    name: str
    where: str
    state: str | None
    priority: int | None
    advert_int: float | None
    version: int | None
    vips: tuple[str, ...]
    notify: tuple[str, ...]  # notify, notify_master, ... scripts
    tracks_scripts: tuple[str, ...]
    interface: str | None = None
    vrid: int | None = None
    nopreempt: bool = False
    auth_type: str | None = None  # PASS or AH; None: no authentication block
    auth_pass: str | None = None  # as written: never published, never logged
    unicast_peers: tuple[str, ...] = ()
    tracks: tuple[Track, ...] = ()
    source: str | None = None  # unicast_src_ip, else mcast_src_ip: its advertisements' source


OWNER = 255  # the address owner's priority (RFC 5798 5.2.4): not for a node that backs up
DEFAULT_PRIORITY = 100  # keepalived's, unless state MASTER: then OWNER


def priority(inst: Instance) -> int:
    """The priority keepalived runs ``inst`` with: its own, else 255 for ``state MASTER`` and
    100 otherwise (keepalived 2.2 vrrp.c ``vrrp_complete_instance``: "If no priority has been
    set, derive it from the initial state")."""
    if inst.priority is not None:
        return inst.priority
    return OWNER if (inst.state or "").upper() == "MASTER" else DEFAULT_PRIORITY


@dataclass(frozen=True)
class Keepalived:
    notify_fifo: str | None
    vrrp_version: int | None  # global_defs; an instance's own wins
    scripts: dict[str, tuple[str, str]]  # vrrp_script name -> (its command, FILE:LINE)
    track_process: tuple[str, ...]  # FILE:LINE of each vrrp_track_process block
    instances: tuple[Instance, ...]
    group_notify: tuple[str, ...]  # notify scripts of vrrp_sync_groups
    files: tuple[Path, ...] = ()  # every file read, includes too
    # track_file (or vrrp_track_file) blocks: name -> (the file, its default weight, FILE:LINE)
    track_files: dict[str, tuple[str, int, str]] = field(default_factory=dict)


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _weight(words: list[str]) -> int:
    """``weight N [reverse]``'s N; keepalived takes -253..253, a typo reads as 0 here."""
    return (_int(words[1]) or 0) if len(words) > 1 else 0


def _tracks(
    inst: Node, script_weights: dict[str, int], file_weights: dict[str, int]
) -> tuple[Track, ...]:
    out = []
    defaults = {"script": script_weights, "file": file_weights}
    for kind, key in (
        ("script", "track_script"),
        ("interface", "track_interface"),
        ("file", "track_file"),
    ):
        for block in inst.find(key):
            for c in block.children:
                if not c.words:
                    continue
                own = c.words.index("weight") if "weight" in c.words else -1
                # a track_file's weight defaults to 1 (keepalived.conf(5)), a script's to 0
                default = defaults[kind].get(c.words[0], 0) if kind in defaults else 0
                weight = _weight(c.words[own:]) if own >= 0 else default
                out.append(Track(kind, c.words[0], weight))
    return tuple(out)


NOTIFY_KEYS = ("notify", "notify_master", "notify_backup", "notify_fault", "notify_stop")


def read(path: Path, config_id: str | None = None) -> Keepalived:
    files: list[Path] = []
    root = parse(path, config_id, files)
    glob_defs = root.find("global_defs")
    fifo = None
    version = None
    for g in glob_defs:
        for key in ("notify_fifo", "vrrp_notify_fifo"):
            found = g.find(key)
            if found and len(found[-1].words) > 1:
                fifo = found[-1].words[1]
        version = _int(g.value("vrrp_version")) or version
    scripts = {}
    weights: dict[str, int] = {}
    for s in root.find("vrrp_script"):
        if len(s.words) > 1:
            scripts[s.words[1]] = (s.value("script") or "", s.where)
            weights[s.words[1]] = _weight(s.find("weight")[-1].words) if s.find("weight") else 0
    track_files: dict[str, tuple[str, int, str]] = {}
    for t in [*root.find("track_file"), *root.find("vrrp_track_file")]:
        if len(t.words) > 1 and t.children:  # a block, not an instance's reference
            weight = _weight(t.find("weight")[-1].words) if t.find("weight") else 1
            track_files[t.words[1]] = (t.value("file") or "", weight, t.where)
    file_weights = {name: w for name, (_, w, _) in track_files.items()}
    instances = []
    for inst in root.find("vrrp_instance"):
        vips: list[str] = []
        for block in inst.find("virtual_ipaddress"):
            vips += [c.words[0] for c in block.children if c.words]
        tracked: list[str] = []
        for block in inst.find("track_script"):
            tracked += [c.words[0] for c in block.children if c.words]
        auth = inst.find("authentication")
        instances.append(
            Instance(
                name=inst.words[1] if len(inst.words) > 1 else "?",
                where=inst.where,
                state=inst.value("state"),
                priority=_int(inst.value("priority")),
                advert_int=_float(inst.value("advert_int")),
                version=_int(inst.value("version")) or version,
                vips=tuple(vips),
                notify=tuple(v for k in NOTIFY_KEYS if (v := inst.value(k))),
                tracks_scripts=tuple(tracked),
                interface=inst.value("interface"),
                vrid=_int(inst.value("virtual_router_id")),
                nopreempt=bool(inst.find("nopreempt")),
                auth_type=(auth[-1].value("auth_type") or "").upper() or None if auth else None,
                auth_pass=auth[-1].value("auth_pass") if auth else None,
                unicast_peers=tuple(
                    c.words[0] for b in inst.find("unicast_peer") for c in b.children if c.words
                ),
                tracks=_tracks(inst, weights, file_weights),
                source=inst.value("unicast_src_ip") or inst.value("mcast_src_ip"),
            )
        )
    groups = []
    for group in root.find("vrrp_sync_group"):
        groups += [v for k in NOTIFY_KEYS if (v := group.value(k))]
    return Keepalived(
        notify_fifo=fifo,
        vrrp_version=version,
        scripts=scripts,
        track_process=tuple(t.where for t in root.find("vrrp_track_process")),
        instances=tuple(instances),
        group_notify=tuple(groups),
        files=tuple(files),
        track_files=track_files,
    )


def stamp(files: tuple[Path, ...]) -> tuple[tuple[int, int, int], ...]:
    """What tells a changed set of files from the one read (a file rewritten, or gone)."""
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            out.append((0, 0, 0))
            continue
        out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


LOOK_EVERY = 1.0  # seconds between looks at whether keepalived.conf changed


class Watched:
    """keepalived.conf as last read, read again when any of its files changed (a stat per
    file, at most once a second)."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.conf: Keepalived | None = None
        self.error: str | None = None
        self._stamp: tuple[tuple[int, int, int], ...] = ()
        self._next_look = 0.0

    def get(self, path: Path) -> Keepalived | None:
        looked = time.monotonic()
        if path == self.path and looked < self._next_look:
            return self.conf  # looked at less than a second ago: the agent publishes often
        self._next_look = looked + LOOK_EVERY
        files = self.conf.files if self.conf is not None else (path,)
        now = stamp(files)
        if path == self.path and now == self._stamp and (self.conf or self.error):
            return self.conf
        self.path = path
        try:
            self.conf, self.error = read(path), None
        except ConfError as exc:
            self.conf, self.error = None, str(exc)
        self._stamp = stamp(self.conf.files if self.conf is not None else (path,))
        return self.conf

"""Red team of the walls a version received from a peer passes (issue 23, finding 1 and item 1
of "What must hold"): attacks a holder of a stolen sync key can send that ``admit`` (read through
``cfgscan``) and the confined check (``sandbox``) let through. Each test asserts the SAFE
behaviour, so it fails for as long as its attack works.

Where it matters the attack is carried out for real, against a haproxy master-worker started
here (as root, on loopback, as the peer's live haproxy runs) and reloaded by lbwatch's own
``reload_haproxy`` after lbwatch's own ``receive`` applied the version; haproxy itself is the
oracle of how it reads a line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lbwatch.config import Config, HaproxyCfg
from lbwatch.procs import identify
from lbwatch.services import reload_haproxy
from lbwatch.sync import sandbox
from lbwatch.sync.admit import DEFAULT_ALLOW, Rules, parse_allow, refusals
from lbwatch.sync.confine import confine_for
from lbwatch.sync.fileset import FileSet
from lbwatch.sync.receive import ApplySettings, receive
from lbwatch.sync.versions import Version
from tests.conftest import free_port, haproxy_config, needs, reap, start_haproxy
from tests.fakes import Expectations
from tests.test_adversarial_confine import haproxy_reads_lua_load
from tests.util import wait_for

STAGING = "/var/lib/lbwatch/incoming"
RULES = Rules(tuple(parse_allow(a) for a in DEFAULT_ALLOW), (STAGING,), "/etc/haproxy")
CHECK = ["haproxy", "-c", "-f", "{file}"]
confined_tier = needs("haproxy", "bwrap", "setpriv", "prlimit")


def why(text: str, rules: Rules = RULES) -> list[str]:
    return [str(r) for r in refusals(text.encode("latin-1"), rules)]


def haproxy_check(text: str, tmp: Path, *extra: str) -> str:
    """What ``haproxy -c`` (as root, unconfined: the oracle) says of ``text``."""
    cfg = tmp / "oracle.cfg"
    cfg.write_bytes(text.encode("latin-1"))
    out = subprocess.run(
        ["haproxy", *extra, "-c", "-f", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return out.stdout + out.stderr


# ---------------------------------------------------------------------------------------------
# Keywords haproxy reads that lbwatch does not


@pytest.mark.parametrize(
    ("text", "directive"),
    [
        # \x00 ends the word for haproxy (its words are C strings), not for cfgscan.
        ("global\n  lua-load\\x00 /etc/haproxy/x.lua", "lua-load"),
        ("program\\x00 pwn\n  command /bin/sh -c id", "program"),
        ("global\n  stats socket\\x00 /etc/passwd", "stats socket"),
        ("backend b\n  option external-check\\x00", "external-check"),
        ("backend b\n  server\\x00 d unix@/run/docker.sock", "server"),
        # "no" before a keyword that takes no negation: haproxy says so, then parses it anyway.
        ("global\n  no lua-load /etc/haproxy/x.lua", "lua-load"),
        ("global\n  no setenv LUA_PATH /x", "setenv"),
    ],
)
def test_keyword_haproxy_reads_despite_a_nul_or_a_no_is_refused(text: str, directive: str) -> None:
    """A directive written ``lua-load\\x00`` or ``no lua-load`` is the directive to haproxy 2.6
    (a word ends at its first NUL; "no" is refused with an alert, then the line is parsed all
    the same) and must be refused as such."""
    found = why(text)
    assert found and any(directive in f for f in found), found


@needs("haproxy")
def test_haproxy_reads_those_keywords(tmp_path: Path) -> None:
    """Positive control for the table above, haproxy as the oracle: it loads Lua for
    ``lua-load\\x00`` and ``no lua-load`` and sees a program section in ``program\\x00``."""
    assert haproxy_reads_lua_load("lua-load\\x00", tmp_path)
    assert haproxy_reads_lua_load("no lua-load", tmp_path)
    said = haproxy_check("program\\x00 pwn\n  command /bin/true\n", tmp_path)
    assert "Can't use a 'program' section without master worker mode" in said, said


@pytest.mark.parametrize(
    "hide",
    [
        "    # the data plane API\rbackend x\n",  # haproxy ends the line at the comment
        ".if defined(NEVER)\nbackend x\n.endif\n",  # haproxy skips the block
    ],
)
@needs("haproxy")
def test_a_command_is_read_in_the_section_haproxy_puts_it_in(hide: str, tmp_path: Path) -> None:
    """With ``program`` allowed and ``command`` allowed for one executable (a data plane API,
    say), a ``command`` is policed only where cfgscan thinks a program section is. A section
    line haproxy never reads (after a comment and a CR, or in an ``.if`` block it skips) moves
    cfgscan out of the program section: the ``command`` that follows, run as root by haproxy
    at every reload, must still be refused. Positive control: ``haproxy -W -c`` takes the
    ``command`` as the program's (in a backend it says "unknown keyword 'command'")."""
    said = haproxy_check(f"program api\n{hide}    command /bin/true\n", tmp_path, "-W")
    assert "Configuration file is valid" in said, said
    rules = Rules(
        (*RULES.allow, parse_allow("program"), parse_allow("command /usr/sbin/dataplaneapi")),
        RULES.hidden,
        "/etc/haproxy",
    )
    text = f"program api\n{hide}    command /bin/sh -c id\n"
    found = why(text, rules)
    assert any("command /bin/sh" in f for f in found), found


def test_a_nul_in_a_path_is_a_refusal_not_a_crash(tmp_path: Path) -> None:
    """``errorfile 503 /etc/x\\x00y``: resolving the path (``os.path.realpath``) raises
    ValueError (embedded null byte) out of admit and the whole sync job fails with a traceback
    instead of the one alert naming the line that item 1 asks for."""
    live = tmp_path / "haproxy.cfg"
    content = b"defaults\n    errorfile 503 /etc/x\\x00y\n"
    confine = confine_for(Config(), live, [live])
    try:
        said = confine.refused({live: content}, live)
    except ValueError as exc:
        pytest.fail(f"admit raised {exc!r}")
    assert said is not None and "line 2" in said, said


SOCKETS = [
    # Sockets haproxy creates as root, replacing whatever file is at the path.
    ("global\n  localpeer me\npeers p\n  peer me /etc/passwd", "/etc/passwd"),
    (f"peers p\n  peer me {STAGING}/status.json", STAGING),
    # Connections to local UNIX sockets (clients relayed, or health checks' bytes).
    ("backend b\n  server-template s 1 /run/dbus/system_bus_socket", "system_bus_socket"),
    ("backend b\n  server-template s 1 unix@/run/docker.sock", "/run/docker.sock"),
    ("backend b\n  tcp-check connect addr /run/systemd/private", "/run/systemd/private"),
    ("backend b\n  http-check connect addr /run/docker.sock", "/run/docker.sock"),
    ("backend b\n  server s 127.0.0.1:1 check addr /run/docker.sock", "/run/docker.sock"),
    ("backend b\n  server s abns@/containerd-shim/x.sock", "abns@"),
    ("peers p\n  peer other /run/php/fpm.sock", "/run/php/fpm.sock"),
    ("global\n  log /run/systemd/notify local0", "/run/systemd/notify"),
    (f"global\n  log {STAGING}/x local0", STAGING),
]


@pytest.mark.parametrize(("text", "what"), SOCKETS)
def test_every_local_socket_haproxy_would_make_or_reach_is_refused(text: str, what: str) -> None:
    """Every directive that makes haproxy create a UNIX socket as root or connect to one (a
    local peer's address, server-template, tcp-check/http-check ``connect addr``, a check
    ``addr``, abstract sockets, ``log`` to a path) is refused like ``server unix@``
    (``test_unix_sockets_reached_and_made_for_real`` carries three of them out)."""
    found = why(text)
    assert found and any(what in f for f in found), found


@needs("haproxy")
@pytest.mark.parametrize(("text", "what"), SOCKETS)
def test_haproxy_takes_those_socket_lines(text: str, what: str, tmp_path: Path) -> None:
    """Positive control for the table above: ``haproxy -c`` finds no error in any of them."""
    said = haproxy_check(f"defaults\n  timeout connect 1s\n{text}\n", tmp_path, "-q")
    assert "ALERT" not in said, said


# ---------------------------------------------------------------------------------------------
# Through lbwatch's own receiving job, against a real haproxy


def _stage(staging: Path, content: bytes, counter: int) -> Path:
    v = Version("haproxy.cfg", "lb1", counter, counter, hashlib.sha256(content).hexdigest())
    path = staging / v.staged_name()
    path.write_bytes(content)
    return path


@dataclass
class Peer:
    """The receiving node: its live haproxy (root, master-worker, on loopback) and lbwatch's
    receiving job with the default ``[sync.received]`` (admit, then the confined check)."""

    live: Path
    port: int
    staging: Path
    settings: ApplySettings
    counter: int = 1
    current: Version | None = None

    def text(self) -> str:
        return self.live.read_text()

    def receive(self, content: str | bytes, counter: int | None = None) -> str:
        """One version from "lb1" (``counter``: the next one unless given), as the job handles
        it, holding what the versions before it left: "RESULT: message"."""
        if counter is None:
            self.counter = counter = self.counter + 1
        raw = content.encode("latin-1") if isinstance(content, str) else content
        staged = _stage(self.staging, raw, counter)
        files = FileSet(self.live)
        rec = receive(staged, files, self.current, self.counter, self.settings, Expectations())
        self.current = rec.current
        return f"{rec.result}: {rec.message}"

    def fetch(self, path: str = "/") -> str:
        """The body the live haproxy answers on its frontend ("" when it does not answer)."""
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), 2) as s,
        ):
            s.settimeout(2)
            s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
            data = b""
            for _ in range(1000):  # bounded
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data.partition(b"\r\n\r\n")[2].decode("latin-1")
        return ""


@pytest.fixture
def peer(tmp_path: Path, subreaper: None) -> Iterator[Peer]:
    etc, state = tmp_path / "etc", tmp_path / "state"
    etc.mkdir()
    (state / "incoming").mkdir(parents=True)
    port = free_port()
    live = haproxy_config(etc / "haproxy.cfg", port, free_port())
    pidfile = tmp_path / "haproxy.pid"
    master = start_haproxy(live, pidfile, tmp_path / "haproxy.log")
    hcfg = HaproxyCfg(
        pidfile=pidfile, find_without_pidfile=False, reload=["kill", "-USR2", str(master.pid)]
    )
    wait_for(lambda: identify(hcfg).children, 5, what="haproxy's first worker")
    cfg = Config(agent={"state_dir": str(state), "run_dir": str(tmp_path / "run")})
    settings = ApplySettings(
        CHECK,
        functools.partial(reload_haproxy, hcfg, 10, 3),
        3,
        30,
        confine_for(cfg, live, [live]),
    )
    try:
        yield Peer(live, port, cfg.staging_path(), settings)
    finally:
        for pid in [*identify(hcfg).children, master.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        master.wait(5)
        reap()


def _appended(peer: Peer, tail: str) -> str:
    return peer.text() + textwrap.dedent(tail)


@confined_tier
def test_program_hidden_by_a_nul_never_runs_as_root(peer: Peer, tmp_path: Path) -> None:
    """``program\\x00`` (a program section to haproxy, not to cfgscan) inside a block only the
    live master-worker reads (``.if defined(HAPROXY_MWORKER)``: set on every reload, never in
    the check): one PUT, no file planted. The version must be refused; on the code of today it
    is applied and the reload runs the command as root."""
    assert peer.receive(_appended(peer, "# control\n")).startswith("applied")  # the path works
    marker = tmp_path / "pwned"
    attack = _appended(
        peer,
        f"""
        .if defined(HAPROXY_MWORKER)
        program\\x00 pwn
            command /bin/sh -c "id > {marker}"
        .endif
        """,
    )
    outcome = peer.receive(attack)
    with contextlib.suppress(TimeoutError):
        wait_for(marker.exists, 3, what="the program's marker")
    assert not marker.exists(), f"{outcome} -> {marker.read_text().strip()}"
    assert outcome.startswith("rejected: refused"), outcome


@confined_tier
def test_lua_named_with_no_never_runs_even_in_the_check(peer: Peer) -> None:
    """``no lua-load FILE`` escapes admit and haproxy runs FILE's Lua while it parses. FILE is
    the live config's own path, where the check shows the received version: a config that is
    also a Lua chunk (haproxy's lines inside a Lua long comment). Its Lua must never run; on the
    code of today it runs in the confined check, and what it prints comes back to the sender
    in the rejection message (the status file the key reads)."""
    polyglot = textwrap.dedent(
        f"""\
        --[[
        global
            no lua-load {peer.live}
        ]]
        io.stderr:write("[ALERT] LUA-RAN uid=" .. io.popen("id -u"):read("*l") .. "\\n")
        """
    )
    outcome = peer.receive(polyglot)
    assert "LUA-RAN" not in outcome, outcome
    assert outcome.startswith("rejected: refused"), outcome


@confined_tier
def test_lua_named_with_no_never_runs_unconfined(peer: Peer, tmp_path: Path) -> None:
    """The finding as it was found, with one word more: a Lua file put into staging under a
    version's name, then ``no lua-load`` of it. On a node with ``sandbox = false`` (README: for
    a node without bubblewrap) the check is haproxy -c as root: the Lua must never run; on the
    code of today it runs as root (admit reads nothing on a line that starts with "no")."""
    peer.settings = dataclasses.replace(
        peer.settings, confine=dataclasses.replace(peer.settings.confine, sandbox=None)
    )
    marker = tmp_path / "pwned"
    lua = f'local f = io.open("{marker}", "w") f:write(io.popen("id"):read("*a")) f:close()\n'
    digest = hashlib.sha256(lua.encode()).hexdigest()
    planted = peer.staging / Version("evil.lua", "lb1", 1, 1, digest).staged_name()
    planted.write_text(lua)
    outcome = peer.receive(peer.text().replace("global\n", f"global\n    no lua-load {planted}\n"))
    assert not marker.exists(), f"{outcome} -> {marker.read_text().strip()}"
    assert outcome.startswith("rejected: refused"), outcome


@pytest.fixture
def root_secret() -> Iterator[Path]:
    """A root-only file (0600) outside /tmp, like /etc/lbwatch/sync_key: the check's user
    cannot read it, the live haproxy (root) can."""
    where = Path(tempfile.mkdtemp(prefix="lbwatch-redteam-", dir="/var/tmp"))
    where.chmod(0o755)
    secret = where / "sync_key"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY----- redteam\n")
    secret.chmod(0o600)
    try:
        yield secret
    finally:
        shutil.rmtree(where)


@confined_tier
def test_a_branch_the_check_skips_cannot_read_root_files(peer: Peer, root_secret: Path) -> None:
    """The check parses another config than the live reload does: ``.if
    defined(HAPROXY_MWORKER)`` is false in the check, true at every master-worker reload. A
    root-only file served with ``http-request return ... file`` fails the check (positive
    control: the check's user cannot read it); inside that block, it must not be served
    either. On the code of today the live haproxy reads it as root and serves it to anyone:
    lbwatch's own sync key, /etc/shadow, TLS keys."""
    serve = "    http-request return status 200 content-type text/plain string ok\n"
    leak = f"    http-request return status 200 content-type text/plain file {root_secret}\n"
    plain = peer.receive(peer.text().replace(serve, leak + serve))
    assert plain.startswith("rejected") and "check_user" in plain, plain  # the check sees it
    hidden = f".if defined(HAPROXY_MWORKER)\n{leak}.endif\n"
    outcome = peer.receive(peer.text().replace(serve, hidden + serve))
    body = peer.fetch()
    leaked = "PRIVATE KEY" in body
    assert not leaked, f"{outcome} -> served: {body[:40]!r}..."
    assert body == "ok", (outcome, body[:40])


def test_a_version_that_loses_is_not_written_where_a_config_can_load_it(peer: Peer) -> None:
    """A version older than the node's ("kept-local") is written verbatim, as root, beside the
    live config (``/etc/haproxy/haproxy.cfg.lbwatch-lost-lb1-STAMP``), before admit reads it,
    and the status file tells the sender the name: a file of the attacker's, at a path it knows,
    outside the directories no version may name (the next test loads one as a shared object).
    No file outside lbwatch's own directories may hold a received version's bytes unchecked."""
    assert peer.receive(_appended(peer, "# control\n")).startswith("applied")
    payload = b"\x7fELF attacker bytes\n" + os.urandom(16).hex().encode()
    outcome = peer.receive(payload, counter=1)
    assert outcome.startswith("kept-local"), outcome
    found = [p for p in peer.live.parent.iterdir() if p.is_file() and p.read_bytes() == payload]
    assert found == [], f"{outcome} -> {found}"


CONSTRUCTOR = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void run(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fprintf(f, "uid=%d\n", (int)getuid()); fclose(f); }
}
"""


@needs("gcc")
@confined_tier
def test_no_shared_object_is_loaded_through_an_admitted_filter(peer: Peer, tmp_path: Path) -> None:
    """Only directives admit admits: ``filter opentracing ... config FILE`` (a file read, not in
    lbwatch's directories) where FILE is a kept copy of the attacker's (previous test) naming,
    as its tracer's ``plugin``, another kept copy: an ELF shared object. ``haproxy -c`` never
    loads a filter's plugin (filters start after the check exits), the live master does, as
    root, at the reload; the line sits in a block only the live master-worker reads so that the
    check, as haproxy's user, does not trip on the root-only copies. The object's constructor
    must never run; on the code of today it runs as root (the reload then fails and is rolled
    back, too late)."""
    marker = tmp_path / "pwned"
    source = tmp_path / "plugin.c"
    source.write_text(CONSTRUCTOR.replace("MARKER", f'"{marker}"'))
    plugin = tmp_path / "plugin.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(plugin), str(source)], check=True)
    assert peer.receive(_appended(peer, "# control\n")).startswith("applied")

    def kept(content: bytes, elsewhere: Path) -> Path:
        """Where a version that lost is kept; when it is refused instead (the shared object:
        it holds NULs), the attack goes on with a file of its own on the node, ``elsewhere``
        (another way in that this test does not rely on)."""
        outcome = peer.receive(content, counter=1)
        if " kept as " not in outcome:
            assert outcome.startswith("rejected: refused"), outcome
            elsewhere.write_bytes(content)
            return elsewhere
        return Path(outcome.rsplit(" kept as ", 1)[1].split(";")[0].strip())

    so = kept(plugin.read_bytes(), plugin)
    up = "../" * 20  # the plugin's path is taken from haproxy's working directory
    tracer = kept(
        textwrap.dedent(
            f"""\
            ot-tracer t
                config {so}
                plugin {up}{str(so).lstrip("/")}
                scopes s
            ot-scope s
                event on-client-session-start
            """
        ).encode(),
        tmp_path / "tracer.cfg",
    )
    bind = "    bind 127.0.0.1:"
    head, _, rest = peer.text().partition(bind)
    line, _, tail = rest.partition("\n")
    attack = (
        f"{head}{bind}{line}\n.if defined(HAPROXY_MWORKER)\n"
        f"    filter opentracing id ot config {tracer}\n.endif\n{tail}"
    )
    outcome = peer.receive(attack)
    with contextlib.suppress(TimeoutError):
        wait_for(marker.exists, 3, what="the plugin's marker")
    assert not marker.exists(), f"{outcome} -> {marker.read_text().strip()}"
    assert outcome.startswith("rejected: refused"), outcome


class UnixListener:
    """A root-only (0600) UNIX stream socket that records who connects (SO_PEERCRED uid) and
    the first bytes each connection sends; stands for the system bus, docker.sock and the
    like."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[tuple[int, bytes]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        path.chmod(0o600)
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                uid = struct.unpack("3i", cred)[1]
                conn.settimeout(1)
                try:
                    data = conn.recv(256)
                except OSError:
                    data = b""
                self.seen.append((uid, data))

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


@confined_tier
def test_unix_sockets_reached_and_made_for_real(peer: Peer, tmp_path: Path) -> None:
    """Admitted today, for real against the live haproxy: a client's bytes relayed to a
    root-only UNIX socket by ``server-template`` (uid 0 connecting: the system bus would take
    it for root), the node itself sending bytes of the attacker's (D-Bus's ``\\0AUTH``) there
    with ``tcp-check connect addr``, and a local peer's address replacing a root-owned file with
    a socket. The version must be refused and none of it happen."""
    bus = UnixListener(tmp_path / "bus.sock")
    victim = tmp_path / "precious"
    victim.write_text("precious\n")
    relay = free_port()
    attack = _appended(
        peer,
        f"""
        frontend relay
            mode tcp
            bind 127.0.0.1:{relay}
            default_backend relay
        backend relay
            mode tcp
            server-template s 1 {bus.path}
        backend health
            mode tcp
            option tcp-check
            tcp-check connect addr {bus.path}
            tcp-check send-binary 00415554480d0a
            server h 127.0.0.1:1 check inter 200ms
        peers p
            peer redteam-local {victim}
        """,
    ).replace("global\n", "global\n    localpeer redteam-local\n", 1)
    try:
        outcome = peer.receive(attack)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", relay), 2) as c:
            c.sendall(b"RELAYED FROM THE NETWORK\r\n")
            time.sleep(0.5)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: len(bus.seen) >= 2, 3, what="connections to the bus")
    finally:
        bus.close()
    replaced = not stat.S_ISREG(victim.lstat().st_mode)
    said = f"{outcome} -> (uid, bytes) at the socket: {bus.seen}; {victim} replaced: {replaced}"
    assert bus.seen == [] and not replaced, said
    assert outcome.startswith("rejected: refused"), outcome


# ---------------------------------------------------------------------------------------------
# The agent itself: time and memory spent on a received version


@confined_tier
def test_a_host_name_cannot_freeze_the_agent(peer: Peer) -> None:
    """``server s aaaa...a!:80``: the host-name pattern of ``sandbox.names``
    (``(?:[A-Za-z0-9-]{0,62}\\.?)*``) backtracks exponentially, and Python's ``re`` holds the
    GIL throughout: every thread of the agent (its supervision loop, its watchdog ping) stops.
    26 letters take seconds, 40 about half a day, 45 weeks. Handling such a version must not
    stall another thread of the process for more than a fraction of a second."""
    gaps: list[float] = []
    done = threading.Event()

    def heartbeat() -> None:
        last = time.monotonic()
        while not done.is_set():
            time.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    time.sleep(0.1)
    bad = peer.text() + "backend evil\n    server s " + "a" * 26 + "!:80\n"
    outcome = peer.receive(bad)
    done.set()
    beat.join(5)
    assert max(gaps) < 0.5, f"the agent's other threads stood still {max(gaps):.1f} s ({outcome})"


def test_admitting_a_small_version_is_quick() -> None:
    """``refusals`` joins every relative path with every base the version sets (``crt-base``,
    ``ca-base``, ``server-state-base``, ``default-path origin``) and resolves each with
    ``realpath``: quadratic. 1,000 bases and 1,000 error files (42 KB) take about 9 s here;
    30,000 of each (1.3 MB, far below the receiver's 64 MiB) hold the sync job for hours. A
    42 KB version must be admitted within a second."""
    text = "global\n" + "".join(f"    crt-base /b{i}\n" for i in range(1000))
    text += "defaults\n" + "".join(f"    errorfile 503 e{i}.http\n" for i in range(1000))
    started = time.monotonic()
    refusals(text.encode(), RULES, os.path.realpath)
    took = time.monotonic() - started
    assert took < 1.0, f"{len(text)} bytes took {took:.1f} s to admit"


SPREAD = """
local function sh(c) local p = io.popen(c .. " 2>&1") local s = p:read("*a") p:close() return s end
local function try(path)
  local dd = "dd if=/dev/zero of=" .. path .. " bs=1M count=1 >/dev/null 2>&1"
  return sh(dd .. " && echo wrote || echo refused")
end
io.stderr:write("SHM=" .. try("/dev/shm/fill") .. "DEV=" .. try("/dev/fill"))
io.stderr:write("SIZE=" .. sh("df --output=size -m /dev | tail -1"))
local spawn = "for i in $(seq 1 40); do sleep 3 & done; "
io.stderr:write("PROCS=" .. sh(spawn .. "ls /proc | grep -c '^[0-9]'"))
"""


@confined_tier
def test_the_check_cannot_spread_beyond_its_limits(tmp_path: Path) -> None:
    """Code that runs in the check (admit bypassed here, as ``no lua-load`` does for real) has
    more than "nothing writable but a private 16 MiB /tmp" and a memory limit: bubblewrap's
    ``--dev`` is a writable tmpfs the size of half the RAM (memory that ``--as`` does not count;
    ~2 GB/s here), and any number of processes each get the whole ``--as``. Writing to /dev
    must be refused and the check must not run 40 processes."""
    lua = tmp_path / "spread.lua"
    lua.write_text(SPREAD)
    cfg = tmp_path / "haproxy.cfg"
    content = f"global\n    lua-load {lua}\ndefaults\n    timeout client 1s\n".encode()
    settings = sandbox.settings_for("haproxy", 512, 10, [], [tmp_path])
    out = sandbox.check(CHECK, cfg, {cfg: content, lua: lua.read_bytes()}, settings, 30).output
    said = dict(
        line.split("=", 1)
        for line in out.splitlines()
        if line.split("=")[0] in {"SHM", "DEV", "SIZE", "PROCS"}
    )
    assert said.keys() == {"SHM", "DEV", "SIZE", "PROCS"}, out
    assert said["SHM"] == "refused" and said["DEV"] == "refused", (
        f"/dev ({said['SIZE'].strip()} MiB): {said}"
    )
    procs = said["PROCS"].strip()
    # Bounded: fewer than 40 counted, or the count itself could not be forked any more.
    refused = "fork" in out.lower() or "resource temporarily unavailable" in out.lower()
    assert (procs.isdigit() and int(procs) < 40) or (not procs.isdigit() and refused), out


def test_admitting_a_large_version_is_bounded_in_memory(tmp_path: Path) -> None:
    """``refusals`` keeps every line and word of a version as objects, about 150 bytes of memory
    per byte received: a 64 MiB version (the receiver's limit) takes ~10 GB in the agent, which
    has no MemoryMax and OOMScoreAdjust=-500 (the kernel kills haproxy or keepalived first).
    Admitting an 8 MiB version must fit in 384 MiB over the interpreter's own size."""
    script = textwrap.dedent(
        """
        import resource, sys
        from lbwatch.sync.admit import DEFAULT_ALLOW, Rules, parse_allow, refusals
        rules = Rules(tuple(parse_allow(a) for a in DEFAULT_ALLOW), ("/x",), "/etc/haproxy")
        content = b"global\\n" + b"  a\\n" * (2 * 1024 * 1024)
        size = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize"))
        limit = size * 1024 + 384 * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            refusals(content, rules)
        except MemoryError:
            print("MemoryError")
            sys.exit(3)
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-500:]


@needs("unshare", "ip", "mount")
@confined_tier
def test_name_resolution_is_bounded_by_the_check_timeout(tmp_path: Path) -> None:
    """The check resolves the version's host names first, as root and outside the sandbox, one
    ``getaddrinfo`` after another (up to 256), with no deadline: names under a domain whose
    servers do not answer hold the sync job for minutes per version. Here the resolver is
    192.0.2.1, which takes queries and answers none, in a network namespace of the test's
    (1 s per lookup); a check with a 3 s timeout must be done within 5 s."""
    cfg = tmp_path / "haproxy.cfg"
    servers = "".join(f"    server s{i} n{i}.redteam.invalid:80\n" for i in range(10))
    cfg.write_text("defaults\n    mode http\nbackend b\n" + servers)
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.1\noptions timeout:1 attempts:1\n")
    script = textwrap.dedent(
        f"""
        import socket
        import time
        from pathlib import Path
        from lbwatch.sync import sandbox
        cfg = Path({str(cfg)!r})
        settings = sandbox.settings_for("haproxy", 512, 3, [], [cfg])
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # takes queries, answers none
        silent.bind(("192.0.2.1", 53))
        started = time.monotonic()
        sandbox.check({CHECK!r}, cfg, {{cfg: cfg.read_bytes()}}, settings, 3)
        print(f"{{time.monotonic() - started:.1f}}")
        """
    )
    setup = (
        "ip link set lo up && ip addr add 192.0.2.1/32 dev lo && "
        f'mount --bind {resolv} /etc/resolv.conf && exec "$0" -c "$1"'
    )
    out = subprocess.run(
        [
            "unshare",
            "--net",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            setup,
            sys.executable,
            script,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 0, out.stderr[-800:]
    took = float(out.stdout.split()[-1])
    assert took <= 5.0, f"a check with a 3 s timeout took {took} s (name resolution)"

"""A stolen sync key is not root on the peer (issue: trust boundaries, finding 1): a version from
a peer that would run code is refused before anything reads it with haproxy, and the check of
what is let through runs confined. The attack as found: a Lua file put into staging under a
version-shaped name, then a haproxy.cfg whose ``global`` has ``lua-load`` of it; the peer's
``haproxy -c`` ran the Lua as root.

The scanner is checked against haproxy itself: on any spelling of ``lua-load``, haproxy and
lbwatch must agree on whether it is the keyword."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbwatch.config import Config, ConfigError, parse
from lbwatch.events import Outcome
from lbwatch.services import run_command
from lbwatch.sync import sandbox
from lbwatch.sync.admit import DEFAULT_ALLOW, Rules, parse_allow, refusals
from lbwatch.sync.cfgscan import split
from lbwatch.sync.confine import confine_for
from lbwatch.sync.fileset import FileSet, pack
from lbwatch.sync.receive import ApplySettings, receive
from lbwatch.sync.versions import Version
from tests.conftest import free_port, haproxy_config, needs
from tests.fakes import Expectations

STAGING = "/var/lib/lbwatch/incoming"
RULES = Rules(tuple(parse_allow(a) for a in DEFAULT_ALLOW), (STAGING,), "/etc/haproxy")
CHECK = ["haproxy", "-c", "-f", "{file}"]
confined_tier = [needs("haproxy", "bwrap", "setpriv", "prlimit")]


def why(text: str, rules: Rules = RULES) -> list[str]:
    return [str(r) for r in refusals(text.encode(), rules)]


def with_allow(*entries: str) -> Rules:
    return Rules(RULES.allow + tuple(parse_allow(e) for e in entries), RULES.hidden, "/etc/haproxy")


# ---------------------------------------------------------------------------------------------
# The rules, as a table


@pytest.mark.parametrize(
    ("line", "refused"),
    [
        ("global\n  lua-load /etc/haproxy/x.lua", "line 2: lua-load /etc/haproxy/x.lua: runs code"),
        ("global\n  lua-load-per-thread /a.lua", "lua-load-per-thread /a.lua: runs code"),
        ("global\n  lua-prepend-path /x/?.lua", "lua-prepend-path /x/?.lua: runs code"),
        ("program p\n  command /bin/sh -c id", "line 1: program p: runs code"),
        ("global\n  external-check", "line 2: external-check: runs code"),
        ("backend b\n  option external-check", "option external-check: runs code"),
        ("backend b\n  external-check command /bin/x", "external-check command /bin/x: runs"),
        ("global\n  insecure-fork-wanted", "insecure-fork-wanted: runs code"),
        ("global\n  setenv PATH /tmp", "setenv PATH: runs code"),
        ("global\n  presetenv LUA_PATH /x", "presetenv LUA_PATH: runs code"),
        ("global\n  ssl-engine rdrand", "ssl-engine rdrand: runs code"),
        ("global\n  ssl-provider-path /x", "ssl-provider-path /x: runs code"),
        ("global\n  unix-bind prefix /etc/", "unix-bind prefix: runs code"),
        ("global\n  stats socket /etc/passwd", "stats socket /etc/passwd: makes haproxy create"),
        ("frontend f\n  bind /etc/cron.d/x", "bind /etc/cron.d/x: makes haproxy create"),
        ("frontend f\n  bind :80,unix@/root/x.sock", "bind /root/x.sock: makes haproxy create"),
        ("global\n  pidfile /etc/passwd", "pidfile /etc/passwd: makes haproxy create"),
        ("backend b\n  server d unix@/run/docker.sock", "server /run/docker.sock: connects"),
        ("backend b\n  server d /run/php/fpm.sock", "server /run/php/fpm.sock: connects"),
        ("global\n  stats socket abns@stats", "stats socket abns@stats: makes haproxy create"),
        ('global\n  log "${LOGHOST}:514" local0', "log ${LOGHOST}:514: connects"),
        ("backend b\n  filter opentracing id ot config /etc/ot.cfg", "filter opentracing: runs"),
        ("global\n  no lua-load /a.lua", "lua-load /a.lua: runs code"),
        ("global\n  lua-load\\x00 /a.lua", "(NUL) lua-load /a.lua: a NUL"),
        ("backend b\n  tcp-check connect addr /run/dbus/x", "addr /run/dbus/x: connects"),
        ("frontend f\n  .if defined(HAPROXY_MWORKER)", "line 2: .if defined(HAPROXY_MWORKER)"),
        ("backend b\n  command /bin/sh -c id", "command /bin/sh: runs code"),
        # Anything in lbwatch's own directories, however it is named.
        (
            f"frontend f\n  bind :443 ssl crt {STAGING}/k.pem",
            f"crt {STAGING}/k.pem: names {STAGING}",
        ),
        (
            "frontend f\n  bind :443 ssl crt ../../var/lib/lbwatch/incoming/k.pem",
            f"names {STAGING}",
        ),
        (f"global\n  crt-base {STAGING}", f"crt-base {STAGING}: names {STAGING}"),
        (
            f"frontend f\n  use_backend %[req.hdr(host),lower,map({STAGING}/m,b)]",
            f"map {STAGING}/m: names",
        ),
        (f"frontend f\n  acl a src -f {STAGING}/x", f"-f {STAGING}/x: names"),
        (f"defaults\n  errorfile 503 {STAGING}/e", f"errorfile {STAGING}/e: names"),
        (
            f"frontend f\n  http-request return status 200 file {STAGING}/x",
            f"file {STAGING}/x: names",
        ),
        (f"frontend f\n  filter spoe config {STAGING}/s.conf", "config /var/lib/lbwatch/inc"),
        (f"global\n  lua-load {STAGING}/x.lua", f"lua-load {STAGING}/x.lua: names {STAGING}"),
        # haproxy's own spellings of a keyword.
        ('global\n  "lua-load" /a.lua', "lua-load /a.lua: runs code"),
        ("global\n  'lua'-load /a.lua", "lua-load /a.lua: runs code"),
        ("global\n  lua\\x2dload /a.lua", "lua-load /a.lua: runs code"),
        ('global\n  "${KW}" /a.lua', "a keyword taken from an environment variable"),
        ("global\n  default insecure-fork-wanted", "insecure-fork-wanted: runs code"),
        ('global\n  stats socket "${SOCK}"', "stats socket ${SOCK}: makes haproxy create"),
        ("global\n\tlua-load /a.lua\r# rest", "lua-load /a.lua: runs code"),
        ("global\n  log /dev/log local0\0\n  lua-load /a.lua", "line 2: (NUL): a NUL byte"),
        ("global\n  .if defined(NEVER)\n  lua-load /a.lua\n  .endif", "line 3: lua-load"),
    ],
)
def test_refused(line: str, refused: str) -> None:
    """Each directive that runs code, creates a path or exposes a local socket, and each path
    into lbwatch's own directories, is refused with its line, however it is spelled."""
    found = why(line)
    assert any(refused in f for f in found), found


@pytest.mark.parametrize(
    "line",
    [
        "global\n  stats socket /run/haproxy/admin.sock mode 660 level admin",
        "global\n  stats socket ipv4@127.0.0.1:9999 level admin",
        "global\n  pidfile /run/haproxy.pid",
        "frontend f\n  bind :443 ssl crt /etc/haproxy/site.pem ca-file /etc/ssl/ca.pem",
        "frontend f\n  bind ipv6@:::80 v4v6",
        "frontend f\n  http-request set-path /api/%[path] if { path_beg /v1 }",
        "frontend f\n  use_backend %[req.hdr(host),lower,map(/etc/haproxy/hosts.map,b)]",
        "frontend f\n  http-request lua.hello",
        "backend b\n  no option external-check",
        "backend b\n  server s1 10.0.0.1:80 check\n  server s2 app.example:80",
        "global\n  # lua-load /a.lua",
        "global\n  log \\#lua-load local0",
        "global\n  lua\\-load /a.lua",  # not an escape: haproxy reads the keyword lua\-load
        "global\n  log /dev/log local0\n  log 127.0.0.1:514 local1",
        "global\n  .if version_atleast(2.4)\n  nbthread 2\n  .endif",
        "backend b\n  filter compression\n  filter spoe engine e config /etc/haproxy/spoe.conf",
        "global\n  no insecure-fork-wanted",
    ],
)
def test_admitted(line: str) -> None:
    """Ordinary configuration (sockets in haproxy's own directories, certificates, maps, URL
    paths, comments, a server's address) is not refused."""
    assert why(line) == []


def test_allow_admits_what_it_names_and_nothing_more() -> None:
    """An allow entry admits its directive with a matching path, resolved: not the same
    directive elsewhere, nor a path that climbs out of the pattern with '..'."""
    rules = with_allow("lua-load /etc/haproxy/lua/*.lua", "server /run/php/*.sock", "setenv")
    assert why("global\n  lua-load /etc/haproxy/lua/ok.lua", rules) == []
    assert why("global\n  lua-load lua/ok.lua", rules) != []  # relative: also against "/"
    assert why("global\n  lua-load /etc/haproxy/lua/../../shadow.lua", rules) != []
    assert why("global\n  lua-load /etc/haproxy/lua/../../../var/lib/lbwatch/incoming/x.lua", rules)
    assert why("global\n  lua-load /srv/x.lua", rules) != []
    assert why("backend b\n  server p /run/php/fpm.sock", rules) == []
    assert why("global\n  setenv A b", rules) == []
    assert why("global\n  presetenv A b", rules) != []
    staged = with_allow("lua-load /*")  # even an allow-everything entry
    assert "names /var/lib/lbwatch/incoming" in why(f"global\n  lua-load {STAGING}/x", staged)[0]


def test_allow_entries_are_validated() -> None:
    """An allow entry names a directive lbwatch polices and an absolute pattern where one is
    needed; anything else is a config error naming the entry."""
    for bad in ("lua-load", "lua-load x.lua", "errorfile /x", "stats socket a b", "bind"):
        with pytest.raises(ValueError, match=r"lua-load|errorfile|stats socket|bind"):
            parse_allow(bad)
    with pytest.raises(ConfigError, match=r"lbwatch.toml: sync\.received\.allow\[0\]: 'lua-load'"):
        parse({"sync": {"received": {"allow": ["lua-load"]}}}, "lbwatch.toml")


@needs("haproxy")
def test_debian_default_config_is_admitted() -> None:
    """Positive control: Debian's own /etc/haproxy/haproxy.cfg (stats socket, chroot, log,
    ca-base, crt-base, errorfiles) is let through whole."""
    content = Path("/etc/haproxy/haproxy.cfg").read_bytes()
    assert refusals(content, RULES) == []


# ---------------------------------------------------------------------------------------------
# The scanner against haproxy


def _spellings() -> st.SearchStrategy[str]:
    """``lua-load`` written any way haproxy's parser takes, or almost takes, it."""

    def one(c: str) -> st.SearchStrategy[str]:
        return st.sampled_from(
            [c, f"\\x{ord(c):02x}", f'"{c}"', f"'{c}'", f"\\{c}", f'"\\{c}"', f'""{c}']
        )

    return st.tuples(*(one(c) for c in "lua-load")).map("".join)


def haproxy_reads_lua_load(spelling: str, tmp: Path) -> bool:
    cfg = tmp / "spell.cfg"
    cfg.write_bytes(f"global\n    {spelling} /nonexistent/x.lua\n".encode("latin-1"))
    out = subprocess.run(
        ["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30, check=False
    )
    return "error in Lua file" in out.stdout + out.stderr


@needs("haproxy")
@settings(max_examples=60, deadline=None)
@given(spelling=_spellings())
def test_scanner_reads_the_keyword_as_haproxy_does(
    spelling: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Whatever the quoting and escaping, lbwatch refuses the line when haproxy reads lua-load
    in it, and reads lua-load only where haproxy does (haproxy itself is the oracle)."""
    tmp = tmp_path_factory.mktemp("spell")
    haproxy = haproxy_reads_lua_load(spelling, tmp)
    words = split(spelling)
    ours = bool(words) and words[0].text == "lua-load"
    assert ours == haproxy, (spelling, words)
    assert bool(why(f"global\n    {spelling} /nonexistent/x.lua")) >= haproxy


# ---------------------------------------------------------------------------------------------
# The confined check


def _settings(tmp: Path, hidden: tuple[Path, ...] = (), memory: int = 1024) -> sandbox.Settings:
    return sandbox.settings_for("haproxy", memory, 10, hidden, [tmp])


PROBE = """
local function sh(c)
  local p = io.popen(c .. " 2>&1")
  local s = p:read("*a")
  p:close()
  return s
end
local function say(k, c) io.stderr:write(k .. "=" .. sh(c) .. "\\n") end
say("ID", "id -u")
say("OWN", "touch {own}/x && echo wrote || echo refused")
say("TMP", "touch /tmp/x && echo wrote || echo refused")
say("SHADOW", "head -c 1 /etc/shadow >/dev/null && echo read || echo refused")
say("LINKS", "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\\\n' ' '")
say("HIDDEN", "ls -A {hidden} | wc -l")
"""


def _lua_config(lua: Path) -> bytes:
    return f"global\n    lua-load {lua}\ndefaults\n    timeout client 1s\n".encode()


@needs("haproxy", "bwrap", "setpriv", "prlimit")
def test_what_runs_in_the_check_is_confined(tmp_path: Path) -> None:
    """Were a config to run code during the check (admit bypassed here, as a future haproxy
    directive might), it runs as haproxy's user, with no network but loopback, nothing
    writable but its own /tmp (not even a directory haproxy's user owns), /etc/shadow
    unreadable and lbwatch's directories empty. The same probe run unconfined shows root, a
    writable directory and the hidden file: the probe can tell."""
    hidden = tmp_path / "state"
    hidden.mkdir()
    (hidden / "sync_key").write_text("secret\n")
    user = pwd.getpwnam("haproxy")
    own = Path(tempfile.mkdtemp(prefix="lbwatch-test-", dir="/var/tmp"))
    os.chown(own, user.pw_uid, user.pw_gid)
    lua = tmp_path / "probe.lua"
    lua.write_text(PROBE.replace("{hidden}", str(hidden)).replace("{own}", str(own)))
    cfg = tmp_path / "haproxy.cfg"
    content = _lua_config(lua)
    cfg.write_bytes(content)
    try:
        plain = run_command(["haproxy", "-c", "-f", str(cfg)], 30).output
        assert "ID=0" in plain and "HIDDEN=1" in plain and "OWN=wrote" in plain, plain
        (own / "x").unlink()
        files = {cfg: content, lua: lua.read_bytes()}
        out = sandbox.check(CHECK, cfg, files, _settings(tmp_path, (hidden,)), 30).output
        assert f"ID={user.pw_uid}" in out, out
        assert "OWN=refused" in out and "Read-only file system" in out, out
        assert "TMP=wrote" in out and "SHADOW=refused" in out, out
        assert "LINKS=lo \n" in out, out
        assert "HIDDEN=0" in out, out
        assert not (own / "x").exists()
    finally:
        shutil.rmtree(own)


@needs("haproxy", "bwrap", "setpriv", "prlimit")
def test_the_check_has_limits(tmp_path: Path) -> None:
    """A check that loops is killed at the timeout, leaving no process behind; one that
    allocates without end fails at the memory limit."""
    lua = tmp_path / "spin.lua"
    lua.write_text("while true do end\n")
    cfg = tmp_path / "haproxy.cfg"
    files = {cfg: _lua_config(lua), lua: lua.read_bytes()}
    spun = sandbox.check(CHECK, cfg, files, _settings(tmp_path), 2)
    assert spun.outcome is Outcome.TIMEOUT
    left = subprocess.run(
        ["pgrep", "-u", "haproxy", "-f", str(lua)], capture_output=True, check=False
    )
    assert left.returncode == 1, left.stdout
    lua.write_text("local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1e6) .. i end\n")
    files[lua] = lua.read_bytes()
    grown = sandbox.check(CHECK, cfg, files, _settings(tmp_path, memory=128), 30)
    assert grown.outcome is Outcome.FAILED and "memory" in grown.output, grown.output


@needs("haproxy", "bwrap", "setpriv", "prlimit")
def test_check_sees_the_versions_files_and_resolved_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version's own files are seen where they will live, a 0600 root certificate among
    them; a host name resolved on the node is resolved in the check too (no network there);
    a root-only file the version does not carry fails, saying which user checks."""
    etc = tmp_path / "etc"
    etc.mkdir()
    cfg = etc / "haproxy.cfg"
    key = etc / "secret.map"
    key.write_text("k v\n")
    key.chmod(0o600)
    text = (
        "global\n    log stderr format raw local0 err\n"
        "defaults\n    mode http\n    timeout client 1s\n    timeout server 1s\n"
        "    timeout connect 1s\n"
        f"frontend f\n    bind 127.0.0.1:{free_port()}\n"
        f"    http-request set-header X %[str(k),map({key})]\n    default_backend b\n"
        "backend b\n    server s app.lab.example:80\n"
    ).encode()
    cfg.write_bytes(text)
    settings_ = _settings(tmp_path)
    monkeypatch.setattr(sandbox, "resolve", lambda names, _: [("192.0.2.10", n) for n in names])
    ok = sandbox.check(CHECK, cfg, {cfg: text, key: key.read_bytes()}, settings_, 30)
    assert ok.outcome is Outcome.OK, ok.output
    monkeypatch.setattr(sandbox, "resolve", lambda names, _: [])
    unresolved = sandbox.check(CHECK, cfg, {cfg: text, key: key.read_bytes()}, settings_, 30)
    assert "could not resolve address 'app.lab.example'" in unresolved.output
    monkeypatch.setattr(sandbox, "resolve", lambda names, _: [("192.0.2.10", n) for n in names])
    confine = confine_for(Config(), cfg, [cfg])
    missing = confine.check(CHECK, cfg, {cfg: text}, 30)  # the map not carried: root's only
    assert not missing.ok and "check_user" in missing.message, missing.message


@needs("bwrap", "setpriv", "prlimit", "choom", "unshare")
def test_the_check_cannot_make_a_user_namespace(tmp_path: Path) -> None:
    """Code that runs in the check cannot make a user namespace of its own (where it would hold
    every capability, and reach the kernel's code for mounts, netfilter and the like). Positive
    control: the same command, as the same user in the same bubblewrap without the filter,
    makes one."""
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_bytes(b"global\n")
    settings = _settings(tmp_path)
    nested = ["unshare", "--user", "true"]
    inside = sandbox.check(nested, cfg, {cfg: b"global\n"}, settings, 30)
    said = "unshare failed: Operation not permitted"
    assert inside.outcome is Outcome.FAILED and said in inside.output, inside.output
    unfiltered = sandbox.argv(nested, settings, {}, None, seccomp=None)
    control = run_command(unfiltered, 30, env=sandbox.ENV)
    assert control.outcome is Outcome.OK, control.output


def test_names_a_config_makes_haproxy_resolve() -> None:
    """Host names are taken from the addresses haproxy resolves while parsing, and nothing
    else (not IP addresses, paths, wildcards, headers)."""
    text = b"""global
    log syslog.example:514 local0
    log 10.0.0.1:514 local0
frontend f
    bind lb.example:80,:81,[::1]:82
    bind ipv4@0.0.0.0:83
    http-request set-header Host www.example:8080
backend b
    server s1 app1.example:80 check addr health.example
    server s2 10.0.0.2:80
    server s3 unix@/run/x.sock
    server s4 app4
peers p
    peer lb2 peer.example:1024
"""
    assert sandbox.names(text) == {
        "syslog.example",
        "lb.example",
        "app1.example",
        "health.example",
        "app4",
        "peer.example",
    }


@needs("bwrap", "setpriv", "prlimit")
def test_a_missing_check_user_is_said_as_such(tmp_path: Path) -> None:
    """A check_user this node lacks fails the check with that reason, not as an invalid config."""
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text("global\n")
    settings_ = sandbox.Settings("no-such-user-lbw", 1 << 30, 10, ())
    out = sandbox.check(CHECK, cfg, {cfg: b"global\n"}, settings_, 10)
    assert out.outcome is Outcome.FAILED and "does not exist" in out.detail


# ---------------------------------------------------------------------------------------------
# The attack as found, on the receiving side


def _stage(staging: Path, file: str, content: bytes, counter: int = 5) -> Path:
    v = Version(file, "lb1", counter, counter, hashlib.sha256(content).hexdigest())
    path = staging / v.staged_name()
    path.write_bytes(content)
    return path


@needs("haproxy", "bwrap", "setpriv", "prlimit")
@pytest.mark.parametrize("bundled", [False, True])
def test_lua_planted_in_staging_never_runs(tmp_path: Path, bundled: bool) -> None:
    """The finding: a Lua file put into staging under a version's name, then a haproxy.cfg
    version that lua-loads it. A valid version is applied first (the path works); the attack
    is refused, naming the directive and the line, and the Lua never runs: not in the check,
    not at a reload. With lua-load allowed for every path, staging is still out of reach."""
    staging, etc = tmp_path / "state" / "incoming", tmp_path / "etc"
    staging.mkdir(parents=True)
    etc.mkdir()
    live = haproxy_config(etc / "haproxy.cfg", free_port(), free_port())
    files = FileSet(live, (str(etc / "*.map"),) if bundled else ())
    marker = tmp_path / "pwned"
    lua = f'local f = io.open("{marker}", "w"); f:write(io.popen("id"):read("*a")); f:close()\n'
    planted = _stage(staging, "evil.lua", lua.encode(), 1)
    reloaded = tmp_path / "reloaded"

    def cfg_with(extra: str) -> bytes:
        text = live.read_text().replace("global\n", f"global\n{extra}", 1).encode()
        return pack({live: text}) if bundled else text

    def received(content: bytes, counter: int, allow: list[str] | None = None) -> str:
        cfg = Config(
            agent={"state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run")},
            sync={"received": {"allow": allow or []}},
        )
        settings_ = ApplySettings(
            CHECK,
            lambda: run_command(["touch", str(reloaded)], 10),
            3,
            30,
            confine_for(cfg, live, [live]),
        )
        staged = _stage(staging, files.unit, content, counter)
        rec = receive(staged, files, None, 0, settings_, Expectations())
        return f"{rec.result}: {rec.message}"

    good = received(cfg_with("    maxconn 100\n"), 2)
    assert good.startswith("applied"), good
    assert reloaded.exists()
    reloaded.unlink()
    attack = received(cfg_with(f"    lua-load {planted}\n"), 3)
    assert attack.startswith("rejected: refused: line 2: lua-load"), attack
    assert "lbwatch's own directory: never allowed" in attack
    anywhere = received(cfg_with(f"    lua-load {planted}\n"), 4, ["lua-load /*"])
    assert anywhere.startswith("rejected"), anywhere
    assert not marker.exists() and not reloaded.exists()
    assert planted.exists()  # the sweeper's, not the job's, to remove


@needs("haproxy", "bwrap", "setpriv", "prlimit")
def test_a_live_file_the_check_user_cannot_walk_to_is_shown_elsewhere(tmp_path: Path) -> None:
    """A config whose directory only root may enter (0700, outside /tmp) is still checked: the
    version is shown to the check user at a path of its own, not refused for a bind bubblewrap
    cannot make. The directory walk is judged from the mode bits."""
    private = Path(tempfile.mkdtemp(prefix="lbwatch-test-", dir="/var/tmp"))
    try:
        cfg = private / "haproxy.cfg"
        text = b"global\n    log stderr format raw local0 err\ndefaults\n    timeout client 1s\n"
        cfg.write_bytes(text)
        user = pwd.getpwnam("haproxy")
        ids = (user.pw_uid, frozenset(os.getgrouplist(user.pw_name, user.pw_gid)))
        assert not sandbox.reachable(cfg, *ids)
        assert sandbox.reachable(Path("/etc/haproxy/haproxy.cfg"), *ids)
        out = sandbox.check(CHECK, cfg, {cfg: text}, _settings(tmp_path), 30)
        assert "Can't create file" not in out.output, out.output
        assert "no listener" in out.output, out.output  # haproxy read it: valid, exit 2
    finally:
        shutil.rmtree(private)


def test_bubblewrap_is_asked_only_what_its_version_knows() -> None:
    """A tmpfs size from bubblewrap 0.7 (RHEL 9 and Debian 11 ship 0.4, Ubuntu 22.04 0.6: an
    option they lack would fail every check); the user-namespace filter (--seccomp, known since
    0.1) and the rest of the view are the same on all of them, and --disable-userns (0.8; it
    needs a writable /proc/sys) is asked of none."""
    settings = sandbox.Settings("haproxy", 1 << 30, 10, ())
    old = sandbox.argv(["haproxy", "-c"], settings, {}, None, 32, (0, 4, 1), seccomp=5)
    new = sandbox.argv(["haproxy", "-c"], settings, {}, None, 32, (0, 11, 0), seccomp=5)
    assert "--size" not in old and "--size" in new
    assert [a for a in new if a not in ("--size", str(sandbox.TMP_SIZE))] == old
    assert "--disable-userns" not in new and new[new.index("--seccomp") + 1] == "5"


def test_a_node_without_the_tools_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without bubblewrap (or the util-linux tools) the check fails closed, saying what is
    missing, and runs nothing."""
    monkeypatch.setattr(sandbox, "TOOLS", ("lbwatch-no-such-tool",))
    cfg = tmp_path / "haproxy.cfg"
    out = sandbox.check(CHECK, cfg, {cfg: b"global\n"}, sandbox.Settings("haproxy", 1, 1, ()), 5)
    assert out.outcome is Outcome.FAILED and "lbwatch-no-such-tool not installed" in out.detail

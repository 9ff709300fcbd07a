"""The shipped systemd unit: `systemd-analyze verify` accepts it without a single complaint, it has
the lines the agent relies on, its offline exposure score stays where the README says, and the
agent still runs inside its capability bounding set and syscall filter.

No systemd runs as PID 1 where these tests run, so the unit is never started: verify and security
work on the file offline, and the sandbox is reproduced with a mount namespace, libcap and
libseccomp (tests/sandbox.py).
"""

from __future__ import annotations

import ctypes.util
import os
import re
import shutil
import signal
import subprocess
import sys
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from lbwatch.cli import EXIT_CONFIG
from lbwatch.config import Config, load
from lbwatch.doctor import unitfs
from lbwatch.doctor.unitpaths import written
from tests.conftest import needs
from tests.unitproc import Unit

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "lbwatch.service"
SANDBOX = REPO / "tests" / "sandbox.py"
# `systemd-analyze security --offline=true`, systemd 252 (Debian 12): 6.1 MEDIUM before the
# sandbox was tightened, 2.7 OK after, 3.7 OK once the check of a peer's version is confined
# (CAP_SETUID/SETGID, user, mount, network, IPC and PID namespaces, @mount: what bubblewrap
# needs to drop the check to haproxy's user in a view of its own). The README quotes them.
EXPOSURE_MAX = 3.7

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def directives(text: str) -> dict[str, list[str]]:
    """Every KEY=VALUE of the unit, all values of a repeated key in order; comments skipped."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        found.setdefault(key, []).append(value)
    return found


def one(text: str, key: str) -> str:
    values = directives(text)[key]
    assert len(values) == 1, (key, values)
    return values[0]


def runnable(text: str, tmp_path: Path) -> Path:
    # verify and security check that ExecStart exists: point it at this checkout's lbwatch.
    lbwatch = Path(sys.executable).with_name("lbwatch")
    unit = tmp_path / "lbwatch.service"
    unit.write_text(text.replace("/usr/local/bin/lbwatch", str(lbwatch)))
    return unit


def verify(text: str, tmp_path: Path) -> str:
    unit = runnable(text, tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if str(unit) in line)


def exposure(text: str, tmp_path: Path) -> float:
    """The "Overall exposure level" of `systemd-analyze security --offline=true` (systemd >=
    250): a fixed weighting of the unit's settings, computed from the file alone."""
    unit = runnable(text, tmp_path)
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


def test_unit_verifies_cleanly(tmp_path: Path) -> None:
    """No warning about any line of the unit."""
    assert verify(UNIT.read_text(), tmp_path) == ""


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above can fail: a misspelt Type= is reported."""
    bad = UNIT.read_text().replace("Type=notify\n", "Type=notifyy\n")
    assert "Failed to parse service type" in verify(bad, tmp_path)


def test_unit_has_what_the_agent_relies_on() -> None:
    """Type=notify with a watchdog, SIGHUP reload, restart always, state directories."""
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=10s",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=always",
        "RuntimeDirectory=lbwatch",
        "StateDirectory=lbwatch",
        "KillMode=mixed",
    ):
        assert f"\n{line}\n" in text


def test_a_config_error_is_not_restarted_a_crash_is() -> None:
    """RestartPreventExitStatus= is exactly the CLI's config-error exit code, and nothing can
    defeat it: the config is checked by the main process, not by an ExecStartPre= (whose failure
    systemd restarts regardless); restarts stay on for every other exit."""
    d = directives(UNIT.read_text())
    assert d["RestartPreventExitStatus"] == [str(EXIT_CONFIG)]
    assert d["Restart"] == ["always"]
    for key in ("ExecStartPre", "ExecStartPost", "ExecCondition", "SuccessExitStatus"):
        assert key not in d
    assert d["ExecStart"][0].split()[-1] == "run"


def test_sandbox_lines() -> None:
    """A negative OOM score, the six capabilities lbwatch uses and no others, the syscall
    filter with EPERM, only the namespaces the confined check needs, and nothing that would
    hide processes or /proc files lbwatch reads, or break `haproxy -c`
    (MemoryDenyWriteExecute)."""
    text = UNIT.read_text()
    d = directives(text)
    assert int(one(text, "OOMScoreAdjust")) < 0
    assert set(one(text, "CapabilityBoundingSet").split()) == {
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_SYS_PTRACE",
        "CAP_SETUID",
        "CAP_SETGID",
    }
    assert d["SystemCallFilter"][0] == "@system-service @mount"
    assert set(one(text, "RestrictNamespaces").split()) == {"user", "mnt", "net", "ipc", "pid"}
    assert one(text, "SystemCallErrorNumber") == "EPERM"
    assert one(text, "NoNewPrivileges") == "yes"
    assert one(text, "ProtectProc") == "default"
    assert one(text, "ProcSubset") == "all"
    assert "MemoryDenyWriteExecute" not in d
    assert one(text, "PrivateDevices") == "yes"


def test_the_descriptor_limit_is_the_units_with_a_margin() -> None:
    """LimitNOFILE= is one number (soft and hard alike: the agent cannot raise it), below
    systemd's default soft limit, and with room several times over for the metrics listener at
    its cap on top of what the agent holds besides (the unit's comment has the arithmetic;
    tests/test_adversarial_metrics.py runs the slow-client attack under this very limit)."""
    from lbwatch.metrics.listener import DESCRIPTORS

    value = one(UNIT.read_text(), "LimitNOFILE")
    assert value.isdigit(), value
    assert 8 * DESCRIPTORS <= int(value) <= 1024


def test_default_paths_are_writable_in_the_sandbox() -> None:
    """Under ProtectSystem=strict, every path the default config writes lies in the runtime or
    state directory or a ReadWritePaths= entry."""
    text = UNIT.read_text()
    d = directives(text)
    assert one(text, "ProtectSystem") == "strict"
    writable = [Path(p.lstrip("-")) for v in d["ReadWritePaths"] for p in v.split()]
    writable += [Path("/run", one(text, "RuntimeDirectory"))]
    writable += [Path("/var/lib", one(text, "StateDirectory"))]
    cfg = Config()
    for path in (
        cfg.agent.run_dir,
        cfg.agent.state_dir,
        cfg.spool_path(),
        cfg.staging_path(),
        cfg.notify.fifo.parent,  # lbwatch creates the FIFO
        cfg.sync.config.parent,  # install, backups
        cfg.sync.control_dir,
    ):
        assert any(path == w or w in path.parents for w in writable), path


EXAMPLE = REPO / "config" / "lbwatch.toml"
# The example config's optional paths, commented out there: switched on as written.
OPTIONAL = ("spool_dir", "staging_dir", "textfile", "track_dir")
# What the example with them has the agent write, and where (a file: its directory), by hand.
EXAMPLE_WRITES = {
    "agent.run_dir": "/run/lbwatch",
    "agent.state_dir": "/var/lib/lbwatch",
    "notify.spool_dir": "/var/lib/lbwatch/spool",
    "notify.fifo": "/run",  # /run/keepalived-lbwatch.fifo, made by lbwatch
    "keepalived.track_dir": "/var/lib/lbwatch/track",
    "sync.config": "/etc/haproxy",  # installed there, backups beside it
    "sync.extra_files[0]": "/etc/haproxy/maps",
    "sync.staging_dir": "/var/lib/lbwatch/incoming",
    "sync.control_dir": "/run/lbwatch/ssh",
    "metrics.textfile": "/var/lib/prometheus/node-exporter",
}
# Path settings lbwatch only reads.
READ_ONLY = {
    "haproxy.pidfile",
    "keepalived.pidfile",
    "keepalived.config",
    "notify.email.password_file",
    "notify.email.ca_file",
    "sync.ssh_key",
    "sync.known_hosts",
}


def example_with_every_feature(tmp_path: Path) -> Config:
    """config/lbwatch.toml with its commented-out paths switched on, read by lbwatch's own
    loader."""
    text = EXAMPLE.read_text()
    for key in OPTIONAL:
        text, n = re.subn(rf'^# ({key} = "/)', r"\1", text, flags=re.M)
        assert n == 1, key
    path = tmp_path / "lbwatch.toml"
    path.write_text(text)
    return load(path)


def test_every_path_the_example_config_writes_is_writable_in_the_sandbox(tmp_path: Path) -> None:
    """The example config with every optional feature on (metrics textfile, config sync with
    extra files and peers, the spool and staging paths written out): each path the agent writes
    is the hand-written one, and the shipped unit lets it write there, as systemd would mount it
    (a '-' path counted as present)."""
    cfg = example_with_every_feature(tmp_path)
    assert {w.key: str(w.directory) for w in written(cfg)} == EXAMPLE_WRITES
    unit = UNIT.read_text()
    for key, directory in EXAMPLE_WRITES.items():
        seen = unitfs.access_in([unit], directory)
        assert seen.outcome == "writable", (key, seen.why)
    # Control: the textfile's directory only through the unit's own line for it.
    without = unit.replace(" -/var/lib/prometheus/node-exporter\n", "\n")
    assert without != unit
    seen = unitfs.access_in([without], EXAMPLE_WRITES["metrics.textfile"])
    assert seen.outcome == "read-only", seen


def test_every_path_the_example_comments_out_is_accounted_for() -> None:
    """Each `# KEY = "/..."` line of the example is switched on above or names a file lbwatch
    only reads: a new optional path cannot slip past the test above."""
    commented = set(re.findall(r'^# (\w+) = "/', EXAMPLE.read_text(), flags=re.M))
    assert commented == {*OPTIONAL, "password_file"}


def path_settings(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every setting of the config model whose value is a Path, by its dotted name."""
    found: set[str] = set()
    for name, info in model.model_fields.items():
        kinds = {info.annotation, *typing.get_args(info.annotation)}
        kinds |= {inner for k in list(kinds) for inner in typing.get_args(k)}
        if Path in kinds:
            found.add(prefix + name)
        for kind in kinds:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                found |= path_settings(kind, f"{prefix}{name}.")
    return found


def test_every_path_setting_is_known_as_written_or_read() -> None:
    """Each Path setting of the config model is one doctor checks against the unit or one
    lbwatch only reads: a new path setting must be placed in one or the other."""
    writes = {key for key in EXAMPLE_WRITES if "[" not in key}
    assert path_settings(Config) == writes | READ_ONLY


def test_exposure_score(tmp_path: Path) -> None:
    """The offline exposure score is at most the one the README states."""
    assert exposure(UNIT.read_text(), tmp_path) <= EXPOSURE_MAX


def test_exposure_score_would_catch_a_weaker_unit(tmp_path: Path) -> None:
    """The check above can fail: without the bounding set and syscall filter the score rises."""
    weak = "\n".join(
        line
        for line in UNIT.read_text().splitlines()
        if not line.startswith(("CapabilityBoundingSet=", "SystemCallFilter="))
    )
    assert exposure(weak, tmp_path) > EXPOSURE_MAX


# ---------------------------------------------------------------------------------------------
# The agent inside the unit's capability bounding set and syscall filter


def sandboxed(unit: Path = UNIT) -> list[str]:
    """A command prefix: the unit's ProtectKernelTunables=, CapabilityBoundingSet=,
    SystemCallFilter=, RestrictNamespaces= and NoNewPrivileges= (tests/sandbox.py), then exec."""
    return [sys.executable, str(SANDBOX), str(unit)]


def _sandbox_missing() -> str:
    if os.geteuid() != 0:
        return "runs as root, like the unit"
    if ctypes.util.find_library("seccomp") is None:
        return "needs libseccomp"
    if ctypes.util.find_library("cap") is None:
        return "needs libcap"
    return ""


needs_sandbox = pytest.mark.skipif(bool(_sandbox_missing()), reason=_sandbox_missing() or "-")
# linux/capability.h
CAP_BITS = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_FOWNER": 3,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SYS_PTRACE": 19,
}


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[Unit]:
    u = Unit(tmp_path)
    try:
        yield u
    finally:
        u.close()


@needs_sandbox
def test_the_sandbox_bites() -> None:
    """Control for the tests below: a call the unit filters out (setpriority, in @resources)
    fails inside the reproduced sandbox and works outside it."""
    outside = subprocess.run(
        ["nice", "-n", "5", "true"], capture_output=True, text=True, timeout=30, check=False
    )
    inside = subprocess.run(
        [*sandboxed(), "nice", "-n", "5", "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert outside.stderr == ""
    assert "cannot set niceness: Operation not permitted" in inside.stderr


@needs_sandbox
def test_agent_runs_in_the_sandbox(unit: Unit) -> None:
    """`lbwatch run`, as the unit's process, starts, publishes its status and exits 0 on SIGTERM
    inside the unit's bounding set and syscall filter (pidfds, inotify, the FIFO, psutil)."""
    unit.write_config()
    proc = unit.start(wrap=sandboxed())
    unit.wait_started(30)
    status = Path(f"/proc/{proc.pid}/status").read_text()
    mask = sum(1 << CAP_BITS[c] for c in one(UNIT.read_text(), "CapabilityBoundingSet").split())
    assert f"CapBnd:\t{mask:016x}\n" in status
    assert "Seccomp:\t2\n" in status  # a filter is installed
    nofile = one(UNIT.read_text(), "LimitNOFILE")
    limits = Path(f"/proc/{proc.pid}/limits").read_text()
    assert re.search(rf"^Max open files\s+{nofile}\s+{nofile}\s", limits, re.M), limits
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert "Traceback" not in unit.text()


HAPROXY_CFG = (
    "global\n    maxconn 100000\n    ulimit-n 300000\n    nbthread 2\n"
    "    cpu-map auto:1/1-2 0-1\n"
    "defaults\n    mode http\n    timeout connect 1s\n    timeout client 1s\n"
    "    timeout server 1s\n"
    "frontend f\n    bind 127.0.0.1:8080\n    http-request deny if { path_reg ^/adm[i]n }\n"
    "    default_backend b\n"
    "backend b\n    server s 127.0.0.1:9\n"
)


@needs_sandbox
@needs("haproxy")
def test_haproxy_check_runs_in_the_sandbox(tmp_path: Path) -> None:
    """`haproxy -c` (what config sync runs) accepts a config with a regex, resource limits and
    CPU pinning inside the sandbox, under the unit's descriptor limit."""
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG)
    proc = subprocess.run(
        [*sandboxed(), "haproxy", "-c", "-f", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


CONFINED_CHECK = """
import sys
from pathlib import Path
from lbwatch.config import Config
from lbwatch.sync.confine import confine_for
cfg = Path(sys.argv[1])
out = confine_for(Config(), cfg, [cfg]).check(["haproxy", "-c", "-f", "{file}"], cfg,
                                              {cfg: cfg.read_bytes()}, 30)
print(out.message)
sys.exit(0 if out.ok else 1)
"""


@needs_sandbox
@needs("haproxy", "bwrap")
def test_confined_check_runs_in_the_sandbox(tmp_path: Path) -> None:
    """The check of a peer's version, confined (setpriv to haproxy's user, bubblewrap's
    namespaces and mounts), runs inside the unit's bounding set, syscall filter and namespace
    restriction; under the unit as it was before (no CAP_SETUID, no namespaces, no @mount), the
    same check cannot run: each of those lines is needed."""
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG)
    argv = [sys.executable, "-c", CONFINED_CHECK, str(cfg)]
    ok = subprocess.run(
        [*sandboxed(), *argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    before = (
        UNIT.read_text()
        .replace(" CAP_SETGID CAP_SETUID", "")
        .replace("SystemCallFilter=@system-service @mount", "SystemCallFilter=@system-service")
    )
    for line in before.splitlines():
        if line.startswith("RestrictNamespaces="):
            before = before.replace(line, "RestrictNamespaces=yes")
    old = tmp_path / "old.service"
    old.write_text(before)
    refused = subprocess.run(
        [*sandboxed(old), *argv], capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode != 0
    assert "the confined check could not run" in refused.stdout, refused.stdout + refused.stderr


TUNABLES = """
import os, sys
for path in sys.argv[1:]:
    if os.path.exists(path):
        print(path, "ro" if os.statvfs(path).f_flag & os.ST_RDONLY else "rw")
with open("/proc/kallsyms", "rb") as f:
    print("/proc/kallsyms", len(f.read(4096)))
"""
KERNEL_TUNABLES = ["/proc/sys", "/proc/sys/user", "/proc/sysrq-trigger", "/proc/irq", "/sys"]


@needs_sandbox
def test_kernel_tunables_are_read_only_in_the_sandbox() -> None:
    """ProtectKernelTunables= as reproduced: /proc/sys, /proc/sysrq-trigger, /proc/irq and /sys
    read-only, /proc/kallsyms empty. Outside, as root, /proc/sys is writable and kallsyms has
    the kernel's symbols: the probe can tell."""
    argv = [sys.executable, "-c", TUNABLES, *KERNEL_TUNABLES]
    outside = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    inside = subprocess.run(
        [*sandboxed(), *argv], capture_output=True, text=True, timeout=30, check=True
    )
    assert "/proc/sys rw" in outside.stdout and "/proc/kallsyms 0" not in outside.stdout
    said = dict(line.rsplit(" ", 1) for line in inside.stdout.splitlines())
    assert said.pop("/proc/kallsyms") == "0", inside.stdout
    assert set(said.values()) == {"ro"} and {"/proc/sys", "/sys"} <= said.keys(), inside.stdout


BWRAP = [
    "setpriv",
    "--reuid=haproxy",
    "--regid=haproxy",
    "--init-groups",
    "--no-new-privs",
    "--inh-caps=-all",
    "--",
    "bwrap",
    "--unshare-user",
    "--unshare-pid",
    "--unshare-net",
    "--ro-bind",
    "/",
    "/",
    "--dev",
    "/dev",
    "--proc",
    "/proc",
]


@needs_sandbox
@needs("bwrap", "setpriv", "haproxy")
def test_disable_userns_cannot_work_under_the_unit() -> None:
    """Why the check does not use bubblewrap's --disable-userns (0.8): it writes
    /proc/sys/user/max_user_namespaces inside the sandbox, and under ProtectKernelTunables= (and
    in containers) /proc/sys is read-only, so bubblewrap fails, as the systemd tier saw in the
    unit itself. The same bubblewrap runs there without the option, and with it outside."""
    from lbwatch.sync.sandbox import bwrap_version

    if bwrap_version() < (0, 8):
        pytest.skip("bubblewrap before 0.8 has no --disable-userns")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)

    plain = run(*sandboxed(), *BWRAP, "--", "true")
    assert plain.returncode == 0, plain.stderr
    outside = run(*BWRAP, "--disable-userns", "--", "true")
    assert outside.returncode == 0, outside.stderr
    inside = run(*sandboxed(), *BWRAP, "--disable-userns", "--", "true")
    assert inside.returncode != 0
    said = "cannot open /proc/sys/user/max_user_namespaces: Read-only file system"
    assert said in inside.stderr, inside.stderr


RECEIVE = """
import hashlib, sys
from pathlib import Path
from lbwatch.config import Config
from lbwatch.services import run_command
from lbwatch.sync.confine import confine_for
from lbwatch.sync.fileset import FileSet
from lbwatch.sync.receive import ApplySettings, receive
from lbwatch.sync.versions import Version
from tests.fakes import Expectations
live, tmp = Path(sys.argv[1]), Path(sys.argv[2])
content = live.read_bytes().replace(b"maxconn 100000", b"maxconn 50000")
cfg = Config(agent={"state_dir": str(tmp / "state"), "run_dir": str(tmp / "run")})
staging = cfg.staging_path()
staging.mkdir(parents=True)
version = Version(live.name, "lb2", 2, 2, hashlib.sha256(content).hexdigest())
staged = staging / version.staged_name()
staged.write_bytes(content)
reload = lambda: run_command(["touch", str(tmp / "reloaded")], 10)
settings = ApplySettings(["haproxy", "-c", "-f", "{file}"], reload, 3, 30,
                         confine_for(cfg, live, [live]))
rec = receive(staged, FileSet(live), None, 0, settings, Expectations())
print(f"{rec.result}: {rec.message}")
"""


@needs_sandbox
@needs("haproxy", "bwrap", "setpriv", "prlimit", "choom")
def test_a_peers_version_is_checked_confined_and_applied_under_the_unit(tmp_path: Path) -> None:
    """A version received from a peer, through lbwatch's own receiving job run under the unit's
    restrictions (ProtectKernelTunables= among them: /proc/sys read-only, as in the unit and in
    containers), passes the confined check and is installed and reloaded."""
    etc = tmp_path / "etc"
    etc.mkdir()
    live = etc / "haproxy.cfg"
    live.write_text(HAPROXY_CFG)
    argv = [sys.executable, "-c", RECEIVE, str(live), str(tmp_path)]
    done = subprocess.run(
        [*sandboxed(), *argv], capture_output=True, text=True, timeout=60, check=False, cwd=REPO
    )
    assert done.stdout.startswith("applied"), done.stdout + done.stderr
    assert "maxconn 50000" in live.read_text() and (tmp_path / "reloaded").exists()


NESTED = """
import sys
from pathlib import Path
from lbwatch.config import Config
from lbwatch.sync.confine import confine_for
cfg = Path(sys.argv[1])
settings = confine_for(Config(), cfg, [cfg]).sandbox
from lbwatch.sync import sandbox
out = sandbox.check(["unshare", "--user", "true"], cfg, {cfg: cfg.read_bytes()}, settings, 30)
print(out.outcome.value, out.output.strip())
"""


@needs_sandbox
@needs("haproxy", "bwrap", "setpriv", "prlimit", "choom", "unshare")
def test_the_check_makes_no_user_namespace_under_the_unit(tmp_path: Path) -> None:
    """The unit lets lbwatch make user namespaces (RestrictNamespaces= names user, for
    bubblewrap); code run in the confined check still cannot make one of its own there."""
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG)
    done = subprocess.run(
        [*sandboxed(), sys.executable, "-c", NESTED, str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    said = "unshare failed: Operation not permitted"
    assert done.stdout.startswith("failed ") and said in done.stdout, done.stdout + done.stderr


# prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN) (Linux >= 6.3): the kernel's own form of what
# MemoryDenyWriteExecute= enforces with seccomp, inherited across execve.
MDWE_EXEC = (
    "import ctypes, os, sys; libc = ctypes.CDLL(None, use_errno=True); "
    "sys.exit(97) if libc.prctl(65, 1, 0, 0, 0) else os.execvp(sys.argv[1], sys.argv[1:])"
)


@needs("haproxy")
def test_why_no_memory_deny_write_execute(tmp_path: Path) -> None:
    """Debian's haproxy JIT-compiles regexes (PCRE2): with writable memory never made executable,
    `haproxy -c` rejects the config above, so the unit must not set MemoryDenyWriteExecute=."""
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(HAPROXY_CFG)
    argv = ["haproxy", "-c", "-f", str(cfg)]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    wxorx = subprocess.run(
        [sys.executable, "-c", MDWE_EXEC, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if wxorx.returncode == 97:
        pytest.skip("the kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert wxorx.returncode != 0
    assert "jit compilation failed" in wxorx.stdout + wxorx.stderr


@needs_sandbox
def test_install_keeps_owner_and_mode_in_the_sandbox(tmp_path: Path) -> None:
    """Config sync's install replaces a file owned by another user, in a directory owned by
    that user, and the new file keeps owner, group and mode (CAP_CHOWN, CAP_FOWNER,
    CAP_DAC_OVERRIDE)."""
    tmp_path.chmod(0o755)
    etc = tmp_path / "haproxy"
    etc.mkdir(mode=0o750)
    live = etc / "haproxy.cfg"
    live.write_text("old\n")
    for p in (etc, live):
        os.chown(p, 65534, 65534)
    live.chmod(0o640)
    code = (
        "import sys; from pathlib import Path; from lbwatch.sync.install import install; "
        "install(b'new\\n', Path(sys.argv[1]), keep=2)"
    )
    proc = subprocess.run(
        [*sandboxed(), sys.executable, "-c", code, str(live)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    st = live.stat()
    assert (live.read_text(), st.st_uid, st.st_gid, st.st_mode & 0o777) == (
        "new\n",
        65534,
        65534,
        0o640,
    )
